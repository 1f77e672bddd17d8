//! The Vault / OpenBao backend: secrets served from a Vault KV engine (version 1 or 2) or
//! minted by a dynamic-secrets engine, through the vaultrs crate, with the same API,
//! policies, leases and audit as any other backend.
//!
//! - [`session`]: how the broker authenticates to Vault (a token file, AppRole or
//!   Kubernetes), renews its token before it expires, and logs in again when renewal is
//!   refused, with one refresh at a time however many requests are waiting.
//! - [`backend`]: the KV and dynamic-secret operations, and the native-lease hooks that
//!   let a Custos lease renew and revoke the Vault lease it wraps.
//! - [`error`]: Vault's failures mapped onto the core backend errors.
//! - [`lease`]: Vault's lease endpoints, which vaultrs does not wrap.

#![forbid(unsafe_code)]

pub mod backend;
pub mod error;
pub mod lease;
pub mod session;

pub use backend::{VaultBackend, VaultBackendSettings, VaultEngine};
pub use session::{VaultAuth, VaultConnection, VaultSessions};
