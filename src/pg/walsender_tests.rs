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
