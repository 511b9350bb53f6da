-- apitokens on PostgreSQL, version 1: the tokens (digests only, never
-- secrets), the change log, and the store's revision and lineage.
-- Applied by `apitokens` itself (store/postgres.rs) in one transaction under
-- an advisory lock, so replicas starting together apply it once.
-- Times are integer seconds and nanoseconds, as in the SQLite store.

CREATE TABLE tokens (
    name           text PRIMARY KEY,
    namespace      text NOT NULL,
    role           text NOT NULL CHECK (role IN ('viewer', 'editor', 'owner')),
    secret_sha256  text NOT NULL UNIQUE CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    create_seconds bigint NOT NULL,
    create_nanos   bigint NOT NULL,
    expire_seconds bigint,
    expire_nanos   bigint,
    update_seconds bigint NOT NULL,
    retired        boolean NOT NULL DEFAULT false,
    CHECK ((expire_seconds IS NULL) = (expire_nanos IS NULL))
);
CREATE INDEX tokens_by_namespace ON tokens (namespace, name);
CREATE INDEX tokens_by_expiry ON tokens (expire_seconds, expire_nanos)
    WHERE NOT retired AND expire_seconds IS NOT NULL;

-- Which tokens each revision changed: a replica at revision R reads what
-- changed since R (the last 10,000 revisions are kept).
CREATE TABLE changes (
    revision bigint NOT NULL,
    name     text NOT NULL
);
CREATE INDEX changes_by_revision ON changes (revision);

-- One row. Every write locks it first (UPDATE ... RETURNING), so writes are
-- serialised, commit in revision order, and the quota count inside a write
-- sees every earlier one.
CREATE TABLE store_state (
    id           integer PRIMARY KEY CHECK (id = 1),
    revision     bigint NOT NULL,
    changes_from bigint NOT NULL,
    lineage      bytea NOT NULL CHECK (length(lineage) = 16)
);
