-- Blobs the object store holds; a row is written only after the bytes are durable.
CREATE TABLE blobs (
    digest          TEXT PRIMARY KEY,
    size            INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    last_referenced INTEGER NOT NULL
);

-- Base models, identified by the fingerprint of their weights.
CREATE TABLE bases (
    name        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    tensors     TEXT NOT NULL, -- JSON array of {name, dtype, shape}
    created_at  INTEGER NOT NULL
);
CREATE INDEX bases_fingerprint ON bases (fingerprint);

-- Manifests, content-addressed by the blake3 of their canonical JSON.
CREATE TABLE manifests (
    digest           TEXT PRIMARY KEY,
    body             BLOB NOT NULL,
    base_fingerprint TEXT NOT NULL,
    method           TEXT NOT NULL,
    size             INTEGER NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE INDEX manifests_base ON manifests (base_fingerprint);

CREATE TABLE manifest_blobs (
    manifest TEXT NOT NULL REFERENCES manifests (digest),
    blob     TEXT NOT NULL REFERENCES blobs (digest),
    PRIMARY KEY (manifest, blob)
);

CREATE TABLE annotations (
    manifest TEXT NOT NULL REFERENCES manifests (digest),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (manifest, key)
);

CREATE TABLE repositories (
    id         INTEGER PRIMARY KEY,
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (namespace, name)
);

-- Versions are immutable: (repository, version) -> manifest never changes.
CREATE TABLE versions (
    repository INTEGER NOT NULL REFERENCES repositories (id),
    version    INTEGER NOT NULL,
    manifest   TEXT NOT NULL REFERENCES manifests (digest),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (repository, version)
);

CREATE TABLE tags (
    repository INTEGER NOT NULL,
    tag        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (repository, tag),
    FOREIGN KEY (repository, version) REFERENCES versions (repository, version)
);
