//! The one secret model every backend maps onto.
//!
//! A secret version holds named fields, each a byte string, plus [`VersionMetadata`].
//! Vault KV and Kubernetes secrets are maps already; a backend whose native secret is one
//! string or blob exposes it as a single field. Values live in [`SecretValue`], which wipes
//! its bytes on drop and never prints them.

use std::collections::BTreeMap;
use std::fmt;

use time::OffsetDateTime;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Longest accepted field name.
pub const MAX_FIELD_NAME_BYTES: usize = 256;

/// Most fields in one secret version.
pub const MAX_FIELDS: usize = 256;

/// The bytes of one secret field. Zeroized on drop; `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The raw bytes. Callers must not log or copy them into long-lived buffers.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as text when it is valid UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for SecretValue {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().to_vec())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SecretValue([REDACTED; {} bytes])", self.0.len())
    }
}

/// Why a set of fields was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("a secret needs at least one field")]
    NoFields,

    #[error("a secret may have at most {MAX_FIELDS} fields; this one has {count}")]
    TooManyFields { count: usize },

    #[error("a field name is empty; name every field")]
    EmptyName,

    #[error("field name {name:?} is longer than {MAX_FIELD_NAME_BYTES} bytes")]
    NameTooLong { name: String },

    #[error("field name {name:?} contains a control character or `/`; use printable names")]
    BadName { name: String },
}

/// The named fields of one secret version, ordered by name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    fields: BTreeMap<String, SecretValue>,
}

impl SecretData {
    /// Builds validated secret data from named values.
    pub fn new(fields: BTreeMap<String, SecretValue>) -> Result<Self, FieldError> {
        if fields.is_empty() {
            return Err(FieldError::NoFields);
        }
        if fields.len() > MAX_FIELDS {
            return Err(FieldError::TooManyFields {
                count: fields.len(),
            });
        }
        for name in fields.keys() {
            validate_field_name(name)?;
        }
        Ok(Self { fields })
    }

    pub fn fields(&self) -> &BTreeMap<String, SecretValue> {
        &self.fields
    }

    pub fn get(&self, name: &str) -> Option<&SecretValue> {
        self.fields.get(name)
    }

    pub fn into_fields(self) -> BTreeMap<String, SecretValue> {
        self.fields
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Field names are not secret and help debugging; the values stay hidden.
        formatter
            .debug_struct("SecretData")
            .field("field_names", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn validate_field_name(name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::EmptyName);
    }
    if name.len() > MAX_FIELD_NAME_BYTES {
        return Err(FieldError::NameTooLong {
            name: name.chars().take(32).collect(),
        });
    }
    if name
        .chars()
        .any(|character| character.is_control() || character == '/')
    {
        return Err(FieldError::BadName {
            name: name.escape_debug().to_string(),
        });
    }
    Ok(())
}

/// Facts about one version of a secret, never its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionMetadata {
    /// Version number as the backend counts it (1, 2, ...).
    pub version: u64,
    pub created_at: OffsetDateTime,
    /// Set when the version was soft-deleted; its content may still be restored.
    pub deleted_at: Option<OffsetDateTime>,
    /// True when the content is gone for good.
    pub destroyed: bool,
}

/// One readable version of a secret: its fields and its metadata.
#[derive(Debug, Clone)]
pub struct SecretVersion {
    pub data: SecretData,
    pub metadata: VersionMetadata,
    /// The backend's own lease on this value (Vault dynamic credentials), which the
    /// broker's lease wraps: renewed and revoked with it, and never outlived by it.
    pub native_lease: Option<NativeLease>,
}

/// A lease the backend itself issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeLease {
    pub id: String,
    pub ttl: std::time::Duration,
    pub renewable: bool,
}

/// One entry of a listing: a secret, or a folder holding more entries (`name/`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListEntry {
    Secret(String),
    Folder(String),
}

impl ListEntry {
    /// The display form used by the API: folders end in `/`.
    pub fn display_name(&self) -> String {
        match self {
            ListEntry::Secret(name) => name.clone(),
            ListEntry::Folder(name) => format!("{name}/"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let mut fields = BTreeMap::new();
        fields.insert(
            "password".to_owned(),
            SecretValue::from("hunter2-very-secret"),
        );
        let data = SecretData::new(fields).unwrap();

        let shown = format!("{data:?} {:?}", data.get("password").unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password"));
        assert!(shown.contains("19 bytes"));
    }

    #[test]
    fn refuses_bad_field_sets() {
        assert_eq!(SecretData::new(BTreeMap::new()), Err(FieldError::NoFields));

        let mut fields = BTreeMap::new();
        fields.insert(String::new(), SecretValue::from("x"));
        assert_eq!(SecretData::new(fields), Err(FieldError::EmptyName));

        let mut fields = BTreeMap::new();
        fields.insert("a\u{7}".to_owned(), SecretValue::from("x"));
        assert!(matches!(
            SecretData::new(fields),
            Err(FieldError::BadName { .. })
        ));
    }
}
