//! The set-based SQL the writer runs against a table on the target node (the
//! table itself, [`TargetTable`], is read from the catalog by `pg::table`).
//!
//! Every statement takes its rows as parallel text arrays (`unnest($1::text[], ...)`)
//! and casts them to the target's own column types, so one round trip handles a whole
//! run of rows and the incoming type names are never spliced into SQL. Identifiers come
//! from the target's catalog and are always quoted.

use crate::pg::sql::{quote_ident, quote_literal};
use crate::pg::table::TargetTable;

impl TargetTable {
    /// `t.k1 = i.k1::type AND ...` joining the table (alias `t`) to incoming rows
    /// whose key columns are named `k0, k1, ...`.
    fn key_join(&self) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(n, k)| format!("t.{} = i.k{n}::{}", quote_ident(k), self.type_of(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `LATERAL` subquery `tb` with the key's `deleted_at`: its tombstone's time or the
    /// table's last truncation by another node than `$q` (the incoming node: its own
    /// rows follow its truncation in its commit order), whichever is later (NULL:
    /// neither). `$p` is the table name; incoming keys are `i.k0, ...`.
    fn deleted_lateral(&self, p: usize, q: usize) -> String {
        format!(
            "LATERAL (SELECT greatest(
                (SELECT deleted_at FROM duplex.tombstones WHERE table_name = ${p}::text AND key = {tomb}),
                {truncated}) AS deleted_at) tb",
            tomb = self.tombstone_key(),
            truncated = last_truncation(p, q),
        )
    }

    /// Applies a truncate of the source at time `$1` as a delete of every row not
    /// newer, and records the truncation (`$2` table name, `$3` source node): rows
    /// written later survive, and a truncate replayed late wipes nothing newer.
    pub fn truncate_sql(&self) -> String {
        let upd = quote_ident(&self.updated_at);
        format!(
            "WITH d AS (DELETE FROM {table} t WHERE t.{upd} IS NULL OR t.{upd} <= $1::text::{ty})
             INSERT INTO duplex.truncations (table_name, truncated_at, origin)
             VALUES ($2::text, $1::text::timestamptz, $3::text)
             ON CONFLICT (table_name) DO UPDATE
               SET truncated_at = greatest(duplex.truncations.truncated_at, EXCLUDED.truncated_at),
                   origin = CASE WHEN EXCLUDED.truncated_at >= duplex.truncations.truncated_at
                            THEN EXCLUDED.origin ELSE duplex.truncations.origin END",
            table = self.sql_name,
            ty = self.type_of(&self.updated_at),
        )
    }

    /// `jsonb_build_array(i.k0, i.k1, ...)`: the tombstone key of incoming rows.
    fn tombstone_key(&self) -> String {
        let ks: Vec<String> = (0..self.key.len()).map(|n| format!("i.k{n}")).collect();
        format!("jsonb_build_array({})", ks.join(", "))
    }

    /// Decides, for incoming rows given as key arrays `$1..$n`, their `updated_at`
    /// texts `$n+1` (the delete time for a delete), whether each wins: `$n+2` is the
    /// table name, `$n+3` true when the incoming node wins ties, `$n+4` the allowed
    /// future skew in ms (NULL: any), `$n+5` true for each delete, `$n+6` the incoming
    /// node. A delete wins over a
    /// row as new or older, and only meets a tombstone where no row is left.
    /// Returns per row: ordinal, local `updated_at`, tombstone time, verdict
    /// (`apply`, `older`, `tombstone`, `null_ts`, `future`).
    pub fn decide_sql(&self) -> String {
        let n = self.key.len();
        let keys: Vec<String> = (1..=n).map(|p| format!("${p}::text[]")).collect();
        let names: Vec<String> = (0..n).map(|p| format!("k{p}")).collect();
        let upd = quote_ident(&self.updated_at);
        let ts = format!("i.ts::{}", self.type_of(&self.updated_at));
        format!(
            "SELECT i.ord::int4, t.{upd}::text, tb.deleted_at::text,
               CASE WHEN i.ts IS NULL THEN 'null_ts'
                    WHEN ${skew}::int8 IS NOT NULL AND {ts} > now() + ${skew}::int8 * interval '1 millisecond' THEN 'future'
                    WHEN i.del THEN CASE
                         WHEN t.ctid IS NOT NULL AND t.{upd} > {ts} THEN 'older'
                         WHEN t.ctid IS NULL AND tb.deleted_at >= {ts} THEN 'tombstone'
                         ELSE 'apply' END
                    WHEN tb.deleted_at IS NOT NULL AND tb.deleted_at >= {ts} THEN 'tombstone'
                    WHEN t.ctid IS NULL OR t.{upd} IS NULL OR t.{upd} < {ts} THEN 'apply'
                    WHEN t.{upd} = {ts} AND ${tie}::bool THEN 'apply'
                    ELSE 'older' END
             FROM unnest({keys}, ${tsp}::text[], ${del}::bool[]) WITH ORDINALITY AS i({names}, ts, del, ord)
             LEFT JOIN {table} t ON {join}
             LEFT JOIN {deleted} ON true
             ORDER BY i.ord",
            keys = keys.join(", "),
            names = names.join(", "),
            tsp = n + 1,
            tie = n + 3,
            skew = n + 4,
            del = n + 5,
            table = self.sql_name,
            join = self.key_join(),
            deleted = self.deleted_lateral(n + 2, n + 6),
        )
    }

    /// Upserts rows given as one text array per column of `columns` (which hold the
    /// key and `updated_at`) where they win under last-writer-wins, and returns the
    /// keys written, as text of the target's key types. The decision is the
    /// statement's own: a row whose `updated_at` is NULL, further ahead than `$n+3`
    /// ms (NULL: any), or not newer than the key's tombstone or the table's last
    /// truncation by another node than the incoming one `$n+4` (table name `$n+2`) is
    /// not inserted, and the conflict guard keeps a newer target row (`$n+1`: incoming
    /// wins ties). Rows keep the source's values of
    /// `GENERATED ALWAYS` identity columns.
    ///
    /// The table's newest tombstone is read once (backwards from the newest entry of
    /// the `deleted_at` index, as in [`Self::settle_sql`]): a row newer than it cannot
    /// lose to a tombstone, so only the others look their key up. A catch-up of new
    /// rows then probes no tombstone at all; the probe was a quarter of the
    /// statement's time (4.4 of 17.7 ms per 2,000 rows).
    pub fn upsert_sql(&self, columns: &[&str]) -> String {
        let m = columns.len();
        let params: Vec<String> = (1..=m).map(|p| format!("${p}::text[]")).collect();
        let names: Vec<String> = (0..m).map(|p| format!("c{p}")).collect();
        let casts: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(p, c)| format!("i.c{p}::{}", self.type_of(c)))
            .collect();
        let quoted: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let sets: Vec<String> = columns
            .iter()
            .filter(|c| !self.key.iter().any(|k| k == *c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let keys: Vec<String> = self.key.iter().map(|k| quote_ident(k)).collect();
        let upd = quote_ident(&self.updated_at);
        let action = if sets.is_empty() {
            "NOTHING".to_string()
        } else {
            format!(
                "UPDATE SET {sets} WHERE {t}.{upd} IS NULL OR {t}.{upd} < EXCLUDED.{upd}
                 OR ({t}.{upd} = EXCLUDED.{upd} AND ${tie}::bool)",
                sets = sets.join(", "),
                t = self.sql_name,
                tie = m + 1,
            )
        };
        // Rows are locked in key order, as an application that orders its writes does,
        // so that the two rarely deadlock.
        let key_pos: Vec<usize> = self
            .key
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        let order: Vec<String> = key_pos.iter().map(|p| format!("{}", p + 1)).collect();
        let tomb: Vec<String> = key_pos.iter().map(|p| format!("i.c{p}")).collect();
        let ts = columns
            .iter()
            .position(|c| *c == self.updated_at)
            .map(|p| format!("i.c{p}::{}", self.type_of(&self.updated_at)))
            .unwrap_or_else(|| "NULL".into());
        let returning: Vec<String> = keys.iter().map(|k| format!("{k}::text")).collect();
        format!(
            "INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE
             SELECT {casts} FROM unnest({params}) AS i({names})
             CROSS JOIN (SELECT
                 {newest} AS tomb,
                 {truncated} AS trunc) g
             WHERE {ts} IS NOT NULL AND (g.trunc IS NULL OR g.trunc < {ts})
               AND CASE WHEN g.tomb IS NULL OR g.tomb < {ts} THEN true
                   ELSE NOT EXISTS (SELECT 1 FROM duplex.tombstones
                                    WHERE table_name = ${tbl}::text AND key = jsonb_build_array({tomb_key})
                                      AND deleted_at >= {ts}) END
               AND (${skew}::int8 IS NULL OR {ts} <= now() + ${skew}::int8 * interval '1 millisecond')
             {order} ON CONFLICT ({keys}) DO {action}
             RETURNING {returning}",
            table = self.sql_name,
            cols = quoted.join(", "),
            casts = casts.join(", "),
            params = params.join(", "),
            names = names.join(", "),
            tbl = m + 2,
            newest = newest_tombstone(m + 2),
            truncated = last_truncation(m + 2, m + 4),
            tomb_key = tomb.join(", "),
            skew = m + 3,
            order = if order.is_empty() {
                String::new()
            } else {
                format!("ORDER BY {}", order.join(", "))
            },
            keys = keys.join(", "),
            returning = returning.join(", "),
        )
    }

    /// Keys `$1..$n` (text) as the target prints its key types, so that they compare
    /// with what [`Self::upsert_sql`] returns.
    pub fn key_text_sql(&self) -> String {
        let n = self.key.len();
        let keys: Vec<String> = (1..=n).map(|p| format!("${p}::text[]")).collect();
        let names: Vec<String> = (0..n).map(|p| format!("k{p}")).collect();
        let casts: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(p, k)| format!("i.k{p}::{}::text", self.type_of(k)))
            .collect();
        format!(
            "SELECT {} FROM unnest({}) WITH ORDINALITY AS i({}, ord) ORDER BY ord",
            casts.join(", "),
            keys.join(", "),
            names.join(", ")
        )
    }

    /// Copies `columns` from the row with key `$n+1..$2n` to the row with key
    /// `$1..$n` (a key change that did not carry unchanged TOAST values).
    pub fn carry_sql(&self, columns: &[&str]) -> String {
        let n = self.key.len();
        let sets: Vec<String> = columns
            .iter()
            .map(|c| format!("{0} = o.{0}", quote_ident(c)))
            .collect();
        let cond = |alias: &str, first: usize| -> Vec<String> {
            self.key
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    format!(
                        "{alias}.{} = ${}::text::{}",
                        quote_ident(k),
                        first + i,
                        self.type_of(k)
                    )
                })
                .collect()
        };
        let mut conds = cond("n", 1);
        conds.extend(cond("o", n + 1));
        format!(
            "UPDATE {t} n SET {sets} FROM {t} o WHERE {conds}",
            t = self.sql_name,
            sets = sets.join(", "),
            conds = conds.join(" AND "),
        )
    }

    /// `WITH i AS (...)`: incoming keys `$1..$n` as rows `k0, k1, ...`.
    fn keys_cte(&self) -> String {
        let n = self.key.len();
        let keys: Vec<String> = (1..=n).map(|p| format!("${p}::text[]")).collect();
        let names: Vec<String> = (0..n).map(|p| format!("k{p}")).collect();
        format!(
            "WITH i AS (SELECT * FROM unnest({}) AS i({}))",
            keys.join(", "),
            names.join(", ")
        )
    }

    /// Deletes, among the rows just written for keys `$1..$n`, those older than a
    /// tombstone of table `$n+1`: a local delete that committed after the upsert's
    /// snapshot (this statement's new snapshot sees it; later deletes find the row
    /// locked). `$n+2` holds the rows' `updated_at` texts, `$n+3` the incoming node
    /// (whose own truncation they follow). Returns their keys and
    /// `updated_at`. Only when the table's newest tombstone or truncation is at least
    /// as new as the oldest of those versions (read backwards from the newest entry of
    /// the `deleted_at` index: a range condition there would scan every older
    /// tombstone) are the keys looked up, one tombstone probe each, and only keys
    /// with a tombstone reach the table.
    pub fn settle_sql(&self) -> String {
        let upd = quote_ident(&self.updated_at);
        let n = self.key.len();
        let ks: Vec<String> = (0..n).map(|k| format!("i.k{k}")).collect();
        let oldest = format!(
            "(SELECT min(u::{}) FROM unnest(${}::text[]) AS u)",
            self.type_of(&self.updated_at),
            n + 2
        );
        format!(
            "{cte},
             d AS MATERIALIZED (SELECT i.*, tb.deleted_at FROM i, {deleted}
                                WHERE greatest(
                                        {newest},
                                        {truncated}
                                      ) >= {oldest}
                                  AND tb.deleted_at IS NOT NULL)
             DELETE FROM {table} t USING d i
             WHERE {join} AND (t.{upd} IS NULL OR i.deleted_at >= t.{upd})
             RETURNING {ks}, t.{upd}::text",
            cte = self.keys_cte(),
            table = self.sql_name,
            join = self.key_join(),
            deleted = self.deleted_lateral(n + 1, n + 3),
            newest = newest_tombstone(n + 1),
            truncated = last_truncation(n + 1, n + 3),
            ks = ks.join(", "),
        )
    }

    /// Writes a repair for each of the keys `$1..$n` of table `$n+1`: the target's
    /// current winner, the row (every stored column as text) or, when a tombstone is
    /// newer, the tombstone. Keys with neither are skipped. A truncation the peer `$n+2`
    /// made is its own to apply: never a per-key delete sent back to it. Generated columns are left
    /// out, as pgoutput leaves them out: the peer computes its own, and refuses a
    /// value for them (428C9).
    pub fn repair_sql(&self) -> String {
        let upd = quote_ident(&self.updated_at);
        // jsonb_build_object takes at most 100 arguments: 50 columns per call.
        let pairs = |cols: Vec<(String, String)>| -> String {
            let parts: Vec<String> = cols
                .chunks(50)
                .map(|chunk| {
                    let args: Vec<String> = chunk
                        .iter()
                        .map(|(name, value)| format!("{}, {value}", quote_literal(name)))
                        .collect();
                    format!("jsonb_build_object({})", args.join(", "))
                })
                .collect();
            parts.join(" || ")
        };
        let row = pairs(
            self.columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| {
                    let col = format!("t.{}", quote_ident(&c.name));
                    // Printed by the output function, as pgoutput prints it.
                    let text = format!("CASE WHEN {col} IS NULL THEN NULL ELSE concat({col}) END");
                    (c.name.clone(), text)
                })
                .collect(),
        );
        let key = pairs(
            self.key
                .iter()
                .enumerate()
                .map(|(n, k)| (k.clone(), format!("i.k{n}")))
                .collect(),
        );
        let live = format!(
            "t.ctid IS NOT NULL AND (tb.deleted_at IS NULL OR (t.{upd} IS NOT NULL AND tb.deleted_at < t.{upd}))"
        );
        format!(
            "{cte}
             INSERT INTO duplex.repairs (table_name, key, image, deleted_at)
             SELECT ${tbl}::text, {tomb},
                    CASE WHEN {live} THEN {row} ELSE {key} END,
                    CASE WHEN {live} THEN NULL ELSE tb.deleted_at END
             FROM i
             LEFT JOIN {table} t ON {join}
             LEFT JOIN {deleted} ON true
             WHERE t.ctid IS NOT NULL OR tb.deleted_at IS NOT NULL",
            cte = self.keys_cte(),
            tbl = self.key.len() + 1,
            tomb = self.tombstone_key(),
            table = self.sql_name,
            join = self.key_join(),
            deleted = self.deleted_lateral(self.key.len() + 1, self.key.len() + 2),
        )
    }

    /// Deletes rows whose keys are `$1..$n` unless the target's version is newer than
    /// the delete's time `$n+1`, and records a tombstone for each key at that time
    /// from node `$n+3`. `$n+2` is the table name. Rows go before tombstones, and
    /// tombstones in key order, as an application's delete (row, then its trigger's
    /// tombstone) takes them: the two never wait on each other crosswise.
    pub fn delete_sql(&self) -> String {
        let n = self.key.len();
        let keys: Vec<String> = (1..=n).map(|p| format!("${p}::text[]")).collect();
        let names: Vec<String> = (0..n).map(|p| format!("k{p}")).collect();
        let order: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(p, k)| format!("i.k{p}::{}", self.type_of(k)))
            .collect();
        let upd = quote_ident(&self.updated_at);
        // The scalar subquery over `d` runs as an init plan: the delete completes
        // before the first tombstone is inserted.
        format!(
            "WITH i AS (SELECT * FROM unnest({keys}, ${ts}::text[]) AS i({names}, ts)),
             d AS (DELETE FROM {table} t USING i WHERE {join}
                   AND (t.{upd} IS NULL OR t.{upd} <= i.ts::{ty}) RETURNING 1)
             INSERT INTO duplex.tombstones (table_name, key, deleted_at, origin)
             SELECT ${tbl}::text, {tomb}, i.ts::timestamptz, ${origin}::text FROM i
             WHERE (SELECT count(*) FROM d) >= 0
             ORDER BY {order}
             ON CONFLICT (table_name, key) DO UPDATE
               SET deleted_at = greatest(duplex.tombstones.deleted_at, EXCLUDED.deleted_at),
                   origin = EXCLUDED.origin",
            keys = keys.join(", "),
            names = names.join(", "),
            ts = n + 1,
            tbl = n + 2,
            origin = n + 3,
            table = self.sql_name,
            join = self.key_join(),
            tomb = self.tombstone_key(),
            ty = self.type_of(&self.updated_at),
            order = order.join(", "),
        )
    }
}

/// The newest tombstone time of table `$p`, read backwards from the newest entry of
/// the `deleted_at` index (a range condition there would scan every older one).
fn newest_tombstone(p: usize) -> String {
    format!("(SELECT max(deleted_at) FROM duplex.tombstones WHERE table_name = ${p}::text)")
}

/// When table `$p` was last truncated by another node than `$q` (NULL: never).
fn last_truncation(p: usize, q: usize) -> String {
    format!(
        "(SELECT truncated_at FROM duplex.truncations WHERE table_name = ${p}::text AND origin <> ${q}::text)"
    )
}

#[cfg(test)]
#[path = "sql_tests.rs"]
mod tests;
