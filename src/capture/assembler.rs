//! Turns a node's decoded pgoutput messages into change events, transaction by
//! transaction.
//!
//! The capture session feeds every decoded message to [`TxnAssembler::handle`] in
//! stream order and gets back what to send downstream: change events (each numbered within its
//! transaction, the last one flagged) and a commit marker carrying the LSN to confirm
//! once the events before it are durable. One event is held back until the next one or
//! the commit arrives, so the `last` flag is right without buffering whole
//! transactions. Transactions under a duplex replication origin are dropped here: they
//! are changes duplex itself applied, and must not echo back; only the repairs they
//! write (the winning version of a key whose incoming version lost) and the key
//! pairings of mapped tables go through.

use crate::capture::pgoutput::{ColumnData, LogicalMessage, OldTuple, Relation, TupleData};
use crate::config::ORIGIN_PREFIX;
use crate::event::{ChangeEvent, Lsn, Op, Row, Source, Value, KEY_PAIRS, REPAIRS};
use crate::pg::walsender::PG_EPOCH_OFFSET_US;
use std::collections::HashMap;
use std::sync::Arc;

/// What the reader found wrong with the stream.
#[derive(Debug, thiserror::Error)]
pub enum AssemblerError {
    #[error(
        "change for relation oid {relation_id} at LSN {lsn} arrived before its Relation message"
    )]
    UnknownRelation { relation_id: u32, lsn: Lsn },
    #[error(
        "{table}: column {column} at LSN {lsn} is not valid UTF-8 (duplex needs a UTF8 database)"
    )]
    NotUtf8 {
        table: String,
        column: String,
        lsn: Lsn,
    },
    #[error(
        "{table}: column {column} at LSN {lsn} came in binary format, which duplex never asks for"
    )]
    Binary {
        table: String,
        column: String,
        lsn: Lsn,
    },
    #[error("{message} outside a transaction at LSN {lsn}")]
    OutsideTransaction { message: &'static str, lsn: Lsn },
}

/// A table as the stream describes it, with what the catalog adds.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// `format_type` of each column, same order as `columns`.
    pub types: Vec<String>,
    /// Primary-key columns in key order.
    pub key: Vec<String>,
}

/// What to send downstream, in this order.
#[derive(Debug)]
pub enum Output {
    Event(Box<ChangeEvent>),
    /// The transaction is complete: once all events before this are durable, the slot
    /// may be confirmed up to `end_lsn`.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        events: u32,
        echo: bool,
    },
}

struct Txn {
    commit_lsn: Lsn,
    commit_ts_us: i64,
    xid: u32,
    next_seq: u32,
    echo: bool,
    held: Option<ChangeEvent>,
}

/// Per-connection state: relation cache and the open transaction.
pub struct TxnAssembler {
    node: String,
    db: String,
    /// The slot's stream id, stamped on every event.
    stream: Option<String>,
    tables: HashMap<u32, TableInfo>,
    /// Commit LSN of the last transaction this session published events of: each
    /// event carries it, linking its transaction to the one before.
    last_published: Option<Lsn>,
    /// Each table's column → type list as events carry it, shared by its events.
    typed: HashMap<u32, Arc<[(String, String)]>>,
    txn: Option<Txn>,
}

impl TxnAssembler {
    pub fn new(node: &str, db: &str, stream: Option<String>) -> TxnAssembler {
        TxnAssembler {
            node: node.to_string(),
            db: db.to_string(),
            stream,
            tables: HashMap::new(),
            last_published: None,
            typed: HashMap::new(),
            txn: None,
        }
    }

    /// Registers a relation (from a Relation message plus catalog lookups).
    pub fn add_table(&mut self, relation_id: u32, info: TableInfo) {
        self.typed.remove(&relation_id);
        self.tables.insert(relation_id, info);
    }

    /// True between Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Handles one message; `wal_start` is its XLogData position, for error messages.
    pub fn handle(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        now_ms: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), AssemblerError> {
        match msg {
            LogicalMessage::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                self.txn = Some(Txn {
                    commit_lsn: final_lsn,
                    commit_ts_us: commit_ts + PG_EPOCH_OFFSET_US,
                    xid,
                    next_seq: 0,
                    echo: false,
                    held: None,
                });
            }
            LogicalMessage::Origin { name, .. } => {
                if let Some(t) = self.txn.as_mut() {
                    t.echo = name.starts_with(ORIGIN_PREFIX);
                    // Under an origin, Begin carries the origin's timestamp (never set
                    // by duplex's sessions, so stale), not the commit time: the repairs
                    // and key pairings such a transaction publishes are stamped when
                    // read, just after their commit.
                    if t.echo {
                        t.commit_ts_us = now_ms * 1000;
                    }
                }
            }
            LogicalMessage::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                let Some(mut t) = self.txn.take() else {
                    return Err(AssemblerError::OutsideTransaction {
                        message: "Commit",
                        lsn: wal_start,
                    });
                };
                if let Some(mut last) = t.held.take() {
                    last.source.last = true;
                    out.push(Output::Event(Box::new(last)));
                }
                if t.next_seq > 0 {
                    self.last_published = Some(t.commit_lsn);
                }
                out.push(Output::Commit {
                    commit_lsn,
                    end_lsn,
                    events: t.next_seq,
                    echo: t.echo,
                });
            }
            LogicalMessage::Relation(rel) => self.refresh_columns(rel),
            LogicalMessage::Insert { relation_id, .. }
            | LogicalMessage::Update { relation_id, .. }
            | LogicalMessage::Delete { relation_id, .. }
                if self.echo_dropped(relation_id, matches!(msg, LogicalMessage::Insert { .. })) => {
            }
            LogicalMessage::Insert { relation_id, new } => {
                let after = self.row(relation_id, new, false, wal_start)?;
                self.emit(
                    relation_id,
                    Op::Insert,
                    None,
                    Some(after),
                    now_ms,
                    out,
                    wal_start,
                )?;
            }
            LogicalMessage::Update {
                relation_id,
                old,
                new,
            } => {
                let before = old
                    .map(|o| self.old_row(relation_id, o, wal_start))
                    .transpose()?;
                let after = self.row(relation_id, new, false, wal_start)?;
                self.emit(
                    relation_id,
                    Op::Update,
                    before,
                    Some(after),
                    now_ms,
                    out,
                    wal_start,
                )?;
            }
            LogicalMessage::Delete { relation_id, old } => {
                let before = self.old_row(relation_id, old, wal_start)?;
                self.emit(
                    relation_id,
                    Op::Delete,
                    Some(before),
                    None,
                    now_ms,
                    out,
                    wal_start,
                )?;
            }
            LogicalMessage::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    self.emit(id, Op::Truncate, None, None, now_ms, out, wal_start)?;
                }
            }
            // Types are resolved through the catalog; messages only advance the stream.
            LogicalMessage::Type { .. } | LogicalMessage::Message { .. } => {}
        }
        Ok(())
    }

    /// A Relation message may arrive again after ALTER TABLE: keep the catalog's key
    /// and types but follow the stream's column list.
    fn refresh_columns(&mut self, rel: Relation) {
        self.typed.remove(&rel.id);
        if let Some(t) = self.tables.get_mut(&rel.id) {
            t.columns = rel.columns.into_iter().map(|c| c.name).collect();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        relation_id: u32,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
        now_ms: i64,
        out: &mut Vec<Output>,
        wal_start: Lsn,
    ) -> Result<(), AssemblerError> {
        let table = self.table(relation_id, wal_start)?;
        let key = table.key.clone();
        let (schema, name) = (table.schema.clone(), table.name.clone());
        let types = match self.typed.get(&relation_id) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<[(String, String)]> = table
                    .columns
                    .iter()
                    .cloned()
                    .zip(table.types.iter().cloned())
                    .collect();
                self.typed.insert(relation_id, t.clone());
                t
            }
        };
        let prev_lsn = self.last_published;
        let Some(t) = self.txn.as_mut() else {
            return Err(AssemblerError::OutsideTransaction {
                message: "row change",
                lsn: wal_start,
            });
        };
        if t.echo && op == Op::Truncate {
            return Ok(());
        }
        let ev = ChangeEvent {
            op,
            before,
            after,
            key,
            types,
            source: Source {
                node: self.node.clone(),
                db: self.db.clone(),
                schema,
                table: name,
                lsn: t.commit_lsn,
                seq: t.next_seq,
                last: false,
                xid: t.xid,
                commit_ts_us: t.commit_ts_us,
                stream: self.stream.clone(),
                prev_lsn,
            },
            ts_ms: now_ms,
        };
        t.next_seq += 1;
        if let Some(prev) = t.held.replace(ev) {
            out.push(Output::Event(Box::new(prev)));
        }
        Ok(())
    }

    /// True for a row change of a transaction duplex applied (an echo), which is
    /// dropped before its row is built: only the repairs and key pairings an apply
    /// session inserts are what the peer must see. (An unknown relation is not
    /// dropped here, so that it is reported.)
    fn echo_dropped(&self, relation_id: u32, insert: bool) -> bool {
        if !self.txn.as_ref().is_some_and(|t| t.echo) {
            return false;
        }
        let Some(table) = self.tables.get(&relation_id) else {
            return false;
        };
        let published =
            [REPAIRS, KEY_PAIRS].contains(&(table.schema.as_str(), table.name.as_str()));
        !(insert && published)
    }

    fn table(&self, relation_id: u32, lsn: Lsn) -> Result<&TableInfo, AssemblerError> {
        self.tables
            .get(&relation_id)
            .ok_or(AssemblerError::UnknownRelation { relation_id, lsn })
    }

    fn old_row(&self, relation_id: u32, old: OldTuple, lsn: Lsn) -> Result<Row, AssemblerError> {
        match old {
            OldTuple::Key(t) => self.row(relation_id, t, true, lsn),
            OldTuple::Full(t) => self.row(relation_id, t, false, lsn),
        }
    }

    /// Pairs tuple values with column names; `key_only` keeps just the key columns
    /// (pgoutput sends the other columns of a key tuple as NULL).
    fn row(
        &self,
        relation_id: u32,
        tuple: TupleData,
        key_only: bool,
        lsn: Lsn,
    ) -> Result<Row, AssemblerError> {
        let table = self.table(relation_id, lsn)?;
        let mut cols = Vec::with_capacity(tuple.0.len());
        for (name, data) in table.columns.iter().zip(tuple.0) {
            if key_only && !table.key.contains(name) {
                continue;
            }
            let value = match data {
                ColumnData::Null => Value::Null,
                ColumnData::UnchangedToast => Value::UnchangedToast,
                ColumnData::Text(bytes) => {
                    Value::Text(
                        String::from_utf8(bytes).map_err(|_| AssemblerError::NotUtf8 {
                            table: crate::event::TableName::new(&table.schema, &table.name)
                                .to_string(),
                            column: name.clone(),
                            lsn,
                        })?,
                    )
                }
                ColumnData::Binary(_) => {
                    return Err(AssemblerError::Binary {
                        table: crate::event::TableName::new(&table.schema, &table.name).to_string(),
                        column: name.clone(),
                        lsn,
                    })
                }
            };
            cols.push((name.clone(), value));
        }
        Ok(Row(cols))
    }
}

#[cfg(test)]
#[path = "assembler_tests.rs"]
mod tests;
