-- The base fingerprint a job runs on ('' when its spec names none): a worker asks only for
-- jobs on the bases it holds, so a job waits for a worker that can run it instead of
-- failing on the first one that cannot.
ALTER TABLE jobs ADD COLUMN base TEXT NOT NULL DEFAULT '';
