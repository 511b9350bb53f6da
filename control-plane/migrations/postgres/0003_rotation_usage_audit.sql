-- Version 3 (issue 12): who created a token, the previous secret of a
-- rotation's overlap, the last use of each token (not a configuration change:
-- no revision), and the audit trail. Never a secret; the trail holds no
-- digest either.

ALTER TABLE tokens ADD COLUMN created_by text;
ALTER TABLE tokens ADD COLUMN previous_sha256 text CHECK (previous_sha256 IS NULL OR previous_sha256 ~ '^[0-9a-f]{64}$');
ALTER TABLE tokens ADD COLUMN previous_until_seconds bigint;
ALTER TABLE tokens ADD COLUMN previous_until_nanos bigint;
ALTER TABLE tokens ADD CHECK ((previous_sha256 IS NULL) = (previous_until_seconds IS NULL));
ALTER TABLE tokens ADD CHECK ((previous_until_seconds IS NULL) = (previous_until_nanos IS NULL));
CREATE INDEX tokens_by_overlap ON tokens (previous_until_seconds, previous_until_nanos)
    WHERE previous_sha256 IS NOT NULL;

CREATE TABLE usage (
    name             text PRIMARY KEY,
    last_use_seconds bigint NOT NULL
);

CREATE TABLE events (
    seq                    bigserial PRIMARY KEY,
    time_seconds           bigint NOT NULL,
    time_nanos             bigint NOT NULL,
    namespace              text NOT NULL,
    action                 text NOT NULL,
    token                  text,
    actor                  text NOT NULL,
    role                   text,
    expire_seconds         bigint,
    expire_nanos           bigint,
    previous_until_seconds bigint,
    previous_until_nanos   bigint,
    client_address         text,
    count                  bigint
);
CREATE INDEX events_by_namespace ON events (namespace, seq);
