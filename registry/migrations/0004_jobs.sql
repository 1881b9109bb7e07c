-- Training and verification jobs, leased by workers.
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    repository TEXT NOT NULL,
    tags TEXT NOT NULL,            -- JSON array
    state TEXT NOT NULL,           -- queued | running | succeeded | failed
    submitter INTEGER,             -- token id (NULL: open registry)
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    lease TEXT,
    lease_expires INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX jobs_waiting ON jobs (state, lease_expires);

CREATE TABLE job_events (
    job INTEGER NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);

-- Verification reports, attached to a manifest (manifests are immutable: reports live
-- beside them, as OCI referrers do).
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest TEXT NOT NULL,
    job INTEGER NOT NULL,
    at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX reports_manifest ON reports (manifest);
