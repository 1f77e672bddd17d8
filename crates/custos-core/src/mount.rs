//! Mounts: which backend instance serves which path prefix.
//!
//! Routing picks the longest mount whose path is a whole-segment prefix of the requested
//! path, so `secret/team-a` wins over `secret` for `secret/team-a/db`.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Operation, SecretBackend};
use crate::path::SecretPath;

/// A backend instance served under a path prefix.
#[derive(Debug, Clone)]
pub struct Mount {
    pub path: SecretPath,
    pub backend: Arc<dyn SecretBackend>,
    /// Refuse writes and deletes even when the backend could do them.
    pub read_only: bool,
    /// Lifetime of a lease on a secret read from this mount, and how far renewals may
    /// extend it.
    pub lease: LeaseLimits,
}

/// A mount's lease lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLimits {
    pub ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl Mount {
    /// Whether this mount accepts `operation`, counting both the backend's abilities and
    /// the mount's own read-only setting.
    pub fn allows(&self, operation: Operation) -> bool {
        let writes = matches!(operation, Operation::Write | Operation::Delete);
        self.backend.supports(operation) && !(writes && self.read_only)
    }
}

/// Why a mount table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("mount `{0}` is configured twice; give each mount a distinct path")]
    Duplicate(String),
}

/// All mounts, longest first so that the first match is the longest.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    mounts: Vec<Mount>,
}

impl MountTable {
    pub fn new(mut mounts: Vec<Mount>) -> Result<Self, MountError> {
        mounts.sort_by(|left, right| {
            right
                .path
                .depth()
                .cmp(&left.path.depth())
                .then_with(|| left.path.cmp(&right.path))
        });
        for pair in mounts.windows(2) {
            if pair[0].path == pair[1].path {
                return Err(MountError::Duplicate(pair[0].path.to_string()));
            }
        }
        Ok(Self { mounts })
    }

    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }

    /// Finds the mount serving `path` and the remainder below it.
    pub fn route(&self, path: &SecretPath) -> Option<(&Mount, Option<SecretPath>)> {
        self.mounts.iter().find_map(|mount| {
            path.strip_prefix(&mount.path)
                .map(|relative| (mount, relative))
        })
    }
}
