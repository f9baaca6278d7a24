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

use super::plan::{Chunk, CopyTable, Method};
use super::SnapshotError;
use crate::config::{Config, Direction};
use crate::pg::node::{self, sql_err, NodeError};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::time::Duration;
use tokio_postgres::Client;

/// How long a worker waits for its origin to be released by a session that died.
const ORIGIN_BUSY_RETRIES: u32 = 20;

/// Rows older than a tombstone recorded this long ago are removed after a direct copy:
/// any tombstone, in practice.
const ALL_TOMBSTONES_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

pub(crate) struct CopyWorker<'a> {
    dir: &'a Direction,
    source: Client,
    target: Client,
    /// Tables whose staging table exists in this target session.
    staged: HashSet<String>,
    incoming_wins_ties: bool,
}

impl<'a> CopyWorker<'a> {
    /// Opens worker `n`'s sessions on both nodes.
    pub(crate) async fn connect(
        cfg: &Config,
        dir: &'a Direction,
        n: usize,
    ) -> Result<CopyWorker<'a>, SnapshotError> {
        let source = node::connect(cfg, &dir.from, &format!("snapshot {dir} #{n}")).await?;
        let target = node::connect(cfg, &dir.to, &format!("snapshot {dir} #{n}")).await?;
        let origin = format!("{}_copy{n}", cfg.origin_name(dir));
        target
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(sql_err(
                &dir.to,
                "setting session_replication_role = replica",
            ))?;
        target
            .query(
                "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)
                 THEN false ELSE pg_replication_origin_create($1) IS NOT NULL END",
                &[&origin],
            )
            .await
            .map_err(sql_err(
                &dir.to,
                format!("creating replication origin {origin}"),
            ))?;
        let mut attempt = 0;
        // A killed run's session may hold the origin for a moment after it died.
        while let Err(e) = target
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            attempt += 1;
            if e.code().map(|c| c.code()) != Some("55006") || attempt > ORIGIN_BUSY_RETRIES {
                return Err(
                    sql_err(&dir.to, format!("using replication origin {origin}"))(e).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(CopyWorker {
            dir,
            source,
            target,
            staged: HashSet::new(),
            incoming_wins_ties: cfg.tie_winner() == dir.from,
        })
    }

    /// Copies `chunk` of `t`; returns the rows copied. A direct copy that meets a row
    /// written since planning (the table is no longer empty) is done again as a merge.
    pub(crate) async fn copy(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
    ) -> Result<u64, SnapshotError> {
        self.target
            .execute(
                "UPDATE duplex.snapshot_chunks SET attempts = attempts + 1
                 WHERE source_node = $1 AND table_name = $2 AND chunk = $3",
                &[&self.dir.from, &t.name, &chunk.chunk],
            )
            .await
            .map_err(sql_err(&self.dir.to, "counting a chunk's attempt"))?;
        if method == Method::Direct {
            match self.copy_chunk(t, chunk, Method::Direct).await {
                Err(SnapshotError::Node(NodeError::Sql { source, .. }))
                    if source.code().map(|c| c.code()) == Some("23505") =>
                {
                    self.rollback().await?;
                    tracing::info!(direction = %self.dir, table = %t.name, chunk = chunk.chunk,
                        "the target table gained rows since planning; merging this chunk");
                }
                other => return other,
            }
        }
        self.copy_chunk(t, chunk, Method::Merge).await
    }

    async fn copy_chunk(
        &mut self,
        t: &CopyTable,
        chunk: &Chunk,
        method: Method,
    ) -> Result<u64, SnapshotError> {
        let to = &self.dir.to;
        self.target
            .batch_execute("BEGIN")
            .await
            .map_err(sql_err(to, "beginning a chunk"))?;
        let staging = format!("pg_temp.{}", staging_name(&t.name));
        let into = match method {
            Method::Direct => t.sql_name.clone(),
            Method::Merge => {
                if self.staged.insert(t.name.clone()) {
                    self.target
                        .batch_execute(&format!(
                            "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS",
                            staging_name(&t.name),
                            t.sql_name
                        ))
                        .await
                        .map_err(sql_err(
                            to,
                            format!("creating a staging table for {}", t.name),
                        ))?;
                }
                staging.clone()
            }
        };
        let rows = self.pump(t, chunk, &into).await?;
        let context = format!("writing chunk {} of {}", chunk.chunk, t.name);
        match method {
            Method::Direct => {
                self.target
                    .execute(&t.target.sweep_sql(), &[&t.name, &ALL_TOMBSTONES_MS])
                    .await
                    .map_err(sql_err(to, context.clone()))?;
            }
            Method::Merge => {
                self.target
                    .execute(&t.merge_sql(&staging), &[&t.name, &self.incoming_wins_ties])
                    .await
                    .map_err(sql_err(to, context.clone()))?;
            }
        }
        self.target
            .execute(
                "UPDATE duplex.snapshot_chunks SET copied_at = now(), rows = $4
                 WHERE source_node = $1 AND table_name = $2 AND chunk = $3",
                &[&self.dir.from, &t.name, &chunk.chunk, &(rows as i64)],
            )
            .await
            .map_err(sql_err(to, context.clone()))?;
        self.target
            .batch_execute("COMMIT")
            .await
            .map_err(sql_err(to, context))?;
        Ok(rows)
    }

    /// Streams the chunk's COPY data from the source into `COPY into` on the target.
    async fn pump(&self, t: &CopyTable, chunk: &Chunk, into: &str) -> Result<u64, SnapshotError> {
        let (from, to) = (&self.dir.from, &self.dir.to);
        let reading = || sql_err(from, format!("reading chunk {} of {}", chunk.chunk, t.name));
        let writing = || sql_err(to, format!("writing chunk {} of {}", chunk.chunk, t.name));
        let out = self
            .source
            .copy_out(&t.copy_out_sql(chunk))
            .await
            .map_err(reading())?;
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
            .map_err(sql_err(&self.dir.to, "rolling back a chunk"))?;
        Ok(())
    }
}

/// The staging table's name for `table`: one per table and session.
fn staging_name(table: &str) -> String {
    let safe: String = table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("duplex_copy_{safe}")
}
