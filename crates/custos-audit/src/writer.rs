//! The audit writer: one task that assigns sequence numbers, chains MACs and commits
//! records in batches (group commit), and the bounded front requests wait on.
//!
//! A request's record is queued, and the request waits until the batch holding it is
//! committed, so a response is sent only after its record is durable. Batching makes one
//! commit (one disk sync on SQLite) serve every request that arrived meanwhile. The wait is
//! bounded by `write_timeout`: in fail-closed mode a record that cannot be stored in time
//! turns the request into a 503; the writer keeps trying with later batches, so the broker
//! recovers by itself when the store comes back. Fail-open mode logs the loss loudly and
//! lets the request through; it is for non-production brokers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custos_storage::audit::{AuditRepository, AuditRow};
use custos_storage::leases::LeaseRow;
use custos_storage::StorageError;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::head::{self, Head};
use crate::key::AuditKey;
use crate::record::AuditRecord;
use crate::sink::{self, JsonLinesSink};

/// Longest time the head file may lag behind the newest commit.
const HEAD_INTERVAL: Duration = Duration::from_millis(100);

/// The MAC the first record chains to.
pub const GENESIS_MAC: &str = "genesis";

/// What happens to a request whose record cannot be stored in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse the request with 503 (the default).
    Closed,
    /// Serve the request anyway and log the lost record as an error.
    Open,
}

/// Tuning of the audit writer.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub fail_mode: FailMode,
    /// Longest wait for a record to become durable.
    pub write_timeout: Duration,
    /// Records waiting for the writer at most; beyond, requests are refused at once.
    pub queue_capacity: usize,
    /// Records per commit at most.
    pub max_batch: usize,
    /// Where the chain head is kept outside the database.
    pub head_file: Option<PathBuf>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            fail_mode: FailMode::Closed,
            write_timeout: Duration::from_secs(2),
            queue_capacity: 8192,
            max_batch: 512,
            head_file: None,
        }
    }
}

/// Why a record was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log did not store the record within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the audit log's queue is full")]
    QueueFull,
    #[error("the audit store refused the record")]
    Store,
    #[error("the audit writer has stopped")]
    Stopped,
}

struct Submission {
    record: AuditRecord,
    record_json: String,
    recorded_at: i64,
    /// Leases of the read this record describes, stored in the same commit.
    leases: Vec<LeaseRow>,
    reply: oneshot::Sender<Result<u64, AuditError>>,
}

/// The front of the audit log that request handling talks to.
#[derive(Debug)]
pub struct AuditLog {
    key: Arc<AuditKey>,
    settings: AuditSettings,
    sender: Mutex<Option<mpsc::Sender<Submission>>>,
    writer: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Submission")
            .field("request_id", &self.record.request_id)
            .finish()
    }
}

impl AuditLog {
    /// Starts the writer over `repository`, continuing the chain where it ends.
    pub async fn start(
        repository: AuditRepository,
        key: Arc<AuditKey>,
        sinks: Vec<JsonLinesSink>,
        settings: AuditSettings,
    ) -> Result<Self, StorageError> {
        let chain = ChainState::load(&repository, &key, settings.head_file.as_deref()).await?;
        let (sender, receiver) = mpsc::channel(settings.queue_capacity.max(1));
        let writer = Writer {
            repository,
            key: key.clone(),
            sinks,
            chain,
            head_file: settings.head_file.clone(),
            max_batch: settings.max_batch.max(1),
            write_timeout: settings.write_timeout,
        };
        let handle = tokio::spawn(writer.run(receiver));

        if settings.fail_mode == FailMode::Open {
            tracing::warn!(
                "AUDIT FAIL-OPEN: requests are served even when their audit record cannot be \
                 stored; use this only for non-production brokers"
            );
        }
        Ok(Self {
            key,
            settings,
            sender: Mutex::new(Some(sender)),
            writer: tokio::sync::Mutex::new(Some(handle)),
        })
    }

    /// An audit log that records nothing, for benchmarks and explicitly unaudited brokers.
    pub fn disabled(key: Arc<AuditKey>) -> Self {
        tracing::warn!("AUDIT DISABLED: requests to this broker leave no audit record");
        Self {
            key,
            settings: AuditSettings::default(),
            sender: Mutex::new(None),
            writer: tokio::sync::Mutex::new(None),
        }
    }

    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    pub fn is_enabled(&self) -> bool {
        self.sender().is_some()
    }

    /// Whether leases can be stored with the records of their reads: only when every
    /// request waits for its record to be durable (enabled and fail-closed), since a lease
    /// must never be lost along with a record that fail-open mode gave up on.
    pub fn stores_leases(&self) -> bool {
        self.is_enabled() && self.settings.fail_mode == FailMode::Closed
    }

    /// Queues `record`, with the `leases` of the read it describes, and waits until both
    /// are durable. `Ok` also when the record was lost in fail-open mode (after logging
    /// it), or when auditing is disabled; leases must then be stored elsewhere (see
    /// [`AuditLog::stores_leases`]), and passing any is refused.
    pub async fn record(
        &self,
        record: AuditRecord,
        leases: Vec<LeaseRow>,
    ) -> Result<(), AuditError> {
        if !leases.is_empty() && !self.stores_leases() {
            tracing::error!("leases handed to an audit log that does not store them");
            return Err(AuditError::Store);
        }
        let Some(sender) = self.sender() else {
            return Ok(());
        };
        let request_id = record.request_id.clone();

        let outcome = self.submit(&sender, record, leases).await;
        match (outcome, self.settings.fail_mode) {
            (Ok(_), _) => Ok(()),
            (Err(error), FailMode::Open) => {
                tracing::error!(%request_id, %error, "audit record LOST (fail-open mode)");
                Ok(())
            }
            (Err(error), FailMode::Closed) => {
                tracing::error!(%request_id, %error, "audit record not stored; request refused");
                Err(error)
            }
        }
    }

    async fn submit(
        &self,
        sender: &mpsc::Sender<Submission>,
        record: AuditRecord,
        leases: Vec<LeaseRow>,
    ) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            record_json: record.canonical_json(),
            recorded_at: unix_micros(&record.time),
            record,
            leases,
            reply,
        };
        sender.try_send(submission).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
        })?;

        match tokio::time::timeout(self.settings.write_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout(self.settings.write_timeout)),
        }
    }

    /// Stops accepting records and waits for the writer to commit what it holds.
    pub async fn close(&self) {
        self.sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<Submission>> {
        self.sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Where the chain ends: the next record chains to `mac` with `sequence + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainState {
    sequence: u64,
    mac: String,
}

impl ChainState {
    /// The furthest point among the database's newest record, the newest checkpoint and
    /// the head file. A head ahead of the database means records were removed from the
    /// end; the chain continues after the head so that the gap stays visible.
    async fn load(
        repository: &AuditRepository,
        key: &AuditKey,
        head_file: Option<&std::path::Path>,
    ) -> Result<Self, StorageError> {
        let mut state = ChainState {
            sequence: 0,
            mac: GENESIS_MAC.to_owned(),
        };
        if let Some(checkpoint) = repository.latest_checkpoint().await? {
            state = ChainState {
                sequence: checkpoint.sequence,
                mac: checkpoint.mac,
            };
        }
        if let Some((sequence, mac)) = repository.last().await? {
            if sequence > state.sequence {
                state = ChainState { sequence, mac };
            }
        }

        let head = match head_file.map(|path| head::read(path, key)) {
            Some(Ok(head)) => head,
            Some(Err(error)) => {
                tracing::error!(%error, "audit head file unusable; verification will say more");
                None
            }
            None => None,
        };
        if let Some(head) = head {
            if head.sequence > state.sequence {
                tracing::error!(
                    database_last = state.sequence,
                    head = head.sequence,
                    "AUDIT LOG TRUNCATED: the database lacks records the head file vouches \
                     for; the chain continues after the head so that the gap stays visible"
                );
                state = ChainState {
                    sequence: head.sequence,
                    mac: head.mac,
                };
            }
        }
        Ok(state)
    }
}

/// The single writer. On SQLite its batches go to the storage crate's append connection,
/// a thread that runs a whole batch per handoff; through the sqlx pool, the five statement
/// round trips of each batch cost more CPU than SQLite's own work did.
struct Writer {
    repository: AuditRepository,
    key: Arc<AuditKey>,
    sinks: Vec<JsonLinesSink>,
    chain: ChainState,
    head_file: Option<PathBuf>,
    max_batch: usize,
    write_timeout: Duration,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<Submission>) {
        let mut head_written_at = Instant::now();
        let mut head_behind = false;
        loop {
            // The head is rewritten at most every HEAD_INTERVAL, and once the writer has
            // been idle for the rest of that interval, rather than after every batch: a
            // rename per batch would cost more than the batch. It is written from the
            // writer's own state, so rows deleted from the database in between are still
            // caught by the next write.
            let next = if head_behind {
                let rest = HEAD_INTERVAL.saturating_sub(head_written_at.elapsed());
                match tokio::time::timeout(rest, receiver.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.write_head();
                        head_written_at = Instant::now();
                        head_behind = false;
                        continue;
                    }
                }
            } else {
                receiver.recv().await
            };
            let Some(first) = next else {
                break;
            };

            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(submission) => batch.push(submission),
                    Err(_) => break,
                }
            }
            // A request that already gave up was answered with 503; recording it as
            // served would be false.
            batch.retain(|submission| !submission.reply.is_closed());
            if !batch.is_empty() {
                self.commit(batch).await;
                head_behind = true;
            }
            if head_behind && head_written_at.elapsed() >= HEAD_INTERVAL {
                self.write_head();
                head_written_at = Instant::now();
                head_behind = false;
            }
        }
        self.write_head();
        tracing::debug!("audit writer stopped");
    }

    fn write_head(&self) {
        let Some(path) = &self.head_file else {
            return;
        };
        if self.chain.sequence == 0 {
            return;
        }
        let head = Head::new(&self.key, self.chain.sequence, self.chain.mac.clone());
        if let Err(error) = head::write(path, &head) {
            tracing::error!(%error, "audit head file not updated");
        }
    }

    async fn commit(&mut self, mut batch: Vec<Submission>) {
        let mut chain = self.chain.clone();
        let mut rows = Vec::with_capacity(batch.len());
        for submission in &batch {
            chain.sequence += 1;
            chain.mac = self
                .key
                .chain_mac(&chain.mac, chain.sequence, &submission.record_json);
            rows.push(row_of(submission, &chain));
        }

        // The leases are not needed after the commit: the requests keep their own copies
        // of any backend lease to revoke on failure.
        let leases: Vec<LeaseRow> = batch
            .iter_mut()
            .flat_map(|submission| std::mem::take(&mut submission.leases))
            .collect();
        let stored = tokio::time::timeout(
            self.write_timeout,
            self.repository.insert_batch(&rows, leases),
        );
        match stored.await {
            Ok(Ok(())) => {
                self.chain = chain;
                // Answer first: the records are durable. The head file and the sinks are
                // copies, written before the next batch is taken.
                for (submission, row) in batch.into_iter().zip(&rows) {
                    let _ = submission.reply.send(Ok(row.sequence));
                }
                self.after_commit(&rows);
            }
            failure => {
                match failure {
                    Ok(Err(error)) => tracing::error!(%error, records = rows.len(),
                        "audit batch not stored"),
                    _ => tracing::error!(records = rows.len(), "audit batch timed out"),
                }
                for submission in batch {
                    let _ = submission.reply.send(Err(AuditError::Store));
                }
                // The commit may have happened before the failure was seen: start again
                // from what the database holds.
                if let Ok(reloaded) =
                    ChainState::load(&self.repository, &self.key, self.head_file.as_deref()).await
                {
                    self.chain = reloaded;
                }
            }
        }
    }

    fn after_commit(&mut self, rows: &[AuditRow]) {
        if self.sinks.is_empty() {
            return;
        }
        let lines: Vec<String> = rows
            .iter()
            .map(|row| sink::line(row.sequence, &row.mac, &row.record))
            .collect();
        for sink in &mut self.sinks {
            if let Err(error) = sink.write_batch(&lines) {
                tracing::error!(target_sink = ?sink.target(), %error, "audit sink write failed");
            }
        }
    }
}

fn row_of(submission: &Submission, chain: &ChainState) -> AuditRow {
    let record = &submission.record;
    AuditRow {
        sequence: chain.sequence,
        recorded_at: submission.recorded_at,
        request_id: record.request_id.clone(),
        principal: record.principal.clone(),
        operation: record.operation.clone(),
        mount: record.mount.clone(),
        path: record.path.clone(),
        outcome: record.outcome.as_str().to_owned(),
        record: submission.record_json.clone(),
        mac: chain.mac.clone(),
    }
}

/// The record time in Unix microseconds (the storage unit), or now if it does not parse.
pub fn unix_micros(rfc3339: &str) -> i64 {
    let moment = time::OffsetDateTime::parse(rfc3339, &Rfc3339)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    i64::try_from(moment.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}
