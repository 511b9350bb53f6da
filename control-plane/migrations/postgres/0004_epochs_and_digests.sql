-- Version 4 (issue 21): the store's epoch and what it is known to be behind,
-- the epoch of the versions the replicas' Envoy streams applied, and one
-- digest per token across current and previous secrets.

-- The history: milliseconds since the Unix epoch when it began (now, for an
-- existing store; `apitokens new-epoch` starts a later one). `behind_*`: the
-- newest position an Envoy or a replica enforced beyond the store's (a
-- restored backup, a failover that lost commits); writes are refused while
-- it is set.
ALTER TABLE store_state ADD COLUMN epoch bigint NOT NULL
    DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
ALTER TABLE store_state ALTER COLUMN epoch DROP DEFAULT;
ALTER TABLE store_state ADD COLUMN behind_epoch bigint;
ALTER TABLE store_state ADD COLUMN behind_revision bigint;
ALTER TABLE store_state ADD CHECK ((behind_epoch IS NULL) = (behind_revision IS NULL));

ALTER TABLE envoy_streams ADD COLUMN acked_epoch bigint;
ALTER TABLE envoy_streams ADD COLUMN nacked_epoch bigint;

-- A digest is a current or a previous secret of one token only: otherwise
-- the table pushed to Envoy holds one digest twice and every push is refused.
-- Two previous secrets: this index; a current and a previous one: checked
-- by every write that sets a digest (store/postgres.rs, no_shared_digest).
CREATE UNIQUE INDEX tokens_previous_unique ON tokens (previous_sha256) WHERE previous_sha256 IS NOT NULL;
