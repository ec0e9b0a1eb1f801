-- One row per topic name, ever. Deleting a topic turns its row into a
-- tombstone (state NULL) instead of removing it, so the version keeps rising
-- across a delete and a re-create: readers compare versions, and a version
-- that went backwards would look older than what they hold.
CREATE TABLE topics (
    -- Validated by the server: [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}.
    name       TEXT    NOT NULL PRIMARY KEY,
    -- The incarnation: the u64 drawn at creation, stored as its i64 bit
    -- pattern because SQLite integers are signed.
    epoch      INTEGER NOT NULL,
    -- Strictly increasing per name, never reused.
    version    INTEGER NOT NULL CHECK (version > 0),
    -- Commit time in milliseconds since the Unix epoch.
    updated_ms INTEGER NOT NULL,
    -- The state as compact JSON object text; NULL marks a tombstone.
    state      TEXT
) STRICT;
