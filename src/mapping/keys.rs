//! Key pairings of mapped tables on one node (`duplex.key_pairs`): which key a row has
//! on each node. Each node's pairings are written by the one applier into that node,
//! inside its transaction, so a pairing commits with the row it was made for; the
//! reader publishes them (they are not echoes), and the peer's applier learns them
//! before any later change that uses them, since both travel on one topic in commit
//! order.

use crate::pg::node::describe;
use std::collections::HashMap;
use tokio_postgres::Client;

/// A failed statement on the pairing table.
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {context}: {}", describe(source))]
pub struct PairingError {
    pub node: String,
    pub context: String,
    #[source]
    pub source: tokio_postgres::Error,
}

/// The pairing table of the target node, seen from one direction.
pub(crate) struct Pairings<'c> {
    pub client: &'c Client,
    pub node: &'c str,
    /// The target is the node whose name sorts first: its keys are in `key_a`.
    pub target_is_a: bool,
}

impl Pairings<'_> {
    fn err(&self, context: &str) -> impl FnOnce(tokio_postgres::Error) -> PairingError {
        let (node, context) = (self.node.to_string(), context.to_string());
        move |source| PairingError {
            node,
            context,
            source,
        }
    }

    fn columns(&self) -> (&'static str, &'static str) {
        if self.target_is_a {
            ("key_b", "key_a")
        } else {
            ("key_a", "key_b")
        }
    }

    /// The target keys paired with these source keys of `table`.
    pub async fn lookup(
        &self,
        table: &str,
        source_keys: &[String],
    ) -> Result<HashMap<String, String>, PairingError> {
        if source_keys.is_empty() {
            return Ok(HashMap::new());
        }
        let (src, dst) = self.columns();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {src}, {dst} FROM duplex.key_pairs
                     WHERE table_name = $1 AND {src} = ANY($2)"
                ),
                &[&table, &source_keys],
            )
            .await
            .map_err(self.err(&format!("reading the key pairings of {table}")))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Records new (source key, target key) pairs of `table`. A pair already known
    /// (learned from the peer meanwhile) is left as it is.
    pub async fn insert(
        &self,
        table: &str,
        pairs: &[(String, String)],
    ) -> Result<(), PairingError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let (src, dst) = self.columns();
        let sources: Vec<&str> = pairs.iter().map(|(s, _)| s.as_str()).collect();
        let targets: Vec<&str> = pairs.iter().map(|(_, t)| t.as_str()).collect();
        self.client
            .execute(
                &format!(
                    "INSERT INTO duplex.key_pairs (table_name, {src}, {dst})
                     SELECT $1, s, t FROM unnest($2::text[], $3::text[]) AS p(s, t)
                     ON CONFLICT DO NOTHING"
                ),
                &[&table, &sources, &targets],
            )
            .await
            .map_err(self.err(&format!("recording key pairings of {table}")))?;
        Ok(())
    }

    /// Stores pairings the peer made, as (table, key_a, key_b). One that contradicts a
    /// pairing here (the same key paired with another) keeps the local one: that is
    /// the pairing this node's rows were written under.
    pub async fn learn(&self, rows: &[(String, String, String)]) -> Result<u64, PairingError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let t: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let a: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let b: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        self.client
            .execute(
                "INSERT INTO duplex.key_pairs (table_name, key_a, key_b)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                 ON CONFLICT DO NOTHING",
                &[&t, &a, &b],
            )
            .await
            .map_err(self.err("storing key pairings learned from the peer"))
    }
}
