//! Storage errors. Messages name the database kind and host, never a password.

/// Everything that can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "unsupported database URL `{0}`: use `sqlite://PATH` or `postgres://USER@HOST/DATABASE`"
    )]
    UnsupportedUrl(String),

    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),

    /// From the SQLite append connection (see `append`), which does not go through sqlx.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),

    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),

    #[error("{0} does not fit in a database integer")]
    OutOfRange(u64),
}
