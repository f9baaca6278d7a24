-- 0003: where each slot stream begins on each topic: the topic's end offset when a
-- capture session first opened the stream there, recorded before it published
-- anything of it. A direction's first start that copies nothing begins there, so
-- that it applies the whole stream and nothing older. Streams that published before
-- this table existed get a row without an offset: where they begin is unknown.
CREATE TABLE duplex.stream_starts (
    stream text NOT NULL,
    topic text NOT NULL,
    first_offset bigint,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, topic)
);
INSERT INTO duplex.stream_starts (stream, topic, first_offset)
SELECT stream, last_offset_topic, NULL FROM duplex.slots WHERE last_offset_topic IS NOT NULL
ON CONFLICT DO NOTHING;
