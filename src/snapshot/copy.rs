//! A copy worker: one session on each node, copying one chunk at a time.
//!
//! In: a chunk of a planned table. Out: its rows in the target, committed in the same
//! transaction that marks the chunk copied, so a chunk is copied exactly once however
//! often the daemon is killed (an interrupted chunk rolls back and is copied again).
//! Rows flow as COPY data from the source straight into the target's COPY, a message
//! at a time: memory stays bounded whatever the table's size.
//!
//! The target session is set up like an apply session: `session_replication_role =
//! replica` (no application trigger or foreign-key check fires, so tables copy in any
//! order) under a replication origin of duplex's (`<direction origin>_copy<n>`), so the
//! target's reader drops the copied rows as echoes instead of sending them back.

use super::mapped::MappedCopier;
use super::plan::Method;
use super::table::{Chunk, CopyTable};
use super::SnapshotError;
use crate::config::{Config, Direction};
use crate::pg::error::SqlError;
use crate::pg::node::{self, NodeError, SqlContext};
use crate::pg::sql::quote_ident;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use tokio_postgres::Client;

/// Rows older than a tombstone recorded this long ago are removed after a direct copy:
/// any tombstone, in practice.
const ALL_TOMBSTONES_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

pub(crate) struct CopyWorker<'a> {
    cfg: &'a Config,
    dir: &'a Direction,
    n: usize,
    /// The session for mapped tables' chunks, opened when the first one comes.
    mapped: Option<MappedCopier<'a>>,
    source: Client,
    target: Client,
    /// Tables whose staging table exists in this target session.
    staged: HashSet<String>,
    incoming_wins_ties: bool,
}

impl<'a> CopyWorker<'a> {
    /// Opens worker `n`'s sessions on both nodes. Both ask their node to end them
    /// once duplex has been gone for about `sync.receive_timeout_ms` (keepalives), and
    /// the target's takes the worker's origin back from a session left behind (see
    /// `origin`).
    pub(crate) async fn connect(
        cfg: &'a Config,
        dir: &'a Direction,
        n: usize,
    ) -> Result<CopyWorker<'a>, SnapshotError> {
        let purpose = format!("snapshot {dir} #{n}");
        let source = node::connect(cfg, &dir.from, &purpose).await?;
        let target = node::connect(cfg, &dir.to, &purpose).await?;
        for (client, node) in [(&source, &dir.from), (&target, &dir.to)] {
            client
                .batch_execute(&node::keepalive_sql(cfg))
                .await
                .sql(node, "setting TCP keepalives")?;
        }
        let origin = format!("{}_copy{n}", cfg.origin_name(dir));
        target
            .batch_execute("SET session_replication_role = replica")
            .await
            .sql(&dir.to, "setting session_replication_role = replica")?;
        crate::pg::setup::ensure_origin(&target, &dir.to, &origin).await?;
        super::origin::take(cfg, dir, &target, &origin, &purpose).await?;
        Ok(CopyWorker {
            cfg,
            dir,
            n,
            mapped: None,
            source,
            target,
            staged: HashSet::new(),
            incoming_wins_ties: cfg.tie_winner() == dir.from,
        })
    }

    /// The direction and the worker's source and target sessions.
    pub(crate) fn sessions(&self) -> (&'a Direction, &Client, &Client) {
        (self.dir, &self.source, &self.target)
    }

    /// Copies `chunk` of `t`'s plan `generation`; returns the rows copied. A direct
    /// copy that meets a row written since planning (the table is no longer empty) is
    /// done again as a merge.
    pub(crate) async fn copy(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
        generation: i32,
    ) -> Result<u64, SnapshotError> {
        self.target
            .execute(
                "UPDATE duplex.snapshot_chunks SET attempts = attempts + 1
                 WHERE source_node = $1 AND table_name = $2 AND chunk = $3 AND generation = $4",
                &[&self.dir.from, &t.name, &chunk.chunk, &generation],
            )
            .await
            .sql(&self.dir.to, "counting a chunk's attempt")?;
        let marked = Marked {
            generation,
            chunk: chunk.chunk,
        };
        if t.mapped {
            return self.copy_mapped(t, chunk, marked).await;
        }
        let mut method = method;
        if method == Method::Direct {
            match self.copy_chunk(t, chunk, Method::Direct, marked).await {
                Err(e) if sqlstate(&e) == Some("23505") => {
                    self.rollback().await?;
                    tracing::info!(direction = %self.dir, table = %t.name, chunk = chunk.chunk,
                        "the target table gained rows since planning; merging this chunk");
                    method = Method::Merge;
                }
                other => return self.explain(t, chunk, method, other).await,
            }
        }
        let r = self.copy_chunk(t, chunk, method, marked).await;
        self.explain(t, chunk, method, r).await
    }

    /// Copies a chunk of a mapped table through the mapping (see `snapshot/mapped.rs`).
    async fn copy_mapped(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        marked: Marked,
    ) -> Result<u64, SnapshotError> {
        let filter = t.chunk_filter(chunk);
        self.ensure_mapped_copier().await?;
        let copier = self.mapped.as_mut().expect("connected above");
        copier
            .copy(&self.source, self.dir, t, &filter, Some(marked))
            .await
    }

    /// Copies the rows of a mapped table with these (source) keys through the
    /// mapping, under last-writer-wins: the repair path of `duplex verify`.
    pub(crate) async fn copy_mapped_keys(
        &mut self,
        t: &CopyTable,
        keys: &[Vec<String>],
    ) -> Result<u64, SnapshotError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let filter = format!(" WHERE {}", t.key_in(keys));
        self.ensure_mapped_copier().await?;
        let copier = self.mapped.as_mut().expect("connected above");
        copier.copy(&self.source, self.dir, t, &filter, None).await
    }

    async fn ensure_mapped_copier(&mut self) -> Result<(), SnapshotError> {
        if self.mapped.is_none() {
            let origin = format!("{}_copy{}m", self.cfg.origin_name(self.dir), self.n);
            crate::pg::setup::ensure_origin(&self.target, &self.dir.to, &origin).await?;
            let copier = MappedCopier::connect(self.cfg, self.dir, &origin, self.n).await?;
            self.mapped = Some(copier);
        }
        Ok(())
    }

    /// Copies the source's row with key `key` into the target under last-writer-wins
    /// (the merge path): the target keeps its version when it is newer. Used to repair
    /// a row `duplex verify` found different.
    pub(crate) async fn copy_key(
        &mut self,
        t: &CopyTable,
        key: &[String],
    ) -> Result<u64, SnapshotError> {
        let into = self.into(t, Method::Merge).await?;
        let to = &self.dir.to;
        self.target
            .batch_execute("BEGIN")
            .await
            .sql(to, "beginning a repair")?;
        let rows = self.pump(t, &t.copy_out_key_sql(key), &into).await?;
        self.merge(t, &into).await?;
        self.target
            .batch_execute("COMMIT")
            .await
            .sql(to, "committing a repair")?;
        Ok(rows)
    }

    /// A chunk the target refused because of its data (SQLSTATE classes 22 and 23)
    /// becomes an error naming the first row it refuses.
    async fn explain(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
        result: Result<u64, SnapshotError>,
    ) -> Result<u64, SnapshotError> {
        let e = match result {
            Err(e) if sqlstate(&e).is_some_and(|s| s.starts_with("22") || s.starts_with("23")) => e,
            other => return other,
        };
        self.rollback().await?;
        Err(self.find_bad_row(t, chunk, method).await?.unwrap_or(e))
    }

    /// Copies the chunk's rows one at a time, each under a savepoint rolled back at
    /// once, until one fails; nothing is kept.
    async fn find_bad_row(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
    ) -> Result<Option<SnapshotError>, SnapshotError> {
        let (from, to) = (&self.dir.from, &self.dir.to);
        let keys: Vec<Vec<String>> = self
            .source
            .query(&t.keys_sql(chunk), &[])
            .await
            .sql(from, format!("reading the keys of {}", t.name))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let into = self.into(t, method).await?;
        self.target
            .batch_execute("BEGIN")
            .await
            .sql(to, "beginning a probe")?;
        for key in keys {
            self.target
                .batch_execute("SAVEPOINT probe")
                .await
                .sql(to, "probing a row")?;
            let mut r = self
                .pump(t, &t.copy_out_key_sql(&key), &into)
                .await
                .map(|_| ());
            if r.is_ok() && method == Method::Merge {
                r = self.merge(t, &into).await;
            }
            if let Err(e) = r {
                self.rollback().await?;
                return Ok(Some(SnapshotError::BadRow {
                    direction: self.dir.to_string(),
                    table: t.name.clone(),
                    key: serde_json::to_string(&key).unwrap_or_default(),
                    error: error_text(&e),
                }));
            }
            self.target
                .batch_execute("ROLLBACK TO SAVEPOINT probe")
                .await
                .sql(to, "probing a row")?;
        }
        self.rollback().await?;
        Ok(None)
    }

    /// Where the chunk's COPY goes: the table itself, or its staging table (created
    /// outside any transaction, so that a rolled-back chunk leaves it in place). The
    /// staging table has the copied columns only, with the table's types and none of
    /// its constraints: a column only the target has takes its default when the merge
    /// inserts the row, as the real table would give it.
    async fn into(&mut self, t: &CopyTable, method: Method) -> Result<String, SnapshotError> {
        if method == Method::Direct {
            return Ok(t.sql_name.clone());
        }
        let staging = staging_name(&t.name);
        if !self.staged.contains(&t.name) {
            let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
            self.target
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS
                     AS SELECT {} FROM {} WITH NO DATA",
                    cols.join(", "),
                    t.sql_name
                ))
                .await
                .sql(
                    &self.dir.to,
                    format!("creating a staging table for {}", t.name),
                )?;
            self.staged.insert(t.name.clone());
        }
        Ok(format!("pg_temp.{staging}"))
    }

    /// Merges the staged rows into the table, then settles them: a statement of its
    /// own, with a snapshot that sees deletes committed while the merge waited.
    async fn merge(&self, t: &CopyTable, staging: &str) -> Result<(), SnapshotError> {
        let context = || format!("merging into {}", t.name);
        self.target
            .execute(
                &t.merge_sql(staging),
                &[&t.name, &self.incoming_wins_ties, &self.dir.from],
            )
            .await
            .sql(&self.dir.to, context())?;
        self.target
            .execute(&t.settle_merge_sql(staging), &[&t.name, &self.dir.from])
            .await
            .sql(&self.dir.to, context())?;
        Ok(())
    }

    async fn copy_chunk(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
        marked: Marked,
    ) -> Result<u64, SnapshotError> {
        let to = &self.dir.to;
        let into = self.into(t, method).await?;
        self.target
            .batch_execute("BEGIN")
            .await
            .sql(to, "beginning a chunk")?;
        let rows = self.pump(t, &t.copy_out_sql(chunk), &into).await?;
        let context = format!("writing chunk {} of {}", chunk.chunk, t.name);
        match method {
            Method::Direct => {
                self.target
                    .execute(&t.target.sweep_sql(), &[&t.name, &ALL_TOMBSTONES_MS])
                    .await
                    .sql(to, context.clone())?;
                self.target
                    .execute(&t.truncated_in_chunk_sql(chunk), &[&t.name, &self.dir.from])
                    .await
                    .sql(to, context.clone())?;
            }
            Method::Merge => self.merge(t, &into).await?,
        }
        self.record_owed(t).await?;
        if !marked.mark(&self.target, self.dir, &t.name, rows).await? {
            self.rollback().await?;
            return Err(marked.replanned(self.dir, &t.name));
        }
        self.target.batch_execute("COMMIT").await.sql(to, context)?;
        Ok(rows)
    }

    /// Records the values of the columns the target lacks as owed from the copy on,
    /// in the chunk's transaction: a chunk committed after the column's debt was
    /// settled owes its rows' values again.
    async fn record_owed(&self, t: &CopyTable) -> Result<(), SnapshotError> {
        let (since_lsn, since_ts) = crate::lww::owed::FROM_THE_COPY;
        for column in &t.owed {
            let new = crate::lww::owed::record_debt(
                &self.target,
                &self.dir.from,
                &t.name,
                column,
                since_lsn,
                since_ts,
            )
            .await
            .sql(
                &self.dir.to,
                format!("recording the values of {}.{column} owed", t.name),
            )?;
            if new {
                tracing::warn!(direction = %self.dir, table = %t.name, column = %column,
                    "node {} lacks a column node {} has: the initial copy copies its rows without it, and its values are owed until the column exists there",
                    self.dir.to, self.dir.from);
            }
        }
        Ok(())
    }

    /// Streams the chunk's COPY data from the source into `COPY into` on the target.
    async fn pump(&self, t: &CopyTable, copy_out: &str, into: &str) -> Result<u64, SnapshotError> {
        let (from, to) = (&self.dir.from, &self.dir.to);
        let reading = || SqlError::on(from, format!("reading {}", t.name));
        let writing = || SqlError::on(to, format!("writing into {}", t.name));
        let out = self.source.copy_out(copy_out).await.map_err(reading())?;
        let sink = self
            .target
            .copy_in(&t.copy_in_sql(into))
            .await
            .map_err(writing())?;
        futures_util::pin_mut!(out);
        futures_util::pin_mut!(sink);
        while let Some(data) = out.next().await {
            let data = data.map_err(reading())?;
            sink.send(data).await.map_err(writing())?;
        }
        Ok(sink.as_mut().finish().await.map_err(writing())?)
    }

    async fn rollback(&self) -> Result<(), SnapshotError> {
        self.target
            .batch_execute("ROLLBACK")
            .await
            .sql(&self.dir.to, "rolling back a chunk")?;
        Ok(())
    }
}

/// The chunk a copy marks copied: its number in the plan of that generation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Marked {
    pub generation: i32,
    pub chunk: i32,
}

impl Marked {
    /// Marks the chunk copied with `rows` rows, in the caller's transaction; false
    /// when its plan was replaced meanwhile (the chunk's range is not this one).
    pub(crate) async fn mark(
        self,
        target: &Client,
        dir: &Direction,
        table: &str,
        rows: u64,
    ) -> Result<bool, SnapshotError> {
        let n = target
            .execute(
                "UPDATE duplex.snapshot_chunks SET copied_at = now(), rows = $4
                 WHERE source_node = $1 AND table_name = $2 AND chunk = $3 AND generation = $5",
                &[
                    &dir.from,
                    &table,
                    &self.chunk,
                    &(rows as i64),
                    &self.generation,
                ],
            )
            .await
            .sql(
                &dir.to,
                format!("marking chunk {} of {table} copied", self.chunk),
            )?;
        Ok(n > 0)
    }

    pub(crate) fn replanned(self, dir: &Direction, table: &str) -> SnapshotError {
        SnapshotError::Replanned {
            direction: dir.to_string(),
            table: table.to_string(),
            chunk: self.chunk,
        }
    }
}

fn sqlstate(e: &SnapshotError) -> Option<&str> {
    match e {
        SnapshotError::Node(NodeError::Sql(e)) => e.code(),
        _ => None,
    }
}

/// The server's message for an SQL error, with the COPY line it names.
fn error_text(e: &SnapshotError) -> String {
    match e {
        SnapshotError::Node(NodeError::Sql(e)) => {
            let mut s = node::describe(&e.source);
            if let Some(w) = e.source.as_db_error().and_then(|d| d.where_()) {
                s.push_str(&format!(" ({w})"));
            }
            s
        }
        other => other.to_string(),
    }
}

/// The staging table's name for `table`: one per table and session, and one table's
/// only (a name made readable, as `public.a_b` and `public_a.b` both would be
/// `public_a_b`, could be shared by two tables).
fn staging_name(table: &str) -> String {
    crate::pg::triggers::per_table_name("duplex_copy", table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_one_tables_own() {
        assert_ne!(staging_name("public.a_b"), staging_name("public_a.b"));
        assert_ne!(staging_name("public.A"), staging_name("public.a"));
        assert_eq!(staging_name("public.a_b"), staging_name("public.a_b"));
        // Within PostgreSQL's 63 bytes, however long the table's name.
        assert!(staging_name(&"x".repeat(200)).len() <= 63);
    }
}
