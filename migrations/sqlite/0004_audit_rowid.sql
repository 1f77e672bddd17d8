-- The audit table keyed by SQLite's rowid. `BIGINT PRIMARY KEY` made SQLite keep a second
-- B-tree beside the table just to index `sequence`; `INTEGER PRIMARY KEY` makes `sequence`
-- the rowid itself, so an appended record touches one B-tree fewer. Records, MACs and the
-- search indexes are unchanged.
CREATE TABLE audit_records_by_rowid (
    sequence INTEGER PRIMARY KEY,
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

INSERT INTO audit_records_by_rowid
    (sequence, recorded_at, request_id, principal, operation, mount, path, outcome, record, mac)
SELECT sequence, recorded_at, request_id, principal, operation, mount, path, outcome, record, mac
FROM audit_records;

DROP TABLE audit_records;
ALTER TABLE audit_records_by_rowid RENAME TO audit_records;

CREATE INDEX audit_records_by_time ON audit_records (recorded_at);
CREATE INDEX audit_records_by_principal ON audit_records (principal, sequence);
CREATE INDEX audit_records_by_path ON audit_records (path, sequence);
