//! How a batch is cut for writing: per table, the row changes of each key in one
//! set-based statement, with a truncate as a barrier nothing moves across.

use crate::event::{ChangeEvent, Op};
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Upsert,
    Delete,
    Truncate,
}

/// A run of events of one table: indexes into the slice being applied. `kind` is
/// `Truncate` for a truncate, else `Upsert` for row changes of any kind.
pub(super) struct Run {
    pub table: String,
    pub kind: Kind,
    pub items: Vec<usize>,
}

/// Groups events into runs: one per table with all its row changes, in order of first
/// appearance; a truncate is a run of its own and a barrier nothing moves across.
pub(super) fn runs(events: &[Cow<'_, ChangeEvent>]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut segment = 0;
    for (i, ev) in events.iter().enumerate() {
        let (schema, name) = (&ev.source.schema, &ev.source.table);
        let table = || format!("{schema}.{name}");
        if ev.op == Op::Truncate {
            out.push(Run {
                table: table(),
                kind: Kind::Truncate,
                items: vec![i],
            });
            segment = out.len();
            continue;
        }
        // Compared without building the name: this runs for every event.
        let same = |r: &&mut Run| {
            r.table.len() == schema.len() + 1 + name.len()
                && r.table.starts_with(schema.as_str())
                && r.table[schema.len()..].starts_with('.')
                && r.table.ends_with(name.as_str())
        };
        match out[segment..].iter_mut().rev().find(same) {
            Some(r) => r.items.push(i),
            None => out.push(Run {
                table: table(),
                kind: Kind::Upsert,
                items: vec![i],
            }),
        }
    }
    out
}

/// How an event changes its row.
pub(super) fn kind_of(ev: &ChangeEvent) -> Kind {
    match ev.op {
        Op::Insert | Op::Update => Kind::Upsert,
        Op::Delete => Kind::Delete,
        Op::Truncate => Kind::Truncate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Lsn, Source};

    fn ev(table: &str, op: Op) -> ChangeEvent {
        ChangeEvent {
            op,
            before: None,
            after: None,
            key: vec![],
            types: std::sync::Arc::from([]),
            source: Source {
                node: "a".into(),
                db: "app".into(),
                schema: "public".into(),
                table: table.into(),
                lsn: Lsn(1),
                seq: 0,
                last: false,
                xid: 1,
                commit_ts_us: 0,
                stream: None,
                prev_lsn: None,
            },
            ts_ms: 0,
        }
    }

    #[test]
    fn runs_group_a_table_until_a_truncate() {
        let events = [
            ev("t1", Op::Insert),
            ev("t2", Op::Insert),
            ev("t1", Op::Delete),
            ev("t1", Op::Truncate),
            ev("t1", Op::Update),
        ];
        let events: Vec<Cow<ChangeEvent>> = events.iter().map(Cow::Borrowed).collect();
        let got: Vec<(String, Vec<usize>)> = runs(&events)
            .into_iter()
            .map(|r| (r.table, r.items))
            .collect();
        let want = [
            ("public.t1", vec![0, 2]),
            ("public.t2", vec![1]),
            ("public.t1", vec![3]),
            ("public.t1", vec![4]),
        ];
        assert_eq!(got, want.map(|(t, i)| (t.to_string(), i)));
    }
}
