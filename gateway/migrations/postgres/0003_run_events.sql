-- The run registry's events, shared by the replicas (gateway/src/runs/store.rs): seq orders
-- them as they were stored, so each replica reads what the others stored since it last looked.
CREATE TABLE run_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    run_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, event_id)
);
CREATE UNIQUE INDEX run_events_seq ON run_events (seq);
