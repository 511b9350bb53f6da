-- Version 11: each namespace's own inactivity policy, as its owners set it
-- (`apitokens:inactivity`: "90d:disable", "30d:delete"), and the policy an
-- audit event set (`apitoken.inactivity`; "off" when removed).
CREATE TABLE inactivity_policies (
    namespace text PRIMARY KEY,
    policy    text NOT NULL
);
ALTER TABLE events ADD COLUMN policy text;
