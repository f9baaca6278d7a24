//! The apply log: a trigger that records every version an apply session writes, and
//! the check that no version was written twice except as a repair.

use tokio_postgres::Client;

/// Every version an apply session writes to `tables`, in `apply_log`, to prove none is
/// written twice: the trigger fires in apply sessions (ALWAYS) and only there (origin
/// set).
pub fn apply_log_ddl(tables: &[&str]) -> String {
    let mut ddl = String::from(
        "CREATE TABLE apply_log (tbl text, id text, updated_at timestamptz);
         CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF pg_replication_origin_session_is_setup() THEN
             INSERT INTO apply_log VALUES (TG_TABLE_NAME, NEW.id::text, NEW.updated_at);
           END IF;
           RETURN NULL;
         END $$;",
    );
    for t in tables {
        ddl.push_str(&format!(
            "CREATE TRIGGER log_{t} AFTER INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION log_apply();
             ALTER TABLE {t} ENABLE ALWAYS TRIGGER log_{t};"
        ));
    }
    ddl
}

/// Versions applied more than once on `c` (per its `apply_log`) that the peer did not
/// re-send as a repair: a replayed event must never be applied twice.
pub async fn applied_twice(c: &Client, peer: &Client) -> i64 {
    let repaired = peer
        .query(
            "SELECT split_part(table_name, '.', 2), image->>'id', image->>'updated_at'
             FROM duplex.repairs WHERE deleted_at IS NULL",
            &[],
        )
        .await
        .unwrap();
    let column = |n: usize| -> Vec<String> { repaired.iter().map(|r| r.get(n)).collect() };
    let (tables, ids, times) = (column(0), column(1), column(2));
    c.query_one(
        "SELECT count(*) FROM (SELECT tbl, id, updated_at FROM apply_log
                               GROUP BY tbl, id, updated_at HAVING count(*) > 1) d
         WHERE (tbl, id, updated_at) NOT IN
               (SELECT t, i, u::timestamptz FROM unnest($1::text[], $2::text[], $3::text[]) AS r(t, i, u))",
        &[&tables, &ids, &times],
    )
    .await
    .unwrap()
    .get(0)
}
