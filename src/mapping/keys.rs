//! Key pairings of mapped tables on one node (`duplex.key_pairs`): which key a row has
//! on each node. Each node's pairings are written by the one applier into that node,
//! inside its transaction, so a pairing commits with the row it was made for; the
//! reader publishes them (they are not echoes), and the peer's applier learns them
//! before any later change that uses them, since both travel on one topic in commit
//! order.

use crate::pg::node::describe;
use crate::pg::sql::quote_ident;
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
                    "INSERT INTO duplex.key_pairs (table_name, {src}, {dst}, made_on)
                     SELECT $1, s, t, $4 FROM unnest($2::text[], $3::text[]) AS p(s, t)
                     ON CONFLICT DO NOTHING"
                ),
                &[&table, &sources, &targets, &self.node],
            )
            .await
            .map_err(self.err(&format!("recording key pairings of {table}")))?;
        Ok(())
    }

    /// Stores pairings the peer made, as (table, key_a, key_b, made_on). A pairing here that
    /// contradicts one (the same key paired with another) is dropped first if its row
    /// here is gone (the entity was deleted and made again: the new pairing holds),
    /// and kept otherwise: it is the pairing this node's row was written under.
    /// `local` names each table's (quoted table, key column) on this node.
    pub async fn learn(
        &self,
        rows: &[(String, String, String, String)],
        local: &HashMap<String, (String, String)>,
    ) -> Result<u64, PairingError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mine = if self.target_is_a { "key_a" } else { "key_b" };
        for (label, (table, key)) in local {
            let of: Vec<&(String, String, String, String)> =
                rows.iter().filter(|r| &r.0 == label).collect();
            if of.is_empty() {
                continue;
            }
            let a: Vec<&str> = of.iter().map(|r| r.1.as_str()).collect();
            let b: Vec<&str> = of.iter().map(|r| r.2.as_str()).collect();
            self.client
                .execute(
                    &format!(
                        "DELETE FROM duplex.key_pairs kp USING unnest($2::text[], $3::text[]) AS l(a, b)
                         WHERE kp.table_name = $1 AND (kp.key_a = l.a) <> (kp.key_b = l.b)
                           AND NOT EXISTS (SELECT 1 FROM {table} r WHERE r.{k}::text = kp.{mine})",
                        k = quote_ident(key),
                    ),
                    &[label, &a, &b],
                )
                .await
                .map_err(self.err(&format!("replacing stale key pairings of {label}")))?;
        }
        let t: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let a: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let b: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let made_on: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
        self.client
            .execute(
                "INSERT INTO duplex.key_pairs (table_name, key_a, key_b, made_on)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                 ON CONFLICT DO NOTHING",
                &[&t, &a, &b, &made_on],
            )
            .await
            .map_err(self.err("storing key pairings learned from the peer"))
    }

    /// Drops the pairings of these target keys whose target row is gone, so that a
    /// row made again under a key it had before (a deleted entity created anew, its
    /// id derived from the same natural key) is paired with its new source key.
    pub async fn release_stale(
        &self,
        table: &str,
        target_keys: &[String],
        table_sql: &str,
        key: &str,
    ) -> Result<u64, PairingError> {
        if target_keys.is_empty() {
            return Ok(0);
        }
        let (_, dst) = self.columns();
        self.client
            .execute(
                &format!(
                    "DELETE FROM duplex.key_pairs kp WHERE kp.table_name = $1 AND kp.{dst} = ANY($2)
                       AND NOT EXISTS (SELECT 1 FROM {table_sql} r WHERE r.{k}::text = kp.{dst})",
                    k = quote_ident(key),
                ),
                &[&table, &target_keys],
            )
            .await
            .map_err(self.err(&format!("releasing stale key pairings of {table}")))
    }

    /// Drops the pairings of these target keys held by these (deleted) source keys.
    pub async fn release_sources(
        &self,
        table: &str,
        target_keys: &[String],
        source_keys: &[String],
    ) -> Result<u64, PairingError> {
        if target_keys.is_empty() || source_keys.is_empty() {
            return Ok(0);
        }
        let (src, dst) = self.columns();
        self.client
            .execute(
                &format!(
                    "DELETE FROM duplex.key_pairs WHERE table_name = $1 AND {dst} = ANY($2) AND {src} = ANY($3)"
                ),
                &[&table, &target_keys, &source_keys],
            )
            .await
            .map_err(self.err(&format!("releasing key pairings of {table}")))
    }
}
