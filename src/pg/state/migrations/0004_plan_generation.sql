-- 0004: generation counts a table's plans and says which plan a chunk belongs to: a
-- copy worker of an earlier plan (whose ranges differ) marks none of a later one's
-- chunks.
ALTER TABLE duplex.snapshots ADD COLUMN generation integer NOT NULL DEFAULT 0;
ALTER TABLE duplex.snapshot_chunks ADD COLUMN generation integer NOT NULL DEFAULT 0;
