//! The chain head kept outside the database.
//!
//! The writer records the newest sequence and MAC in a small file on the broker's own
//! filesystem, authenticated with the audit key: whenever it falls idle, at least every
//! 100 ms under load, and when it stops. Someone who can
//! edit the audit table but not this file cannot remove the newest records unnoticed:
//! verification finds the database's chain ending before the head. The file is replaced
//! atomically (write, then rename) but not synced: after a crash it may lag behind the
//! database, which verification accepts, since records past the head are still chained.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::key::AuditKey;

/// The newest record the writer committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub sequence: u64,
    pub mac: String,
    /// Authenticates `sequence` and `mac`.
    pub head_mac: String,
}

impl Head {
    pub fn new(key: &AuditKey, sequence: u64, mac: String) -> Self {
        let head_mac = key.head_mac(sequence, &mac);
        Self {
            sequence,
            mac,
            head_mac,
        }
    }
}

/// Why the head file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot read the audit head file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the audit head file {path} is not authentic (edited, or from another key)")]
    Forged { path: String },
    #[error("cannot write the audit head file {path}: {reason}")]
    Unwritable { path: String, reason: String },
}

/// Reads and authenticates the head file; `Ok(None)` when it does not exist yet.
pub fn read(path: &Path, key: &AuditKey) -> Result<Option<Head>, HeadError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(HeadError::Unreadable {
                path: path.display().to_string(),
                reason: error.to_string(),
            })
        }
    };
    let forged = || HeadError::Forged {
        path: path.display().to_string(),
    };
    let head: Head = serde_json::from_str(&text).map_err(|_| forged())?;
    if !AuditKey::macs_equal(&key.head_mac(head.sequence, &head.mac), &head.head_mac) {
        return Err(forged());
    }
    Ok(Some(head))
}

/// Replaces the head file atomically.
pub fn write(path: &Path, head: &Head) -> Result<(), HeadError> {
    let unwritable = |error: std::io::Error| HeadError::Unwritable {
        path: path.display().to_string(),
        reason: error.to_string(),
    };
    let temporary = path.with_extension("tmp");
    let mut file = fs::File::create(&temporary).map_err(unwritable)?;
    let text = serde_json::to_string(head).expect("a head always serialises");
    file.write_all(text.as_bytes()).map_err(unwritable)?;
    drop(file);
    fs::rename(&temporary, path).map_err(unwritable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_edits_are_caught() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.head");
        let key = AuditKey::from_bytes(&[1; 32]);
        assert_eq!(read(&path, &key).unwrap(), None);

        let head = Head::new(&key, 12, "abc".to_owned());
        write(&path, &head).unwrap();
        assert_eq!(read(&path, &key).unwrap(), Some(head));

        let rewound = fs::read_to_string(&path)
            .unwrap()
            .replace("\"sequence\":12", "\"sequence\":9");
        fs::write(&path, rewound).unwrap();
        assert!(matches!(read(&path, &key), Err(HeadError::Forged { .. })));
    }
}
