//! The audit key: a per-installation 256-bit HMAC-SHA256 key.
//!
//! It keys the record chain, the checkpoints, the head file, and the hashes that stand in
//! for credentials in records (like Vault's salted HMAC), so a security team can match
//! "the same token" across records, or a token they hold (`custos audit hash`), without
//! the log ever holding the token. It is separate from the key-encryption keys: whoever
//! verifies the log needs this key, and it reveals no secret.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

const KEY_BYTES: usize = 32;

/// Why the audit key could not be loaded or created. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot read the audit key file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the audit key file {path} does not hold a base64-encoded 32-byte key")]
    Malformed { path: String },
    #[error("cannot write the audit key file {path}: {reason}")]
    Unwritable { path: String, reason: String },
    #[error("the system random number generator failed")]
    Random,
}

/// The audit HMAC key.
pub struct AuditKey {
    key: hmac::Key,
}

impl AuditKey {
    pub fn from_bytes(material: &[u8; KEY_BYTES]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, material),
        }
    }

    /// Loads the key from `path`.
    pub fn load(path: &Path) -> Result<Self, AuditKeyError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|error| {
            AuditKeyError::Unreadable {
                path: path.display().to_string(),
                reason: error.to_string(),
            }
        })?);
        let malformed = || AuditKeyError::Malformed {
            path: path.display().to_string(),
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with('#'))
            .ok_or_else(malformed)?;
        let decoded = Zeroizing::new(STANDARD.decode(line).map_err(|_| malformed())?);
        let material: Zeroizing<[u8; KEY_BYTES]> =
            Zeroizing::new(decoded.as_slice().try_into().map_err(|_| malformed())?);
        Ok(Self::from_bytes(&material))
    }

    /// Creates a new random key at `path` with mode 0600, unless the file exists.
    /// Returns whether a key was created.
    pub fn create_if_missing(path: &Path) -> Result<bool, AuditKeyError> {
        if path.exists() {
            return Ok(false);
        }
        let unwritable = |error: std::io::Error| AuditKeyError::Unwritable {
            path: path.display().to_string(),
            reason: error.to_string(),
        };

        let mut material = Zeroizing::new([0_u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(material.as_mut())
            .map_err(|_| AuditKeyError::Random)?;
        let text = Zeroizing::new(format!(
            "# Custos audit key: verifies the audit log. Keep it secret (mode 0600).\n{}\n",
            STANDARD.encode(material.as_ref())
        ));

        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            fs::create_dir_all(parent).map_err(unwritable)?;
        }
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(unwritable)?;
        file.write_all(text.as_bytes()).map_err(unwritable)?;
        file.sync_all().map_err(unwritable)?;
        Ok(true)
    }

    /// Keyed hash of a credential or other value, as it appears in records.
    pub fn hash(&self, value: &str) -> String {
        format!(
            "hmac-sha256:{}",
            self.hex_mac(&[b"custos.audit.hash.v1\0", value.as_bytes()])
        )
    }

    /// MAC of record `sequence`, chaining it to the previous record's MAC.
    pub fn chain_mac(&self, previous_mac: &str, sequence: u64, record: &str) -> String {
        self.hex_mac(&[
            b"custos.audit.chain.v1\0",
            &sequence.to_be_bytes(),
            previous_mac.as_bytes(),
            b"\0",
            record.as_bytes(),
        ])
    }

    /// MAC of a pruning checkpoint.
    pub fn checkpoint_mac(&self, sequence: u64, mac: &str, pruned_before: i64) -> String {
        self.hex_mac(&[
            b"custos.audit.checkpoint.v1\0",
            &sequence.to_be_bytes(),
            mac.as_bytes(),
            b"\0",
            &pruned_before.to_be_bytes(),
        ])
    }

    /// MAC of the chain head kept in the head file.
    pub fn head_mac(&self, sequence: u64, mac: &str) -> String {
        self.hex_mac(&[
            b"custos.audit.head.v1\0",
            &sequence.to_be_bytes(),
            mac.as_bytes(),
        ])
    }

    /// Constant-time comparison of two hex MACs made by this key.
    pub fn macs_equal(expected: &str, actual: &str) -> bool {
        use subtle::ConstantTimeEq;
        expected.as_bytes().ct_eq(actual.as_bytes()).into()
    }

    fn hex_mac(&self, parts: &[&[u8]]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        for part in parts {
            context.update(part);
        }
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let tag = context.sign();
        let mut hex = String::with_capacity(tag.as_ref().len() * 2);
        for byte in tag.as_ref() {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        hex
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("AuditKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_load_back_and_hash_stably() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.key");
        assert!(AuditKey::create_if_missing(&path).unwrap());
        assert!(!AuditKey::create_if_missing(&path).unwrap());

        let first = AuditKey::load(&path).unwrap();
        let again = AuditKey::load(&path).unwrap();
        assert_eq!(first.hash("cst_token"), again.hash("cst_token"));
        assert_ne!(first.hash("cst_token"), first.hash("cst_other"));
        assert!(first.hash("cst_token").starts_with("hmac-sha256:"));
        assert!(!first.hash("cst_token").contains("cst_token"));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn chain_macs_depend_on_every_input() {
        let key = AuditKey::from_bytes(&[7; KEY_BYTES]);
        let base = key.chain_mac("previous", 3, "{}");
        assert_ne!(base, key.chain_mac("previous", 4, "{}"));
        assert_ne!(base, key.chain_mac("other", 3, "{}"));
        assert_ne!(base, key.chain_mac("previous", 3, "{ }"));
        assert_ne!(
            base,
            AuditKey::from_bytes(&[8; KEY_BYTES]).chain_mac("previous", 3, "{}")
        );
        assert!(AuditKey::macs_equal(
            &base,
            &key.chain_mac("previous", 3, "{}")
        ));
    }
}
