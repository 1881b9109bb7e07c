-- API tokens, stored only as blake3 hashes of the secret.
CREATE TABLE tokens (
    id          INTEGER PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    namespace   TEXT NOT NULL,          -- a namespace, or '*' for every namespace
    scope       TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    kind        TEXT NOT NULL CHECK (kind IN ('user', 'worker')),
    description TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,                -- NULL: never
    revoked_at  INTEGER
);

-- Namespaces anyone may read.
CREATE TABLE public_namespaces (
    namespace TEXT PRIMARY KEY
);

-- Which namespaces may see a blob: the uploader's, and every namespace whose manifests
-- reference it. A blob is visible to a caller only through these links.
CREATE TABLE blob_links (
    blob      TEXT NOT NULL REFERENCES blobs (digest),
    namespace TEXT NOT NULL,
    PRIMARY KEY (blob, namespace)
);

-- Every write: who, what, when, which digest.
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    token     INTEGER,                  -- NULL: open registry, no token
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    digest    TEXT NOT NULL DEFAULT ''
);
