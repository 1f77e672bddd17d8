-- Identities, policies and leases for SQLite.

-- Tokens gain policies, lifetimes, use limits and a parent (revoking a token revokes the
-- tokens it created). Root tokens keep NULL lifetimes: they do not expire.
ALTER TABLE auth_tokens ADD COLUMN policies TEXT NOT NULL DEFAULT '[]';
ALTER TABLE auth_tokens ADD COLUMN auth_method TEXT NOT NULL DEFAULT 'token';
ALTER TABLE auth_tokens ADD COLUMN principal TEXT NOT NULL DEFAULT 'root';
ALTER TABLE auth_tokens ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
ALTER TABLE auth_tokens ADD COLUMN ttl_seconds BIGINT;
ALTER TABLE auth_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE auth_tokens ADD COLUMN max_expires_at BIGINT;
ALTER TABLE auth_tokens ADD COLUMN uses_remaining BIGINT;
ALTER TABLE auth_tokens ADD COLUMN parent_accessor TEXT;
CREATE INDEX auth_tokens_by_expiry ON auth_tokens (expires_at);
CREATE INDEX auth_tokens_by_parent ON auth_tokens (parent_accessor);

-- Policies written through the API; those in the configuration file are not stored.
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    rules TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One lease per secret read through the broker.
CREATE TABLE leases (
    lease_id TEXT PRIMARY KEY,
    token_accessor TEXT NOT NULL,
    principal TEXT NOT NULL,
    mount TEXT NOT NULL,
    path TEXT NOT NULL,
    version BIGINT,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_expires_at BIGINT NOT NULL,
    renewable BIGINT NOT NULL,
    revoked_at BIGINT,
    revoke_reason TEXT,
    native_lease_id TEXT
);
CREATE INDEX leases_by_path ON leases (path);
CREATE INDEX leases_by_principal ON leases (principal);
CREATE INDEX leases_by_token ON leases (token_accessor);
CREATE INDEX leases_by_expiry ON leases (expires_at);

-- AppRole: a role id (not secret) plus short-lived, possibly single-use secret ids, stored
-- as SHA-256 hashes.
CREATE TABLE approle_roles (
    name TEXT PRIMARY KEY,
    role_id TEXT NOT NULL UNIQUE,
    policies TEXT NOT NULL,
    token_ttl_seconds BIGINT NOT NULL,
    token_max_ttl_seconds BIGINT NOT NULL,
    secret_id_ttl_seconds BIGINT NOT NULL,
    secret_id_uses BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE approle_secret_ids (
    secret_id_hash BLOB PRIMARY KEY,
    role_name TEXT NOT NULL,
    accessor TEXT NOT NULL UNIQUE,
    expires_at BIGINT NOT NULL,
    uses_remaining BIGINT,
    created_at BIGINT NOT NULL
);
