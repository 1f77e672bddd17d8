//! Connecting to SQLite or PostgreSQL and applying migrations.

use std::str::FromStr;
use std::time::Duration;

use std::path::PathBuf;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

use crate::append::Appender;
use crate::error::StorageError;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// Which database engine a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

impl DatabaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseKind::Sqlite => "sqlite",
            DatabaseKind::Postgres => "postgres",
        }
    }
}

/// A connection pool to the broker's database, migrated and ready.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    kind: DatabaseKind,
    /// The connection that commits batches of audit records and leases, for SQLite files.
    appender: Option<Appender>,
}

impl Database {
    /// Connects to `url` (`sqlite://PATH`, `sqlite::memory:`, or `postgres://...`), creating
    /// a SQLite file when missing, and applies pending migrations.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        sqlx::any::install_default_drivers();

        let kind = kind_of(url)?;
        let target = describe(url);
        let options = match kind {
            DatabaseKind::Sqlite => AnyConnectOptions::from_str(&with_create_mode(url)),
            DatabaseKind::Postgres => AnyConnectOptions::from_str(url),
        }
        .map_err(|source| StorageError::Connect {
            target: target.clone(),
            source,
        })?;

        let pool = pool_options(kind)
            .connect_with(options)
            .await
            .map_err(|source| StorageError::Connect { target, source })?;

        match kind {
            DatabaseKind::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            DatabaseKind::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        tracing::debug!(database = kind.as_str(), "database migrated");

        let appender = match sqlite_file(url)? {
            Some(path) => Some(Appender::start(path)?),
            None => None,
        };
        Ok(Self {
            pool,
            kind,
            appender,
        })
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn appender(&self) -> Option<&Appender> {
        self.appender.as_ref()
    }

    /// A cheap round trip, used by readiness checks.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn pool_options(kind: DatabaseKind) -> AnyPoolOptions {
    let options = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5));

    match kind {
        // WAL lets readers proceed during a write; FULL sync makes each commit durable;
        // the busy timeout makes a second writer wait instead of failing at once, but not
        // so long that connections stuck behind a foreign lock starve the pool.
        // No ping before handing out a SQLite connection: it is a file opened in this
        // process and cannot have been dropped by a server, and each ping is a round trip
        // to the connection's worker thread, which cost as much as the query it preceded.
        DatabaseKind::Sqlite => {
            options
                .test_before_acquire(false)
                .after_connect(|connection, _metadata| {
                    Box::pin(async move {
                        connection
                            .execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 1000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                        Ok(())
                    })
                })
        }
        DatabaseKind::Postgres => options,
    }
}

fn kind_of(url: &str) -> Result<DatabaseKind, StorageError> {
    if url.starts_with("sqlite:") {
        Ok(DatabaseKind::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(DatabaseKind::Postgres)
    } else {
        Err(StorageError::UnsupportedUrl(describe(url)))
    }
}

/// The file behind a SQLite URL; `None` for PostgreSQL and for in-memory databases.
fn sqlite_file(url: &str) -> Result<Option<PathBuf>, StorageError> {
    if kind_of(url)? != DatabaseKind::Sqlite
        || url.contains(":memory:")
        || url.contains("mode=memory")
    {
        return Ok(None);
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|source| {
        StorageError::Connect {
            target: describe(url),
            source,
        }
    })?;
    Ok(Some(options.get_filename().to_path_buf()))
}

fn with_create_mode(url: &str) -> String {
    if url.contains("mode=") || url.contains(":memory:") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// The URL without credentials or query, safe to show in errors and logs. Everything up to
/// the last `@` goes first, so a password holding `?`, `/` or `#` cannot survive.
pub fn describe(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split('?').next().unwrap_or_default().to_owned();
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    format!("{scheme}://{rest}")
}

/// A database URL, which may hold a password: `Debug` and `Display` show it without
/// credentials or query.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The full URL, password included; only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "DatabaseUrl({:?})", describe(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&describe(&self.0))
    }
}

/// The current time in Unix microseconds, the unit every stored time uses.
pub fn unix_micros_now() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// An unsigned count or version as a database BIGINT.
pub(crate) fn to_i64(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| StorageError::OutOfRange(value))
}

/// A database BIGINT as an unsigned count or version.
pub(crate) fn to_u64(value: i64) -> Result<u64, StorageError> {
    u64::try_from(value).map_err(|_| StorageError::Corrupt(format!("{value} is negative")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_never_show_passwords() {
        assert_eq!(
            describe("postgres://custos:hunter2@db.internal:5432/custos?sslmode=require"),
            "postgres://db.internal:5432/custos"
        );
        assert_eq!(
            describe("sqlite:///var/lib/custos.db"),
            "sqlite:///var/lib/custos.db"
        );
    }

    #[test]
    fn sqlite_files_are_created_when_missing() {
        assert_eq!(
            with_create_mode("sqlite:///a.db"),
            "sqlite:///a.db?mode=rwc"
        );
        assert_eq!(
            with_create_mode("sqlite:///a.db?x=1"),
            "sqlite:///a.db?x=1&mode=rwc"
        );
        assert_eq!(with_create_mode("sqlite::memory:"), "sqlite::memory:");
    }

    #[test]
    fn only_sqlite_files_get_an_append_connection() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/custos/custos.db?mode=rwc").unwrap(),
            Some(PathBuf::from("/var/lib/custos/custos.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:").unwrap(), None);
        assert_eq!(sqlite_file("postgres://custos@db/custos").unwrap(), None);
    }
}
