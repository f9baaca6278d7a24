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

use crate::config::IdentityConfig;
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

/// SQL creating the trigger that fills in a missing id on `table` (quoted; configured
/// as `table_name`) and rejects a row whose id disagrees with its natural key, with
/// `uuid_generate_v5` from the uuid-ossp extension installed in `ext_schema`. Each
/// natural-key column is printed by its type's output function (`concat_ws` does so;
/// `col::text` would print a bool as `true`, not `t`) under duplex's fixed output
/// settings, as pgoutput prints it and the apply side checks. Applied rows are checked
/// by the apply side instead: apply sessions run as replica, where this trigger does
/// not fire.
pub fn trigger_ddl(
    table_name: &str,
    table: &str,
    id: &IdentityConfig,
    ext_schema: &str,
) -> crate::pg::triggers::TriggerDdl {
    let q = crate::capture::walsender::quote_ident;
    let literal = crate::capture::walsender::quote_literal;
    let function = format!(
        "duplex.{}",
        crate::pg::triggers::per_table_name("identity", table_name)
    );
    let checks: Vec<String> = id
        .from
        .iter()
        .map(|c| {
            format!(
                "    IF NEW.{col} IS NULL THEN
        RAISE EXCEPTION 'duplex: natural-key column % of % is NULL', {name}, {tbl};
    END IF;",
                col = q(c),
                name = literal(c),
                tbl = literal(table_name),
            )
        })
        .collect();
    let values: Vec<String> = id.from.iter().map(|c| format!("NEW.{}", q(c))).collect();
    let body = format!(
        r#"
DECLARE
    derived uuid;
BEGIN
{checks}
    derived := {ext}.uuid_generate_v5({ns}::uuid, concat_ws(E'\x1f', {values}));
    IF NEW.{col} IS NULL THEN
        NEW.{col} := derived;
    ELSIF NEW.{col} <> derived THEN
        RAISE EXCEPTION 'duplex: % of % is % but its natural key derives %',
            {col_name}, {tbl}, NEW.{col}, derived;
    END IF;
    RETURN NEW;
END "#,
        checks = checks.join("\n"),
        ext = q(ext_schema),
        ns = literal(&namespace(&id.namespace).to_string()),
        values = values.join(", "),
        col = q(&id.column),
        col_name = literal(&id.column),
        tbl = literal(table_name),
    );
    let sql = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn${body}$fn$;
CREATE OR REPLACE TRIGGER duplex_identity BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();",
        settings = crate::pg::triggers::trigger_function_settings(),
    );
    crate::pg::triggers::TriggerDdl {
        function,
        body,
        triggers: vec!["duplex_identity"],
        sql,
    }
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
