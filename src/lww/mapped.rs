//! Mapped tables in the writer: a readied batch in the source's schema becomes one
//! in the target's (see `mapping/`), inside the open transaction, before
//! last-writer-wins decides. Unmapped tables pass through untouched.

use super::{DeleteTimes, DeletedKey};
use super::{TargetWriter, WriteError};
use crate::event::ChangeEvent;
use crate::mapping::owed::OwedSource;
use crate::mapping::Outcome;
use std::borrow::Cow;

/// A batch in the target's schema, and the events that could not be mapped, with why.
pub struct MappedBatch<'e> {
    pub events: Vec<Cow<'e, ChangeEvent>>,
    pub deleted: DeleteTimes,
    pub bad: Vec<(ChangeEvent, String)>,
}

impl TargetWriter<'_> {
    /// SQL pruning the target's key pairings of rows long gone (empty without mapped
    /// tables).
    pub fn pairing_prune_sql(&self, retention_ms: u64) -> String {
        self.mapper.prune_sql(retention_ms)
    }

    /// Maps `events` (and the delete times they carry) into the target's schema.
    pub async fn map<'e>(
        &self,
        events: Vec<Cow<'e, ChangeEvent>>,
        deleted: DeleteTimes,
    ) -> Result<MappedBatch<'e>, WriteError> {
        if self.mapper.is_empty() {
            return Ok(MappedBatch {
                events,
                deleted,
                bad: Vec::new(),
            });
        }
        let keys: Vec<DeletedKey> = deleted.keys().cloned().collect();
        let mapped = self.mapper.map_batch(&self.client, &events, &keys).await?;
        let mut out = MappedBatch {
            events: Vec::with_capacity(events.len()),
            deleted: deleted.remap(&mapped.deleted_keys, |t| self.mapper.target_of(t)),
            bad: Vec::new(),
        };
        for (ev, outcome) in events.into_iter().zip(mapped.outcomes) {
            match outcome {
                Outcome::Keep => out.events.push(ev),
                Outcome::Mapped(m) => out.events.push(Cow::Owned(*m)),
                Outcome::Drop => {}
                Outcome::Bad(reason) => out.bad.push((ev.into_owned(), reason)),
            }
        }
        Ok(out)
    }
}

impl TargetWriter<'_> {
    /// A page of a mapped pair's owed values read from the source, as rows of
    /// (source key, value, `updated_at`), in the target's terms (see
    /// `mapping::owed`): rows not on the target left out.
    pub(super) async fn owed_in_target_terms(
        &self,
        src: &OwedSource,
        page: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<Vec<Option<String>>>, WriteError> {
        let rows = page
            .into_iter()
            .filter_map(|r| match r.as_slice() {
                [Some(k), v, u] => Some((k.clone(), v.clone(), u.clone())),
                _ => None,
            })
            .collect();
        let rows = self.mapper.owed_rows(&self.client, src, rows).await?;
        Ok(rows
            .into_iter()
            .map(|(k, v, u)| vec![Some(k), v, u])
            .collect())
    }
}
