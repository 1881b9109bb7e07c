-- Yanked versions stay pullable by digest or version number but leave listings and `latest`.
ALTER TABLE versions ADD COLUMN yanked INTEGER NOT NULL DEFAULT 0;

-- Blobs fsck found corrupt (and quarantined): served as DATA_LOSS, reported missing so a
-- re-push uploads good bytes, which clears the mark.
ALTER TABLE blobs ADD COLUMN corrupt INTEGER NOT NULL DEFAULT 0;
