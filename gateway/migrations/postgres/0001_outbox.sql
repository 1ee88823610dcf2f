-- The outbox on PostgreSQL: the same tables as the embedded SQLite outbox
-- (gateway/src/outbox/sqlite.rs), in PostgreSQL's types. Applied once, in order, by
-- gateway/src/outbox/postgres.rs, which records each applied file in schema_migrations.

CREATE TABLE messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    identifier_system TEXT NOT NULL,
    identifier_value TEXT NOT NULL,
    upsert BOOLEAN NOT NULL DEFAULT false,
    -- pending, delivered or dead
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    settled_ms BIGINT,
    status_line TEXT,
    location TEXT,
    last_error TEXT,
    outcome TEXT,
    -- The previous message about the same resource at the same destination: this one waits
    -- while that one is pending, so per resource the EHR gets them in acceptance order.
    predecessor BIGINT,
    -- created, updated, amended or retracted
    disposition TEXT NOT NULL DEFAULT 'created',
    -- A charting interval's message, rewritten while pending by a later reading: how often.
    -- NULL for every other message, which is never rewritten.
    body_version BIGINT
);

-- The FHIR of each message, apart from the row that settling rewrites.
CREATE TABLE message_bodies (
    message_id BIGINT PRIMARY KEY,
    body BYTEA NOT NULL
);

-- What each destination was last given for each resource: tells a resend (same content, a
-- no-op) from a correction (other content) and an older state of a run from a newer one.
CREATE TABLE resource_state (
    resource_type TEXT NOT NULL,
    time_key TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    content_hash BYTEA NOT NULL,
    revision BIGINT,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (resource_type, time_key, logical_id, destination)
);

-- Delivery walks a destination's pending messages in acceptance order and finds the earliest
-- retry time; dead letters are listed by id; retention finds what is past keeping.
CREATE INDEX messages_pending ON messages (destination, id) WHERE state = 'pending';
CREATE INDEX messages_pending_due ON messages (destination, next_attempt_ms) WHERE state = 'pending';
CREATE INDEX messages_dead ON messages (id) WHERE state = 'dead';
CREATE INDEX messages_delivered ON messages (settled_ms) WHERE state = 'delivered';
CREATE INDEX messages_batch ON messages (batch_id);

-- At a destination that charts a statistic of each interval: every reading's value (NULL when
-- the device marked it invalid) and whether the reading was taken back.
CREATE TABLE chart_values (
    destination TEXT NOT NULL,
    slot_logical_id TEXT NOT NULL,
    reading_ms BIGINT NOT NULL,
    value TEXT,
    retracted BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (destination, slot_logical_id, reading_ms)
);
CREATE INDEX chart_values_time ON chart_values (reading_ms);

-- What each accepted request was about, for the message browser (lists framed by newlines,
-- see gateway/src/outbox/browse.rs).
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY,
    received_ms BIGINT NOT NULL,
    sender TEXT NOT NULL,
    devices TEXT NOT NULL,
    patients TEXT NOT NULL,
    runs TEXT NOT NULL
);
CREATE INDEX batches_received ON batches (received_ms);
