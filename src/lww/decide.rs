//! Last-writer-wins for a run of rows: which incoming versions win on the target, the
//! losers recorded as conflicts, and repairs that tell the peer the winner.
//!
//! In: the candidates of a run (one final version per key). Upserts decide in the
//! statement that writes them (`writer/statements`); [`TargetWriter::decide`] is one
//! set-based statement for the deletes and for the upserts that statement did not
//! write, telling why. After the winners are written, [`TargetWriter::settle`]
//! removes inserted rows that a local delete, committed meanwhile, made older than
//! their tombstone. Out: for every key whose incoming version lost, a conflict row and,
//! when the peer receives from this node, a row in `duplex.repairs` holding this node's
//! winner, written in the apply transaction. The reader publishes repairs although the
//! apply session's origin hides everything else, and the peer applies them like any
//! change: so the node holding the loser always learns the winner, whatever the
//! interleaving of local writes and applied ones.

use super::{Kind, TargetWriter, WriteError};
use crate::config::TableConfig;
use crate::event::ChangeEvent;
use crate::pg::table::TargetTable;
use std::borrow::Cow;
use tokio_postgres::types::ToSql;

/// An event's final version of a key in a run.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    /// Index of the event in the slice being applied.
    pub index: usize,
    pub kind: Kind,
    /// Key values as text, in the target's key order.
    pub key: Vec<String>,
    /// `updated_at` text (the delete time for a delete).
    pub ts: Option<String>,
    /// A later event of the same key in the batch carried a lower version: the source
    /// ended on that one, so it must be told the winner.
    pub repair: bool,
}

impl Candidate {
    /// Folds in `later`, the next event of the same key in stream order: the higher
    /// version stays. A source's versions need not rise in commit order (clients
    /// stamp `updated_at`, and a repair may carry a version the source has passed).
    pub fn supersede(&mut self, later: Candidate) {
        if later.outranks(self) {
            *self = later;
        } else {
            self.repair = true;
        }
    }

    /// At least as high as `earlier` in the version order: newer `updated_at`; at the
    /// same time a delete over a row, else the later event. Versions that cannot be
    /// compared go by stream order.
    fn outranks(&self, earlier: &Candidate) -> bool {
        let (Some(new), Some(old)) = (
            self.ts.as_deref().and_then(sortable_ts),
            earlier.ts.as_deref().and_then(sortable_ts),
        ) else {
            return true;
        };
        new > old || (new == old && !(earlier.kind == Kind::Delete && self.kind != Kind::Delete))
    }
}

/// A timestamp as PostgreSQL prints it under duplex's session settings (ISO, UTC),
/// `2026-11-23 18:09:00.1234+00` (`timestamptz`) or without the offset (`timestamp`),
/// made comparable as text: the fraction padded to microseconds, the UTC offset
/// dropped. `None` for anything else (BC dates, other offsets, infinity).
fn sortable_ts(ts: &str) -> Option<String> {
    let ts = ts.strip_suffix("+00").unwrap_or(ts);
    let (whole, frac) = ts.split_once('.').unwrap_or((ts, ""));
    let b = whole.as_bytes();
    let shape = b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        });
    if !shape || frac.len() > 6 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{whole}.{frac:0<6}"))
}

/// What the target says of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Newer than the target's row and tombstone: write it.
    Apply,
    /// The target's row is newer (or equal, and the target wins ties).
    Older,
    /// The target's tombstone is as new or newer.
    Tombstone,
    /// `updated_at` is NULL: cannot be ordered.
    NullTs,
    /// `updated_at` is further ahead than `max_future_skew_ms`.
    Future,
}

impl Verdict {
    fn parse(s: &str) -> Option<Verdict> {
        Some(match s {
            "apply" => Verdict::Apply,
            "older" => Verdict::Older,
            "tombstone" => Verdict::Tombstone,
            "null_ts" => Verdict::NullTs,
            "future" => Verdict::Future,
            _ => return None,
        })
    }
}

/// The target's answer for one candidate.
#[derive(Debug, Clone)]
pub(super) struct Decision {
    pub verdict: Verdict,
    /// The target's `updated_at` text, when it has the row.
    pub local_ts: Option<String>,
}

/// How an incoming version lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    KeptLocal,
    DroppedOlderThanTombstone,
}

impl Resolution {
    fn as_str(self) -> &'static str {
        match self {
            Resolution::KeptLocal => "kept_local",
            Resolution::DroppedOlderThanTombstone => "dropped_older_than_tombstone",
        }
    }
}

/// A candidate that lost, with the target's version.
#[derive(Debug, Clone)]
pub(super) struct Lost {
    pub candidate: Candidate,
    pub local_ts: Option<String>,
    pub resolution: Resolution,
}

/// Key columns as parameters `$1..$n`: one text array per key column.
pub(super) fn key_arrays<'k>(
    key_len: usize,
    keys: impl Iterator<Item = &'k Vec<String>>,
) -> Vec<Vec<&'k str>> {
    let mut arrays: Vec<Vec<&str>> = vec![Vec::new(); key_len];
    for key in keys {
        for (n, v) in key.iter().enumerate() {
            arrays[n].push(v);
        }
    }
    arrays
}

pub(super) fn params<'p>(arrays: &'p [Vec<&str>]) -> Vec<&'p (dyn ToSql + Sync)> {
    arrays.iter().map(|k| k as &(dyn ToSql + Sync)).collect()
}

impl TargetWriter<'_> {
    /// The target's decision for each candidate, in order.
    pub(super) async fn decide(
        &self,
        table: &TargetTable,
        rows: &[Candidate],
        tc: Option<&TableConfig>,
    ) -> Result<Vec<Decision>, WriteError> {
        let keys = key_arrays(table.key.len(), rows.iter().map(|c| &c.key));
        let ts: Vec<Option<&str>> = rows.iter().map(|c| c.ts.as_deref()).collect();
        let skew = tc.and_then(|t| t.max_future_skew_ms).map(|v| v as i64);
        let mut p = params(&keys);
        p.push(&ts);
        p.push(&table.name);
        p.push(&self.incoming_wins_ties);
        p.push(&skew);
        let deletes: Vec<bool> = rows.iter().map(|c| c.kind == Kind::Delete).collect();
        p.push(&deletes);
        p.push(&self.dir.from);
        let context = format!("comparing versions in {}", table.name);
        let result = self
            .query_prepared(table.decide_sql(), &p, &context)
            .await?;
        result
            .iter()
            .map(|r| {
                let verdict: String = r.get(3);
                Ok(Decision {
                    verdict: Verdict::parse(&verdict).ok_or_else(|| WriteError::Internal {
                        node: self.dir.to.clone(),
                        detail: format!("unknown verdict {verdict:?} for {}", table.name),
                    })?,
                    local_ts: r.get(1),
                })
            })
            .collect()
    }

    /// Removes rows just written for `written` whose key a local delete tombstoned
    /// at the same time or later while the upsert waited for it (the delete removed
    /// the row the decision saw, so the upsert inserted); returns them as lost.
    pub(super) async fn settle(
        &self,
        table: &TargetTable,
        written: &[Candidate],
    ) -> Result<Vec<Lost>, WriteError> {
        if written.is_empty() {
            return Ok(Vec::new());
        }
        let keys = key_arrays(table.key.len(), written.iter().map(|c| &c.key));
        let ts: Vec<Option<&str>> = written.iter().map(|c| c.ts.as_deref()).collect();
        let mut p = params(&keys);
        p.push(&table.name);
        p.push(&ts);
        p.push(&self.dir.from);
        let context = format!("checking tombstones in {}", table.name);
        let rows = self
            .query_prepared(table.settle_sql(), &p, &context)
            .await?;
        let n = table.key.len();
        Ok(rows
            .iter()
            .filter_map(|r| {
                let key: Vec<String> = (0..n).map(|i| r.get(i)).collect();
                let candidate = written.iter().find(|c| c.key == key)?.clone();
                Some(Lost {
                    candidate,
                    local_ts: r.get(n),
                    resolution: Resolution::DroppedOlderThanTombstone,
                })
            })
            .collect())
    }

    /// Records the losers in `duplex.conflicts` and repairs their keys.
    pub(super) async fn record_losers(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        lost: &[Lost],
    ) -> Result<(), WriteError> {
        if lost.is_empty() {
            return Ok(());
        }
        self.record_conflicts(events, table, lost).await?;
        // A delete that meets a tombstone finds the key deleted already: nothing to
        // tell the peer (and re-sending equal tombstones back and forth never ends),
        // unless the source ended the batch on a lower version of the key.
        let keys = lost
            .iter()
            .filter(|l| {
                l.candidate.repair
                    || !(l.candidate.kind == Kind::Delete
                        && l.resolution == Resolution::DroppedOlderThanTombstone)
            })
            .map(|l| l.candidate.key.clone())
            .collect();
        self.repair(table, keys).await
    }

    /// When the peer receives from this node, writes repairs carrying this node's
    /// current version of each of `keys`.
    pub(super) async fn repair(
        &self,
        table: &TargetTable,
        keys: Vec<Vec<String>>,
    ) -> Result<(), WriteError> {
        if !self.peer_receives || keys.is_empty() {
            return Ok(());
        }
        let keys = key_arrays(table.key.len(), keys.iter());
        let mut p = params(&keys);
        p.push(&table.name);
        p.push(&self.dir.from);
        let repaired = self
            .client
            .execute(&table.repair_sql(), &p)
            .await
            .map_err(self.sql(&format!("writing repairs for {}", table.name)))?;
        if let Some(t) = self.metrics.table(&table.label) {
            t.repairs.increment(repaired);
        }
        Ok(())
    }

    async fn record_conflicts(
        &self,
        events: &[Cow<'_, ChangeEvent>],
        table: &TargetTable,
        lost: &[Lost],
    ) -> Result<(), WriteError> {
        let keys: Vec<String> = lost
            .iter()
            .map(|l| serde_json::to_string(&l.candidate.key).unwrap_or_default())
            .collect();
        let local: Vec<Option<&str>> = lost.iter().map(|l| l.local_ts.as_deref()).collect();
        let incoming: Vec<Option<&str>> = lost.iter().map(|l| l.candidate.ts.as_deref()).collect();
        let resolution: Vec<&str> = lost.iter().map(|l| l.resolution.as_str()).collect();
        let position: Vec<String> = lost
            .iter()
            .map(|l| events[l.candidate.index].position().to_string())
            .collect();
        let ops: Vec<&str> = lost
            .iter()
            .map(|l| match l.candidate.kind {
                Kind::Delete => "delete",
                _ => "upsert",
            })
            .collect();
        self.client
            .execute(
                "INSERT INTO duplex.conflicts (table_name, key, op, local_updated_at, incoming_updated_at, incoming_node, incoming_position, resolution)
                 SELECT $1, k::jsonb, o, l, i, $3, p, r
                 FROM unnest($2::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) AS u(o, k, l, i, p, r)",
                &[&table.name, &ops, &self.dir.from, &keys, &local, &incoming, &position, &resolution],
            )
            .await
            .map_err(self.sql("recording conflicts"))?;
        if let Some(t) = self.metrics.table(&table.label) {
            for r in &resolution {
                if let Some(c) = t.conflicts(r) {
                    c.increment(1);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resolution_has_a_conflict_series() {
        for r in [Resolution::KeptLocal, Resolution::DroppedOlderThanTombstone] {
            assert!(
                crate::metrics::CONFLICT_RESOLUTIONS.contains(&r.as_str()),
                "{}",
                r.as_str()
            );
        }
    }

    #[test]
    fn verdicts_parse_strictly() {
        assert_eq!(Verdict::parse("apply"), Some(Verdict::Apply));
        assert_eq!(Verdict::parse("tombstone"), Some(Verdict::Tombstone));
        assert_eq!(Verdict::parse("future"), Some(Verdict::Future));
        assert_eq!(Verdict::parse("Apply"), None);
        assert_eq!(Verdict::parse(""), None);
    }

    fn cand(index: usize, kind: Kind, ts: &str) -> Candidate {
        Candidate {
            index,
            kind,
            key: vec!["1".into()],
            ts: Some(ts.into()),
            repair: false,
        }
    }

    #[test]
    fn timestamps_compare_as_postgresql_orders_them() {
        let t = |s| sortable_ts(s).unwrap();
        assert!(t("2026-11-30 04:57:48.65+00") < t("2026-11-30 04:57:48.652675+00"));
        assert!(t("2026-11-30 04:57:48+00") < t("2026-11-30 04:57:48.000001+00"));
        assert_eq!(
            t("2026-11-30 04:57:48.5"),
            t("2026-11-30 04:57:48.500000+00")
        );
        assert!(t("2026-11-30 04:57:48.9") < t("2026-11-30 04:57:49"));
        for odd in [
            "infinity",
            "0044-03-15 12:00:00 BC",
            "2026-11-30 04:57:48+02",
            "",
        ] {
            assert_eq!(sortable_ts(odd), None, "{odd}");
        }
    }

    #[test]
    fn the_highest_version_of_a_key_goes_on_and_a_lower_last_one_asks_for_a_repair() {
        // Later and higher: replaces.
        let mut c = cand(0, Kind::Upsert, "2026-11-30 04:00:00.1+00");
        c.supersede(cand(1, Kind::Upsert, "2026-11-30 04:00:00.2+00"));
        assert_eq!((c.index, c.repair), (1, false));
        // Later but lower (a client's stale stamp, a stale repair): kept, repaired.
        c.supersede(cand(2, Kind::Delete, "2026-11-30 04:00:00.15+00"));
        assert_eq!((c.index, c.repair), (1, true));
        // Then higher again: the source ends on the winner, no repair needed.
        c.supersede(cand(3, Kind::Upsert, "2026-11-30 04:00:00.3+00"));
        assert_eq!((c.index, c.repair), (3, false));
        // Same time: a delete beats a row, a row does not beat a delete.
        c.supersede(cand(4, Kind::Delete, "2026-11-30 04:00:00.3+00"));
        assert_eq!(c.index, 4);
        c.supersede(cand(5, Kind::Upsert, "2026-11-30 04:00:00.3+00"));
        assert_eq!((c.index, c.repair), (4, true));
        // Versions that cannot be compared go by stream order.
        c.supersede(cand(6, Kind::Upsert, "infinity"));
        assert_eq!(c.index, 6);
    }

    #[test]
    fn keys_become_one_array_per_column() {
        let a = vec!["1".to_string(), "x".to_string()];
        let b = vec!["2".to_string(), "y".to_string()];
        assert_eq!(
            key_arrays(2, [&a, &b].into_iter()),
            vec![vec!["1", "2"], vec!["x", "y"]]
        );
    }
}
