//! Tests of the transaction assembler: numbering, echo suppression, repairs, old rows
//! and bad input.
use super::*;

fn reader() -> TxnAssembler {
    let mut r = TxnAssembler::new("a", "app", None);
    r.add_table(
        7,
        TableInfo {
            schema: "public".into(),
            name: "items".into(),
            columns: vec!["id".into(), "body".into()],
            types: vec!["bigint".into(), "text".into()],
            key: vec!["id".into()],
        },
    );
    r
}

fn text(s: &str) -> ColumnData {
    ColumnData::Text(s.as_bytes().to_vec())
}

fn feed(r: &mut TxnAssembler, msgs: Vec<LogicalMessage>) -> Vec<Output> {
    let mut out = Vec::new();
    for m in msgs {
        r.handle(m, Lsn(1), 0, &mut out).unwrap();
    }
    out
}

fn begin() -> LogicalMessage {
    LogicalMessage::Begin {
        final_lsn: Lsn(100),
        commit_ts: 0,
        xid: 9,
    }
}

fn commit() -> LogicalMessage {
    LogicalMessage::Commit {
        flags: 0,
        commit_lsn: Lsn(100),
        end_lsn: Lsn(130),
        commit_ts: 0,
    }
}

fn insert(id: &str) -> LogicalMessage {
    LogicalMessage::Insert {
        relation_id: 7,
        new: TupleData(vec![text(id), ColumnData::UnchangedToast]),
    }
}

#[test]
fn events_are_numbered_and_the_last_is_flagged() {
    let mut r = reader();
    let out = feed(
        &mut r,
        vec![begin(), insert("1"), insert("2"), insert("3"), commit()],
    );
    let evs: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(evs.len(), 3);
    assert_eq!(
        evs.iter()
            .map(|e| (e.source.seq, e.source.last))
            .collect::<Vec<_>>(),
        vec![(0, false), (1, false), (2, true)]
    );
    assert!(evs.iter().all(|e| e.source.lsn == Lsn(100)));
    assert_eq!(
        evs[0].after.as_ref().unwrap().get("body"),
        Some(&Value::UnchangedToast)
    );
    assert!(matches!(
        out.last(),
        Some(Output::Commit {
            end_lsn: Lsn(130),
            events: 3,
            echo: false,
            ..
        })
    ));
}

#[test]
fn duplex_origin_transactions_are_dropped_but_still_committed() {
    let mut r = reader();
    let origin = LogicalMessage::Origin {
        origin_lsn: Lsn(5),
        name: "duplex_from_b".into(),
    };
    let out = feed(&mut r, vec![begin(), origin, insert("1"), commit()]);
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out[0],
        Output::Commit {
            echo: true,
            events: 0,
            ..
        }
    ));
    // Another tool's origin is not an echo.
    let other = LogicalMessage::Origin {
        origin_lsn: Lsn(5),
        name: "pg_16384".into(),
    };
    let out = feed(&mut r, vec![begin(), other, insert("1"), commit()]);
    assert_eq!(out.len(), 2);
}

#[test]
fn repairs_written_by_apply_sessions_are_published() {
    let mut r = reader();
    r.add_table(
        8,
        TableInfo {
            schema: "duplex".into(),
            name: "repairs".into(),
            columns: vec!["id".into()],
            types: vec!["bigint".into()],
            key: vec!["id".into()],
        },
    );
    let origin = LogicalMessage::Origin {
        origin_lsn: Lsn(5),
        name: "duplex_from_b".into(),
    };
    let repair = LogicalMessage::Insert {
        relation_id: 8,
        new: TupleData(vec![text("1")]),
    };
    let pruned = LogicalMessage::Delete {
        relation_id: 8,
        old: OldTuple::Key(TupleData(vec![text("1")])),
    };
    let out = feed(
        &mut r,
        vec![
            begin(),
            origin.clone(),
            insert("1"),
            repair,
            pruned,
            commit(),
        ],
    );
    let Output::Event(ev) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!((ev.source.table.as_str(), ev.source.seq), ("repairs", 0));
    assert!(ev.source.last);
    assert!(matches!(
        out[1],
        Output::Commit {
            events: 1,
            echo: true,
            ..
        }
    ));
    assert_eq!(out.len(), 2);
    // Begin carried the origin's stale timestamp (0 here): the event is stamped
    // with the time it was read instead.
    let mut out = Vec::new();
    let second = LogicalMessage::Insert {
        relation_id: 8,
        new: TupleData(vec![text("2")]),
    };
    for m in [begin(), origin, second, commit()] {
        r.handle(m, Lsn(1), 1_700_000_000_000, &mut out).unwrap();
    }
    let Output::Event(stamped) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(stamped.source.commit_ts_us, 1_700_000_000_000_000);
}

#[test]
fn key_only_old_tuples_keep_just_the_key() {
    let mut r = reader();
    let upd = LogicalMessage::Update {
        relation_id: 7,
        old: Some(OldTuple::Key(TupleData(vec![text("1"), ColumnData::Null]))),
        new: TupleData(vec![text("2"), text("x")]),
    };
    let out = feed(&mut r, vec![begin(), upd, commit()]);
    let Output::Event(ev) = &out[0] else { panic!() };
    assert_eq!(
        ev.before.as_ref().unwrap().0,
        vec![("id".to_string(), Value::Text("1".into()))]
    );
}

#[test]
fn unknown_relation_and_bad_utf8_are_errors() {
    let mut r = reader();
    let mut out = Vec::new();
    r.handle(begin(), Lsn(1), 0, &mut out).unwrap();
    let bad = LogicalMessage::Insert {
        relation_id: 8,
        new: TupleData(vec![]),
    };
    assert!(r.handle(bad, Lsn(1), 0, &mut out).is_err());
    let bad = LogicalMessage::Insert {
        relation_id: 7,
        new: TupleData(vec![ColumnData::Text(vec![0xff]), ColumnData::Null]),
    };
    let e = r.handle(bad, Lsn(1), 0, &mut out).unwrap_err().to_string();
    assert!(e.contains("public.items") && e.contains("id"), "{e}");
    assert!(r.handle(commit(), Lsn(1), 0, &mut out).is_ok());
    assert!(r.handle(commit(), Lsn(1), 0, &mut out).is_err());
}

fn begin_at(lsn: u64) -> LogicalMessage {
    LogicalMessage::Begin {
        final_lsn: Lsn(lsn),
        commit_ts: 0,
        xid: 9,
    }
}

fn commit_at(lsn: u64) -> LogicalMessage {
    LogicalMessage::Commit {
        flags: 0,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 30),
        commit_ts: 0,
    }
}

fn prev_links(out: &[Output]) -> Vec<(Lsn, Option<Lsn>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some((e.source.lsn, e.source.prev_lsn)),
            _ => None,
        })
        .collect()
}

#[test]
fn each_transaction_links_to_the_one_published_before_it() {
    let mut r = reader();
    let echo = LogicalMessage::Origin {
        origin_lsn: Lsn(5),
        name: "duplex_from_b".into(),
    };
    let out = feed(
        &mut r,
        vec![
            begin_at(100),
            insert("1"),
            insert("2"),
            commit_at(100),
            // An echo publishes nothing: the next transaction links past it.
            begin_at(200),
            echo,
            insert("3"),
            commit_at(200),
            begin_at(300),
            insert("4"),
            commit_at(300),
        ],
    );
    assert_eq!(
        prev_links(&out),
        vec![
            (Lsn(100), None),
            (Lsn(100), None),
            (Lsn(300), Some(Lsn(100)))
        ]
    );
}
