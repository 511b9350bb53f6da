-- Version 10: the last client addresses a token was seen from (at most five,
-- the latest first), as the filters' usage reports name them:
-- "address@unix_seconds" joined by commas (apitokens::store::row).
ALTER TABLE usage ADD COLUMN addresses text;
