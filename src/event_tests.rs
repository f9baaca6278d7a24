//! Unit tests of `event`.

use super::*;

fn sample() -> ChangeEvent {
    ChangeEvent {
        op: Op::Update,
        before: None,
        after: Some(Row(vec![
            ("id".into(), Value::Text("42".into())),
            ("body".into(), Value::UnchangedToast),
            ("note".into(), Value::Null),
            (
                "name".into(),
                Value::Text("Zoë \"quoted\" \u{1F600}".into()),
            ),
        ])),
        key: vec!["id".into()],
        types: vec![
            ("id".into(), "bigint".into()),
            ("body".into(), "text".into()),
            ("note".into(), "text".into()),
            ("name".into(), "text".into()),
        ]
        .into(),
        source: Source {
            node: "a".into(),
            db: "app".into(),
            schema: "public".into(),
            table: "items".into(),
            lsn: Lsn(0x1_0000_00ff),
            seq: 3,
            last: true,
            xid: 900,
            commit_ts_us: 1_700_000_000_123_456,
            stream: Some("5f1c2d3e4a5b6c7d".into()),
            prev_lsn: Some(Lsn(0x16B2000)),
        },
        ts_ms: 1_700_000_000_200,
    }
}

#[test]
fn unix_microseconds_format_as_utc_timestamps() {
    assert_eq!(format_unix_us(0), "1970-01-01 00:00:00.000000+00");
    assert_eq!(
        format_unix_us(1_709_251_199_123_456),
        "2024-02-29 23:59:59.123456+00"
    );
    assert_eq!(format_unix_us(-1), "1969-12-31 23:59:59.999999+00");
}

#[test]
fn lsn_prints_and_parses_like_postgres() {
    assert_eq!(Lsn(0x16B3748).to_string(), "0/16B3748");
    assert_eq!(Lsn(0x1_0000_00ff).to_string(), "1/FF");
    assert_eq!("1/FF".parse::<Lsn>().unwrap(), Lsn(0x1_0000_00ff));
    assert!("1FF".parse::<Lsn>().is_err());
    assert!("x/1".parse::<Lsn>().is_err());
}

#[test]
fn envelope_round_trips_null_and_unchanged_toast_distinctly() {
    let ev = sample();
    let json = ev.to_json();
    let text = String::from_utf8(json.clone()).unwrap();
    assert!(text.contains(r#""note":null"#), "{text}");
    assert!(text.contains(r#""unchanged_toast":["body"]"#), "{text}");
    assert!(!text.contains(r#""body":"#) || text.contains(r#""body":"text""#));
    let back = ChangeEvent::from_json(&json).unwrap();
    assert_eq!(back, ev);
}

#[test]
fn kafka_key_names_table_and_key_values() {
    let key = String::from_utf8(sample().kafka_key()).unwrap();
    assert_eq!(key, r#"{"key":{"id":"42"},"table":"public.items"}"#);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(ChangeEvent::from_json(b"{").is_err());
    assert!(ChangeEvent::from_json(br#"{"op":"x"}"#).is_err());
}

#[test]
fn events_of_one_table_share_their_type_list_and_others_do_not() {
    let mut cache = TypesCache::default();
    let json = sample().to_json();
    let first = ChangeEvent::from_json_in(&json, &mut cache).unwrap();
    let second = ChangeEvent::from_json_in(&json, &mut cache).unwrap();
    assert!(Arc::ptr_eq(&first.types, &second.types));
    assert_eq!(second, sample());
    // A column name with an escape (not borrowed from the message) decodes too, and a
    // different list gets its own copy.
    let mut other = sample();
    other.types = vec![
        ("id".into(), "bigint".into()),
        ("na\"me".into(), "text".into()),
    ]
    .into();
    other.after = Some(Row(vec![("id".into(), Value::Text("1".into()))]));
    let third = ChangeEvent::from_json_in(&other.to_json(), &mut cache).unwrap();
    assert_eq!(third, other);
    assert!(!Arc::ptr_eq(&first.types, &third.types));
    let fourth = ChangeEvent::from_json_in(&json, &mut cache).unwrap();
    assert!(Arc::ptr_eq(&first.types, &fourth.types));
}
