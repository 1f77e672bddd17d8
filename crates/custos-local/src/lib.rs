//! The local backend: secrets sealed with envelope encryption in Custos's own database.
//!
//! - [`keyring`] loads key-encryption keys (KEKs) from a key file or an environment
//!   variable and names each by an id derived from its material.
//! - [`envelope`] seals one version: a fresh AES-256-GCM data key per version, wrapped by
//!   the active KEK, with mount, path and version bound as associated data.
//! - [`backend`] implements the core backend trait over the storage crate's repository.
//! - [`rotation`] re-wraps every data key under a new KEK while the broker keeps serving.

#![forbid(unsafe_code)]

pub mod backend;
pub mod envelope;
pub mod keyring;
pub mod rotation;

pub use backend::{LocalBackend, LocalBackendSettings};
pub use keyring::{KeyError, KeySource, Keyring, KeyringHandle};
pub use rotation::{rotate_key, RotationError, RotationReport};
