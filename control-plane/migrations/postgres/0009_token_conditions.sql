-- Version 9: a token's conditions (a not-before time, client address
-- ranges), in the filter's encoding (apitokens_core::conditions). Existing
-- tokens have none.
ALTER TABLE tokens ADD COLUMN conditions bytea;
