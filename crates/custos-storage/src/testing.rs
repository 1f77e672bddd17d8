//! Throw-away databases for tests: a SQLite file in a temporary directory, or a fresh
//! PostgreSQL database created on the server named by `CUSTOS_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped afterwards.

use sqlx::{AnyConnection, Connection, Executor};

use crate::database::DatabaseKind;

/// The maintenance connection used to create and drop test databases.
pub fn postgres_admin_url() -> String {
    std::env::var("CUSTOS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test and is removed by [`TestDatabase::drop_database`].
#[derive(Debug)]
pub struct TestDatabase {
    pub kind: DatabaseKind,
    pub url: String,
    postgres_name: Option<String>,
    _directory: Option<tempfile_free::Directory>,
}

impl TestDatabase {
    /// Creates an empty database of `kind`.
    pub async fn create(kind: DatabaseKind) -> Self {
        match kind {
            DatabaseKind::Sqlite => {
                let directory = tempfile_free::Directory::new();
                let url = format!("sqlite://{}/custos.db", directory.path.display());
                Self {
                    kind,
                    url,
                    postgres_name: None,
                    _directory: Some(directory),
                }
            }
            DatabaseKind::Postgres => {
                sqlx::any::install_default_drivers();
                let name = format!("custos_test_{}", uuid::Uuid::new_v4().simple());
                let admin_url = postgres_admin_url();
                let mut admin = AnyConnection::connect(&admin_url)
                    .await
                    .expect("PostgreSQL for tests is reachable (CUSTOS_TEST_POSTGRES_URL)");
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("the test role may create databases");
                admin.close().await.ok();

                let base = admin_url
                    .rsplit_once('/')
                    .map_or(admin_url.as_str(), |(base, _)| base);
                Self {
                    kind,
                    url: format!("{base}/{name}"),
                    postgres_name: Some(name),
                    _directory: None,
                }
            }
        }
    }

    /// Drops a PostgreSQL test database (SQLite files go with their directory).
    pub async fn drop_database(mut self) {
        if let Some(name) = self.postgres_name.take() {
            drop_postgres_database(&name)
                .await
                .expect("the test database can be dropped");
        }
    }
}

impl Drop for TestDatabase {
    /// A test that panicked before `drop_database` still leaves no database behind: the
    /// drop runs on a thread of its own, since this may be inside an async runtime.
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else {
            return;
        };
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(drop_postgres_database(&name)).ok()
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("a PostgreSQL test database could not be dropped");
        }
    }
}

async fn drop_postgres_database(name: &str) -> Result<(), sqlx::Error> {
    let mut admin = AnyConnection::connect(&postgres_admin_url()).await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    admin.close().await.ok();
    Ok(())
}

/// A temporary directory without pulling `tempfile` into the library's dependencies.
mod tempfile_free {
    use std::path::PathBuf;

    #[derive(Debug)]
    pub struct Directory {
        pub path: PathBuf,
    }

    impl Directory {
        pub fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("custos-test-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("the temporary directory is writable");
            Self { path }
        }
    }

    impl Drop for Directory {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
