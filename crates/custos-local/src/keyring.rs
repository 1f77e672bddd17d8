//! Key-encryption keys: where they come from, how they are named, how the broker finds one.
//!
//! A keyring is text: one base64-encoded 256-bit key per line, newest first, `#` comments
//! allowed. The first key is the one `custos init` and `custos key rotate` make active; the
//! database records which key is active for writes (see `custos_storage::local_secrets`).
//! A key's id is derived from its material, so a wrong key can never pose under a right
//! id: an unknown id means "this keyring does not hold that key", said with the id.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of a key-encryption key in bytes (AES-256).
pub const KEY_BYTES: usize = 32;

/// Where the keyring comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file, normally created by `custos init` with mode 0600.
    File(PathBuf),
    /// An environment variable holding the same text as a key file.
    Environment(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => write!(formatter, "key file {}", path.display()),
            KeySource::Environment(name) => write!(formatter, "environment variable {name}"),
        }
    }
}

/// Why a keyring could not be loaded or saved. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the {source_name}: {reason}")]
    Unreadable { source_name: String, reason: String },

    #[error(
        "the {source_name} holds no key; create one with `custos init` or put a base64 \
         256-bit key on a line of its own"
    )]
    Empty { source_name: String },

    #[error(
        "line {line} of the {source_name} is not a base64-encoded 32-byte key; each line \
         must be one key (generate one with `custos init`)"
    )]
    Malformed { source_name: String, line: usize },

    #[error("cannot write the key file {path}: {reason}")]
    Unwritable { path: String, reason: String },

    #[error("the system random number generator failed")]
    Random,

    #[error(
        "the store's active key {key_id} is not in the {source_name}; configure the keyring \
         that holds it (a wrong key file, or a database from another installation?)"
    )]
    ActiveKeyMissing { key_id: String, source_name: String },
}

/// One key-encryption key and its derived id.
pub struct KeyEncryptionKey {
    id: String,
    material: Zeroizing<[u8; KEY_BYTES]>,
    cipher: LessSafeKey,
}

impl KeyEncryptionKey {
    pub fn from_material(material: &[u8; KEY_BYTES]) -> Self {
        let material = Zeroizing::new(*material);
        let id = key_id_of(&material);
        let unbound = UnboundKey::new(&AES_256_GCM, material.as_ref())
            .expect("AES-256-GCM accepts every 32-byte key");
        Self {
            id,
            material,
            cipher: LessSafeKey::new(unbound),
        }
    }

    pub fn generate() -> Result<Self, KeyError> {
        let mut material = Zeroizing::new([0_u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(material.as_mut())
            .map_err(|_| KeyError::Random)?;
        Ok(Self::from_material(&material))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn cipher(&self) -> &LessSafeKey {
        &self.cipher
    }

    fn encoded(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.material.as_ref()))
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "KeyEncryptionKey({})", self.id)
    }
}

/// The ordered keys of one keyring, newest first.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<Arc<KeyEncryptionKey>>,
}

impl Keyring {
    pub fn new(keys: Vec<KeyEncryptionKey>) -> Self {
        Self {
            keys: keys.into_iter().map(Arc::new).collect(),
        }
    }

    /// A keyring with one freshly generated key.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self::new(vec![KeyEncryptionKey::generate()?]))
    }

    /// Loads and parses the keyring from `source`.
    pub fn load(source: &KeySource) -> Result<Self, KeyError> {
        let source_name = source.to_string();
        let text = match source {
            KeySource::File(path) => {
                warn_if_readable_by_others(path);
                Zeroizing::new(
                    fs::read_to_string(path).map_err(|error| KeyError::Unreadable {
                        source_name: source_name.clone(),
                        reason: error.to_string(),
                    })?,
                )
            }
            KeySource::Environment(name) => {
                Zeroizing::new(std::env::var(name).map_err(|_| KeyError::Unreadable {
                    source_name: source_name.clone(),
                    reason: "it is not set".to_owned(),
                })?)
            }
        };
        Self::parse(&text, &source_name)
    }

    fn parse(text: &str, source_name: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || KeyError::Malformed {
                source_name: source_name.to_owned(),
                line: index + 1,
            };
            let decoded = Zeroizing::new(STANDARD.decode(line).map_err(|_| malformed())?);
            let material: Zeroizing<[u8; KEY_BYTES]> =
                Zeroizing::new(decoded.as_slice().try_into().map_err(|_| malformed())?);
            keys.push(KeyEncryptionKey::from_material(&material));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        Ok(Self::new(keys))
    }

    /// The newest key: the one a fresh store or a rotation makes active.
    pub fn newest(&self) -> &Arc<KeyEncryptionKey> {
        &self.keys[0]
    }

    pub fn get(&self, key_id: &str) -> Option<&Arc<KeyEncryptionKey>> {
        self.keys.iter().find(|key| key.id() == key_id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|key| key.id().to_owned()).collect()
    }

    /// This keyring with `key` in front.
    pub fn with_newest(&self, key: KeyEncryptionKey) -> Self {
        let mut keys = vec![Arc::new(key)];
        keys.extend(self.keys.iter().cloned());
        Self { keys }
    }

    /// This keyring with only its newest key.
    pub fn only_newest(&self) -> Self {
        Self {
            keys: vec![self.keys[0].clone()],
        }
    }

    /// Writes the keyring to `path` with mode 0600, atomically: a reader sees the old file
    /// or the new one, never half of either.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let unwritable = |error: std::io::Error| KeyError::Unwritable {
            path: path.display().to_string(),
            reason: error.to_string(),
        };

        let mut text = Zeroizing::new(String::from(
            "# Custos key-encryption keys, newest first. Keep this file secret (mode 0600)\n\
             # and back it up: without it the local store cannot be decrypted.\n",
        ));
        for key in &self.keys {
            text.push_str(&key.encoded());
            text.push('\n');
        }

        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            fs::create_dir_all(parent).map_err(unwritable)?;
        }
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = private_file(&temporary).map_err(unwritable)?;
        file.write_all(text.as_bytes()).map_err(unwritable)?;
        file.sync_all().map_err(unwritable)?;
        fs::rename(&temporary, path).map_err(unwritable)?;

        // The rename is durable only once the directory is synced; rotation updates the
        // database right after, and must never get ahead of the key file.
        sync_directory(path).map_err(unwritable)?;
        Ok(())
    }
}

/// A keyring shared by the broker, reloaded from its source when asked for a key it does
/// not hold (a rotation by `custos key rotate` adds keys while the broker runs).
#[derive(Debug)]
pub struct KeyringHandle {
    source: KeySource,
    current: RwLock<Arc<Keyring>>,
}

impl KeyringHandle {
    pub fn load(source: KeySource) -> Result<Self, KeyError> {
        let keyring = Keyring::load(&source)?;
        Ok(Self {
            source,
            current: RwLock::new(Arc::new(keyring)),
        })
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    pub fn snapshot(&self) -> Arc<Keyring> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The key with `key_id`, re-reading the source once if it is not held yet.
    pub fn key(&self, key_id: &str) -> Option<Arc<KeyEncryptionKey>> {
        if let Some(key) = self.snapshot().get(key_id) {
            return Some(key.clone());
        }

        match Keyring::load(&self.source) {
            Ok(reloaded) => {
                let found = reloaded.get(key_id).cloned();
                tracing::info!(
                    source = %self.source,
                    key_ids = ?reloaded.ids(),
                    "keyring reloaded"
                );
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(reloaded);
                found
            }
            Err(error) => {
                tracing::error!(source = %self.source, %error, "keyring reload failed");
                None
            }
        }
    }
}

fn key_id_of(material: &[u8; KEY_BYTES]) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(b"custos key-encryption key id v1\0");
    context.update(material);
    let fingerprint = context.finish();
    let hex: String = fingerprint.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("kek-{hex}")
}

#[cfg(unix)]
fn sync_directory(path: &Path) -> std::io::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::File::open(directory)?.sync_all()
}

#[cfg(not(unix))]
fn sync_directory(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::File::create(path)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = fs::metadata(path) {
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the key file is readable by group or others; restrict it with chmod 600"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_keyrings_load_back_with_the_same_ids_and_private_mode() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("keys/keyring");
        let keyring = Keyring::generate().unwrap();
        let rotated = keyring.with_newest(KeyEncryptionKey::generate().unwrap());
        rotated.save(&path).unwrap();

        let loaded = Keyring::load(&KeySource::File(path.clone())).unwrap();
        assert_eq!(loaded.ids(), rotated.ids());
        assert_eq!(loaded.ids()[1], keyring.newest().id());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn malformed_and_empty_keyrings_name_the_problem_without_the_material() {
        let error = Keyring::parse("# nothing\n\n", "key file k").unwrap_err();
        assert!(matches!(error, KeyError::Empty { .. }));

        let error = Keyring::parse("c2hvcnQ=\n", "key file k").unwrap_err();
        assert!(matches!(error, KeyError::Malformed { line: 1, .. }));
        assert!(!error.to_string().contains("c2hvcnQ"));
    }

    #[test]
    fn ids_depend_on_the_material() {
        let first = KeyEncryptionKey::from_material(&[1; KEY_BYTES]);
        let again = KeyEncryptionKey::from_material(&[1; KEY_BYTES]);
        let other = KeyEncryptionKey::from_material(&[2; KEY_BYTES]);
        assert_eq!(first.id(), again.id());
        assert_ne!(first.id(), other.id());
        assert!(first.id().starts_with("kek-") && first.id().len() == 20);
        assert!(!format!("{first:?}").contains("AQEB"));
    }
}
