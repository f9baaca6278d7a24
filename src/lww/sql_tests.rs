//! Unit tests of `sql`.

use super::*;
use crate::pg::table::TargetColumn;

fn items() -> TargetTable {
    TargetTable {
        name: "public.items".into(),
        label: "public.items".into(),
        sql_name: "\"public\".\"items\"".into(),
        columns: vec![
            TargetColumn {
                name: "id".into(),
                type_sql: "bigint".into(),
                generated: false,
            },
            TargetColumn {
                name: "body".into(),
                type_sql: "text".into(),
                generated: false,
            },
            TargetColumn {
                name: "updated_at".into(),
                type_sql: "timestamp with time zone".into(),
                generated: false,
            },
        ],
        key: vec!["id".into()],
        updated_at: "updated_at".into(),
    }
}

#[test]
fn upsert_casts_to_target_types_and_guards_lww() {
    let sql = items().upsert_sql(&["id", "body", "updated_at"]);
    assert!(
        sql.contains("i.c0::bigint, i.c1::text, i.c2::timestamp with time zone"),
        "{sql}"
    );
    assert!(
        sql.contains("ON CONFLICT (\"id\") DO UPDATE SET \"body\" = EXCLUDED.\"body\""),
        "{sql}"
    );
    assert!(!sql.contains("\"id\" = EXCLUDED"), "{sql}");
    assert!(sql.contains("$4::bool"), "{sql}");
}

#[test]
fn upserts_lock_in_key_order_and_repairs_carry_every_column() {
    let t = items();
    let sql = t.upsert_sql(&["body", "id", "updated_at"]);
    assert!(sql.contains("ORDER BY 2 ON CONFLICT"), "{sql}");
    let r = t.repair_sql();
    assert!(
        r.contains("jsonb_build_object('id', CASE WHEN t.\"id\" IS NULL THEN NULL ELSE concat(t.\"id\") END, 'body', CASE"),
    );
    assert!(r.contains("ELSE jsonb_build_object('id', i.k0) END"), "{r}");
    let settle = t.settle_sql();
    assert!(
        settle.contains("WHERE table_name = $2::text AND key = jsonb_build_array(i.k0)"),
        "{settle}"
    );
    assert!(
        settle.contains("FROM duplex.truncations WHERE table_name = $2::text"),
        "{settle}"
    );
}

#[test]
fn repairs_leave_generated_columns_out() {
    let mut t = items();
    t.columns.push(TargetColumn {
        name: "total".into(),
        type_sql: "integer".into(),
        generated: true,
    });
    let r = t.repair_sql();
    assert!(r.contains("'body', CASE"), "{r}");
    assert!(!r.contains("total"), "{r}");
}

#[test]
fn decide_and_delete_number_their_parameters() {
    let t = items();
    let d = t.decide_sql();
    assert!(
        d.contains("unnest($1::text[], $2::text[], $6::bool[])"),
        "{d}"
    );
    assert!(
        d.contains("$3::text")
            && d.contains("$4::bool")
            && d.contains("$5::int8")
            && d.contains("$6::bool[]"),
        "{d}"
    );
    let del = t.delete_sql();
    assert!(del.contains("unnest($1::text[], $2::text[])"), "{del}");
    assert!(del.contains("t.\"id\" = i.k0::bigint"), "{del}");
}

#[test]
fn the_upsert_decides_in_the_statement_and_returns_what_it_wrote() {
    let sql = items().upsert_sql(&["body", "id", "updated_at"]);
    // NULL versions, versions too far ahead and versions a tombstone beats are not
    // inserted; the tombstone is looked up by the incoming key text.
    assert!(
        sql.contains("WHERE i.c2::timestamp with time zone IS NOT NULL"),
        "{sql}"
    );
    assert!(
        sql.contains("key = jsonb_build_array(i.c1)")
            && sql.contains("deleted_at >= i.c2::timestamp with time zone"),
        "{sql}"
    );
    // The key's tombstone is looked up only when the table's newest is not older.
    assert!(
        sql.contains(
            "CASE WHEN g.tomb IS NULL OR g.tomb < i.c2::timestamp with time zone THEN true"
        ) && sql.contains("g.trunc IS NULL OR g.trunc < i.c2::timestamp with time zone"),
        "{sql}"
    );
    assert!(
        sql.contains("$5::text") && sql.contains("$6::int8"),
        "{sql}"
    );
    assert!(sql.ends_with("RETURNING \"id\"::text"), "{sql}");
    let keys = items().key_text_sql();
    assert!(keys.contains("i.k0::bigint::text"), "{keys}");
    assert!(keys.contains("ORDER BY ord"), "{keys}");
}

#[test]
fn settling_looks_keys_up_only_when_a_tombstone_is_new_enough() {
    let settle = items().settle_sql();
    assert!(
        settle.contains("(SELECT min(u::timestamp with time zone) FROM unnest($3::text[]) AS u)"),
        "{settle}"
    );
    assert!(
        settle.contains(
            "(SELECT max(deleted_at) FROM duplex.tombstones WHERE table_name = $2::text)"
        ) && settle.contains(") >= (SELECT min("),
        "{settle}"
    );
}
