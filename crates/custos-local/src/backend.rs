//! The local backend: the core backend trait over sealed rows in Custos's database.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use custos_core::{
    BackendError, DeleteRequest, ListEntry, Operation, SecretBackend, SecretData, SecretPath,
    SecretVersion, VersionMetadata, WriteOptions,
};
use custos_storage::local_secrets::{
    DeleteOutcome, LocalSecretRepository, NewVersion, SealedVersion, StoredVersion, WriteRefusal,
};
use custos_storage::StorageError;
use time::OffsetDateTime;

use crate::envelope::{self, Binding, EnvelopeError, Sealed};
use crate::keyring::KeyringHandle;

/// Default number of versions kept per secret.
pub const DEFAULT_MAX_VERSIONS: u64 = 10;

/// Settings of one local mount.
#[derive(Debug, Clone)]
pub struct LocalBackendSettings {
    /// The mount path; part of every row's key and of the encryption binding.
    pub mount: String,
    pub max_versions: u64,
}

/// One local mount.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    settings: LocalBackendSettings,
    repository: LocalSecretRepository,
    keyring: Arc<KeyringHandle>,
}

impl LocalBackend {
    pub fn new(
        settings: LocalBackendSettings,
        repository: LocalSecretRepository,
        keyring: Arc<KeyringHandle>,
    ) -> Self {
        Self {
            settings,
            repository,
            keyring,
        }
    }

    fn binding<'a>(&'a self, path: &'a SecretPath, version: u64) -> Binding<'a> {
        Binding {
            mount: &self.settings.mount,
            path: path.as_str(),
            version,
        }
    }

    fn open_version(
        &self,
        path: &SecretPath,
        stored: StoredVersion,
    ) -> Result<SecretVersion, BackendError> {
        let metadata = metadata_of(&stored);
        if stored.destroyed_at.is_some() {
            return Err(BackendError::VersionDestroyed {
                version: stored.version,
            });
        }
        if stored.deleted_at.is_some() {
            return Err(BackendError::VersionDeleted {
                version: stored.version,
            });
        }
        let Some(sealed) = stored.sealed else {
            return Err(BackendError::Internal(format!(
                "version {} has no sealed content",
                stored.version
            )));
        };

        let key = self
            .keyring
            .key(&sealed.key_id)
            .ok_or_else(|| BackendError::KeyUnavailable {
                key_id: sealed.key_id.clone(),
            })?;
        let envelope = Sealed {
            wrapped_key: sealed.wrapped_key,
            ciphertext: sealed.ciphertext,
        };
        let data = envelope::open(&envelope, self.binding(path, stored.version), &key).map_err(
            |error| {
                tracing::error!(
                    mount = %self.settings.mount,
                    path = %path,
                    version = stored.version,
                    key_id = %sealed.key_id,
                    %error,
                    "a stored secret version failed to decrypt"
                );
                BackendError::DecryptionFailed {
                    key_id: sealed.key_id.clone(),
                }
            },
        )?;
        Ok(SecretVersion {
            data,
            metadata,
            native_lease: None,
        })
    }
}

/// Errors while sealing inside the write transaction.
enum SealFailure {
    Storage(StorageError),
    Backend(BackendError),
}

impl From<StorageError> for SealFailure {
    fn from(error: StorageError) -> Self {
        SealFailure::Storage(error)
    }
}

#[async_trait]
impl SecretBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn supports(&self, _operation: Operation) -> bool {
        true
    }

    async fn read(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<SecretVersion, BackendError> {
        let stored = self
            .repository
            .read_version(&self.settings.mount, path.as_str(), version)
            .await
            .map_err(storage_error)?;

        match (stored, version) {
            (Some(stored), _) => self.open_version(path, stored),
            (None, None) => Err(BackendError::NotFound),
            (None, Some(version)) => {
                let exists = self
                    .repository
                    .exists(&self.settings.mount, path.as_str())
                    .await
                    .map_err(storage_error)?;
                if exists {
                    Err(BackendError::VersionNotFound { version })
                } else {
                    Err(BackendError::NotFound)
                }
            }
        }
    }

    async fn list(&self, prefix: Option<&SecretPath>) -> Result<Vec<ListEntry>, BackendError> {
        let text_prefix = prefix
            .map(|prefix| format!("{prefix}/"))
            .unwrap_or_default();
        let paths = self
            .repository
            .paths_with_prefix(&self.settings.mount, &text_prefix)
            .await
            .map_err(storage_error)?;
        if paths.is_empty() {
            return Err(BackendError::NotFound);
        }

        let entries: BTreeSet<ListEntry> = paths
            .iter()
            .filter_map(|path| path.strip_prefix(&text_prefix))
            .map(|rest| match rest.split_once('/') {
                Some((folder, _)) => ListEntry::Folder(folder.to_owned()),
                None => ListEntry::Secret(rest.to_owned()),
            })
            .collect();
        Ok(entries.into_iter().collect())
    }

    async fn write(
        &self,
        path: &SecretPath,
        data: SecretData,
        options: WriteOptions,
    ) -> Result<VersionMetadata, BackendError> {
        let request = NewVersion {
            mount: &self.settings.mount,
            path: path.as_str(),
            check_and_set: options.check_and_set,
            max_versions: self.settings.max_versions,
        };

        let outcome = self
            .repository
            .write_version(request, |plan| {
                let key = self.keyring.key(&plan.active_key_id).ok_or_else(|| {
                    SealFailure::Backend(BackendError::KeyUnavailable {
                        key_id: plan.active_key_id.clone(),
                    })
                })?;
                let sealed = envelope::seal(&data, self.binding(path, plan.version), &key)
                    .map_err(|error| SealFailure::Backend(envelope_error(error)))?;
                Ok(SealedVersion {
                    key_id: key.id().to_owned(),
                    wrapped_key: sealed.wrapped_key,
                    ciphertext: sealed.ciphertext,
                })
            })
            .await;

        match outcome {
            Ok(Ok(written)) => Ok(VersionMetadata {
                version: written.version,
                created_at: from_micros(written.created_at),
                deleted_at: None,
                destroyed: false,
            }),
            Ok(Err(WriteRefusal::CheckAndSet { expected, current })) => {
                Err(BackendError::CheckAndSetMismatch { expected, current })
            }
            Err(SealFailure::Storage(error)) => Err(storage_error(error)),
            Err(SealFailure::Backend(error)) => Err(error),
        }
    }

    async fn delete(&self, path: &SecretPath, request: DeleteRequest) -> Result<(), BackendError> {
        let mount = &self.settings.mount;
        let outcome = match request {
            DeleteRequest::SoftDelete { versions } => {
                self.repository
                    .soft_delete(mount, path.as_str(), &versions)
                    .await
            }
            DeleteRequest::Destroy { versions } if versions.is_empty() => {
                self.repository.destroy_secret(mount, path.as_str()).await
            }
            DeleteRequest::Destroy { versions } => {
                self.repository
                    .destroy_versions(mount, path.as_str(), &versions)
                    .await
            }
        }
        .map_err(storage_error)?;

        match outcome {
            DeleteOutcome::Done => Ok(()),
            DeleteOutcome::SecretMissing => Err(BackendError::NotFound),
            DeleteOutcome::VersionMissing(version) => {
                Err(BackendError::VersionNotFound { version })
            }
        }
    }
}

fn metadata_of(stored: &StoredVersion) -> VersionMetadata {
    VersionMetadata {
        version: stored.version,
        created_at: from_micros(stored.created_at),
        deleted_at: stored.deleted_at.map(from_micros),
        destroyed: stored.destroyed_at.is_some(),
    }
}

fn from_micros(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn storage_error(error: StorageError) -> BackendError {
    tracing::error!(%error, "local store query failed");
    BackendError::StoreUnavailable
}

fn envelope_error(error: EnvelopeError) -> BackendError {
    BackendError::Internal(error.to_string())
}
