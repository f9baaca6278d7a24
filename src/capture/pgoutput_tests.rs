//! Tests of the pgoutput decoder on real PostgreSQL 15 bytes and on broken input.
use super::*;

/// Real messages from PostgreSQL 15 (see `testdata/pgoutput/capture.sql`), each hex
/// line preceded by a comment holding the expected [`render`]ing of its decoding.
const FIXTURES: [&str; 8] = [
    include_str!("testdata/pgoutput/insert.hex"),
    include_str!("testdata/pgoutput/update.hex"),
    include_str!("testdata/pgoutput/delete.hex"),
    include_str!("testdata/pgoutput/toast.hex"),
    include_str!("testdata/pgoutput/replica_identity_full.hex"),
    include_str!("testdata/pgoutput/truncate.hex"),
    include_str!("testdata/pgoutput/message.hex"),
    include_str!("testdata/pgoutput/origin.hex"),
];

/// `(last comment line, bytes)` for every hex line of a fixture file.
fn parse(text: &'static str) -> Vec<(&'static str, Vec<u8>)> {
    let mut comment = "";
    let mut out = Vec::new();
    for line in text.lines() {
        match line.strip_prefix('#') {
            Some(c) => comment = c.trim_start(),
            None => out.push((comment, hex(line))),
        }
    }
    out
}

fn hex(line: &str) -> Vec<u8> {
    let digits: Vec<u8> = line.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let byte = |pair: &[u8]| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16);
    digits.chunks(2).map(|pair| byte(pair).unwrap()).collect()
}

fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    FIXTURES.into_iter().flat_map(parse).collect()
}

/// The message's `Debug` form, except that column values and message contents
/// are shown as strings (the fixtures are UTF-8) rather than lists of numbers.
fn render(m: &LogicalMessage) -> String {
    let col = |c: &ColumnData| match c {
        ColumnData::Text(v) => format!("{:?}", std::str::from_utf8(v).unwrap()),
        ColumnData::Binary(v) => format!("b\"{}\"", v.escape_ascii()),
        other => format!("{other:?}"),
    };
    let tuple = |t: &TupleData| t.0.iter().map(col).collect::<Vec<_>>().join(", ");
    let old = |o: &OldTuple| match o {
        OldTuple::Key(t) => format!("Key([{}])", tuple(t)),
        OldTuple::Full(t) => format!("Full([{}])", tuple(t)),
    };
    match m {
        LogicalMessage::Insert {
            relation_id: id,
            new,
        } => {
            format!("Insert {{ relation_id: {id}, new: [{}] }}", tuple(new))
        }
        LogicalMessage::Update {
            relation_id: id,
            old: o,
            new,
        } => {
            let o = o
                .as_ref()
                .map_or("None".into(), |o| format!("Some({})", old(o)));
            format!(
                "Update {{ relation_id: {id}, old: {o}, new: [{}] }}",
                tuple(new)
            )
        }
        LogicalMessage::Delete {
            relation_id: id,
            old: o,
        } => {
            format!("Delete {{ relation_id: {id}, old: {} }}", old(o))
        }
        LogicalMessage::Message {
            transactional: t,
            lsn,
            prefix: p,
            content: c,
        } => {
            let head = format!("Message {{ transactional: {t}, lsn: {lsn:?}");
            format!(
                "{head}, prefix: {p:?}, content: b\"{}\" }}",
                c.escape_ascii()
            )
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn decodes_captured_messages_exactly() {
    for (expected, bytes) in fixtures() {
        assert_eq!(render(&decode(&bytes).unwrap()), expected);
    }
}

#[test]
fn fixtures_cover_what_the_decoder_must_handle() {
    let all: Vec<&str> = fixtures().into_iter().map(|(e, _)| e).collect();
    let seen = |needle: &str| all.iter().any(|e| e.contains(needle));
    let kinds = "Begin Commit Origin Relation Type Insert Update Delete Truncate Message";
    assert!(kinds
        .split(' ')
        .all(|k| all.iter().any(|e| e.starts_with(k))));
    let shapes = "old: None|old: Some(Key(|old: Some(Full(|old: Key(|old: Full(";
    let values = "UnchangedToast|Null]|transactional: true|transactional: false|Zoë 日本 😀";
    assert!(shapes.split('|').chain(values.split('|')).all(seen));
    // The unchanged value really is TOASTed: larger than a page.
    let toasted = all
        .iter()
        .find(|e| e.starts_with("Insert { relation_id: 16398,"));
    assert!(toasted.unwrap().len() > 8192);
}

#[test]
fn every_prefix_is_truncated_and_an_extra_byte_is_trailing() {
    for (_, m) in fixtures() {
        for len in 0..m.len() {
            let err = decode(&m[..len]).unwrap_err();
            let cut = matches!(err, DecodeError::Truncated { .. });
            assert!(
                cut || matches!(err, DecodeError::Unterminated { .. }),
                "{err}"
            );
        }
        let err = decode(&[&m[..], &[0]].concat()).unwrap_err();
        let DecodeError::TrailingBytes { offset, count, .. } = err else {
            panic!("{err}")
        };
        assert_eq!((offset, count), (m.len(), 1));
    }
}

#[test]
fn mutated_fixtures_never_panic() {
    let all = fixtures();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound.max(1) as u64) as usize
    };
    for _ in 0..20_000 {
        let mut m = all[next(all.len())].1.clone();
        for _ in 0..=next(4) {
            let (i, bit, byte) = (next(m.len()), 1 << next(8), next(256) as u8);
            match next(5) {
                0 if i < m.len() => m[i] ^= bit,
                1 if i < m.len() => m[i] = byte,
                2 => m.truncate(i),
                3 => m.insert(i, byte),
                // Runs of 0xff make counts and lengths negative or huge.
                _ => m.iter_mut().skip(i).take(4).for_each(|b| *b = 0xff),
            }
        }
        if let Err(e) = decode(&m) {
            assert!(e.to_string().contains(" pgoutput "), "{e}");
        }
    }
}

#[test]
fn errors_name_the_field_and_offset() {
    let cases = parse(include_str!("testdata/pgoutput/errors.hex"));
    assert_eq!(cases.len(), 14);
    for (expected, input) in cases {
        assert_eq!(decode(&input).unwrap_err().to_string(), expected);
    }
}

#[test]
fn binary_columns_are_kept_apart_from_text() {
    let (relation_id, id) = (7, 7_u32.to_be_bytes());
    let input = [&b"I"[..], &id, b"N\0\x02b\0\0\0\x02\xde\xadn"].concat();
    let new = TupleData(vec![ColumnData::Binary(vec![0xde, 0xad]), ColumnData::Null]);
    assert_eq!(
        decode(&input),
        Ok(LogicalMessage::Insert { relation_id, new })
    );
}
