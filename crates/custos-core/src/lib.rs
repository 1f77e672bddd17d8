//! Custos's domain: secret paths, the secret model, mounts and the backend contract.
//!
//! This crate knows nothing of HTTP, SQL or any backend SDK; every other crate depends on
//! it and it depends on none of them. See `docs/ARCHITECTURE.md` for the whole map.

#![forbid(unsafe_code)]

pub mod backend;
pub mod mount;
pub mod path;
pub mod policy;
pub mod secret;

pub use backend::{BackendError, DeleteRequest, Operation, SecretBackend, WriteOptions};
pub use mount::{LeaseLimits, Mount, MountError, MountTable};
pub use path::{PathError, SecretPath};
pub use secret::{
    FieldError, ListEntry, NativeLease, SecretData, SecretValue, SecretVersion, VersionMetadata,
};
