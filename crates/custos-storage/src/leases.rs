//! Leases: one per secret read through the broker, renewable up to a maximum, revocable
//! one by one, by path prefix, by principal, or with the token that holds them.

use sqlx::{AnyPool, Row};

use crate::append::Appender;
use crate::database::{to_i64, to_u64, Database};
use crate::error::StorageError;

/// One stored lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub lease_id: String,
    pub token_accessor: String,
    pub principal: String,
    pub mount: String,
    pub path: String,
    pub version: Option<u64>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub max_expires_at: i64,
    pub renewable: bool,
    pub revoked_at: Option<i64>,
    /// `revoked`, `expired`, `token revoked`, ...
    pub revoke_reason: Option<String>,
    /// The backend's own lease (a Vault lease id), renewed and revoked with this one.
    pub native_lease_id: Option<String>,
}

const COLUMNS: &str = "lease_id, token_accessor, principal, mount, path, version, issued_at, \
                       expires_at, max_expires_at, renewable, revoked_at, revoke_reason, \
                       native_lease_id";

/// Which leases a bulk revocation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseSelector {
    /// The path itself and everything below it.
    PathPrefix(String),
    Principal(String),
    Tokens(Vec<String>),
    /// Active leases that expired at or before this time (Unix microseconds).
    ExpiredBy(i64),
}

#[derive(Debug, Clone)]
pub struct LeaseRepository {
    pool: AnyPool,
    appender: Option<Appender>,
}

/// Leases inserted by one statement: 13 parameters each, well under both engines' limits.
const ROWS_PER_STATEMENT: usize = 256;

impl LeaseRepository {
    pub fn new(database: &Database) -> Self {
        Self {
            pool: database.pool().clone(),
            appender: database.appender().cloned(),
        }
    }

    /// Inserts many leases at one commit (every read takes a lease; batching them is what
    /// keeps a durable commit per read from capping throughput). A SQLite file commits
    /// through its append connection, as audit batches do.
    pub async fn insert_batch(&self, leases: Vec<LeaseRow>) -> Result<(), StorageError> {
        if let Some(appender) = &self.appender {
            return appender.append(Vec::new(), leases).await;
        }
        let mut transaction = self.pool.begin().await?;
        insert_rows(&mut transaction, &leases).await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn get(&self, lease_id: &str) -> Result<Option<LeaseRow>, StorageError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM leases WHERE lease_id = $1"))
            .bind(lease_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(lease_row).transpose()
    }

    /// Moves an active lease's expiry; false when it is revoked or already expired.
    pub async fn renew(
        &self,
        lease_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool, StorageError> {
        let changed = sqlx::query(
            "UPDATE leases SET expires_at = $2 WHERE lease_id = $1 AND revoked_at IS NULL \
             AND expires_at > $3",
        )
        .bind(lease_id)
        .bind(expires_at)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Revokes one active lease; false when it was not active.
    pub async fn revoke(
        &self,
        lease_id: &str,
        reason: &str,
        now: i64,
    ) -> Result<bool, StorageError> {
        let changed = sqlx::query(
            "UPDATE leases SET revoked_at = $2, revoke_reason = $3 \
             WHERE lease_id = $1 AND revoked_at IS NULL",
        )
        .bind(lease_id)
        .bind(now)
        .bind(reason)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Revokes every active lease the selector takes and returns them (as they were before
    /// revocation), so callers can revoke native leases and report what was revoked.
    pub async fn revoke_many(
        &self,
        selector: &LeaseSelector,
        reason: &str,
        now: i64,
    ) -> Result<Vec<LeaseRow>, StorageError> {
        let mut transaction = self.pool.begin().await?;
        let rows = match selector {
            LeaseSelector::PathPrefix(prefix) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM leases WHERE revoked_at IS NULL \
                     AND (path = $1 OR substr(path, 1, length($2)) = $2)"
                ))
                .bind(prefix)
                .bind(format!("{prefix}/"))
                .fetch_all(&mut *transaction)
                .await?
            }
            LeaseSelector::Principal(principal) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM leases WHERE revoked_at IS NULL AND principal = $1"
                ))
                .bind(principal)
                .fetch_all(&mut *transaction)
                .await?
            }
            LeaseSelector::Tokens(accessors) => {
                let mut rows = Vec::new();
                for accessor in accessors {
                    rows.extend(
                        sqlx::query(&format!(
                            "SELECT {COLUMNS} FROM leases WHERE revoked_at IS NULL \
                             AND token_accessor = $1"
                        ))
                        .bind(accessor)
                        .fetch_all(&mut *transaction)
                        .await?,
                    );
                }
                rows
            }
            LeaseSelector::ExpiredBy(moment) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM leases WHERE revoked_at IS NULL AND expires_at <= $1"
                ))
                .bind(*moment)
                .fetch_all(&mut *transaction)
                .await?
            }
        };

        let leases: Vec<LeaseRow> = rows.into_iter().map(lease_row).collect::<Result<_, _>>()?;
        for lease in &leases {
            sqlx::query(
                "UPDATE leases SET revoked_at = $2, revoke_reason = $3 \
                 WHERE lease_id = $1 AND revoked_at IS NULL",
            )
            .bind(&lease.lease_id)
            .bind(now)
            .bind(reason)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(leases)
    }
}

/// Inserts `leases` inside a transaction the caller commits (the audit writer stores a
/// read's lease in the same commit as the read's audit record).
pub(crate) async fn insert_rows(
    connection: &mut sqlx::AnyConnection,
    leases: &[LeaseRow],
) -> Result<(), StorageError> {
    for chunk in leases.chunks(ROWS_PER_STATEMENT) {
        let mut sql = format!("INSERT INTO leases ({COLUMNS}) VALUES ");
        let mut arguments = sqlx::any::AnyArguments::default();
        for (index, lease) in chunk.iter().enumerate() {
            if index > 0 {
                sql.push_str(", ");
            }
            let placeholders: Vec<String> = (1..=13)
                .map(|offset| format!("${}", index * 13 + offset))
                .collect();
            sql.push_str(&format!("({})", placeholders.join(", ")));
            bind_lease(&mut arguments, lease)?;
        }
        sqlx::query_with(&sql, arguments)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

fn bind_lease(
    arguments: &mut sqlx::any::AnyArguments<'_>,
    lease: &LeaseRow,
) -> Result<(), StorageError> {
    use sqlx::Arguments;
    let bind_error = |error: sqlx::error::BoxDynError| {
        StorageError::Corrupt(format!("cannot bind a lease value: {error}"))
    };
    arguments.add(lease.lease_id.clone()).map_err(bind_error)?;
    arguments
        .add(lease.token_accessor.clone())
        .map_err(bind_error)?;
    arguments.add(lease.principal.clone()).map_err(bind_error)?;
    arguments.add(lease.mount.clone()).map_err(bind_error)?;
    arguments.add(lease.path.clone()).map_err(bind_error)?;
    arguments
        .add(lease.version.map(to_i64).transpose()?)
        .map_err(bind_error)?;
    arguments.add(lease.issued_at).map_err(bind_error)?;
    arguments.add(lease.expires_at).map_err(bind_error)?;
    arguments.add(lease.max_expires_at).map_err(bind_error)?;
    arguments
        .add(i64::from(lease.renewable))
        .map_err(bind_error)?;
    arguments.add(lease.revoked_at).map_err(bind_error)?;
    arguments
        .add(lease.revoke_reason.clone())
        .map_err(bind_error)?;
    arguments
        .add(lease.native_lease_id.clone())
        .map_err(bind_error)?;
    Ok(())
}

fn lease_row(row: sqlx::any::AnyRow) -> Result<LeaseRow, StorageError> {
    Ok(LeaseRow {
        lease_id: row.try_get(0)?,
        token_accessor: row.try_get(1)?,
        principal: row.try_get(2)?,
        mount: row.try_get(3)?,
        path: row.try_get(4)?,
        version: row.try_get::<Option<i64>, _>(5)?.map(to_u64).transpose()?,
        issued_at: row.try_get(6)?,
        expires_at: row.try_get(7)?,
        max_expires_at: row.try_get(8)?,
        renewable: row.try_get::<i64, _>(9)? == 1,
        revoked_at: row.try_get(10)?,
        revoke_reason: row.try_get(11)?,
        native_lease_id: row.try_get(12)?,
    })
}
