//! The SQLite append connection: one thread with its own connection that commits batches
//! of audit records and leases, the two tables every read adds to.
//!
//! Through sqlx, each statement is a round trip between the async caller and the
//! connection's worker thread, and a batch takes five of them (acquire, BEGIN, two INSERTs,
//! COMMIT). On a small machine those thread handoffs cost more than SQLite's own work. This
//! thread instead receives a whole batch at once and runs it with cached prepared
//! statements, so a batch is one handoff there and one back, whatever its size.
//!
//! Only file databases get an append connection; an in-memory database is private to the
//! connection that opened it, so its batches go through the pool like PostgreSQL's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditRow;
use crate::database::to_i64;
use crate::error::StorageError;
use crate::leases::LeaseRow;

/// Batches waiting for the thread at most; the audit and lease writers each have one
/// under way at a time, so this is reached only when the thread is stuck.
const QUEUE: usize = 16;

/// How long the connection waits for another connection's write lock, as the pool does.
const BUSY_TIMEOUT: Duration = Duration::from_millis(1000);

const INSERT_RECORD: &str = "INSERT INTO audit_records (sequence, recorded_at, request_id, \
     principal, operation, mount, path, outcome, record, mac) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

const INSERT_LEASE: &str = "INSERT INTO leases (lease_id, token_accessor, principal, mount, \
     path, version, issued_at, expires_at, max_expires_at, renewable, revoked_at, \
     revoke_reason, native_lease_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

struct Batch {
    records: Vec<AuditRow>,
    leases: Vec<LeaseRow>,
    done: oneshot::Sender<Result<(), StorageError>>,
}

/// The sending side of the append thread; the thread ends when the last one is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Appender {
    batches: mpsc::Sender<Batch>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Batch")
            .field("records", &self.records.len())
            .field("leases", &self.leases.len())
            .finish()
    }
}

impl Appender {
    /// Starts the thread for the database file at `path`. The connection is opened on the
    /// first batch, and again after a batch that found it unusable.
    pub(crate) fn start(path: PathBuf) -> Result<Self, StorageError> {
        let (batches, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("custos-sqlite-append".to_owned())
            .spawn(move || run(&path, queue))
            .map_err(|error| {
                StorageError::Corrupt(format!("cannot start the SQLite append thread: {error}"))
            })?;
        Ok(Self { batches })
    }

    /// Stores `records` and `leases` at one commit: all of them become durable, or none.
    pub(crate) async fn append(
        &self,
        records: Vec<AuditRow>,
        leases: Vec<LeaseRow>,
    ) -> Result<(), StorageError> {
        let stopped = || StorageError::Corrupt("the SQLite append thread stopped".to_owned());
        let (done, answer) = oneshot::channel();
        let batch = Batch {
            records,
            leases,
            done,
        };
        self.batches.send(batch).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn run(path: &Path, mut queue: mpsc::Receiver<Batch>) {
    let mut connection = None;
    while let Some(batch) = queue.blocking_recv() {
        // A caller that gave up (its wait timed out) no longer needs the batch stored; the
        // audit writer has already answered its requests with an error.
        if batch.done.is_closed() {
            continue;
        }
        let outcome = match &mut connection {
            Some(connection) => commit(connection, &batch.records, &batch.leases),
            None => open(path).and_then(|opened| {
                commit(connection.insert(opened), &batch.records, &batch.leases)
            }),
        };
        if let Err(error) = &outcome {
            if !is_transient(error) {
                // Reopen on the next batch: the file may have been replaced or repaired.
                connection = None;
            }
        }
        let _ = batch.done.send(outcome.map_err(StorageError::from));
    }
    tracing::debug!("SQLite append thread stopped");
}

fn open(path: &Path) -> Result<Connection, rusqlite::Error> {
    // Read-write without create: the pool created and migrated the file before any batch.
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    // The journal mode (WAL) is a property of the file, set by the pool; synchronous is
    // per connection and FULL is what makes a commit durable.
    connection.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    Ok(connection)
}

/// A lock held elsewhere, which goes away by itself; the connection stays usable.
fn is_transient(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn commit(
    connection: &mut Connection,
    records: &[AuditRow],
    leases: &[LeaseRow],
) -> Result<(), rusqlite::Error> {
    // IMMEDIATE takes the write lock up front, so that waiting for it happens in the busy
    // handler rather than as a deadlock error halfway through the batch.
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;

    if !records.is_empty() {
        let mut insert = transaction.prepare_cached(INSERT_RECORD)?;
        for record in records {
            insert.execute(params![
                integer(record.sequence)?,
                record.recorded_at,
                record.request_id,
                record.principal,
                record.operation,
                record.mount,
                record.path,
                record.outcome,
                record.record,
                record.mac,
            ])?;
        }
    }

    if !leases.is_empty() {
        let mut insert = transaction.prepare_cached(INSERT_LEASE)?;
        for lease in leases {
            insert.execute(params![
                lease.lease_id,
                lease.token_accessor,
                lease.principal,
                lease.mount,
                lease.path,
                lease.version.map(integer).transpose()?,
                lease.issued_at,
                lease.expires_at,
                lease.max_expires_at,
                lease.renewable,
                lease.revoked_at,
                lease.revoke_reason,
                lease.native_lease_id,
            ])?;
        }
    }

    // Dropping an uncommitted transaction rolls it back, so an error above stores nothing.
    transaction.commit()
}

fn integer(value: u64) -> Result<i64, rusqlite::Error> {
    to_i64(value).map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))
}
