//! Vault's failures, mapped on purpose onto the core backend errors.
//!
//! - Vault unreachable: `Unavailable` (502). A Vault that does not answer in time:
//!   `Timeout` (504).
//! - Vault's 403: `PermissionDenied` (502). It means the broker's own Vault identity lacks
//!   access; the client's permission is Custos's policy, checked before Vault is asked.
//! - Vault's 404: `NotFound`, or the deleted or destroyed state of a KV version when
//!   Vault's answer says so.
//!
//! Vault's reason is kept in the message, because it is what an operator needs; vaultrs
//! keeps it only in the error's structure (its `Display` is generic). Bodies of answers
//! that could not be parsed are never copied into a message: a successful answer carries
//! secret values.

use custos_core::BackendError;
use serde_json::Value;
use vaultrs::error::ClientError;

/// What a failed Vault call means for the request.
pub fn map_error(error: ClientError) -> BackendError {
    match error {
        ClientError::APIError { code, errors } => from_status(code, &errors, None),
        ClientError::RestClientError { source } => map_transport(source),
        ClientError::FileNotFoundError { path } | ClientError::FileReadError { path, .. } => {
            BackendError::Unavailable(format!("cannot read the Vault TLS file {path}"))
        }
        ClientError::ParseCertificateError { path, .. } => BackendError::Unavailable(format!(
            "the Vault CA file {path} is not a PEM certificate; fix `vault.ca_file`"
        )),
        ClientError::RestClientBuildError { source } => {
            BackendError::Unavailable(format!("cannot set up the Vault HTTP client: {source}"))
        }
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            BackendError::Internal("Vault answered without data".to_owned())
        }
        other => BackendError::Internal(format!("unexpected Vault client failure: {other}")),
    }
}

/// A failure below the Vault API: the transport, or an answer vaultrs could not read.
fn map_transport(error: rustify::errors::ClientError) -> BackendError {
    use rustify::errors::ClientError as Transport;

    match error {
        Transport::ServerResponseError { code, content } => {
            let body = content
                .as_deref()
                .and_then(|text| serde_json::from_str::<Value>(text).ok());
            from_status(code, &errors_of(body.as_ref()), body.as_ref())
        }
        Transport::RequestError { source, .. } => {
            let reqwest_error = source
                .chain()
                .find_map(|cause| cause.downcast_ref::<reqwest::Error>());
            let timed_out = reqwest_error.is_some_and(reqwest::Error::is_timeout);
            let reason = describe_cause(source.chain().last());
            if timed_out {
                BackendError::Timeout(format!("Vault did not answer in time ({reason})"))
            } else {
                BackendError::Unavailable(format!("cannot reach Vault ({reason})"))
            }
        }
        Transport::ResponseParseError { .. } | Transport::ResponseConversionError { .. } => {
            // The body is deliberately dropped: it may hold secret values.
            BackendError::Internal("Vault's answer could not be parsed".to_owned())
        }
        other => BackendError::Unavailable(format!("the Vault request failed: {other}")),
    }
}

/// The error for an HTTP status Vault answered with, given its `errors` and body.
fn from_status(code: u16, errors: &[String], body: Option<&Value>) -> BackendError {
    let reason = reason_of(errors);
    match code {
        404 => deleted_version(body).unwrap_or(BackendError::NotFound),
        403 => BackendError::PermissionDenied(format!(
            "Vault answered 403 ({reason}); grant the broker's Vault identity access to \
             this path"
        )),
        400 => BackendError::InvalidInput(format!("Vault refused the request: {reason}")),
        429 | 503 => BackendError::Unavailable(format!(
            "Vault is sealed, in standby or rate-limiting ({code}: {reason}); retry shortly"
        )),
        _ => BackendError::Unavailable(format!("Vault answered {code} ({reason})")),
    }
}

/// The `errors` list of a Vault error body.
fn errors_of(body: Option<&Value>) -> Vec<String> {
    body.and_then(|body| body.get("errors"))
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// KV v2 answers 404 for a deleted or destroyed version, with the version's metadata.
fn deleted_version(body: Option<&Value>) -> Option<BackendError> {
    let metadata = body?.get("data")?.get("metadata")?;
    let version = metadata.get("version")?.as_u64()?;
    if metadata.get("destroyed").and_then(Value::as_bool) == Some(true) {
        return Some(BackendError::VersionDestroyed { version });
    }
    let deleted = metadata
        .get("deletion_time")
        .and_then(Value::as_str)
        .is_some_and(|time| !time.is_empty());
    deleted.then_some(BackendError::VersionDeleted { version })
}

/// Vault's error list as one line (Vault nests multi-errors in tabbed text).
fn reason_of(errors: &[String]) -> String {
    let reasons: Vec<String> = errors
        .iter()
        .flat_map(|error| error.lines())
        .map(|line| line.trim().trim_start_matches("* ").trim())
        .filter(|line| !line.is_empty() && !line.ends_with("error occurred:"))
        .map(str::to_owned)
        .collect();
    if reasons.is_empty() {
        "no reason given".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// The innermost cause of a transport failure, such as "Connection refused (os error 111)".
fn describe_cause(cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    cause.map_or_else(|| "no cause given".to_owned(), ToString::to_string)
}

/// Whether Vault refused a request for lack of permission (or for an invalid token, which
/// Vault reports the same way).
pub fn is_permission_denied(error: &ClientError) -> bool {
    status_of(error).is_some_and(|(code, _)| code == 403)
}

/// A login Vault refused: which method, Vault's reason, and what to check. The credential
/// itself never appears.
pub fn refused_login(error: ClientError, method: &str, remedy: &str) -> BackendError {
    match status_of(&error) {
        Some((400 | 403, errors)) => BackendError::PermissionDenied(format!(
            "Vault refused the broker's {method} login ({}); {remedy}",
            reason_of(&errors)
        )),
        _ => map_error(error),
    }
}

/// The HTTP status and `errors` of an answer Vault gave, if it gave one.
fn status_of(error: &ClientError) -> Option<(u16, Vec<String>)> {
    match error {
        ClientError::APIError { code, errors } => Some((*code, errors.clone())),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, content },
        } => {
            let body = content
                .as_deref()
                .and_then(|text| serde_json::from_str::<Value>(text).ok());
            Some((*code, errors_of(body.as_ref())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_vault_errors_read_as_one_line() {
        let errors = vec!["1 error occurred:\n\t* permission denied\n\n".to_owned()];
        assert_eq!(reason_of(&errors), "permission denied");
        assert_eq!(reason_of(&[]), "no reason given");
    }

    #[test]
    fn statuses_map_to_the_documented_errors() {
        let denied = from_status(403, &["permission denied".to_owned()], None);
        assert!(
            matches!(&denied, BackendError::PermissionDenied(message)
                if message.contains("broker's Vault identity")),
            "{denied:?}"
        );
        assert_eq!(from_status(404, &[], None), BackendError::NotFound);
        assert!(matches!(
            from_status(503, &["Vault is sealed".to_owned()], None),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            from_status(400, &["bad".to_owned()], None),
            BackendError::InvalidInput(_)
        ));
    }

    #[test]
    fn a_deleted_or_destroyed_kv_version_is_named() {
        let deleted: Value = serde_json::json!({"data": {"data": null, "metadata": {
            "deletion_time": "2026-12-03T21:22:13Z", "destroyed": false, "version": 3}}});
        assert_eq!(
            from_status(404, &[], Some(&deleted)),
            BackendError::VersionDeleted { version: 3 }
        );
        let destroyed: Value = serde_json::json!({"data": {"data": null, "metadata": {
            "deletion_time": "", "destroyed": true, "version": 2}}});
        assert_eq!(
            from_status(404, &[], Some(&destroyed)),
            BackendError::VersionDestroyed { version: 2 }
        );
    }

    #[test]
    fn unparsable_answers_never_reach_the_message() {
        let error = ClientError::RestClientError {
            source: rustify::errors::ClientError::ResponseParseError {
                source: anyhow::anyhow!("expected value"),
                content: Some(r#"{"data": {"password": "hunter2"}}"#.to_owned()),
            },
        };
        let mapped = map_error(error);
        assert!(!format!("{mapped:?} {mapped}").contains("hunter2"));
    }
}
