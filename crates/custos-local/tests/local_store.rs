//! The local backend against real SQLite and PostgreSQL databases: round trips, versions,
//! listing, deletion, tamper resistance, wrong keys and rotation under load.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use custos_core::{
    BackendError, DeleteRequest, ListEntry, SecretBackend, SecretData, SecretPath, SecretValue,
    WriteOptions,
};
use custos_local::LocalBackendSettings;
use custos_local::{rotate_key, KeySource, Keyring, KeyringHandle, LocalBackend};
use custos_storage::local_secrets::LocalSecretRepository;
use custos_storage::testing::TestDatabase;
use custos_storage::{Database, DatabaseKind};

/// One local mount over a fresh database, with its keyring in a temporary file.
struct Fixture {
    database: Database,
    test_database: TestDatabase,
    key_file: PathBuf,
    _key_directory: tempfile::TempDir,
}

impl Fixture {
    async fn new(kind: DatabaseKind) -> Self {
        let test_database = TestDatabase::create(kind).await;
        let database = Database::connect(&test_database.url).await.unwrap();
        let key_directory = tempfile::tempdir().unwrap();
        let key_file = key_directory.path().join("keyring");
        let keyring = Keyring::generate().unwrap();
        keyring.save(&key_file).unwrap();
        repository(&database)
            .initialise_active_key(keyring.newest().id())
            .await
            .unwrap();

        Self {
            database,
            test_database,
            key_file,
            _key_directory: key_directory,
        }
    }

    fn backend(&self, mount: &str, max_versions: u64) -> LocalBackend {
        let keyring = KeyringHandle::load(KeySource::File(self.key_file.clone())).unwrap();
        LocalBackend::new(
            LocalBackendSettings {
                mount: mount.to_owned(),
                max_versions,
            },
            repository(&self.database),
            Arc::new(keyring),
        )
    }

    async fn finish(self) {
        self.database.close().await;
        self.test_database.drop_database().await;
    }
}

fn repository(database: &Database) -> LocalSecretRepository {
    LocalSecretRepository::new(database.pool().clone())
}

fn path(text: &str) -> SecretPath {
    SecretPath::parse(text).unwrap()
}

fn data(pairs: &[(&str, &str)]) -> SecretData {
    let fields: BTreeMap<String, SecretValue> = pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), SecretValue::from(*value)))
        .collect();
    SecretData::new(fields).unwrap()
}

fn text(data: &SecretData, field: &str) -> String {
    data.get(field).unwrap().as_text().unwrap().to_owned()
}

macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(custos_storage::DatabaseKind::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(custos_storage::DatabaseKind::Postgres).await;
                }
            )*
        }
    };
}

on_both_databases!(
    round_trip_and_versions,
    old_versions_beyond_the_maximum_are_dropped,
    check_and_set_guards_concurrent_writers,
    listing_shows_immediate_children,
    soft_delete_and_destroy,
    ciphertext_moved_to_another_row_fails_to_decrypt,
    a_keyring_without_the_key_names_the_missing_key,
    rotation_rewraps_everything_while_reads_continue,
);

async fn round_trip_and_versions(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    let secret = path("app/db");

    let first = backend
        .write(
            &secret,
            data(&[("password", "one")]),
            WriteOptions::default(),
        )
        .await
        .unwrap();
    let second = backend
        .write(
            &secret,
            data(&[("password", "two"), ("user", "app")]),
            WriteOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((first.version, second.version), (1, 2));

    let latest = backend.read(&secret, None).await.unwrap();
    assert_eq!(latest.metadata.version, 2);
    assert_eq!(text(&latest.data, "password"), "two");
    assert_eq!(text(&latest.data, "user"), "app");

    let older = backend.read(&secret, Some(1)).await.unwrap();
    assert_eq!(text(&older.data, "password"), "one");
    assert_eq!(older.data.fields().len(), 1);

    assert_eq!(
        backend.read(&secret, Some(7)).await.unwrap_err(),
        BackendError::VersionNotFound { version: 7 }
    );
    assert_eq!(
        backend.read(&path("app/none"), None).await.unwrap_err(),
        BackendError::NotFound
    );

    // Another mount over the same database sees nothing of the first.
    let other = fixture.backend("other", 10);
    assert_eq!(
        other.read(&secret, None).await.unwrap_err(),
        BackendError::NotFound
    );
    fixture.finish().await;
}

async fn old_versions_beyond_the_maximum_are_dropped(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 3);
    let secret = path("rotating");
    for value in ["1", "2", "3", "4", "5"] {
        backend
            .write(&secret, data(&[("v", value)]), WriteOptions::default())
            .await
            .unwrap();
    }

    for version in [1, 2] {
        assert_eq!(
            backend.read(&secret, Some(version)).await.unwrap_err(),
            BackendError::VersionNotFound { version }
        );
    }
    for version in [3, 4, 5] {
        let read = backend.read(&secret, Some(version)).await.unwrap();
        assert_eq!(text(&read.data, "v"), version.to_string());
    }
    fixture.finish().await;
}

async fn check_and_set_guards_concurrent_writers(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    let secret = path("cas");
    let only_new = WriteOptions {
        check_and_set: Some(0),
    };

    backend
        .write(&secret, data(&[("a", "1")]), only_new)
        .await
        .unwrap();
    assert_eq!(
        backend
            .write(&secret, data(&[("a", "2")]), only_new)
            .await
            .unwrap_err(),
        BackendError::CheckAndSetMismatch {
            expected: 0,
            current: 1
        }
    );
    let after_one = WriteOptions {
        check_and_set: Some(1),
    };
    assert_eq!(
        backend
            .write(&secret, data(&[("a", "2")]), after_one)
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        text(&backend.read(&secret, None).await.unwrap().data, "a"),
        "2"
    );
    fixture.finish().await;
}

async fn listing_shows_immediate_children(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    for name in ["app/db", "app/api", "app/team/x", "app_other", "top"] {
        backend
            .write(&path(name), data(&[("k", "v")]), WriteOptions::default())
            .await
            .unwrap();
    }

    let root = backend.list(None).await.unwrap();
    assert_eq!(
        root,
        vec![
            ListEntry::Secret("app_other".into()),
            ListEntry::Secret("top".into()),
            ListEntry::Folder("app".into()),
        ]
    );
    let app = backend.list(Some(&path("app"))).await.unwrap();
    assert_eq!(
        app,
        vec![
            ListEntry::Secret("api".into()),
            ListEntry::Secret("db".into()),
            ListEntry::Folder("team".into()),
        ]
    );
    assert_eq!(
        backend.list(Some(&path("nothing"))).await.unwrap_err(),
        BackendError::NotFound
    );
    fixture.finish().await;
}

async fn soft_delete_and_destroy(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    let secret = path("app/db");
    for value in ["1", "2", "3"] {
        backend
            .write(&secret, data(&[("v", value)]), WriteOptions::default())
            .await
            .unwrap();
    }

    backend
        .delete(&secret, DeleteRequest::SoftDelete { versions: vec![] })
        .await
        .unwrap();
    assert_eq!(
        backend.read(&secret, None).await.unwrap_err(),
        BackendError::VersionDeleted { version: 3 }
    );
    assert_eq!(
        text(&backend.read(&secret, Some(2)).await.unwrap().data, "v"),
        "2"
    );

    backend
        .delete(&secret, DeleteRequest::Destroy { versions: vec![2] })
        .await
        .unwrap();
    assert_eq!(
        backend.read(&secret, Some(2)).await.unwrap_err(),
        BackendError::VersionDestroyed { version: 2 }
    );
    assert_eq!(
        text(&backend.read(&secret, Some(1)).await.unwrap().data, "v"),
        "1"
    );

    backend
        .delete(&secret, DeleteRequest::Destroy { versions: vec![] })
        .await
        .unwrap();
    assert_eq!(
        backend.read(&secret, Some(1)).await.unwrap_err(),
        BackendError::NotFound
    );
    assert_eq!(
        backend.list(None).await.unwrap_err(),
        BackendError::NotFound
    );
    assert_eq!(
        backend
            .delete(&secret, DeleteRequest::SoftDelete { versions: vec![] })
            .await
            .unwrap_err(),
        BackendError::NotFound
    );
    fixture.finish().await;
}

async fn ciphertext_moved_to_another_row_fails_to_decrypt(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    backend
        .write(
            &path("victim"),
            data(&[("password", "victim-value")]),
            WriteOptions::default(),
        )
        .await
        .unwrap();
    backend
        .write(
            &path("attacker"),
            data(&[("password", "mine")]),
            WriteOptions::default(),
        )
        .await
        .unwrap();

    // An attacker with write access to the database copies the victim's sealed row over
    // their own, hoping the broker decrypts it for them.
    sqlx::query(
        "UPDATE local_secret_versions SET \
         wrapped_key = (SELECT wrapped_key FROM local_secret_versions WHERE path = 'victim'), \
         ciphertext = (SELECT ciphertext FROM local_secret_versions WHERE path = 'victim') \
         WHERE path = 'attacker'",
    )
    .execute(fixture.database.pool())
    .await
    .unwrap();

    let error = backend.read(&path("attacker"), None).await.unwrap_err();
    assert!(
        matches!(error, BackendError::DecryptionFailed { .. }),
        "{error:?}"
    );
    assert!(!error.to_string().contains("victim-value"));
    assert_eq!(
        text(
            &backend.read(&path("victim"), None).await.unwrap().data,
            "password"
        ),
        "victim-value"
    );
    fixture.finish().await;
}

async fn a_keyring_without_the_key_names_the_missing_key(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = fixture.backend("secret", 10);
    backend
        .write(&path("a"), data(&[("k", "v")]), WriteOptions::default())
        .await
        .unwrap();
    let right_key_id = Keyring::load(&KeySource::File(fixture.key_file.clone()))
        .unwrap()
        .newest()
        .id()
        .to_owned();

    // The operator points the broker at another installation's key file.
    Keyring::generate()
        .unwrap()
        .save(&fixture.key_file)
        .unwrap();
    let confused = fixture.backend("secret", 10);

    let error = confused.read(&path("a"), None).await.unwrap_err();
    assert_eq!(
        error,
        BackendError::KeyUnavailable {
            key_id: right_key_id.clone()
        }
    );
    assert!(error.to_string().contains(&right_key_id));
    fixture.finish().await;
}

async fn rotation_rewraps_everything_while_reads_continue(kind: DatabaseKind) {
    let fixture = Fixture::new(kind).await;
    let backend = Arc::new(fixture.backend("secret", 10));
    for index in 0..60 {
        backend
            .write(
                &path(&format!("s{index}")),
                data(&[("value", &format!("value-{index}"))]),
                WriteOptions::default(),
            )
            .await
            .unwrap();
    }
    let old_key_id = Keyring::load(&KeySource::File(fixture.key_file.clone()))
        .unwrap()
        .newest()
        .id()
        .to_owned();

    // Readers and a writer keep using the broker's backend for the whole rotation.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..3 {
        let backend = backend.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut operations = 0_u64;
            let mut index = worker;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || operations < 20 {
                let secret = path(&format!("s{}", index % 60));
                if worker == 0 {
                    // The writer uses secrets of its own, so that the versions being
                    // rotated are never pruned by max_versions under it.
                    backend
                        .write(
                            &path(&format!("w{}", index % 5)),
                            data(&[("value", &format!("value-{}", index % 60))]),
                            WriteOptions::default(),
                        )
                        .await
                        .expect("writes succeed during rotation");
                } else {
                    let read = backend.read(&secret, None).await.expect("reads succeed");
                    assert_eq!(text(&read.data, "value"), format!("value-{}", index % 60));
                }
                operations += 1;
                index += 7;
            }
            operations
        }));
    }

    let report = rotate_key(
        &KeySource::File(fixture.key_file.clone()),
        &repository(&fixture.database),
    )
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        assert!(worker.await.unwrap() >= 20);
    }

    assert_eq!(report.old_key_ids, vec![old_key_id.clone()]);
    assert!(report.rewrapped >= 60, "{report:?}");
    let repository = repository(&fixture.database);
    assert_eq!(
        repository.count_wrapped_under(&old_key_id).await.unwrap(),
        0
    );
    assert_eq!(
        repository.active_key_id().await.unwrap(),
        Some(report.new_key_id.clone())
    );
    let keyring = Keyring::load(&KeySource::File(fixture.key_file.clone())).unwrap();
    assert_eq!(keyring.ids(), vec![report.new_key_id.clone()]);

    // A broker started after the rotation, holding only the new key, reads everything.
    let fresh = fixture.backend("secret", 10);
    for index in 0..60 {
        let read = fresh.read(&path(&format!("s{index}")), None).await.unwrap();
        assert_eq!(text(&read.data, "value"), format!("value-{index}"));
    }
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_never_lose_a_key() {
    let fixture = Fixture::new(DatabaseKind::Sqlite).await;
    let backend = fixture.backend("secret", 10);
    for index in 0..30 {
        backend
            .write(
                &path(&format!("s{index}")),
                data(&[("value", &format!("value-{index}"))]),
                WriteOptions::default(),
            )
            .await
            .unwrap();
    }

    let source = KeySource::File(fixture.key_file.clone());
    let first = {
        let (source, repository) = (source.clone(), repository(&fixture.database));
        tokio::spawn(async move { rotate_key(&source, &repository).await })
    };
    let second = {
        let (source, repository) = (source.clone(), repository(&fixture.database));
        tokio::spawn(async move { rotate_key(&source, &repository).await })
    };
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();

    // Whatever order they ran in, the final keyring opens every version.
    let fresh = fixture.backend("secret", 10);
    for index in 0..30 {
        let read = fresh.read(&path(&format!("s{index}")), None).await.unwrap();
        assert_eq!(text(&read.data, "value"), format!("value-{index}"));
    }
    assert_eq!(Keyring::load(&source).unwrap().ids().len(), 1);
    fixture.finish().await;
}
