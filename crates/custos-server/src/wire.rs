//! The JSON shapes of the secrets API, shared by every backend.
//!
//! A field value is a JSON string when its bytes are UTF-8 text, and `{"base64": "..."}`
//! otherwise; clients send either form. Secret bytes are written straight from the
//! zeroizing [`SecretValue`] into the response, without intermediate `String` copies.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custos_core::{SecretData, SecretValue, VersionMetadata};
use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Body of `PUT /v1/secrets/...`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBody {
    pub data: WireFields,
    /// Check-and-set: the version the client expects to replace (0: must not exist).
    #[serde(default)]
    pub cas: Option<u64>,
}

/// Fields as received from a client.
pub struct WireFields(pub BTreeMap<String, SecretValue>);

impl std::fmt::Debug for WireFields {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_tuple("WireFields")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<'de> Deserialize<'de> for WireFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum WireValue {
            Text(String),
            Binary { base64: String },
        }

        let raw = BTreeMap::<String, WireValue>::deserialize(deserializer)?;
        let mut fields = BTreeMap::new();
        for (name, value) in raw {
            let bytes = match value {
                WireValue::Text(text) => text.into_bytes(),
                WireValue::Binary { base64 } => STANDARD
                    .decode(base64.as_bytes())
                    .map_err(|_| de::Error::custom(format!("field `{name}` has invalid base64")))?,
            };
            fields.insert(name, SecretValue::new(bytes));
        }
        Ok(Self(fields))
    }
}

/// Serialises secret fields in the wire form.
#[derive(Debug)]
pub struct FieldsView<'a>(pub &'a SecretData);

impl Serialize for FieldsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.fields().len()))?;
        for (name, value) in self.0.fields() {
            match value.as_text() {
                Some(text) => map.serialize_entry(name, text)?,
                None => map.serialize_entry(name, &Base64View(value))?,
            }
        }
        map.end()
    }
}

struct Base64View<'a>(&'a SecretValue);

impl Serialize for Base64View<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let encoded = zeroize::Zeroizing::new(STANDARD.encode(self.0.expose()));
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("base64", encoded.as_str())?;
        map.end()
    }
}

/// Metadata of a version as the API shows it.
#[derive(Debug, Serialize)]
pub struct MetadataView {
    pub path: String,
    pub mount: String,
    pub backend: &'static str,
    pub version: u64,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
}

impl MetadataView {
    pub fn new(
        path: String,
        mount: String,
        backend: &'static str,
        metadata: &VersionMetadata,
    ) -> Self {
        Self {
            path,
            mount,
            backend,
            version: metadata.version,
            created_at: rfc3339(metadata.created_at),
            deleted_at: metadata.deleted_at.map(rfc3339),
        }
    }
}

/// Body of a successful read.
#[derive(Debug, Serialize)]
pub struct ReadResponse<'a> {
    pub data: FieldsView<'a>,
    pub metadata: MetadataView,
    pub lease: crate::leases::LeaseView,
}

/// Body of a successful write.
#[derive(Debug, Serialize)]
pub struct WriteResponse {
    pub metadata: MetadataView,
}

/// Body of a listing.
#[derive(Debug, Serialize)]
pub struct ListResponse {
    pub path: String,
    pub keys: Vec<String>,
}

pub fn rfc3339(moment: OffsetDateTime) -> String {
    moment
        .format(&Rfc3339)
        .unwrap_or_else(|_| moment.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_binary_becomes_base64_both_ways() {
        let body: WriteBody = serde_json::from_str(
            r#"{"data": {"user": "app", "blob": {"base64": "AJ+Slg=="}}, "cas": 2}"#,
        )
        .unwrap();
        assert_eq!(body.cas, Some(2));
        assert_eq!(body.data.0["user"].expose(), b"app");
        assert_eq!(body.data.0["blob"].expose(), &[0, 159, 146, 150]);

        let data = SecretData::new(body.data.0).unwrap();
        let shown = serde_json::to_value(FieldsView(&data)).unwrap();
        assert_eq!(
            shown,
            serde_json::json!({"user": "app", "blob": {"base64": "AJ+Slg=="}})
        );
    }

    #[test]
    fn unknown_keys_and_bad_base64_are_refused_without_echoing_values() {
        let error = serde_json::from_str::<WriteBody>(r#"{"data": {}, "extra": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("extra"), "{error}");

        let error = serde_json::from_str::<WriteBody>(
            r#"{"data": {"k": {"base64": "not base64 secret!"}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("secret!"), "{error}");
    }
}
