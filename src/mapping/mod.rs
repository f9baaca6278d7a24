//! Mapped tables: a table pair whose schema differs between the nodes (the legacy
//! integer-key schema and its modern UUID schema). Events on a node's topic keep that
//! node's schema; the applier into the other node maps each batch here, after
//! `apply::batch` readied it and before the writer decides last-writer-wins:
//!
//! `events (source schema) → learn the peer's key pairings → pair every key (lookup,
//! else derive a UUIDv5, match a natural key, or take the target's sequence) →
//! translate foreign keys through the referenced table's pairings (waiting a bounded
//! time for one still in flight) → rename and convert columns → events (target schema)`.
//!
//! Pairings are written in the batch's transaction (see [`keys`]), so a row and its
//! pairing commit together and exactly once. A value that cannot be converted, or a
//! reference still unpaired after `sync.reference_wait_ms`, makes its event bad (halt
//! or dead letter): nothing is written with a wrong or NULL reference.

pub mod check;
pub mod convert;
pub(crate) mod keys;
pub mod owed;
mod pair;
mod pairing;

use crate::config::{Config, Direction};
use crate::event::{ChangeEvent, Op, Row, Value, KEY_PAIRS};
use crate::pg::error::SqlError;
use crate::pg::node::sql_class;
use crate::pg::sql::{quote_ident, quote_literal};
use crate::{Classify, ErrorClass};
use keys::{PairingError, Pairings};
pub use pair::PairMap;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How often an unpaired reference is looked up again while it waits.
const REFERENCE_RECHECK: Duration = Duration::from_millis(200);

/// Errors mapping a batch: the target's catalog or pairing table could not be read
/// or written, or a mapped table does not fit its config.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(transparent)]
    Pairing(#[from] PairingError),
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("mapped table {table} on node {node}: {detail}")]
    Config {
        table: String,
        node: String,
        detail: String,
    },
}

impl Classify for MapError {
    fn class(&self) -> ErrorClass {
        match self {
            MapError::Pairing(e) => sql_class(&e.source),
            MapError::Sql(e) => e.class(),
            MapError::Config { .. } => ErrorClass::Definite,
        }
    }
}

/// What became of one event of the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Not a mapped table: written as it is.
    Keep,
    /// The event in the target's schema.
    Mapped(Box<ChangeEvent>),
    /// Nothing to write (a pairing learned; a delete of a row never paired here).
    Drop,
    /// The event cannot be written, and why.
    Bad(String),
}

/// A mapped batch: an outcome per event, and the target's (table, key) for each
/// source (table, key) the batch's tombstones name.
#[derive(Debug, Default)]
pub struct Mapped {
    pub outcomes: Vec<Outcome>,
    pub deleted_keys: HashMap<(String, Vec<String>), (String, Vec<String>)>,
}

/// One direction's mapped tables.
pub struct Mapper {
    pairs: Vec<PairMap>,
    target: String,
    target_is_a: bool,
    reference_wait: Duration,
}

impl Mapper {
    /// Reads the target's catalog for every mapped table of `cfg`.
    pub async fn load(cfg: &Config, dir: &Direction, target: &Client) -> Result<Mapper, MapError> {
        let mut pairs = Vec::new();
        for tc in cfg.tables.iter().filter(|t| t.is_mapped()) {
            pairs.push(PairMap::load(tc, dir, target).await?);
        }
        Ok(Mapper {
            pairs,
            target: dir.to.clone(),
            target_is_a: cfg.nodes.keys().next() == Some(&dir.to),
            reference_wait: Duration::from_millis(cfg.sync.reference_wait_ms),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Prunes the target's pairings of rows that are gone and whose tombstone has
    /// been pruned (run after the tombstones are): until then a late change of the
    /// key must find its row's pairing, and so its tombstone.
    pub fn prune_sql(&self, retention_ms: u64) -> String {
        let mine = if self.target_is_a { "key_a" } else { "key_b" };
        self.pairs
            .iter()
            .map(|p| {
                let (schema, table) = p.target_table.split_once('.').unwrap_or(("public", &p.target_table));
                format!(
                    "DELETE FROM duplex.key_pairs kp WHERE kp.table_name = {label}
                       AND kp.paired_at < now() - {retention_ms} * interval '1 millisecond'
                       AND NOT EXISTS (SELECT 1 FROM {t} r WHERE r.{k}::text = kp.{mine})
                       AND NOT EXISTS (SELECT 1 FROM duplex.tombstones tb WHERE tb.table_name = {name}
                                       AND tb.key = jsonb_build_array(kp.{mine}));",
                    label = quote_literal(&p.label),
                    t = format_args!("{}.{}", quote_ident(schema), quote_ident(table)),
                    k = quote_ident(&p.target_key),
                    name = quote_literal(&p.target_table),
                )
            })
            .collect()
    }

    /// The target table of a mapped source table (`schema.table`).
    pub fn target_of(&self, source_table: &str) -> Option<String> {
        self.pairs
            .iter()
            .find(|p| p.source_table == source_table)
            .map(|p| p.target_table.clone())
    }

    /// (referenced table label, source key) of every non-NULL reference of `ev`.
    pub fn references_of(&self, ev: &ChangeEvent) -> Vec<(String, String)> {
        self.pair_of(ev).map_or_else(Vec::new, |p| {
            p.references_of(ev)
                .into_iter()
                .map(|(label, k)| (label.to_string(), k))
                .collect()
        })
    }

    /// The references `events` make to rows that have no pairing on the target and
    /// are not among `events` themselves, as referenced table label → source keys.
    /// A copy takes those rows along (see `snapshot/mapped`): no pairing comes for
    /// them while it runs, since the stream is applied after it.
    pub async fn unpaired_references(
        &self,
        client: &Client,
        events: &[ChangeEvent],
    ) -> Result<HashMap<String, HashSet<String>>, MapError> {
        let pairings = Pairings {
            client,
            node: &self.target,
            target_is_a: self.target_is_a,
        };
        let mut present: HashSet<(&str, String)> = HashSet::new();
        for ev in events.iter().filter(|e| e.op != Op::Delete) {
            if let Some((p, k)) = self
                .pair_of(ev)
                .and_then(|p| Some((p, p.source_key_of(ev)?)))
            {
                present.insert((p.label.as_str(), k));
            }
        }
        let mut wanted: HashMap<String, HashSet<String>> = HashMap::new();
        for ev in events {
            let Some(p) = self.pair_of(ev) else { continue };
            for (label, k) in p.references_of(ev) {
                if !present.contains(&(label, k.clone())) {
                    wanted.entry(label.to_string()).or_default().insert(k);
                }
            }
        }
        for (label, keys) in wanted.iter_mut() {
            let list: Vec<String> = keys.iter().cloned().collect();
            for (s, _) in pairings.lookup(label, &list).await? {
                keys.remove(&s);
            }
        }
        wanted.retain(|_, keys| !keys.is_empty());
        Ok(wanted)
    }

    /// The pair whose source table is `schema.table`.
    fn pair_of(&self, ev: &ChangeEvent) -> Option<&PairMap> {
        let name = ev.source.table_name().to_string();
        self.pairs.iter().find(|p| p.source_table == name)
    }

    /// Maps a readied batch inside the target transaction `client` has open.
    pub async fn map_batch(
        &self,
        client: &Client,
        events: &[Cow<'_, ChangeEvent>],
        deleted: &[(String, Vec<String>)],
    ) -> Result<Mapped, MapError> {
        let pairings = Pairings {
            client,
            node: &self.target,
            target_is_a: self.target_is_a,
        };
        let mut out = Mapped {
            outcomes: vec![Outcome::Keep; events.len()],
            ..Mapped::default()
        };
        let learned = self.learned(events, &mut out.outcomes);
        let local: HashMap<String, (String, String)> = self
            .pairs
            .iter()
            .map(|p| {
                (
                    p.label.clone(),
                    (p.target_table_sql(), p.target_key.clone()),
                )
            })
            .collect();
        pairings.learn(&learned, &local).await?;
        let mut known = self.lookup_all(&pairings, events, deleted).await?;
        self.pair_new_rows(&pairings, events, &mut known, &mut out.outcomes)
            .await?;
        self.await_references(&pairings, events, &mut known).await?;
        for (i, ev) in events.iter().enumerate() {
            if out.outcomes[i] != Outcome::Keep {
                continue;
            }
            if let Some(p) = self.pair_of(ev) {
                out.outcomes[i] = self.map_event(p, ev, &known);
            }
        }
        for (table, key) in deleted {
            let Some(p) = self.pairs.iter().find(|p| &p.source_table == table) else {
                continue;
            };
            if let Some(t) = key
                .first()
                .and_then(|k| known.get(&(p.label.clone(), k.clone())))
            {
                out.deleted_keys.insert(
                    (table.clone(), key.clone()),
                    (p.target_table.clone(), vec![t.clone()]),
                );
            }
        }
        Ok(out)
    }

    /// Pairings the peer made and published, as (table, key_a, key_b, made_on);
    /// their events are dropped, as are the peer's copies of pairings made here (a
    /// stale copy must not bring back a pairing this node has since released).
    fn learned(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        outcomes: &mut [Outcome],
    ) -> Vec<(String, String, String, String)> {
        let mut learned = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if (ev.source.schema.as_str(), ev.source.table.as_str()) != KEY_PAIRS {
                continue;
            }
            outcomes[i] = Outcome::Drop;
            // Inserted where it was made, or touched again there by the republisher.
            let Some(row) = ev
                .after
                .as_ref()
                .filter(|_| matches!(ev.op, Op::Insert | Op::Update))
            else {
                continue;
            };
            if let (Some(t), Some(a), Some(b), Some(by)) = (
                text(row, "table_name"),
                text(row, "key_a"),
                text(row, "key_b"),
                text(row, "made_on"),
            ) {
                if by != self.target {
                    // A later pairing of either key supersedes an earlier one.
                    learned.retain(|(lt, la, lb, _): &(String, String, String, String)| {
                        !(lt == t && (la == a || lb == b))
                    });
                    learned.push((t.to_string(), a.to_string(), b.to_string(), by.to_string()));
                }
            }
        }
        learned
    }

    /// Looks up every source key the batch names: its rows' keys, their references
    /// and its tombstones'. Returns (table label, source key) → target key.
    async fn lookup_all(
        &self,
        pairings: &Pairings<'_>,
        events: &[Cow<'_, ChangeEvent>],
        deleted: &[(String, Vec<String>)],
    ) -> Result<HashMap<(String, String), String>, MapError> {
        let mut wanted: HashMap<&str, HashSet<String>> = HashMap::new();
        for ev in events {
            let Some(p) = self.pair_of(ev) else { continue };
            if let Some(k) = p.source_key_of(ev) {
                wanted.entry(&p.label).or_default().insert(k);
            }
            for (label, v) in p.references_of(ev) {
                wanted.entry(label).or_default().insert(v);
            }
        }
        for (table, key) in deleted {
            if let (Some(p), Some(k)) = (
                self.pairs.iter().find(|p| &p.source_table == table),
                key.first(),
            ) {
                wanted.entry(&p.label).or_default().insert(k.clone());
            }
        }
        let mut known = HashMap::new();
        for (label, keys) in wanted {
            let keys: Vec<String> = keys.into_iter().collect();
            for (s, t) in pairings.lookup(label, &keys).await? {
                known.insert((label.to_string(), s), t);
            }
        }
        Ok(known)
    }

    /// Gives every upserted row without a pairing its target key, and records the
    /// pairings (see [`pairing::pair_new_rows`]). A row whose key cannot be made is bad.
    async fn pair_new_rows(
        &self,
        pairings: &Pairings<'_>,
        events: &[Cow<'_, ChangeEvent>],
        known: &mut HashMap<(String, String), String>,
        outcomes: &mut [Outcome],
    ) -> Result<(), MapError> {
        for p in &self.pairs {
            let mine: Vec<usize> = (0..events.len())
                .filter(|i| self.pair_of(&events[*i]).map(|q| &q.label) == Some(&p.label))
                .collect();
            pairing::pair_new_rows(p, pairings, events, &mine, known, outcomes).await?;
        }
        Ok(())
    }

    /// Waits, up to `sync.reference_wait_ms`, for references whose row is not paired
    /// on the target yet (its pairing may be in flight on the other topic).
    async fn await_references(
        &self,
        pairings: &Pairings<'_>,
        events: &[Cow<'_, ChangeEvent>],
        known: &mut HashMap<(String, String), String>,
    ) -> Result<(), MapError> {
        let deadline = Instant::now() + self.reference_wait;
        loop {
            let mut missing: HashMap<String, HashSet<String>> = HashMap::new();
            for ev in events.iter().filter(|e| e.op != Op::Delete) {
                let Some(p) = self.pair_of(ev) else { continue };
                for (label, v) in p.references_of(ev) {
                    if !known.contains_key(&(label.to_string(), v.clone())) {
                        missing.entry(label.to_string()).or_default().insert(v);
                    }
                }
            }
            if missing.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            tracing::debug!(?missing, "waiting for referenced rows to be paired");
            tokio::time::sleep(REFERENCE_RECHECK).await;
            for (label, keys) in missing {
                let keys: Vec<String> = keys.into_iter().collect();
                for (s, t) in pairings.lookup(&label, &keys).await? {
                    known.insert((label.clone(), s), t);
                }
            }
        }
    }

    /// One event in the target's schema.
    fn map_event(
        &self,
        p: &PairMap,
        ev: &ChangeEvent,
        known: &HashMap<(String, String), String>,
    ) -> Outcome {
        let Some((schema, table)) = p.target_table.split_once('.') else {
            return Outcome::Bad(format!(
                "target table {} is not schema.table",
                p.target_table
            ));
        };
        let mut out = ev.clone();
        out.source.schema = schema.to_string();
        out.source.table = table.to_string();
        out.key = vec![p.target_key.clone()];
        out.types = Arc::from([]);
        if ev.op == Op::Truncate {
            return Outcome::Mapped(Box::new(out));
        }
        let Some(source_key) = p.source_key_of(ev) else {
            return Outcome::Bad(format!("key column {} is missing or NULL", p.source_key));
        };
        let Some(target_key) = known.get(&(p.label.clone(), source_key.clone())) else {
            return match ev.op {
                // Never paired here: the row never reached this node.
                Op::Delete => Outcome::Drop,
                _ => Outcome::Bad(format!(
                    "{} key {source_key} has no key on node {}",
                    p.source_table, self.target
                )),
            };
        };
        let key_image = Row(vec![(
            p.target_key.clone(),
            Value::Text(target_key.clone()),
        )]);
        if ev.op == Op::Delete {
            out.before = Some(key_image);
            out.after = None;
            return Outcome::Mapped(Box::new(out));
        }
        let Some(after) = &ev.after else {
            return Outcome::Bad("the event has no row image".into());
        };
        let mut row = key_image;
        for (col, v) in &after.0 {
            match p.map_value(col, v, known) {
                Ok(Some((target_col, value))) => row.0.push((target_col, value)),
                Ok(None) => {}
                Err(reason) => {
                    return Outcome::Bad(format!(
                        "{} key {source_key}, column {col}: {reason}",
                        p.source_table
                    ))
                }
            }
        }
        out.before = None;
        out.after = Some(row);
        Outcome::Mapped(Box::new(out))
    }
}

/// A text column of a duplex row.
fn text<'r>(row: &'r Row, col: &str) -> Option<&'r str> {
    match row.get(col) {
        Some(Value::Text(t)) => Some(t),
        _ => None,
    }
}
