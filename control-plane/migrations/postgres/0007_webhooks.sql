-- Version 7: webhooks. The audit trail is their outbox: each endpoint keeps
-- the last event it acknowledged (its cursor) and a lease, so that one
-- replica at a time delivers to it and another takes over when the lease
-- runs out. And the expiry warnings already given (one per token, expiry and
-- lead time).

CREATE TABLE outbox (
    endpoint       text PRIMARY KEY,
    cursor         bigint NOT NULL,
    holder         text,
    lease_until_ms bigint NOT NULL DEFAULT 0
);

CREATE TABLE expiry_warnings (
    name           text NOT NULL,
    expire_seconds bigint NOT NULL,
    lead_seconds   bigint NOT NULL,
    PRIMARY KEY (name, expire_seconds, lead_seconds)
);
