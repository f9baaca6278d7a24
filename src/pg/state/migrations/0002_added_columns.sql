-- 0002: the columns added after the first release while the schema stayed at version
-- 1 (every start added them where missing), for a node last set up before them.
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
