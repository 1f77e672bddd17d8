//! Rows of the audit log and of its pruning checkpoints.
//!
//! The repository stores what the audit crate computed (canonical record text and MACs)
//! and answers searches; it neither computes nor checks MACs.

use sqlx::any::AnyArguments;
use sqlx::{AnyPool, Arguments, Row};

use crate::append::Appender;
use crate::database::{to_i64, to_u64, Database};
use crate::error::StorageError;
use crate::leases::LeaseRow;

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub sequence: u64,
    /// Unix microseconds.
    pub recorded_at: i64,
    pub request_id: String,
    pub principal: Option<String>,
    pub operation: String,
    pub mount: Option<String>,
    pub path: Option<String>,
    pub outcome: String,
    /// The canonical JSON of the record, exactly as its MAC covers it.
    pub record: String,
    /// Hex HMAC chaining this record to the previous one.
    pub mac: String,
}

/// A pruning checkpoint: where the remaining chain starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sequence of the last removed record.
    pub sequence: u64,
    /// MAC of the last removed record, which the next record chains to.
    pub mac: String,
    /// Records recorded before this time (Unix microseconds) were removed.
    pub pruned_before: i64,
    pub created_at: i64,
    /// HMAC over the checkpoint itself, so that it cannot be forged without the key.
    pub checkpoint_mac: String,
}

/// Search filters; every one is optional. Results are newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub principal: Option<String>,
    /// Whole-segment path prefix: `secret/app` matches `secret/app` and `secret/app/db`.
    pub path_prefix: Option<String>,
    pub mount: Option<String>,
    pub operation: Option<String>,
    pub outcome: Option<String>,
    /// Unix microseconds, inclusive.
    pub since: Option<i64>,
    /// Unix microseconds, exclusive.
    pub until: Option<i64>,
    /// Only records older than this sequence (the pagination cursor).
    pub before_sequence: Option<u64>,
}

const COLUMNS: &str =
    "sequence, recorded_at, request_id, principal, operation, mount, path, outcome, record, mac";

/// Rows inserted by one statement: 5120 parameters, under SQLite's 32766 and PostgreSQL's
/// 65535. A batch this size or smaller is one statement, hence one round trip.
const ROWS_PER_STATEMENT: usize = 512;

#[derive(Debug, Clone)]
pub struct AuditRepository {
    pool: AnyPool,
    appender: Option<Appender>,
}

impl AuditRepository {
    pub fn new(database: &Database) -> Self {
        Self {
            pool: database.pool().clone(),
            appender: database.appender().cloned(),
        }
    }

    /// Stores records, and the leases of the reads they record, in one commit: all of them
    /// become durable, or none does, so a read's lease exists exactly when its record does.
    ///
    /// A SQLite file commits through its append connection. Otherwise the batch is an
    /// explicit transaction: on PostgreSQL a caller that gives up waiting (a lock held
    /// elsewhere) never sends COMMIT, whereas a lone statement queued behind the lock would
    /// still commit once the lock is released.
    pub async fn insert_batch(
        &self,
        rows: &[AuditRow],
        leases: Vec<LeaseRow>,
    ) -> Result<(), StorageError> {
        if let Some(appender) = &self.appender {
            return appender.append(rows.to_vec(), leases).await;
        }

        let mut transaction = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let (sql, arguments) = insert_statement(chunk)?;
            sqlx::query_with(&sql, arguments)
                .execute(&mut *transaction)
                .await?;
        }
        crate::leases::insert_rows(&mut transaction, &leases).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The newest record's sequence and MAC.
    pub async fn last(&self) -> Result<Option<(u64, String)>, StorageError> {
        let row =
            sqlx::query("SELECT sequence, mac FROM audit_records ORDER BY sequence DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| Ok((to_u64(row.try_get(0)?)?, row.try_get(1)?)))
            .transpose()
    }

    /// Records matching `filter`, newest first, at most `limit`.
    pub async fn search(
        &self,
        filter: &AuditFilter,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StorageError> {
        let mut conditions = Vec::new();
        let mut arguments = AnyArguments::default();
        let mut next = 1;
        let mut condition = |clause: &str, count: usize| {
            let numbers: Vec<usize> = (next..next + count).collect();
            next += count;
            let mut text = clause.to_owned();
            for (index, number) in numbers.iter().enumerate() {
                text = text.replace(&format!("?{}", index + 1), &format!("${number}"));
            }
            conditions.push(text);
        };

        if let Some(principal) = &filter.principal {
            condition("principal = ?1", 1);
            add(&mut arguments, principal.clone())?;
        }
        if let Some(prefix) = &filter.path_prefix {
            condition("(path = ?1 OR substr(path, 1, length(?2)) = ?2)", 2);
            add(&mut arguments, prefix.clone())?;
            add(&mut arguments, format!("{prefix}/"))?;
        }
        if let Some(mount) = &filter.mount {
            condition("mount = ?1", 1);
            add(&mut arguments, mount.clone())?;
        }
        if let Some(operation) = &filter.operation {
            condition("operation = ?1", 1);
            add(&mut arguments, operation.clone())?;
        }
        if let Some(outcome) = &filter.outcome {
            condition("outcome = ?1", 1);
            add(&mut arguments, outcome.clone())?;
        }
        if let Some(since) = filter.since {
            condition("recorded_at >= ?1", 1);
            add(&mut arguments, since)?;
        }
        if let Some(until) = filter.until {
            condition("recorded_at < ?1", 1);
            add(&mut arguments, until)?;
        }
        if let Some(before) = filter.before_sequence {
            condition("sequence < ?1", 1);
            add(&mut arguments, to_i64(before)?)?;
        }

        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records {where_clause} ORDER BY sequence DESC LIMIT {}",
            limit.max(1)
        );
        let rows = sqlx::query_with(&sql, arguments)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(audit_row).collect()
    }

    /// Records with a sequence above `after`, recorded in `[since, until)`, oldest first,
    /// at most `limit`: the order in which verification and export walk the chain.
    pub async fn after(
        &self,
        after: u64,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_records WHERE sequence > $1 AND recorded_at >= $2 \
             AND recorded_at < $3 ORDER BY sequence LIMIT $4"
        ))
        .bind(to_i64(after)?)
        .bind(since)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(audit_row).collect()
    }

    /// The newest checkpoint, if the log was ever pruned.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StorageError> {
        let row = sqlx::query(
            "SELECT sequence, mac, pruned_before, created_at, checkpoint_mac \
             FROM audit_checkpoints ORDER BY sequence DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Checkpoint {
                sequence: to_u64(row.try_get(0)?)?,
                mac: row.try_get(1)?,
                pruned_before: row.try_get(2)?,
                created_at: row.try_get(3)?,
                checkpoint_mac: row.try_get(4)?,
            })
        })
        .transpose()
    }

    /// The newest record recorded before `before`, which a prune would remove last.
    pub async fn last_before(&self, before: i64) -> Result<Option<AuditRow>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_records WHERE recorded_at < $1 \
             ORDER BY sequence DESC LIMIT 1"
        ))
        .bind(before)
        .fetch_optional(&self.pool)
        .await?;
        row.map(audit_row).transpose()
    }

    /// Removes every record up to and including `checkpoint.sequence` and stores the
    /// checkpoint, in one transaction. Returns the number of records removed.
    pub async fn prune(&self, checkpoint: &Checkpoint) -> Result<u64, StorageError> {
        let mut transaction = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM audit_records WHERE sequence <= $1")
            .bind(to_i64(checkpoint.sequence)?)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        sqlx::query(
            "INSERT INTO audit_checkpoints (sequence, mac, pruned_before, created_at, \
             checkpoint_mac) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(to_i64(checkpoint.sequence)?)
        .bind(&checkpoint.mac)
        .bind(checkpoint.pruned_before)
        .bind(checkpoint.created_at)
        .bind(&checkpoint.checkpoint_mac)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(removed)
    }
}

/// One multi-row INSERT for `rows`.
fn insert_statement(rows: &[AuditRow]) -> Result<(String, AnyArguments<'static>), StorageError> {
    let mut sql = format!("INSERT INTO audit_records ({COLUMNS}) VALUES ");
    let mut arguments = AnyArguments::default();
    for (index, row) in rows.iter().enumerate() {
        if index > 0 {
            sql.push_str(", ");
        }
        let base = index * 10;
        let placeholders: Vec<String> = (1..=10)
            .map(|offset| format!("${}", base + offset))
            .collect();
        sql.push_str(&format!("({})", placeholders.join(", ")));
        add_row_arguments(&mut arguments, row)?;
    }
    Ok((sql, arguments))
}

fn add_row_arguments(arguments: &mut AnyArguments<'_>, row: &AuditRow) -> Result<(), StorageError> {
    add(arguments, to_i64(row.sequence)?)?;
    add(arguments, row.recorded_at)?;
    add(arguments, row.request_id.clone())?;
    add(arguments, row.principal.clone())?;
    add(arguments, row.operation.clone())?;
    add(arguments, row.mount.clone())?;
    add(arguments, row.path.clone())?;
    add(arguments, row.outcome.clone())?;
    add(arguments, row.record.clone())?;
    add(arguments, row.mac.clone())?;
    Ok(())
}

fn add<'q, T>(arguments: &mut AnyArguments<'q>, value: T) -> Result<(), StorageError>
where
    T: 'q + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    arguments
        .add(value)
        .map_err(|error| StorageError::Corrupt(format!("cannot bind a value: {error}")))
}

fn audit_row(row: sqlx::any::AnyRow) -> Result<AuditRow, StorageError> {
    Ok(AuditRow {
        sequence: to_u64(row.try_get(0)?)?,
        recorded_at: row.try_get(1)?,
        request_id: row.try_get(2)?,
        principal: row.try_get(3)?,
        operation: row.try_get(4)?,
        mount: row.try_get(5)?,
        path: row.try_get(6)?,
        outcome: row.try_get(7)?,
        record: row.try_get(8)?,
        mac: row.try_get(9)?,
    })
}
