-- Version 6: a token may be disabled (suspended by an owner: refused by
-- every Envoy, kept with its name, role, secrets, history and last use).
-- Every existing token is enabled.
ALTER TABLE tokens ADD COLUMN disabled boolean NOT NULL DEFAULT false;
