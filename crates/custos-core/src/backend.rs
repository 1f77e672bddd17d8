//! The contract every secret backend fulfils, and the errors it may report.
//!
//! Backends receive paths relative to their mount, already validated by [`crate::path`].
//! Errors are typed so that the HTTP layer maps each one to a status on purpose; their
//! messages are shown to clients and therefore never include a secret value.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::path::SecretPath;
use crate::secret::{ListEntry, SecretData, SecretVersion, VersionMetadata};

/// What a client may ask a backend to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    List,
    Write,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::List => "list",
            Operation::Write => "write",
            Operation::Delete => "delete",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Options of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Check-and-set: write only when the current version is this one (0: the secret must
    /// not exist yet).
    pub check_and_set: Option<u64>,
}

/// What a delete removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteRequest {
    /// Hides versions but keeps their content; an empty list means the latest version.
    SoftDelete { versions: Vec<u64> },
    /// Removes the content of versions for good; an empty list means every version and the
    /// secret's metadata.
    Destroy { versions: Vec<u64> },
}

/// Everything that can go wrong in a backend, by cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("no secret exists at this path")]
    NotFound,

    #[error("version {version} of this secret is deleted; read another version")]
    VersionDeleted { version: u64 },

    #[error("version {version} of this secret is destroyed and cannot be read")]
    VersionDestroyed { version: u64 },

    #[error("version {version} of this secret does not exist")]
    VersionNotFound { version: u64 },

    #[error("the {backend} backend does not support {operation}")]
    Unsupported {
        backend: String,
        operation: Operation,
    },

    #[error("{0}")]
    InvalidInput(String),

    #[error(
        "check-and-set failed: the request expected version {expected} but the current \
         version is {current}"
    )]
    CheckAndSetMismatch { expected: u64, current: u64 },

    #[error(
        "the data is encrypted under key {key_id}, which is not in the configured keyring; \
         configure the keyring that holds it"
    )]
    KeyUnavailable { key_id: String },

    #[error(
        "decryption failed under key {key_id}: the keyring's key material or the stored \
         record does not match"
    )]
    DecryptionFailed { key_id: String },

    #[error("the backend is unavailable: {0}")]
    Unavailable(String),

    #[error("the broker's own database did not answer; retry shortly")]
    StoreUnavailable,

    #[error("the backend did not answer in time: {0}")]
    Timeout(String),

    #[error("the broker's own identity is not allowed by the backend: {0}")]
    PermissionDenied(String),

    #[error("internal backend error: {0}")]
    Internal(String),
}

/// A place secrets live. Paths are relative to the mount the backend serves.
#[async_trait]
pub trait SecretBackend: Send + Sync + fmt::Debug {
    /// Short name of the backend type, such as `local` or `vault`.
    fn kind(&self) -> &'static str;

    /// Whether the backend can do `operation` at all (a read-only backend answers false
    /// for writes and deletes).
    fn supports(&self, operation: Operation) -> bool;

    /// Reads the latest version, or the given one.
    async fn read(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<SecretVersion, BackendError>;

    /// Lists the immediate children of `prefix`, or of the mount root when `None`.
    async fn list(&self, prefix: Option<&SecretPath>) -> Result<Vec<ListEntry>, BackendError>;

    /// Stores `data` as a new version and returns its metadata.
    async fn write(
        &self,
        path: &SecretPath,
        data: SecretData,
        options: WriteOptions,
    ) -> Result<VersionMetadata, BackendError>;

    /// Soft-deletes or destroys versions.
    async fn delete(&self, path: &SecretPath, request: DeleteRequest) -> Result<(), BackendError>;

    /// Renews a lease this backend issued (see [`crate::secret::NativeLease`]) by about
    /// `increment`; returns the lifetime the backend granted. Backends without leases keep
    /// this default.
    async fn renew_native_lease(
        &self,
        lease_id: &str,
        increment: Duration,
    ) -> Result<Duration, BackendError> {
        let _ = (lease_id, increment);
        Err(BackendError::Unsupported {
            backend: self.kind().to_owned(),
            operation: Operation::Read,
        })
    }

    /// Revokes a lease this backend issued. Backends without leases keep this default.
    async fn revoke_native_lease(&self, lease_id: &str) -> Result<(), BackendError> {
        let _ = lease_id;
        Ok(())
    }
}
