//! An audit log written before the SQLite rowid migration (0004) comes through it intact:
//! every column byte for byte (so every MAC still verifies), in the new table layout.

use std::path::Path;

use custos_storage::audit::{AuditFilter, AuditRepository};
use custos_storage::testing::TestDatabase;
use custos_storage::{Database, DatabaseKind};
use sqlx::{AnyConnection, Connection, Row};

const MIGRATIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/sqlite");

/// Applies the SQLite migrations numbered below `before`, as an older broker would have.
async fn migrate_up_to(url: &str, before: &str) {
    let older = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(MIGRATIONS).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < before {
            std::fs::copy(&path, older.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(Path::new(older.path()))
        .await
        .unwrap();
    let mut connection = AnyConnection::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    migrator.run(&mut connection).await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn records_written_before_the_rowid_migration_survive_it() {
    sqlx::any::install_default_drivers();
    let test_database = TestDatabase::create(DatabaseKind::Sqlite).await;
    migrate_up_to(&test_database.url, "0004").await;

    let mut connection = AnyConnection::connect(&test_database.url).await.unwrap();
    for sequence in 1..=3_i64 {
        sqlx::query(
            "INSERT INTO audit_records (sequence, recorded_at, request_id, principal, \
             operation, mount, path, outcome, record, mac) \
             VALUES ($1, $2, $3, $4, 'read', 'secret', $5, 'ok', $6, $7)",
        )
        .bind(sequence)
        .bind(1_700_000_000_000_000 + sequence)
        .bind(format!("request-{sequence}"))
        .bind(if sequence == 2 { None } else { Some("app") })
        .bind(format!("secret/app/{sequence}"))
        .bind(format!("{{\"sequence\":{sequence},\"note\":\"é\"}}"))
        .bind(format!("{sequence:064x}"))
        .execute(&mut connection)
        .await
        .unwrap();
    }
    let before = sqlx::query("SELECT * FROM audit_records ORDER BY sequence")
        .fetch_all(&mut connection)
        .await
        .unwrap()
        .iter()
        .map(|row| {
            (0..10)
                .map(|column| {
                    row.try_get::<Option<String>, _>(column)
                        .or_else(|_| row.try_get::<i64, _>(column).map(|n| Some(n.to_string())))
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    connection.close().await.unwrap();

    // A current broker opens the file and applies the rest.
    let database = Database::connect(&test_database.url).await.unwrap();
    let audit = AuditRepository::new(&database);
    let after = audit.search(&AuditFilter::default(), 10).await.unwrap();
    let after: Vec<Vec<Option<String>>> = after
        .iter()
        .rev()
        .map(|row| {
            vec![
                Some(row.sequence.to_string()),
                Some(row.recorded_at.to_string()),
                Some(row.request_id.clone()),
                row.principal.clone(),
                Some(row.operation.clone()),
                row.mount.clone(),
                row.path.clone(),
                Some(row.outcome.clone()),
                Some(row.record.clone()),
                Some(row.mac.clone()),
            ]
        })
        .collect();
    assert_eq!(after, before, "every record, every column, unchanged");

    let mut connection = AnyConnection::connect(&test_database.url).await.unwrap();
    let table: String =
        sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'audit_records'")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert!(table.contains("sequence INTEGER PRIMARY KEY"), "{table}");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_records' \
         ORDER BY name",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "audit_records_by_path",
            "audit_records_by_principal",
            "audit_records_by_time"
        ],
        "the search indexes are back, and no separate index on sequence"
    );

    // A search through the rebuilt principal index finds the same records.
    let by_principal = audit
        .search(
            &AuditFilter {
                principal: Some("app".to_owned()),
                ..AuditFilter::default()
            },
            10,
        )
        .await
        .unwrap();
    let sequences: Vec<u64> = by_principal.iter().map(|row| row.sequence).collect();
    assert_eq!(sequences, [3, 1]);

    connection.close().await.unwrap();
    database.close().await;
    test_database.drop_database().await;
}
