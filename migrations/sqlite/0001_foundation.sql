-- Foundation schema for SQLite. Times are Unix microseconds (BIGINT) so that SQLite and
-- PostgreSQL store and compare them the same way.

-- Which key-encryption key new data keys are wrapped under. One row; writers lock it so
-- that a key rotation and a secret write never interleave.
CREATE TABLE keyring_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active_key_id TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE local_secrets (
    mount TEXT NOT NULL,
    path TEXT NOT NULL,
    current_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (mount, path)
);

-- One row per kept version. `wrapped_key` and `ciphertext` are NULL once destroyed.
CREATE TABLE local_secret_versions (
    mount TEXT NOT NULL,
    path TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    destroyed_at BIGINT,
    key_id TEXT,
    wrapped_key BLOB,
    ciphertext BLOB,
    PRIMARY KEY (mount, path, version),
    FOREIGN KEY (mount, path) REFERENCES local_secrets (mount, path) ON DELETE CASCADE
);

CREATE INDEX local_secret_versions_by_key ON local_secret_versions (key_id);

-- Tokens are stored only as SHA-256 hashes of the token text.
CREATE TABLE auth_tokens (
    token_hash BLOB PRIMARY KEY,
    accessor TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    is_root BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
