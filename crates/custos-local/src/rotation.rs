//! Key rotation: a new key-encryption key, every data key re-wrapped, the old key retired.
//!
//! The steps are ordered so that a broker serving at the same time never meets a key it
//! cannot find:
//! 1. the new key is written to the key file in front of the old ones;
//! 2. the database's active key becomes the new key, so every later write uses it (writes
//!    lock that row, see `custos_storage::local_secrets`);
//! 3. every data key under an old key is re-wrapped, row by row; a broker that meets a
//!    row with the new key id reloads the key file, which holds both keys;
//! 4. once no row refers to an old key, the key file keeps only the new key.
//!
//! Ciphertext is never touched; only the small wrapped keys are rewritten.

use custos_storage::local_secrets::LocalSecretRepository;
use custos_storage::StorageError;

use crate::envelope::{self, Binding};
use crate::keyring::{KeyEncryptionKey, KeyError, KeySource, Keyring};

const BATCH_SIZE: i64 = 500;

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    pub old_key_ids: Vec<String>,
    pub new_key_id: String,
    pub rewrapped: u64,
}

/// Why a rotation stopped. Rotation can be run again after any of these: every step is
/// safe to repeat.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(
        "key rotation needs a key file it can rewrite; the keyring comes from the {0}. \
         Move it to a key file (`keys.file` in the configuration) first"
    )]
    NotAFile(String),

    #[error(transparent)]
    Key(#[from] KeyError),

    #[error(transparent)]
    Storage(#[from] StorageError),

    #[error(
        "the data key of {mount}/{path} version {version} does not open under key {key_id}; \
         the row is damaged or was moved, and was left as it is"
    )]
    Unwrap {
        mount: String,
        path: String,
        version: u64,
        key_id: String,
    },

    #[error(
        "rows are still wrapped under key {key_id}, which this keyring does not hold; \
         add that key to the key file and run the rotation again"
    )]
    UnknownKey { key_id: String },
}

/// Rotates the keyring at `source` and re-wraps every data key in `repository`.
pub async fn rotate_key(
    source: &KeySource,
    repository: &LocalSecretRepository,
) -> Result<RotationReport, RotationError> {
    let KeySource::File(path) = source else {
        return Err(RotationError::NotAFile(source.to_string()));
    };
    // Two rotations at once could each retire the other's new key; the lock, held until
    // this function returns, makes the second wait.
    let _lock = lock_rotation(path)?;

    let keyring = Keyring::load(source)?;
    let active = repository
        .initialise_active_key(keyring.newest().id())
        .await?;
    if keyring.get(&active).is_none() {
        return Err(KeyError::ActiveKeyMissing {
            key_id: active,
            source_name: source.to_string(),
        }
        .into());
    }

    let rotated = keyring.with_newest(KeyEncryptionKey::generate()?);
    rotated.save(path)?;
    let new_key = rotated.newest().clone();
    repository.set_active_key(new_key.id()).await?;
    tracing::info!(
        new_key_id = new_key.id(),
        "new key-encryption key is active"
    );

    let mut rewrapped = 0;
    let old_key_ids: Vec<String> = rotated.ids().into_iter().skip(1).collect();
    for old_key_id in &old_key_ids {
        let old_key = rotated
            .get(old_key_id)
            .expect("the id was taken from this keyring");
        rewrapped += rewrap_all(repository, old_key, &new_key).await?;
    }

    // Refuse to drop old keys while any row still needs a key other than the new one,
    // including keys this keyring never held.
    if let Some(key_id) = repository
        .other_key_ids_in_use(new_key.id())
        .await?
        .into_iter()
        .next()
    {
        return Err(RotationError::UnknownKey { key_id });
    }
    rotated.only_newest().save(path)?;
    tracing::info!(rewrapped, retired = ?old_key_ids, "key rotation finished");

    Ok(RotationReport {
        old_key_ids,
        new_key_id: new_key.id().to_owned(),
        rewrapped,
    })
}

fn lock_rotation(key_file: &std::path::Path) -> Result<std::fs::File, KeyError> {
    let lock_path = key_file.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .and_then(|file| file.lock().map(|()| file))
        .map_err(|error| KeyError::Unwritable {
            path: lock_path.display().to_string(),
            reason: error.to_string(),
        })?;
    Ok(lock)
}

async fn rewrap_all(
    repository: &LocalSecretRepository,
    old_key: &KeyEncryptionKey,
    new_key: &KeyEncryptionKey,
) -> Result<u64, RotationError> {
    let mut rewrapped = 0;
    loop {
        let rows = repository
            .keys_wrapped_under(old_key.id(), BATCH_SIZE)
            .await?;
        if rows.is_empty() {
            return Ok(rewrapped);
        }

        for row in rows {
            let binding = Binding {
                mount: &row.mount,
                path: &row.path,
                version: row.version,
            };
            let new_wrapped = envelope::rewrap(&row.wrapped_key, binding, old_key, new_key)
                .map_err(|_| RotationError::Unwrap {
                    mount: row.mount.clone(),
                    path: row.path.clone(),
                    version: row.version,
                    key_id: old_key.id().to_owned(),
                })?;
            if repository
                .rewrap(&row, old_key.id(), new_key.id(), &new_wrapped)
                .await?
            {
                rewrapped += 1;
            }
        }
    }
}
