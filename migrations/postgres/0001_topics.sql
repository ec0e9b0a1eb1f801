-- One row per topic name, ever, shared by every hub. Deleting a topic turns
-- its row into a tombstone (state NULL) instead of removing it, so versions
-- keep rising across a delete and a re-create. See migrations/sqlite for the
-- embedded twin of this schema.
CREATE TABLE topics (
    -- Validated by the server: [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}.
    name       TEXT   NOT NULL PRIMARY KEY,
    -- The incarnation: the u64 drawn at creation as its i64 bit pattern.
    epoch      BIGINT NOT NULL,
    -- Strictly increasing per name. 0 only in a placeholder row that a
    -- committing hub inserts to lock a name that has never been written;
    -- such rows are not topics and are skipped when loading.
    version    BIGINT NOT NULL CHECK (version >= 0),
    -- Commit time in milliseconds since the Unix epoch.
    updated_ms BIGINT NOT NULL,
    -- The state as compact JSON object text (TEXT, not jsonb, so the bytes
    -- readers receive are exactly the ones committed); NULL for a tombstone.
    state      TEXT,
    -- The last Redis stream entry (MILLISECONDS-SEQUENCE) applied, if any.
    stream_id  TEXT
);
