//! The commit the audit writer relies on, against real SQLite and PostgreSQL databases: a
//! batch of records and the leases of their reads is stored whole or not at all. On SQLite
//! this is the append connection; on PostgreSQL, a transaction through the pool.

use std::time::Duration;

use custos_storage::audit::{AuditFilter, AuditRepository, AuditRow};
use custos_storage::leases::{LeaseRepository, LeaseRow};
use custos_storage::testing::TestDatabase;
use custos_storage::{Database, DatabaseKind};
use sqlx::Connection;

fn record(sequence: u64) -> AuditRow {
    AuditRow {
        sequence,
        recorded_at: 1_700_000_000_000_000 + i64::try_from(sequence).unwrap(),
        request_id: format!("request-{sequence}"),
        principal: Some("app".to_owned()),
        operation: "read".to_owned(),
        mount: Some("secret".to_owned()),
        path: Some(format!("secret/app/{sequence}")),
        outcome: "ok".to_owned(),
        record: format!("{{\"sequence\":{sequence}}}"),
        mac: format!("mac-{sequence}"),
    }
}

fn lease(name: &str) -> LeaseRow {
    LeaseRow {
        lease_id: format!("lease_{name}"),
        token_accessor: "accessor".to_owned(),
        principal: "app".to_owned(),
        mount: "secret".to_owned(),
        path: "secret/app".to_owned(),
        version: Some(3),
        issued_at: 1_700_000_000_000_000,
        expires_at: 1_700_000_360_000_000,
        max_expires_at: 1_700_086_400_000_000,
        renewable: true,
        revoked_at: None,
        revoke_reason: None,
        native_lease_id: Some("database/creds/app/abc".to_owned()),
    }
}

async fn stored_sequences(audit: &AuditRepository) -> Vec<u64> {
    let rows = audit.search(&AuditFilter::default(), 100).await.unwrap();
    rows.iter().map(|row| row.sequence).collect()
}

async fn a_batch_stores_its_records_and_leases_together(kind: DatabaseKind) {
    let test_database = TestDatabase::create(kind).await;
    let database = Database::connect(&test_database.url).await.unwrap();
    let (audit, leases) = (
        AuditRepository::new(&database),
        LeaseRepository::new(&database),
    );

    let records = vec![record(1), record(2), record(3)];
    audit
        .insert_batch(&records, vec![lease("one"), lease("two")])
        .await
        .unwrap();

    let stored = audit.search(&AuditFilter::default(), 10).await.unwrap();
    assert_eq!(
        stored,
        records.into_iter().rev().collect::<Vec<_>>(),
        "every field comes back, newest first"
    );
    assert_eq!(
        leases.get("lease_one").await.unwrap(),
        Some(lease("one")),
        "the lease comes back field by field"
    );
    assert!(leases.get("lease_two").await.unwrap().is_some());

    database.close().await;
    test_database.drop_database().await;
}

async fn a_failed_batch_stores_nothing_and_the_next_one_commits(kind: DatabaseKind) {
    let test_database = TestDatabase::create(kind).await;
    let database = Database::connect(&test_database.url).await.unwrap();
    let (audit, leases) = (
        AuditRepository::new(&database),
        LeaseRepository::new(&database),
    );
    audit.insert_batch(&[record(1)], Vec::new()).await.unwrap();

    // Record 2 is fine, but the batch repeats record 1: none of it may land.
    let refused = audit
        .insert_batch(&[record(2), record(1)], vec![lease("orphan")])
        .await;
    assert!(refused.is_err(), "a repeated sequence is refused");
    assert_eq!(stored_sequences(&audit).await, vec![1]);
    assert_eq!(
        leases.get("lease_orphan").await.unwrap(),
        None,
        "no lease without its record"
    );

    audit
        .insert_batch(&[record(2)], vec![lease("kept")])
        .await
        .unwrap();
    assert_eq!(stored_sequences(&audit).await, vec![2, 1]);
    assert!(leases.get("lease_kept").await.unwrap().is_some());

    // Leases alone (an unaudited or fail-open broker) take the same path.
    leases.insert_batch(vec![lease("alone")]).await.unwrap();
    assert!(leases.get("lease_alone").await.unwrap().is_some());

    database.close().await;
    test_database.drop_database().await;
}

#[tokio::test]
async fn a_batch_stores_its_records_and_leases_together_on_sqlite() {
    a_batch_stores_its_records_and_leases_together(DatabaseKind::Sqlite).await;
}

#[tokio::test]
async fn a_batch_stores_its_records_and_leases_together_on_postgres() {
    a_batch_stores_its_records_and_leases_together(DatabaseKind::Postgres).await;
}

#[tokio::test]
async fn a_failed_batch_stores_nothing_and_the_next_one_commits_on_sqlite() {
    a_failed_batch_stores_nothing_and_the_next_one_commits(DatabaseKind::Sqlite).await;
}

#[tokio::test]
async fn a_failed_batch_stores_nothing_and_the_next_one_commits_on_postgres() {
    a_failed_batch_stores_nothing_and_the_next_one_commits(DatabaseKind::Postgres).await;
}

/// The append connection waits for a write lock another connection holds, as the pool's
/// connections do, and commits once it is released.
#[tokio::test]
async fn a_sqlite_batch_waits_for_a_lock_held_elsewhere() {
    let test_database = TestDatabase::create(DatabaseKind::Sqlite).await;
    let database = Database::connect(&test_database.url).await.unwrap();
    let audit = AuditRepository::new(&database);

    let mut locker = sqlx::AnyConnection::connect(&test_database.url)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let audit = audit.clone();
        async move { audit.insert_batch(&[record(1)], Vec::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the batch waits for the lock");
    assert!(stored_sequences(&audit).await.is_empty());

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    waiting
        .await
        .unwrap()
        .expect("the batch commits after the lock is released");
    assert_eq!(stored_sequences(&audit).await, vec![1]);

    database.close().await;
    test_database.drop_database().await;
}
