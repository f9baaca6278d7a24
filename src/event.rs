//! Change events: what one committed row change on a node looks like on Kafka.
//!
//! The reader builds a [`ChangeEvent`] for every row change (and one per truncated
//! table) of a committed transaction; the Kafka sink serialises it with
//! [`ChangeEvent::to_json`] and the apply side reads it back with
//! [`ChangeEvent::from_json`]. Values travel as PostgreSQL's own text output so that
//! every type round-trips exactly; NULL and unchanged-TOAST stay distinct.

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A WAL position (PostgreSQL's `pg_lsn`), printed as `X/Y` in hex like PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Error for a string that is not an `X/Y` LSN.
#[derive(Debug, thiserror::Error)]
#[error("not a PostgreSQL LSN (expected X/Y in hex): {0:?}")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Formats microseconds since the Unix epoch as a PostgreSQL `timestamptz` literal in
/// UTC, e.g. `2026-11-23 18:09:00.123456+00`.
pub fn format_unix_us(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{micros:06}+00",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Where an event sits in the source's history: the commit LSN of its transaction and
/// its ordinal inside that transaction. Several events share one commit LSN, so the LSN
/// alone never identifies an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.seq)
    }
}

/// duplex's own table of tombstones: its rows travel with deletes and give the peer
/// each delete's exact time.
pub const TOMBSTONES: (&str, &str) = ("duplex", "tombstones");

/// duplex's own table of truncations: when each table was last truncated, written by
/// a trigger in the truncating transaction; it travels with the truncate and acts as a
/// tombstone for every key of the table older than it.
pub const TRUNCATIONS: (&str, &str) = ("duplex", "truncations");

/// duplex's own table of repairs: the winning version of a key, written by an apply
/// session that rejected an older one, so that the node that sent the loser learns the
/// winner. Inserts into it are published even from apply sessions (they are not echoes).
pub const REPAIRS: (&str, &str) = ("duplex", "repairs");

/// duplex's own table of key pairings (see `mapping/`): which key a row of a mapped
/// table has on each node. Inserts into it are published even from apply sessions:
/// the peer must learn the pairings made here.
pub const KEY_PAIRS: (&str, &str) = ("duplex", "key_pairs");

/// The kind of change, with Debezium's letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Insert,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    /// The `op` label of the capture metrics.
    pub fn label(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// One column's value as PostgreSQL's text output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: the node did not send it, and the
    /// target must keep what it has.
    UnchangedToast,
    Text(String),
}

/// Columns of one row image in table order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row(pub Vec<(String, Value)>);

impl Row {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.iter().find(|(c, _)| c == column).map(|(_, v)| v)
    }

    /// Names of the columns whose value is unchanged-TOAST.
    pub fn unchanged_toast(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, v)| *v == Value::UnchangedToast)
            .map(|(c, _)| c.as_str())
            .collect()
    }
}

/// Serialises present values as a JSON object in column order; unchanged-TOAST columns
/// are left out here and listed in the envelope's `unchanged_toast` instead.
impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let present = self.0.iter().filter(|(_, v)| *v != Value::UnchangedToast);
        let mut map = s.serialize_map(None)?;
        for (col, v) in present {
            match v {
                Value::Null => map.serialize_entry(col, &())?,
                Value::Text(t) => map.serialize_entry(col, t)?,
                Value::UnchangedToast => {}
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = Row;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of column name to text value or null")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Row, A::Error> {
                let mut cols = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Option<String>>()? {
                    cols.push((k, v.map_or(Value::Null, Value::Text)));
                }
                Ok(Row(cols))
            }
        }
        d.deserialize_map(RowVisitor)
    }
}

/// A table's schema-qualified name, as the events, metrics and logs print it
/// (`public.items`), and as SQL names it ([`TableName::quoted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableName<'a> {
    pub schema: &'a str,
    pub name: &'a str,
}

impl<'a> TableName<'a> {
    pub fn new(schema: &'a str, name: &'a str) -> TableName<'a> {
        TableName { schema, name }
    }

    /// `"schema"."name"`, each part quoted as an SQL identifier.
    pub fn quoted(&self) -> String {
        // As `pg::sql::quote_ident` quotes, written here so that `event` needs
        // nothing above it.
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        format!("{}.{}", quote(self.schema), quote(self.name))
    }
}

impl fmt::Display for TableName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The configured name of the node the change was committed on.
    pub node: String,
    pub db: String,
    pub schema: String,
    pub table: String,
    /// Commit LSN of the transaction.
    pub lsn: Lsn,
    /// Ordinal of this event in its transaction, from 0.
    pub seq: u32,
    /// True on the transaction's last event: a consumer may commit after it.
    pub last: bool,
    pub xid: u32,
    /// Commit time in microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// The slot the change was read through, one id per slot created: LSNs are
    /// comparable only within one stream (a slot created again after a restore or a
    /// loss starts a new stream, whose LSNs may be lower). Absent from events of
    /// earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Commit LSN of the transaction the same capture session published before this
    /// one; absent on a session's first transaction (and on events of earlier
    /// versions). An applier that applied less than this lacks a whole transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_lsn: Option<Lsn>,
}

/// One change, as it is written to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub op: Op,
    /// Old image: key columns (or the whole row under REPLICA IDENTITY FULL) for
    /// updates that changed the key and for deletes; absent otherwise.
    pub before: Option<Row>,
    /// New image for inserts and updates.
    pub after: Option<Row>,
    /// Primary-key column names, in key order.
    pub key: Vec<String>,
    /// Column name → PostgreSQL type as `format_type` prints it, in table order.
    pub types: Arc<[(String, String)]>,
    pub source: Source,
    /// When duplex read the change, milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    #[serde(default)]
    unchanged_toast: Vec<String>,
    key: Vec<String>,
    #[serde(borrow)]
    types: Types<'a>,
    source: Source,
    ts_ms: i64,
}

/// Ordered column → type map, borrowed from the message where it can be: a decoder
/// shares one copy per table ([`TypesCache`]).
struct Types<'a>(Vec<(Str<'a>, Str<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Types<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TypesVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TypesVisitor<'a> {
            type Value = Types<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of column name to type name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Types<'a>, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<Str<'a>, Str<'a>>()? {
                    v.push(e);
                }
                Ok(Types(v))
            }
        }
        d.deserialize_map(TypesVisitor(std::marker::PhantomData))
    }
}

/// A JSON string, borrowed unless it had escapes.
struct Str<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StrVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for StrVisitor<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(v.to_owned().into()))
            }
        }
        d.deserialize_str(StrVisitor(std::marker::PhantomData))
    }
}

/// Column type lists a decoder saw last, so that the events of one table share one
/// copy instead of holding (and freeing) their own.
#[derive(Default)]
pub struct TypesCache(Vec<Arc<[(String, String)]>>);

/// Type lists a [`TypesCache`] keeps: more tables than that in turn only cost copies.
const TYPES_CACHED: usize = 32;

impl TypesCache {
    fn intern(&mut self, types: &Types<'_>) -> Arc<[(String, String)]> {
        let same = |cached: &[(String, String)]| {
            cached.len() == types.0.len()
                && cached
                    .iter()
                    .zip(&types.0)
                    .all(|((c, t), (dc, dt))| *c == dc.0 && *t == dt.0)
        };
        if let Some(hit) = self.0.iter().find(|c| same(c)) {
            return hit.clone();
        }
        let owned: Arc<[(String, String)]> = types
            .0
            .iter()
            .map(|(c, t)| (c.0.to_string(), t.0.to_string()))
            .collect();
        if self.0.len() >= TYPES_CACHED {
            self.0.remove(0);
        }
        self.0.push(owned.clone());
        owned
    }
}

/// Error for a Kafka message that is not a duplex envelope.
#[derive(Debug, thiserror::Error)]
#[error("not a duplex change envelope: {0}")]
pub struct EnvelopeError(#[from] serde_json::Error);

impl Source {
    /// The changed table's name.
    pub fn table_name(&self) -> TableName<'_> {
        TableName::new(&self.schema, &self.table)
    }
}

impl ChangeEvent {
    pub fn position(&self) -> Position {
        Position {
            commit_lsn: self.source.lsn,
            seq: self.source.seq,
        }
    }

    /// The Kafka message key: table and primary-key values, so that compaction and
    /// partitioning (if ever more than one partition) keep a row's history together.
    pub fn kafka_key(&self) -> Vec<u8> {
        let image = match self.op {
            Op::Delete => self.before.as_ref(),
            _ => self.after.as_ref(),
        };
        let mut key = serde_json::Map::new();
        for k in &self.key {
            let v = match image.and_then(|r| r.get(k)) {
                Some(Value::Text(t)) => serde_json::Value::String(t.clone()),
                _ => serde_json::Value::Null,
            };
            key.insert(k.clone(), v);
        }
        let table = self.source.table_name().to_string();
        serde_json::json!({ "table": table, "key": key })
            .to_string()
            .into_bytes()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut toast: Vec<String> = Vec::new();
        if let Some(after) = &self.after {
            toast.extend(after.unchanged_toast().into_iter().map(str::to_string));
        }
        let env = EnvelopeRef {
            op: self.op,
            before: self.before.as_ref(),
            after: self.after.as_ref(),
            unchanged_toast: &toast,
            key: &self.key,
            types: TypesRef(&self.types),
            source: &self.source,
            ts_ms: self.ts_ms,
        };
        // Serialising owned strings and maps cannot fail.
        serde_json::to_vec(&env).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<ChangeEvent, EnvelopeError> {
        Self::from_json_in(bytes, &mut TypesCache::default())
    }

    /// [`Self::from_json`], sharing type lists through `cache`.
    pub fn from_json_in(
        bytes: &[u8],
        cache: &mut TypesCache,
    ) -> Result<ChangeEvent, EnvelopeError> {
        let env: Envelope = serde_json::from_slice(bytes)?;
        let types = cache.intern(&env.types);
        let after = env.after.map(|mut row| {
            // Put unchanged-TOAST columns back in table order.
            for (pos, (col, _)) in types.iter().enumerate() {
                if env.unchanged_toast.contains(col) && row.get(col).is_none() {
                    row.0
                        .insert(pos.min(row.0.len()), (col.clone(), Value::UnchangedToast));
                }
            }
            row
        });
        Ok(ChangeEvent {
            op: env.op,
            before: env.before,
            after,
            key: env.key,
            types,
            source: env.source,
            ts_ms: env.ts_ms,
        })
    }
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    op: Op,
    before: Option<&'a Row>,
    after: Option<&'a Row>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unchanged_toast: &'a [String],
    key: &'a [String],
    types: TypesRef<'a>,
    source: &'a Source,
    ts_ms: i64,
}

struct TypesRef<'a>(&'a [(String, String)]);

impl Serialize for TypesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (c, t) in self.0 {
            map.serialize_entry(c, t)?;
        }
        map.end()
    }
}

#[cfg(test)]
#[path = "event_tests.rs"]
mod tests;
