//! Unit tests of `walsender`.

use super::*;

#[test]
fn keepalive_and_xlogdata_parse() {
    let mut k = vec![b'k'];
    k.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
    k.extend_from_slice(&7i64.to_be_bytes());
    k.push(1);
    match parse_copy_data(Bytes::from(k)).unwrap() {
        ReplicationMessage::Keepalive {
            wal_end,
            reply_requested,
        } => {
            assert_eq!(wal_end, Lsn(0x1_0000_0010));
            assert!(reply_requested);
        }
        other => panic!("{other:?}"),
    }
    let mut w = vec![b'w'];
    w.extend_from_slice(&5u64.to_be_bytes());
    w.extend_from_slice(&[0; 16]);
    w.extend_from_slice(b"B...");
    match parse_copy_data(Bytes::from(w)).unwrap() {
        ReplicationMessage::XLogData { wal_start, data } => {
            assert_eq!(wal_start, Lsn(5));
            assert_eq!(&data[..], b"B...");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn short_copy_data_is_an_error() {
    assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"w123")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"k1")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"zzzzzzzzzzzzzzzzzzzzzzzzzz")).is_err());
}

#[test]
fn server_versions_give_their_major() {
    assert_eq!(major_of("13.23"), 13);
    assert_eq!(major_of("15.18 (Debian 15.18-1.pgdg120+1)"), 15);
    assert_eq!(major_of("18beta1"), 18);
    assert_eq!(major_of(""), 0);
}

#[test]
fn pgoutput_asks_for_messages_only_where_the_server_has_them() {
    let on = |major| pgoutput_options(major, "duplex_pub", false);
    assert_eq!(
        on(13),
        "proto_version '1', publication_names '\"duplex_pub\"'"
    );
    for major in [14, 15, 16, 17, 18, 0] {
        assert!(on(major).ends_with(", messages 'true'"), "{major}");
    }
}

#[test]
fn pgoutput_filters_origins_only_when_asked_and_only_from_16() {
    let local = |major| pgoutput_options(major, "duplex_pub", true);
    for major in [13, 14, 15, 0] {
        assert!(!local(major).contains("origin"), "{major}");
    }
    for major in [16, 17, 18] {
        assert_eq!(
            local(major),
            "proto_version '1', publication_names '\"duplex_pub\"', messages 'true', origin 'none'"
        );
        assert!(!pgoutput_options(major, "duplex_pub", false).contains("origin"));
    }
}
