-- Several gateway replicas share one queue: a replica's delivery worker claims the messages it
-- sends (claimed_by = its replica id) until claimed_until_ms, which it extends while it holds
-- them; a claim that runs out (its replica died) is taken over by another replica. Settling a
-- message clears its claim.
ALTER TABLE messages ADD COLUMN claimed_by TEXT;
ALTER TABLE messages ADD COLUMN claimed_until_ms BIGINT;
-- A replica extends its own claims every few seconds without reading the whole queue.
CREATE INDEX messages_claimed ON messages (claimed_by) WHERE claimed_by IS NOT NULL;
