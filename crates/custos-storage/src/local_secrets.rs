//! Rows of the local backend: secret metadata, encrypted versions and the active key id.
//!
//! The repository moves ciphertext in and out; sealing and opening it is the local
//! backend's job. Writes lock the single `keyring_state` row first, which serialises them
//! with key rotation on both databases and takes SQLite's write lock up front.

use sqlx::{Any, AnyPool, Row, Transaction};

use crate::database::unix_micros_now;
use crate::database::{to_i64, to_u64};
use crate::error::StorageError;

/// The sealed content of one version, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedVersion {
    /// Id of the key-encryption key that wrapped `wrapped_key`.
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedVersion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SealedVersion")
            .field("key_id", &self.key_id)
            .field("wrapped_key_bytes", &self.wrapped_key.len())
            .field("ciphertext_bytes", &self.ciphertext.len())
            .finish()
    }
}

/// One stored version with its timestamps; `sealed` is `None` once destroyed.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub version: u64,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
    pub destroyed_at: Option<i64>,
    pub sealed: Option<SealedVersion>,
}

/// Where and how to write a new version.
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'request> {
    pub mount: &'request str,
    pub path: &'request str,
    /// Expected current version for check-and-set (0: must not exist).
    pub check_and_set: Option<u64>,
    /// Versions older than the newest `max_versions` are removed.
    pub max_versions: u64,
}

/// What a write decided, before sealing: the version number and the key to wrap under.
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub version: u64,
    pub active_key_id: String,
}

/// Why a write was refused by the repository's own rules.
#[derive(Debug)]
pub enum WriteRefusal {
    CheckAndSet { expected: u64, current: u64 },
}

/// A version as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenVersion {
    pub version: u64,
    /// Unix microseconds, as stored.
    pub created_at: i64,
}

/// How a delete ended when it was not refused by the database itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Every named version was deleted (or already was).
    Done,
    /// No secret exists at the path.
    SecretMissing,
    /// The secret exists but this version does not; nothing was changed.
    VersionMissing(u64),
}

/// A row of a key rotation: one data key to re-wrap.
#[derive(Clone)]
pub struct WrappedKeyRow {
    pub mount: String,
    pub path: String,
    pub version: u64,
    pub wrapped_key: Vec<u8>,
}

impl std::fmt::Debug for WrappedKeyRow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WrappedKeyRow")
            .field("mount", &self.mount)
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The local backend's rows in one database.
#[derive(Debug, Clone)]
pub struct LocalSecretRepository {
    pool: AnyPool,
}

impl LocalSecretRepository {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// The key id new versions are wrapped under, if the store was ever initialised.
    pub async fn active_key_id(&self) -> Result<Option<String>, StorageError> {
        let row = sqlx::query("SELECT active_key_id FROM keyring_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.get::<String, _>(0)))
    }

    /// Records `key_id` as the active key unless one is recorded already; returns the
    /// active key id either way.
    pub async fn initialise_active_key(&self, key_id: &str) -> Result<String, StorageError> {
        sqlx::query(
            "INSERT INTO keyring_state (id, active_key_id, updated_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(key_id)
        .bind(unix_micros_now())
        .execute(&self.pool)
        .await?;

        self.active_key_id()
            .await?
            .ok_or_else(|| StorageError::Corrupt("keyring state row is missing".to_owned()))
    }

    /// Makes `key_id` the key that every new version is wrapped under.
    pub async fn set_active_key(&self, key_id: &str) -> Result<(), StorageError> {
        sqlx::query("UPDATE keyring_state SET active_key_id = $1, updated_at = $2 WHERE id = 1")
            .bind(key_id)
            .bind(unix_micros_now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes a new version. `seal` receives the plan (version number and active key id)
    /// and returns the sealed content; it runs inside the transaction, so the key it
    /// wraps under is still the active one when the row commits.
    pub async fn write_version<SealError>(
        &self,
        request: NewVersion<'_>,
        seal: impl FnOnce(&WritePlan) -> Result<SealedVersion, SealError>,
    ) -> Result<Result<WrittenVersion, WriteRefusal>, SealError>
    where
        SealError: From<StorageError>,
    {
        let mut transaction = self.pool.begin().await.map_err(StorageError::from)?;
        let active_key_id = lock_active_key(&mut transaction).await?;

        let current = current_version(&mut transaction, request.mount, request.path).await?;
        if let Some(expected) = request.check_and_set {
            if expected != current.unwrap_or(0) {
                return Ok(Err(WriteRefusal::CheckAndSet {
                    expected,
                    current: current.unwrap_or(0),
                }));
            }
        }

        let plan = WritePlan {
            version: current.unwrap_or(0) + 1,
            active_key_id,
        };
        let sealed = seal(&plan)?;
        let now = unix_micros_now();
        insert_version(
            &mut transaction,
            &request,
            &plan,
            &sealed,
            now,
            current.is_some(),
        )
        .await?;

        transaction.commit().await.map_err(StorageError::from)?;
        Ok(Ok(WrittenVersion {
            version: plan.version,
            created_at: now,
        }))
    }

    /// The newest version (when `version` is `None`) or the given one.
    pub async fn read_version(
        &self,
        mount: &str,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, StorageError> {
        let columns = "SELECT version, created_at, deleted_at, destroyed_at, key_id, \
                       wrapped_key, ciphertext FROM local_secret_versions";
        let row = match version {
            Some(version) => {
                sqlx::query(&format!(
                    "{columns} WHERE mount = $1 AND path = $2 AND version = $3"
                ))
                .bind(mount)
                .bind(path)
                .bind(to_i64(version)?)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "{columns} WHERE mount = $1 AND path = $2 ORDER BY version DESC LIMIT 1"
                ))
                .bind(mount)
                .bind(path)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(stored_version).transpose()
    }

    /// Whether any metadata exists for the secret (it may have no readable version).
    pub async fn exists(&self, mount: &str, path: &str) -> Result<bool, StorageError> {
        let row = sqlx::query("SELECT 1 FROM local_secrets WHERE mount = $1 AND path = $2")
            .bind(mount)
            .bind(path)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Every secret path in `mount` that starts with `prefix` (plain text prefix; callers
    /// pass a whole-segment prefix ending in `/`, or an empty one for the mount root).
    pub async fn paths_with_prefix(
        &self,
        mount: &str,
        prefix: &str,
    ) -> Result<Vec<String>, StorageError> {
        // `substr` rather than LIKE: paths may contain `_`, which LIKE treats as a wildcard.
        let rows = sqlx::query(
            "SELECT path FROM local_secrets WHERE mount = $1 \
             AND substr(path, 1, length($2)) = $2 ORDER BY path",
        )
        .bind(mount)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| row.get::<String, _>(0))
            .collect())
    }

    /// Marks versions deleted (restorable); an empty list means the latest version. All or
    /// nothing: if one named version does not exist, nothing changes.
    pub async fn soft_delete(
        &self,
        mount: &str,
        path: &str,
        versions: &[u64],
    ) -> Result<DeleteOutcome, StorageError> {
        self.change_versions(
            mount,
            path,
            versions,
            "UPDATE local_secret_versions SET deleted_at = $4 WHERE mount = $1 \
             AND path = $2 AND version = $3 AND deleted_at IS NULL",
        )
        .await
    }

    /// Erases the sealed content of versions, keeping a tombstone row. All or nothing, like
    /// [`Self::soft_delete`].
    pub async fn destroy_versions(
        &self,
        mount: &str,
        path: &str,
        versions: &[u64],
    ) -> Result<DeleteOutcome, StorageError> {
        self.change_versions(
            mount,
            path,
            versions,
            "UPDATE local_secret_versions SET destroyed_at = $4, key_id = NULL, \
             wrapped_key = NULL, ciphertext = NULL WHERE mount = $1 AND path = $2 \
             AND version = $3 AND destroyed_at IS NULL",
        )
        .await
    }

    async fn change_versions(
        &self,
        mount: &str,
        path: &str,
        versions: &[u64],
        update: &str,
    ) -> Result<DeleteOutcome, StorageError> {
        // Taking the write lock first serialises deletes with writes and rotation, so
        // "the latest version" cannot change under us.
        let mut transaction = self.pool.begin().await?;
        lock_active_key(&mut transaction).await?;
        let Some(current) = current_version(&mut transaction, mount, path).await? else {
            return Ok(DeleteOutcome::SecretMissing);
        };
        let versions = if versions.is_empty() {
            vec![current]
        } else {
            versions.to_vec()
        };

        for version in &versions {
            let exists = sqlx::query(
                "SELECT 1 FROM local_secret_versions WHERE mount = $1 AND path = $2 \
                 AND version = $3",
            )
            .bind(mount)
            .bind(path)
            .bind(to_i64(*version)?)
            .fetch_optional(&mut *transaction)
            .await?;
            if exists.is_none() {
                return Ok(DeleteOutcome::VersionMissing(*version));
            }
        }

        let now = unix_micros_now();
        for version in &versions {
            sqlx::query(update)
                .bind(mount)
                .bind(path)
                .bind(to_i64(*version)?)
                .bind(now)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(DeleteOutcome::Done)
    }

    /// Removes a secret entirely: every version and its metadata.
    pub async fn destroy_secret(
        &self,
        mount: &str,
        path: &str,
    ) -> Result<DeleteOutcome, StorageError> {
        let mut transaction = self.pool.begin().await?;
        lock_active_key(&mut transaction).await?;
        // Versions go with their secret (ON DELETE CASCADE); deleting them first keeps
        // SQLite connections without foreign keys enabled correct too.
        sqlx::query("DELETE FROM local_secret_versions WHERE mount = $1 AND path = $2")
            .bind(mount)
            .bind(path)
            .execute(&mut *transaction)
            .await?;
        let removed = sqlx::query("DELETE FROM local_secrets WHERE mount = $1 AND path = $2")
            .bind(mount)
            .bind(path)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;

        Ok(if removed > 0 {
            DeleteOutcome::Done
        } else {
            DeleteOutcome::SecretMissing
        })
    }

    /// Up to `limit` data keys still wrapped under `key_id`, for rotation.
    pub async fn keys_wrapped_under(
        &self,
        key_id: &str,
        limit: i64,
    ) -> Result<Vec<WrappedKeyRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT mount, path, version, wrapped_key FROM local_secret_versions \
             WHERE key_id = $1 ORDER BY mount, path, version LIMIT $2",
        )
        .bind(key_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;

        rows.into_iter()
            .map(|row| {
                Ok(WrappedKeyRow {
                    mount: row.try_get(0)?,
                    path: row.try_get(1)?,
                    version: to_u64(row.try_get(2)?)?,
                    wrapped_key: row.try_get(3)?,
                })
            })
            .collect()
    }

    /// Replaces one wrapped data key, only if it is still wrapped under `old_key_id`.
    /// Returns false when the row changed meanwhile (destroyed, or already re-wrapped).
    pub async fn rewrap(
        &self,
        row: &WrappedKeyRow,
        old_key_id: &str,
        new_key_id: &str,
        new_wrapped_key: &[u8],
    ) -> Result<bool, StorageError> {
        let changed = sqlx::query(
            "UPDATE local_secret_versions SET key_id = $1, wrapped_key = $2 \
             WHERE mount = $3 AND path = $4 AND version = $5 AND key_id = $6",
        )
        .bind(new_key_id)
        .bind(new_wrapped_key)
        .bind(&row.mount)
        .bind(&row.path)
        .bind(to_i64(row.version)?)
        .bind(old_key_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Key ids that any stored version is wrapped under, other than `key_id`.
    pub async fn other_key_ids_in_use(&self, key_id: &str) -> Result<Vec<String>, StorageError> {
        let rows = sqlx::query(
            "SELECT DISTINCT key_id FROM local_secret_versions \
             WHERE key_id IS NOT NULL AND key_id <> $1",
        )
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| Ok(row.try_get::<String, _>(0)?))
            .collect()
    }

    /// Counts stored versions whose data key is wrapped under `key_id`.
    pub async fn count_wrapped_under(&self, key_id: &str) -> Result<u64, StorageError> {
        let row = sqlx::query("SELECT COUNT(*) FROM local_secret_versions WHERE key_id = $1")
            .bind(key_id)
            .fetch_one(&self.pool)
            .await?;
        to_u64(row.try_get(0)?)
    }
}

/// Takes the write lock on the keyring state and returns the active key id.
async fn lock_active_key(transaction: &mut Transaction<'_, Any>) -> Result<String, StorageError> {
    // A no-op UPDATE is the one statement that takes a row lock on PostgreSQL and the
    // database write lock on SQLite, with the same SQL on both.
    let row = sqlx::query(
        "UPDATE keyring_state SET active_key_id = active_key_id WHERE id = 1 \
         RETURNING active_key_id",
    )
    .fetch_optional(&mut **transaction)
    .await?;
    row.map(|row| row.get::<String, _>(0))
        .ok_or_else(|| StorageError::Corrupt("the keyring state is not initialised".to_owned()))
}

async fn current_version(
    transaction: &mut Transaction<'_, Any>,
    mount: &str,
    path: &str,
) -> Result<Option<u64>, StorageError> {
    let row =
        sqlx::query("SELECT current_version FROM local_secrets WHERE mount = $1 AND path = $2")
            .bind(mount)
            .bind(path)
            .fetch_optional(&mut **transaction)
            .await?;
    row.map(|row| to_u64(row.try_get(0)?)).transpose()
}

async fn insert_version(
    transaction: &mut Transaction<'_, Any>,
    request: &NewVersion<'_>,
    plan: &WritePlan,
    sealed: &SealedVersion,
    now: i64,
    secret_exists: bool,
) -> Result<(), StorageError> {
    let version = to_i64(plan.version)?;
    if secret_exists {
        let updated = sqlx::query(
            "UPDATE local_secrets SET current_version = $3, updated_at = $4 \
             WHERE mount = $1 AND path = $2",
        )
        .bind(request.mount)
        .bind(request.path)
        .bind(version)
        .bind(now)
        .execute(&mut **transaction)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(StorageError::Corrupt(format!(
                "the metadata of {}/{} vanished during a locked write",
                request.mount, request.path
            )));
        }
    } else {
        sqlx::query(
            "INSERT INTO local_secrets (mount, path, current_version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(request.mount)
        .bind(request.path)
        .bind(version)
        .bind(now)
        .execute(&mut **transaction)
        .await?;
    }

    sqlx::query(
        "INSERT INTO local_secret_versions (mount, path, version, created_at, key_id, \
         wrapped_key, ciphertext) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(request.mount)
    .bind(request.path)
    .bind(version)
    .bind(now)
    .bind(&sealed.key_id)
    .bind(&sealed.wrapped_key)
    .bind(&sealed.ciphertext)
    .execute(&mut **transaction)
    .await?;

    let oldest_kept = version - to_i64(request.max_versions.max(1))? + 1;
    sqlx::query(
        "DELETE FROM local_secret_versions WHERE mount = $1 AND path = $2 AND version < $3",
    )
    .bind(request.mount)
    .bind(request.path)
    .bind(oldest_kept)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

fn stored_version(row: sqlx::any::AnyRow) -> Result<StoredVersion, StorageError> {
    let key_id: Option<String> = row.try_get(4)?;
    let wrapped_key: Option<Vec<u8>> = row.try_get(5)?;
    let ciphertext: Option<Vec<u8>> = row.try_get(6)?;
    let sealed = match (key_id, wrapped_key, ciphertext) {
        (Some(key_id), Some(wrapped_key), Some(ciphertext)) => Some(SealedVersion {
            key_id,
            wrapped_key,
            ciphertext,
        }),
        _ => None,
    };

    Ok(StoredVersion {
        version: to_u64(row.try_get(0)?)?,
        created_at: row.try_get(1)?,
        deleted_at: row.try_get(2)?,
        destroyed_at: row.try_get(3)?,
        sealed,
    })
}
