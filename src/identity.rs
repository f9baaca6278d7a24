//! Deterministic identities: a UUIDv5 derived from a row's natural key, so that a row
//! created independently on both nodes gets the same primary key on each.
//!
//! Canonical encoding, byte for byte: the natural-key columns' values as their types'
//! output functions print them, in the configured order, encoded as UTF-8 and joined with
//! the single byte 0x1F (ASCII unit separator); no prefix, suffix or normalisation.
//! The id is `uuid5(namespace, that byte string)` — the same as Python's
//! `uuid.uuid5(ns, "\x1f".join(values))` and PostgreSQL's
//! `uuid_generate_v5(ns, concat_ws(E'\x1f', c1, c2))` (not `c1::text`: a bool casts
//! to `true` but prints as `t`). A NULL in a key
//! column has no encoding and is an error. The namespace is a UUID, or any other string
//! `s`, which stands for `uuid5(6ba7b811-9dad-11d1-80b4-00c04fd430c8, s)` (the URL
//! namespace).

use uuid::Uuid;

/// The separator between natural-key values.
pub const SEPARATOR: u8 = 0x1f;

/// Errors deriving an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("natural-key column {0} is NULL: a deterministic id needs every key column")]
    NullKey(String),
    #[error("natural-key value {0:?} contains the separator byte 0x1F")]
    Separator(String),
}

/// The namespace UUID for a configured namespace string.
pub fn namespace(ns: &str) -> Uuid {
    Uuid::parse_str(ns).unwrap_or_else(|_| Uuid::new_v5(&Uuid::NAMESPACE_URL, ns.as_bytes()))
}

/// Derives the id from `(column, value)` pairs in key order.
pub fn derive(ns: &Uuid, values: &[(&str, Option<&str>)]) -> Result<Uuid, IdentityError> {
    let mut name = Vec::new();
    for (i, (column, value)) in values.iter().enumerate() {
        let v = value.ok_or_else(|| IdentityError::NullKey(column.to_string()))?;
        if v.as_bytes().contains(&SEPARATOR) {
            return Err(IdentityError::Separator(v.to_string()));
        }
        if i > 0 {
            name.push(SEPARATOR);
        }
        name.extend_from_slice(v.as_bytes());
    }
    Ok(Uuid::new_v5(ns, &name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_uuid5_values() {
        // uuid.uuid5(uuid.NAMESPACE_DNS, "python.org") from Python's documentation.
        let ns = namespace("6ba7b810-9dad-11d1-80b4-00c04fd430c8");
        let id = derive(&ns, &[("host", Some("python.org"))]).unwrap();
        assert_eq!(id.to_string(), "886313e1-3b8a-5372-9b90-0c9aee199e5d");
    }

    #[test]
    fn multi_column_keys_join_with_the_unit_separator() {
        let ns = namespace("orders");
        let joined = derive(&ns, &[("k", Some("a\u{1f}b"))]);
        assert!(joined.is_err());
        let two = derive(&ns, &[("x", Some("a")), ("y", Some("b"))]).unwrap();
        assert_eq!(two, Uuid::new_v5(&ns, b"a\x1fb"));
        assert_ne!(two, derive(&ns, &[("x", Some("ab"))]).unwrap());
    }

    #[test]
    fn null_key_columns_are_errors() {
        let e = derive(&namespace("x"), &[("email", None)]).unwrap_err();
        assert!(e.to_string().contains("email"));
    }

    #[test]
    fn names_are_hashed_into_the_url_namespace() {
        assert_eq!(
            namespace("orders"),
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"orders")
        );
    }
}
