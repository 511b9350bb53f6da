-- Version 12: the conditions an audit event set (a token's create, or the
-- update of its conditions), as the API writes them (a JSON object).
ALTER TABLE events ADD COLUMN conditions text;
