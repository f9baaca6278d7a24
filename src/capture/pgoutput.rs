//! Decoder for the binary messages of PostgreSQL's `pgoutput` logical decoding plugin.
//!
//! The walsender hands every XLogData payload to [`decode`], which turns it into one
//! [`LogicalMessage`]; the reader then assembles transactions from them. This covers
//! protocol version 1 as PostgreSQL 15 sends it with `messages 'true'`: no streamed
//! in-progress transactions, no two-phase messages, no `binary` tuples in practice
//! (decoded anyway when present).
//!
//! What the stream looks like, as observed on PostgreSQL 15:
//! - A transaction is `Begin`, optionally `Origin` (when the writer had a replication
//!   origin set up), then changes, then `Commit`. Empty transactions are skipped.
//! - `Type` (user-defined column types only) and `Relation` precede the first change
//!   that needs them, and are sent again after anything invalidates the relation cache
//!   (a `TRUNCATE` does), so callers must treat them as "replace", never "insert once".
//! - Non-transactional logical messages arrive outside any `Begin`/`Commit`.
//!
//! Column values stay as the bytes PostgreSQL sent (its text output), because this
//! layer does not know the column types; NULL and unchanged TOAST are kept distinct.
//! The input is untrusted: every read is bounds-checked and errors name the field and
//! offset, so a bad message can be diagnosed from the log alone.

use crate::event::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 (PostgreSQL's epoch), as sent. When the writer
        /// set up a replication origin, here and in `Commit` this is the timestamp it
        /// gave `pg_replication_origin_xact_setup`, not the local commit time.
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        origin_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: TupleData,
    },
    Update {
        relation_id: u32,
        /// `None` unless the replica identity changed or is FULL.
        old: Option<OldTuple>,
        new: TupleData,
    },
    Delete {
        relation_id: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit 0: `CASCADE`, bit 1: `RESTART IDENTITY`.
        options: u8,
        relation_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A table's shape; changes refer to it by `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `pg_class.relreplident`: `d`, `n`, `f` or `i`.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (every column is, under `REPLICA IDENTITY FULL`).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row of an update or delete: only the replica identity columns (`K`, the
/// others arrive as [`ColumnData::Null`]) or the whole row (`O`, identity FULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    Key(TupleData),
    Full(TupleData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData(pub Vec<ColumnData>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnData {
    Null,
    /// A TOASTed value the change did not touch; PostgreSQL does not resend it.
    UnchangedToast,
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

/// Why a message could not be decoded; `reading` names the field and `offset` is the
/// byte position in the message where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated pgoutput message while reading {reading} at byte {offset}")]
    Truncated {
        reading: &'static str,
        offset: usize,
    },
    #[error(
        "unknown pgoutput message type '{}' ({:#04x}) while reading message type at byte 0",
        std::ascii::escape_default(*.0),
        .0
    )]
    UnknownMessage(u8),
    #[error(
        "unexpected byte {byte:#04x} in pgoutput message while reading {reading} at byte {offset}"
    )]
    UnexpectedByte {
        reading: &'static str,
        offset: usize,
        byte: u8,
    },
    #[error("missing NUL terminator in pgoutput message while reading {reading} at byte {offset}")]
    Unterminated {
        reading: &'static str,
        offset: usize,
    },
    /// `offset` is that of the first invalid byte.
    #[error("invalid UTF-8 in pgoutput message while reading {reading} at byte {offset}")]
    BadUtf8 {
        reading: &'static str,
        offset: usize,
    },
    #[error("malformed pgoutput message while reading {reading} at byte {offset}: {detail}")]
    Malformed {
        reading: &'static str,
        offset: usize,
        detail: String,
    },
    #[error(
        "{count} byte(s) of trailing data at byte {offset} after {reading}, \
         the last field of its pgoutput message"
    )]
    TrailingBytes {
        reading: &'static str,
        offset: usize,
        count: usize,
    },
}

/// Decodes one pgoutput message (the payload of one XLogData).
pub fn decode(buf: &[u8]) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader {
        buf,
        pos: 0,
        last: "message type",
    };
    // Struct expressions evaluate their fields in the order written, which is the
    // order they appear on the wire.
    let message = match r.u8("message type")? {
        b'B' => LogicalMessage::Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_ts: r.i64("Begin commit timestamp")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => LogicalMessage::Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_ts: r.i64("Commit timestamp")?,
        },
        b'O' => LogicalMessage::Origin {
            origin_lsn: r.lsn("Origin LSN")?,
            name: r.cstring("Origin name")?,
        },
        b'R' => LogicalMessage::Relation(relation(&mut r)?),
        b'Y' => LogicalMessage::Type {
            id: r.u32("Type id")?,
            namespace: r.cstring("Type namespace")?,
            name: r.cstring("Type name")?,
        },
        b'I' => LogicalMessage::Insert {
            relation_id: r.u32("Insert relation id")?,
            new: {
                r.expect(b'N', "Insert new tuple marker")?;
                tuple(&mut r, &INSERT_NEW)?
            },
        },
        b'U' => {
            let relation_id = r.u32("Update relation id")?;
            let at = r.pos;
            let old = match r.u8("Update tuple kind")? {
                b'K' => Some(OldTuple::Key(tuple(&mut r, &UPDATE_OLD_KEY)?)),
                b'O' => Some(OldTuple::Full(tuple(&mut r, &UPDATE_OLD)?)),
                b'N' => None,
                byte => return Err(unexpected("Update tuple kind", at, byte)),
            };
            if old.is_some() {
                r.expect(b'N', "Update new tuple marker")?;
            }
            let new = tuple(&mut r, &UPDATE_NEW)?;
            LogicalMessage::Update {
                relation_id,
                old,
                new,
            }
        }
        b'D' => LogicalMessage::Delete {
            relation_id: r.u32("Delete relation id")?,
            old: {
                let at = r.pos;
                match r.u8("Delete tuple kind")? {
                    b'K' => OldTuple::Key(tuple(&mut r, &DELETE_OLD_KEY)?),
                    b'O' => OldTuple::Full(tuple(&mut r, &DELETE_OLD)?),
                    byte => return Err(unexpected("Delete tuple kind", at, byte)),
                }
            },
        },
        b'T' => {
            let count = r.count32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            // Bounded by the input so a forged count cannot make us allocate.
            let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(r.u32("Truncate relation id")?);
            }
            LogicalMessage::Truncate {
                options,
                relation_ids,
            }
        }
        b'M' => LogicalMessage::Message {
            // Only bit 0 is defined; later versions may add bits we can ignore.
            transactional: r.u8("Message flags")? & 1 != 0,
            lsn: r.lsn("Message LSN")?,
            prefix: r.cstring("Message prefix")?,
            content: r
                .bytes32("Message content length", "Message content")?
                .to_vec(),
        },
        tag => return Err(DecodeError::UnknownMessage(tag)),
    };
    // A well-formed message is consumed exactly; leftovers mean we misread its layout.
    match r.remaining() {
        0 => Ok(message),
        count => Err(DecodeError::TrailingBytes {
            reading: r.last,
            offset: r.pos,
            count,
        }),
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    Ok(Relation {
        id: r.u32("Relation id")?,
        namespace: r.cstring("Relation namespace")?,
        name: r.cstring("Relation name")?,
        replica_identity: r.u8("Relation replica identity")?,
        columns: {
            let count = r.count16("Relation column count")?;
            // A column takes at least ten bytes: the input bounds the allocation.
            let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
            for _ in 0..count {
                columns.push(RelationColumn {
                    // Only bit 0 (key) is defined; later versions may add others.
                    is_key: r.u8("Relation column flags")? & 1 != 0,
                    name: r.cstring("Relation column name")?,
                    type_oid: r.u32("Relation column type oid")?,
                    type_modifier: r.i32("Relation column type modifier")?,
                });
            }
            columns
        },
    })
}

/// Names of a tuple's count, kind, length and value fields, so that errors say which
/// of a message's tuples was bad.
type TupleFields = [&'static str; 4];

macro_rules! tuple_fields {
    ($tuple:literal) => {
        [
            concat!($tuple, " column count"),
            concat!($tuple, " column kind"),
            concat!($tuple, " column length"),
            concat!($tuple, " column value"),
        ]
    };
}

const INSERT_NEW: TupleFields = tuple_fields!("Insert new tuple");
const UPDATE_OLD_KEY: TupleFields = tuple_fields!("Update old key tuple");
const UPDATE_OLD: TupleFields = tuple_fields!("Update old tuple");
const UPDATE_NEW: TupleFields = tuple_fields!("Update new tuple");
const DELETE_OLD_KEY: TupleFields = tuple_fields!("Delete old key tuple");
const DELETE_OLD: TupleFields = tuple_fields!("Delete old tuple");

fn tuple(r: &mut Reader<'_>, fields: &TupleFields) -> Result<TupleData, DecodeError> {
    let &[count, kind, length, value] = fields;
    let count = r.count16(count)?;
    // A column takes at least its kind byte: the input bounds the allocation.
    let mut columns = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let at = r.pos;
        columns.push(match r.u8(kind)? {
            b'n' => ColumnData::Null,
            b'u' => ColumnData::UnchangedToast,
            b't' => ColumnData::Text(r.bytes32(length, value)?.to_vec()),
            b'b' => ColumnData::Binary(r.bytes32(length, value)?.to_vec()),
            byte => return Err(unexpected(kind, at, byte)),
        });
    }
    Ok(TupleData(columns))
}

fn unexpected(reading: &'static str, offset: usize, byte: u8) -> DecodeError {
    DecodeError::UnexpectedByte {
        reading,
        offset,
        byte,
    }
}

type Res<T> = Result<T, DecodeError>;

/// Counts and lengths are signed on the wire; a negative one is corruption, not a huge
/// unsigned value to go and allocate.
fn non_negative(n: i64, at: usize, reading: &'static str) -> Res<usize> {
    usize::try_from(n).map_err(|_| DecodeError::Malformed {
        reading,
        offset: at,
        detail: format!("negative value {n}"),
    })
}

/// A cursor over one message; `pos` never exceeds `buf.len()`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The field read last, to say where trailing data starts.
    last: &'static str,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.rest().len()
    }

    fn take(&mut self, n: usize, reading: &'static str) -> Res<&'a [u8]> {
        let bytes = self.rest().get(..n).ok_or(DecodeError::Truncated {
            reading,
            offset: self.pos,
        })?;
        self.pos += n;
        self.last = reading;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, reading: &'static str) -> Res<[u8; N]> {
        let offset = self.pos;
        let bytes = self.take(N, reading)?;
        <[u8; N]>::try_from(bytes).map_err(|_| DecodeError::Truncated { reading, offset })
    }

    fn u8(&mut self, reading: &'static str) -> Res<u8> {
        Ok(self.array::<1>(reading)?[0])
    }

    fn u32(&mut self, reading: &'static str) -> Res<u32> {
        self.array(reading).map(u32::from_be_bytes)
    }

    fn i32(&mut self, reading: &'static str) -> Res<i32> {
        self.array(reading).map(i32::from_be_bytes)
    }

    fn i64(&mut self, reading: &'static str) -> Res<i64> {
        self.array(reading).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, reading: &'static str) -> Res<Lsn> {
        self.array(reading).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn expect(&mut self, want: u8, reading: &'static str) -> Res<()> {
        let at = self.pos;
        match self.u8(reading)? {
            byte if byte == want => Ok(()),
            byte => Err(unexpected(reading, at, byte)),
        }
    }

    fn count16(&mut self, reading: &'static str) -> Res<usize> {
        let at = self.pos;
        let n = i16::from_be_bytes(self.array(reading)?);
        non_negative(n.into(), at, reading)
    }

    fn count32(&mut self, reading: &'static str) -> Res<usize> {
        let at = self.pos;
        let n = self.i32(reading)?;
        non_negative(n.into(), at, reading)
    }

    /// An Int32 length followed by that many bytes.
    fn bytes32(&mut self, length: &'static str, value: &'static str) -> Res<&'a [u8]> {
        let n = self.count32(length)?;
        self.take(n, value)
    }

    fn cstring(&mut self, reading: &'static str) -> Res<String> {
        let start = self.pos;
        let rest = self.rest();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated {
                reading,
                offset: start,
            })?;
        let bytes = rest.get(..len).unwrap_or_default();
        let s = std::str::from_utf8(bytes).map_err(|e| DecodeError::BadUtf8 {
            reading,
            offset: start + e.valid_up_to(),
        })?;
        self.pos += len + 1;
        self.last = reading;
        Ok(s.to_owned())
    }
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
mod tests;
