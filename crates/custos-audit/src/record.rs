//! The audit record: who did what to which secret, from where, and how it ended.
//!
//! A record is serialised once, to canonical JSON (fields in declaration order, absent
//! options left out), and that exact text is what the chain MAC covers and what the
//! database and the JSON-lines sink store. Adding a field is one change here: give it
//! `#[serde(default, skip_serializing_if = "Option::is_none")]` and old records still
//! parse and verify.

use serde::{Deserialize, Serialize};

/// How a request ended, from the security team's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
    NotFound,
    BadRequest,
    Error,
}

impl Outcome {
    /// The outcome an HTTP status stands for.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=399 => Outcome::Ok,
            401 | 403 | 429 => Outcome::Denied,
            404 => Outcome::NotFound,
            400..=499 => Outcome::BadRequest,
            _ => Outcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::Error => "error",
        }
    }
}

/// One audited request. Never holds a secret value or a raw credential: credentials appear
/// only as keyed hashes (see [`crate::key::AuditKey::hash`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// UTC, RFC 3339 with microseconds.
    pub time: String,
    /// Also returned to the client in `X-Request-Id`.
    pub request_id: String,
    /// Who acted, when known: `root`, `token:NAME`, `kubernetes:NAMESPACE/SERVICE_ACCOUNT`
    /// or `approle:ROLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// How the principal authenticated: `root`, `token`, `kubernetes` or `approle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
    /// Keyed hash of the token's accessor, to follow one token across records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_accessor_hash: Option<String>,
    /// The login role asked for, on logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Keyed hash of the presented token, valid or not: `hmac-sha256:HEX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    /// HTTP method.
    pub method: String,
    /// What was asked: `read`, `list`, `write`, `delete`, `audit.search`, ...
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// The normalised secret path, when the request named a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path as sent (still percent-encoded, at most 512 characters), when it was
    /// refused as invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_path: Option<String>,
    /// The secret version served or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Backend type of the mount, such as `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The lease created by a read, or the lease a lease operation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub status: u16,
    pub latency_ms: f64,
}

impl AuditRecord {
    /// The canonical JSON text of the record.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("an audit record always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        let cases = [
            (200, Outcome::Ok),
            (204, Outcome::Ok),
            (400, Outcome::BadRequest),
            (401, Outcome::Denied),
            (403, Outcome::Denied),
            (404, Outcome::NotFound),
            (405, Outcome::BadRequest),
            (413, Outcome::BadRequest),
            (500, Outcome::Error),
            (502, Outcome::Error),
        ];
        for (status, outcome) in cases {
            assert_eq!(Outcome::from_status(status), outcome, "{status}");
        }
    }

    #[test]
    fn canonical_json_leaves_out_absent_fields_and_parses_back() {
        let record = AuditRecord {
            time: "2026-12-03T19:00:00.000001Z".to_owned(),
            request_id: "r1".to_owned(),
            principal: None,
            auth_method: None,
            token_accessor_hash: None,
            role: None,
            token_hash: None,
            client_address: Some("127.0.0.1:5000".to_owned()),
            method: "GET".to_owned(),
            operation: "read".to_owned(),
            mount: Some("secret".to_owned()),
            path: Some("secret/a".to_owned()),
            requested_path: None,
            version: Some(2),
            backend: Some("local".to_owned()),
            lease_id: None,
            outcome: Outcome::NotFound,
            error_code: Some("secret_not_found".to_owned()),
            status: 404,
            latency_ms: 1.5,
        };
        let text = record.canonical_json();
        assert!(text.starts_with(r#"{"time":"2026-12-03T19:00:00.000001Z","request_id":"r1","#));
        assert!(!text.contains("principal"));
        assert!(text.contains(r#""outcome":"not_found""#));
        assert_eq!(serde_json::from_str::<AuditRecord>(&text).unwrap(), record);
    }
}
