-- Version 8: the evidence for least privilege. When a token's admitted
-- requests last did each kind of access (read, write, the token API), last
-- did what a viewer, an editor, an owner may not, and when a use last came
-- from a filter that does not report it; unknown (NULL) for uses before
-- this version.
ALTER TABLE usage ADD COLUMN read_seconds bigint;
ALTER TABLE usage ADD COLUMN write_seconds bigint;
ALTER TABLE usage ADD COLUMN tokens_seconds bigint;
ALTER TABLE usage ADD COLUMN past_viewer_seconds bigint;
ALTER TABLE usage ADD COLUMN past_editor_seconds bigint;
ALTER TABLE usage ADD COLUMN past_owner_seconds bigint;
ALTER TABLE usage ADD COLUMN unreported_seconds bigint;
