-- 0007: values owed to this node. While it lacks a column its peer's rows carry (a
-- migration that reached the peer first), duplex applies those rows without it and
-- records here, per source node, table and column, the earliest source commit whose
-- value it left out. The row goes once the column exists here and what was owed has
-- been brought over.
CREATE TABLE IF NOT EXISTS duplex.owed_columns (
    source_node text NOT NULL,
    table_name text NOT NULL,
    column_name text NOT NULL,
    since_lsn pg_lsn NOT NULL,
    since_ts timestamptz NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_node, table_name, column_name)
);
