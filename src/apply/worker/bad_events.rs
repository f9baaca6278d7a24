//! Finding and setting aside the events a target cannot take: when a batch fails on
//! a definite error, its events are written again one by one, each under a
//! savepoint, and each one that fails halts the direction or goes to the dead-letter
//! queue (`sync.on_error`). The rest of the batch commits as usual.

use super::{Held, Worker};
use crate::apply::dead_letter::DeadLetter;
use crate::apply::error::{ApplyError, HaltingEvent};
use crate::config::OnError;
use crate::event::ChangeEvent;
use crate::lww::DeleteTimes;
use crate::lww::WriteError;
use crate::{Classify, ErrorClass};
use std::borrow::Cow;

impl Worker<'_> {
    /// Applies events singly, each under its own savepoint, to find the bad ones.
    pub(super) async fn one_by_one(
        &mut self,
        pending: &[Held],
        events: &[Cow<'_, ChangeEvent>],
        deleted: &DeleteTimes,
    ) -> Result<(), ApplyError> {
        for ev in events {
            self.writer.execute("SAVEPOINT one", "savepoint").await?;
            let p = pending_of(pending, ev);
            match self.writer.apply(std::slice::from_ref(ev), deleted).await {
                Ok(applied) => {
                    self.writer
                        .execute("RELEASE SAVEPOINT one", "savepoint")
                        .await?;
                    if let Some(bad) = applied.bad.into_iter().next() {
                        self.bad(DeadLetter::of(p.offset, &p.key, &p.raw, ev, bad.reason))
                            .await?;
                    }
                }
                Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()),
                Err(e) => {
                    self.writer
                        .execute("ROLLBACK TO SAVEPOINT one", "savepoint")
                        .await?;
                    let mut reason = error_text(&e);
                    // A value its column's type refuses: say which column.
                    if sqlstate(&e).is_some_and(|c| c.starts_with("22")) {
                        if let Some(column) = self.writer.refused_column(ev).await? {
                            reason = format!("{column} ({reason})");
                        }
                    }
                    self.bad(DeadLetter::of(p.offset, &p.key, &p.raw, ev, reason))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// A bad event halts the direction or goes to the dead-letter queue.
    pub(super) async fn bad(&mut self, letter: DeadLetter) -> Result<(), ApplyError> {
        if self.cfg.sync.on_error == OnError::Halt {
            return Err(ApplyError::BadEvent(Box::new(HaltingEvent {
                direction: self.dir.to_string(),
                table: letter.table.unwrap_or_else(|| "?".into()),
                key: letter.key.unwrap_or_else(|| "?".into()),
                position: letter.position.unwrap_or_else(|| "?".into()),
                offset: letter.offset,
                reason: letter.error,
            })));
        }
        tracing::warn!(direction = %self.dir, table = ?letter.table, key = ?letter.key, position = ?letter.position, error = %letter.error, "event sent to the dead-letter queue");
        self.dlq
            .record(self.cfg, self.dir, &self.writer, &letter)
            .await?;
        self.metrics.dead_letters.increment(1);
        Ok(())
    }
}

pub(super) fn pending_of<'p>(pending: &'p [Held], ev: &ChangeEvent) -> &'p Held {
    pending
        .iter()
        .find(|p| p.event.position() == ev.position())
        .unwrap_or(&pending[0])
}

fn sqlstate(e: &WriteError) -> Option<&str> {
    match e {
        WriteError::Sql(e) => e.source.code().map(|c| c.code()),
        _ => None,
    }
}

fn error_text(e: &WriteError) -> String {
    match e {
        WriteError::Sql(e) => crate::pg::node::describe(&e.source),
        other => other.to_string(),
    }
}
