-- Version 2: the serve replicas on this database and the Envoy streams each
-- one serves, so that a write answered by one replica waits until the Envoys
-- of every replica applied it, and /status shows them all.

CREATE TABLE replicas (
    id           text PRIMARY KEY,          -- random, new at every start
    name         text NOT NULL,             -- --replica-name
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE envoy_streams (
    replica_id     text NOT NULL REFERENCES replicas (id) ON DELETE CASCADE,
    stream         bigint NOT NULL,
    acked_version  bigint,
    nacked_version bigint,
    nack_error     text,
    status         jsonb NOT NULL,          -- the stream as /status shows it
    PRIMARY KEY (replica_id, stream)
);
