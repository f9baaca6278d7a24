//! The drift between the nodes' configured tables: columns only one node has, and
//! columns whose types differ, as a migration applied to one node only leaves them.
//! duplex syncs through both (README "Schema changes during a sync"), so each is a
//! warning that says what it means for the values.

use super::WARNING;
use crate::config::Config;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// A table's columns on one node: name → type as `format_type` prints it.
type Columns = BTreeMap<String, String>;

/// Warnings for every configured table (mapped pairs have their own check) found on
/// both nodes.
pub(super) async fn warnings(cfg: &Config, clients: &BTreeMap<String, Client>) -> Vec<String> {
    let nodes: Vec<&String> = clients.keys().collect();
    let [x, y] = nodes.as_slice() else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for t in cfg.tables.iter().filter(|t| !t.is_mapped()) {
        let (Some(cx), Some(cy)) = (
            columns(&clients[*x], &t.name).await,
            columns(&clients[*y], &t.name).await,
        ) else {
            continue;
        };
        lines.extend(drift(&t.name, (x, &cx), (y, &cy)));
    }
    for t in cfg.tables.iter().filter(|t| t.is_mapped()) {
        let (Some(cx), Some(cy)) = (
            columns(&clients[*x], t.name_on(x)).await,
            columns(&clients[*y], t.name_on(y)).await,
        ) else {
            continue;
        };
        let mapped: Vec<(&str, &str)> = t
            .columns
            .iter()
            .filter_map(|c| Some((c.names.get(*x)?.as_str(), c.names.get(*y)?.as_str())))
            .collect();
        lines.extend(mapped_drift(&t.name, &mapped, (x, &cx), (y, &cy)));
    }
    lines
}

/// The columns of a mapped pair's `columns` entries (each as (name on x, name on y))
/// that one node has and the other lacks yet, as warnings.
fn mapped_drift(
    table: &str,
    mapped: &[(&str, &str)],
    (x, cx): (&str, &Columns),
    (y, cy): (&str, &Columns),
) -> Vec<String> {
    let mut lines = Vec::new();
    for (on_x, on_y) in mapped {
        for (here, mine, there, missing) in [(x, on_x, y, on_y), (y, on_y, x, on_x)] {
            let (has, lacks) = if here == x { (cx, cy) } else { (cy, cx) };
            if has.contains_key(*mine) && !lacks.contains_key(*missing) {
                lines.push(format!(
                    "{WARNING}mapped table {table}: column {mine} of node {here} maps to {missing}, which node {there} lacks: its values are applied without it there, and owed to node {there} until the column is added"
                ));
            }
        }
    }
    lines
}

/// The table's columns on a node, `None` if the table is missing or unreadable there.
async fn columns(client: &Client, table: &str) -> Option<Columns> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .ok()?;
    (!rows.is_empty()).then(|| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The drift between the table's columns on two nodes, as warnings.
fn drift(table: &str, (x, cx): (&str, &Columns), (y, cy): (&str, &Columns)) -> Vec<String> {
    let mut lines = Vec::new();
    for (here, mine, there, theirs) in [(x, cx, y, cy), (y, cy, x, cx)] {
        for column in mine.keys().filter(|c| !theirs.contains_key(*c)) {
            lines.push(format!(
                "{WARNING}table {table}: column {column} exists on node {here} only: its values are applied without it on node {there}, and owed to node {there} until the column is added there"
            ));
        }
    }
    for (column, tx) in cx {
        if let Some(ty) = cy.get(column).filter(|ty| *ty != tx) {
            lines.push(format!(
                "{WARNING}table {table}: column {column} is {tx} on node {x} and {ty} on node {y}: values are cast as they are applied, and one that a node's type refuses halts its direction or goes to the dead-letter queue"
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(pairs: &[(&str, &str)]) -> Columns {
        pairs
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn columns_on_one_node_only_and_differing_types_are_named_and_nothing_else() {
        let a = cols(&[("id", "integer"), ("color", "text"), ("n", "bigint")]);
        let b = cols(&[("id", "integer"), ("size", "text"), ("n", "integer")]);
        let lines = drift("public.items", ("a", &a), ("b", &b));
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines.iter().all(|l| l.starts_with(WARNING)));
        assert!(
            lines[0].contains("column color exists on node a only"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("column size exists on node b only"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("column n is bigint on node a and integer on node b"),
            "{}",
            lines[2]
        );
        assert!(drift("public.items", ("a", &a), ("b", &a)).is_empty());
    }

    #[test]
    fn a_mapped_column_one_node_lacks_is_named_with_its_name_on_each_node() {
        let legacy = cols(&[
            ("id", "integer"),
            ("colour", "text"),
            ("total_cents", "bigint"),
        ]);
        let modern = cols(&[("id", "uuid"), ("total", "numeric")]);
        let mapped = [("colour", "color"), ("total_cents", "total")];
        let lines = mapped_drift(
            "public.orders",
            &mapped,
            ("legacy", &legacy),
            ("modern", &modern),
        );
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0]
                .contains("column colour of node legacy maps to color, which node modern lacks"),
            "{}",
            lines[0]
        );
        let modern = cols(&[("id", "uuid"), ("total", "numeric"), ("color", "text")]);
        assert!(mapped_drift(
            "public.orders",
            &mapped,
            ("legacy", &legacy),
            ("modern", &modern)
        )
        .is_empty());
    }
}
