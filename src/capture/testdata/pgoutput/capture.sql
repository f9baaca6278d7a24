-- Produces the pgoutput fixtures in this directory (run with psql on a fresh
-- PostgreSQL 15 cluster started with wal_level=logical). Each fixture file holds
-- the hex of the `data` column for one group of transactions, each line preceded
-- by a comment with the expected decoding; relation and type oids depend on the
-- cluster, so regenerating means updating the expectations too.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE t_types (
  id int PRIMARY KEY,
  n numeric,
  ts timestamptz,
  j jsonb,
  ai int4[],
  at text[],
  b bytea,
  u uuid,
  m mood,
  txt text,
  nul text
);
CREATE TABLE t_toast (id int PRIMARY KEY, big text, small int);
CREATE TABLE t_full (id int PRIMARY KEY, v text);
ALTER TABLE t_full REPLICA IDENTITY FULL;
CREATE TABLE t_parent (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE TABLE t_child (id bigserial PRIMARY KEY, parent_id int REFERENCES t_parent(id));
CREATE PUBLICATION p FOR ALL TABLES;
SELECT pg_replication_origin_create('upstream');
SELECT 'slot', lsn FROM pg_create_logical_replication_slot('s', 'pgoutput');

SET TimeZone = 'UTC';
-- 1: insert with every type
INSERT INTO t_types VALUES (1, 12345.678900, '2024-03-01 12:34:56.789012+00', '{"a": [1, 2.5, null], "b": "ü"}',
  '{1,2,NULL,-4}', '{"x","y z",NULL,"q\"uote"}', '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  'happy', 'Zoë 日本 😀', NULL);
-- 2: update without key change (no old tuple)
UPDATE t_types SET n = -0.5, m = 'sad' WHERE id = 1;
-- 3: update with key change (old key 'K')
UPDATE t_types SET id = 2 WHERE id = 1;
-- 4: delete (old key 'K')
DELETE FROM t_types WHERE id = 2;
-- 5: unchanged toast
INSERT INTO t_toast SELECT 1, string_agg(md5(random()::text), ''), 1 FROM generate_series(1, 400);
UPDATE t_toast SET small = 2 WHERE id = 1;
-- 6: replica identity full
INSERT INTO t_full VALUES (1, 'before');
UPDATE t_full SET v = 'after' WHERE id = 1;
DELETE FROM t_full WHERE id = 1;
-- 7: truncate
INSERT INTO t_parent (v) VALUES ('p');
INSERT INTO t_child (parent_id) VALUES (1);
TRUNCATE t_parent, t_child RESTART IDENTITY CASCADE;
TRUNCATE t_full;
-- 8: messages
SELECT pg_logical_emit_message(true, 'duplex', 'in a transaction');
SELECT pg_logical_emit_message(false, 'duplex/raw', '\x00010203ff'::bytea);
-- 9: origin
SELECT pg_replication_origin_session_setup('upstream');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/12345678', '2024-01-02 03:04:05+00');
INSERT INTO t_full VALUES (7, 'from upstream');
COMMIT;
SELECT pg_replication_origin_session_reset();

SELECT lsn, xid, encode(data, 'hex')
FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL,
  'proto_version', '1', 'publication_names', 'p', 'messages', 'true');
