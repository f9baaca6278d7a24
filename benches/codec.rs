//! Micro-benchmarks of the per-event work on a realistic row (10 columns of mixed
//! types, about 300 bytes): pgoutput decoding, turning the message into a change
//! event, the JSON envelope both ways, and building the apply statements.
//!
//! `cargo bench --bench codec`; throughput is reported in events per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use duplex::capture::assembler::{Output, TableInfo, TxnAssembler};
use duplex::capture::pgoutput::{self, LogicalMessage};
use duplex::event::{ChangeEvent, Lsn};
use duplex::pg::table::{TargetColumn, TargetTable};
use std::hint::black_box;

const COLUMNS: &[(&str, &str, &str)] = &[
    ("id", "bigint", "184467"),
    ("account", "uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("name", "text", "customer 184467"),
    ("email", "text", "user184467@example.com"),
    ("amount", "numeric(12,2)", "26352.43"),
    ("qty", "integer", "7"),
    ("active", "boolean", "t"),
    ("tags", "text[]", "{tag7,x}"),
    (
        "payload",
        "jsonb",
        "{\"k\": 7, \"note\": \"some payload text here\"}",
    ),
    (
        "updated_at",
        "timestamp with time zone",
        "2026-11-23 18:09:00.123456+00",
    ),
];

/// An Insert message as PostgreSQL 15's pgoutput sends it for `COLUMNS`.
fn insert_message() -> Vec<u8> {
    let mut m = vec![b'I'];
    m.extend_from_slice(&16384u32.to_be_bytes());
    m.push(b'N');
    m.extend_from_slice(&(COLUMNS.len() as u16).to_be_bytes());
    for (_, _, v) in COLUMNS {
        m.push(b't');
        m.extend_from_slice(&(v.len() as u32).to_be_bytes());
        m.extend_from_slice(v.as_bytes());
    }
    m
}

fn reader() -> TxnAssembler {
    let mut r = TxnAssembler::new("a", "app", Some("0123456789abcdef".into()));
    r.add_table(
        16384,
        TableInfo {
            schema: "public".into(),
            name: "bench_rows".into(),
            columns: COLUMNS.iter().map(|c| c.0.to_string()).collect(),
            types: COLUMNS.iter().map(|c| c.1.to_string()).collect(),
            key: vec!["id".into()],
        },
    );
    let mut out = Vec::new();
    let begin = LogicalMessage::Begin {
        final_lsn: Lsn(0x5000),
        commit_ts: 0,
        xid: 7,
    };
    r.handle(begin, Lsn(1), 0, &mut out).unwrap();
    r
}

fn event() -> ChangeEvent {
    let mut r = reader();
    let mut out = Vec::new();
    let msg = pgoutput::decode(&insert_message()).unwrap();
    r.handle(msg.clone(), Lsn(1), 0, &mut out).unwrap();
    r.handle(msg, Lsn(1), 0, &mut out).unwrap();
    match out.remove(0) {
        Output::Event(e) => *e,
        _ => unreachable!("an insert gives an event"),
    }
}

fn bench(c: &mut Criterion) {
    let msg = insert_message();
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pgoutput_decode", |b| {
        b.iter(|| pgoutput::decode(black_box(&msg)).unwrap())
    });
    let decoded = pgoutput::decode(&msg).unwrap();
    let mut r = reader();
    let mut out = Vec::with_capacity(4);
    g.bench_function("reader_to_event", |b| {
        b.iter(|| {
            out.clear();
            r.handle(black_box(decoded.clone()), Lsn(1), 0, &mut out)
                .unwrap();
        })
    });
    let ev = event();
    g.bench_function("envelope_encode", |b| b.iter(|| black_box(&ev).to_json()));
    let json = ev.to_json();
    g.bench_function("envelope_decode", |b| {
        b.iter(|| ChangeEvent::from_json(black_box(&json)).unwrap())
    });
    // As the apply side decodes: events of one table share their type list.
    let mut types = duplex::event::TypesCache::default();
    g.bench_function("envelope_decode_shared_types", |b| {
        b.iter(|| ChangeEvent::from_json_in(black_box(&json), &mut types).unwrap())
    });
    g.finish();

    let table = TargetTable {
        name: "public.bench_rows".into(),
        label: "public.bench_rows".into(),
        sql_name: "\"public\".\"bench_rows\"".into(),
        columns: COLUMNS
            .iter()
            .map(|(n, t, _)| TargetColumn {
                name: n.to_string(),
                type_sql: t.to_string(),
                generated: false,
            })
            .collect(),
        key: vec!["id".into()],
        updated_at: "updated_at".into(),
    };
    let cols: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
    let mut g = c.benchmark_group("apply_statements");
    g.bench_function("upsert_sql", |b| {
        b.iter(|| black_box(&table).upsert_sql(black_box(&cols)))
    });
    g.bench_function("decide_sql", |b| b.iter(|| black_box(&table).decide_sql()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
