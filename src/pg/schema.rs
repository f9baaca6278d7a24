//! The `duplex` schema on each node: the tables duplex keeps there, created with
//! `IF NOT EXISTS` on every setup so that an upgrade adds what is new and a reconnect
//! takes no lock.

pub(crate) const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS duplex;
CREATE TABLE IF NOT EXISTS duplex.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO duplex.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;
-- Where each direction into this node stands, written in the same transaction as the
-- rows it applied.
CREATE TABLE IF NOT EXISTS duplex.apply_positions (
    source_node text NOT NULL,
    -- A new topic (another topic_prefix, a recreated topic) is a new stream.
    topic text NOT NULL,
    next_offset bigint NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    seq integer NOT NULL,
    last_commit_ts timestamptz,
    applied_at timestamptz NOT NULL DEFAULT now(),
    -- The source slot's stream (see duplex.slots) that commit_lsn belongs to.
    stream text,
    PRIMARY KEY (source_node, topic)
);
-- Each direction into this node: running, halted (and why) or stopped.
CREATE TABLE IF NOT EXISTS duplex.apply_state (
    source_node text PRIMARY KEY,
    state text NOT NULL,
    reason text,
    since timestamptz NOT NULL DEFAULT now()
);
-- Deleted keys, so that an older insert or update arriving later does not bring the
-- row back. Pruned after sync.tombstone_retention_ms.
CREATE TABLE IF NOT EXISTS duplex.tombstones (
    table_name text NOT NULL,
    key jsonb NOT NULL,
    deleted_at timestamptz NOT NULL,
    origin text NOT NULL,
    PRIMARY KEY (table_name, key)
);
CREATE INDEX IF NOT EXISTS tombstones_deleted_at ON duplex.tombstones (deleted_at);
-- When each table was last truncated (by the application, or by applying a peer's
-- truncate): a tombstone for every key of the table older than that.
CREATE TABLE IF NOT EXISTS duplex.truncations (
    table_name text PRIMARY KEY,
    truncated_at timestamptz NOT NULL,
    origin text NOT NULL
);
-- The winner of a key whose incoming version lost here, written by the apply session
-- and published (the one exception to echo suppression), so the peer converges on it:
-- `image` is every column as text, or the key columns when `deleted_at` is set.
CREATE TABLE IF NOT EXISTS duplex.repairs (
    id bigserial PRIMARY KEY,
    made_at timestamptz NOT NULL DEFAULT now(),
    table_name text NOT NULL,
    key jsonb NOT NULL,
    image jsonb NOT NULL,
    deleted_at timestamptz
);
-- Slots duplex created here: one that disappears later took changes with it, and
-- the daemon must say so rather than quietly create a new one.
-- `stream` names the slot's history: every event read through it carries it, and a
-- slot created again gets a new one, so that appliers know its LSNs start over.
CREATE TABLE IF NOT EXISTS duplex.slots (
    slot_name text PRIMARY KEY,
    created_lsn pg_lsn NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    stream text NOT NULL DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 16)
);
-- Columns added since the first release, added only where missing (no lock otherwise).
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.slots'::regclass
                   AND attname = 'stream' AND NOT attisdropped) THEN
        ALTER TABLE duplex.slots ADD COLUMN stream text NOT NULL
            DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 16);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.apply_positions'::regclass
                   AND attname = 'stream' AND NOT attisdropped) THEN
        ALTER TABLE duplex.apply_positions ADD COLUMN stream text;
    END IF;
    -- The highest offset the broker acknowledged on the node's topic: a broker that
    -- comes back without it lost messages.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.slots'::regclass
                   AND attname = 'last_offset' AND NOT attisdropped) THEN
        ALTER TABLE duplex.slots ADD COLUMN last_offset bigint;
    END IF;
    -- The topic last_offset is on: another topic (a new topic_prefix) starts afresh.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.slots'::regclass
                   AND attname = 'last_offset_topic' AND NOT attisdropped) THEN
        ALTER TABLE duplex.slots ADD COLUMN last_offset_topic text;
    END IF;
    -- Set when the broker was found to have lost acknowledged messages: no session
    -- reads or writes the topic again until the operator resynchronised.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.slots'::regclass
                   AND attname = 'topic_lost' AND NOT attisdropped) THEN
        ALTER TABLE duplex.slots ADD COLUMN topic_lost text;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS duplex.conflicts (
    id bigserial PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    table_name text NOT NULL,
    key jsonb NOT NULL,
    op text NOT NULL,
    local_updated_at text,
    incoming_updated_at text,
    incoming_node text NOT NULL,
    incoming_position text NOT NULL,
    resolution text NOT NULL
);
CREATE TABLE IF NOT EXISTS duplex.dead_letters (
    id bigserial PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    source_node text NOT NULL,
    kafka_offset bigint NOT NULL,
    table_name text,
    key text,
    position text,
    error text NOT NULL,
    event text NOT NULL,
    replayed_at timestamptz
);
-- When duplex was first set up on this node: rows whose version is older predate
-- duplex (see snapshot.mode initial); later ones are on the node's stream.
CREATE TABLE IF NOT EXISTS duplex.node (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    first_setup_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    first_setup_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO duplex.node DEFAULT VALUES ON CONFLICT DO NOTHING;
-- Copies of rows that existed before duplex (see snapshot/): one row per source node
-- and table copied into this node, and its chunks, key ranges marked copied in the
-- same transaction as their rows, so that a restart copies only what is left.
CREATE TABLE IF NOT EXISTS duplex.snapshots (
    source_node text NOT NULL,
    table_name text NOT NULL,
    -- copying | done
    state text NOT NULL,
    -- direct (COPY into an empty table) | merge (last-writer-wins)
    method text NOT NULL,
    rows_estimated bigint NOT NULL,
    chunks integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (source_node, table_name)
);
-- lower_key exclusive, upper_key inclusive, as jsonb arrays of the key's texts; NULL
-- is unbounded. `attempts` counts copies started, `copied_at` marks the one that
-- committed.
CREATE TABLE IF NOT EXISTS duplex.snapshot_chunks (
    source_node text NOT NULL,
    table_name text NOT NULL,
    chunk integer NOT NULL,
    lower_key jsonb,
    upper_key jsonb,
    attempts integer NOT NULL DEFAULT 0,
    rows bigint,
    copied_at timestamptz,
    PRIMARY KEY (source_node, table_name, chunk)
);
-- generation counts a table's plans, and says which plan a chunk belongs to: a copy
-- worker of an earlier plan (whose ranges differ) marks none of a later one's chunks.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.snapshots'::regclass
                   AND attname = 'generation' AND NOT attisdropped) THEN
        ALTER TABLE duplex.snapshots ADD COLUMN generation integer NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'duplex.snapshot_chunks'::regclass
                   AND attname = 'generation' AND NOT attisdropped) THEN
        ALTER TABLE duplex.snapshot_chunks ADD COLUMN generation integer NOT NULL DEFAULT 0;
    END IF;
END $$;
-- Mapped tables (see mapping/): the key a row has on each node, `key_a` on the node
-- whose name sorts first. Made by the applier that first writes the row to a node,
-- in the same transaction, and published so that the other node learns it. Kept
-- after the row is deleted, so a late change of the key finds its tombstone.
CREATE TABLE IF NOT EXISTS duplex.key_pairs (
    table_name text NOT NULL,
    key_a text NOT NULL,
    key_b text NOT NULL,
    -- The node whose applier made the pairing; the peer stores it as learned, and
    -- the copy that comes back from the peer is ignored.
    made_on text NOT NULL,
    paired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, key_a),
    UNIQUE (table_name, key_b)
);
-- The last `duplex verify` of each table, written to both nodes when it finishes, for
-- the daemon's metrics. `rows_checked_total` adds up every run's rows.
CREATE TABLE IF NOT EXISTS duplex.verify_results (
    table_name text PRIMARY KEY,
    finished_at timestamptz NOT NULL,
    rows_checked bigint NOT NULL,
    rows_checked_total bigint NOT NULL,
    differences bigint NOT NULL,
    orphans bigint NOT NULL
);
";
