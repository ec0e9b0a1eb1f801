-- The id (MILLISECONDS-SEQUENCE) of the last Redis stream entry applied to
-- the topic. Written in the same transaction as the state, so an entry that
-- is delivered again, or after a newer one, is recognised and skipped.
-- NULL when the topic was never written through the stream.
ALTER TABLE topics ADD COLUMN stream_id TEXT;
