-- Audit log for SQLite. `record` is the canonical JSON the MAC covers; the other columns
-- are copies for searching, checked against `record` by `custos audit verify`.
CREATE TABLE audit_records (
    sequence BIGINT PRIMARY KEY,
    recorded_at BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    principal TEXT,
    operation TEXT NOT NULL,
    mount TEXT,
    path TEXT,
    outcome TEXT NOT NULL,
    record TEXT NOT NULL,
    mac TEXT NOT NULL
);

CREATE INDEX audit_records_by_time ON audit_records (recorded_at);
CREATE INDEX audit_records_by_principal ON audit_records (principal, sequence);
CREATE INDEX audit_records_by_path ON audit_records (path, sequence);

-- Left by `custos audit prune`: the last removed record's sequence and MAC, authenticated
-- with the audit key, so that verification can start after it.
CREATE TABLE audit_checkpoints (
    sequence BIGINT PRIMARY KEY,
    mac TEXT NOT NULL,
    pruned_before BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    checkpoint_mac TEXT NOT NULL
);
