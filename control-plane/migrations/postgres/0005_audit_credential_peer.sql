-- Version 5: which of the caller's secrets acted (`current` / `previous`)
-- and the connection's peer (the proxy, when one forwarded the call) for
-- each audit event, and the index audit retention deletes by.
ALTER TABLE events ADD COLUMN peer_address text;
ALTER TABLE events ADD COLUMN credential text;
CREATE INDEX events_by_time ON events (time_seconds);
