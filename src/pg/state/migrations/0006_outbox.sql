-- 0006: what an apply session publishes, kept apart from the transaction it applies.
-- From PostgreSQL 16 the node's walsender drops whole transactions written under a
-- replication origin (pgoutput's origin = 'none'), so the repairs and key pairings
-- duplex writes there would never reach the peer. A trigger notes each one in
-- duplex.outbox, in the same transaction; the republisher (duplex.republish) then
-- touches those rows again in a transaction of its own, which the walsender sends.
CREATE TABLE IF NOT EXISTS duplex.outbox (
    id bigserial PRIMARY KEY,
    repair_id bigint,
    pair_table text,
    pair_key_a text
);

-- Only duplex's writing sessions (session_replication_role = replica, under a
-- replication origin) and only where the walsender can filter origins.
CREATE OR REPLACE FUNCTION duplex.note_outbox() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('session_replication_role') = 'replica'
       AND current_setting('server_version_num')::integer >= 160000 THEN
        IF TG_TABLE_NAME = 'repairs' THEN
            INSERT INTO duplex.outbox (repair_id) VALUES (NEW.id);
        ELSE
            INSERT INTO duplex.outbox (pair_table, pair_key_a) VALUES (NEW.table_name, NEW.key_a);
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS duplex_outbox ON duplex.repairs;
CREATE TRIGGER duplex_outbox AFTER INSERT ON duplex.repairs
    FOR EACH ROW EXECUTE FUNCTION duplex.note_outbox();
ALTER TABLE duplex.repairs ENABLE ALWAYS TRIGGER duplex_outbox;
DROP TRIGGER IF EXISTS duplex_outbox ON duplex.key_pairs;
CREATE TRIGGER duplex_outbox AFTER INSERT ON duplex.key_pairs
    FOR EACH ROW EXECUTE FUNCTION duplex.note_outbox();
ALTER TABLE duplex.key_pairs ENABLE ALWAYS TRIGGER duplex_outbox;

-- Touches every noted repair and pairing that still exists (an update the peer reads
-- as the row again) and empties the outbox; with `touch` false it only empties it
-- (the node's walsender sends the origin's transactions itself). Returns the rows
-- touched. An empty outbox costs a scan of an empty table and no transaction id.
CREATE OR REPLACE FUNCTION duplex.republish(touch boolean) RETURNS bigint
LANGUAGE sql AS $fn$
    WITH taken AS (DELETE FROM duplex.outbox RETURNING repair_id, pair_table, pair_key_a),
    repairs AS (
        UPDATE duplex.repairs r SET made_at = r.made_at
        FROM (SELECT DISTINCT repair_id FROM taken WHERE repair_id IS NOT NULL) t
        WHERE touch AND r.id = t.repair_id
        RETURNING 1
    ),
    pairs AS (
        UPDATE duplex.key_pairs kp SET paired_at = kp.paired_at
        FROM (SELECT DISTINCT pair_table, pair_key_a FROM taken WHERE pair_table IS NOT NULL) t
        WHERE touch AND kp.table_name = t.pair_table AND kp.key_a = t.pair_key_a
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM repairs) + (SELECT count(*) FROM pairs)
$fn$;

-- Where the node's own walsender may begin to filter a slot's stream: changes before
-- this were applied without the outbox, so a session that starts reading before it
-- decodes every transaction and lets the repairs and pairings through itself.
ALTER TABLE duplex.slots ADD COLUMN IF NOT EXISTS filter_from pg_lsn;
UPDATE duplex.slots SET filter_from = pg_current_wal_lsn() WHERE filter_from IS NULL;
