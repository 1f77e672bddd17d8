//! Handlers of `/v1/secrets/{mount}/{path...}`: read, list, write and delete.
//!
//! The secret path is taken from the raw, still percent-encoded request path and parsed
//! once by `custos_core::path`, so that encoded separators and dots are judged by the same
//! rules as plain ones.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use custos_core::{DeleteRequest, Mount, Operation, SecretData, SecretPath, WriteOptions};
use http_body_util::BodyExt;
use serde::Deserialize;

use custos_core::policy::Capability;

use crate::audit_trail::AuditDraft;
use crate::error::ApiError;
use crate::leases::{LEASE_ID_HEADER, LEASE_TTL_HEADER};
use crate::token::Principal;
use crate::wire::{ListResponse, MetadataView, ReadResponse, WriteBody, WriteResponse};
use crate::AppState;

const SECRETS_PREFIX: &str = "/v1/secrets";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    version: Option<u64>,
    #[serde(default)]
    list: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Comma-separated version numbers; empty means the latest (or all, with `destroy`).
    versions: Option<String>,
    #[serde(default)]
    destroy: bool,
}

pub async fn read(
    State(state): State<AppState>,
    Extension(draft): Extension<AuditDraft>,
    Extension(principal): Extension<Principal>,
    uri: Uri,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let path = secret_path(&uri)?;
    let (mount, relative) = route(&state, &path)?;

    if query.list {
        state
            .policies
            .authorize(&principal, &path, Capability::List)?;
        return list(mount, relative.as_ref(), &path).await;
    }
    state
        .policies
        .authorize(&principal, &path, Capability::Read)?;
    if let Some(version) = query.version {
        check_version(version)?;
    }

    let relative = require_secret(relative, &path)?;
    require(mount, Operation::Read)?;
    let version = mount.backend.read(&relative, query.version).await?;
    let lease = state
        .leases
        .issue(
            &principal,
            &mount.path,
            &path,
            version.metadata.version,
            version.native_lease.as_ref(),
            &draft,
        )
        .await
        .map_err(crate::leases::store_error)?;
    draft.update(|fields| {
        fields.version = Some(version.metadata.version);
        fields.lease_id = Some(lease.lease_id.clone());
    });
    let metadata = MetadataView::new(
        path.to_string(),
        mount.path.to_string(),
        mount.backend.kind(),
        &version.metadata,
    );
    tracing::info!(path = %path, version = version.metadata.version, "secret read");

    let lease_headers = [
        (LEASE_ID_HEADER, lease.lease_id.clone()),
        (LEASE_TTL_HEADER, lease.ttl_seconds.to_string()),
    ];
    let body = ReadResponse {
        data: crate::wire::FieldsView(&version.data),
        metadata,
        lease,
    };
    Ok((lease_headers, Json(body)).into_response())
}

async fn list(
    mount: &Mount,
    relative: Option<&SecretPath>,
    path: &SecretPath,
) -> Result<Response, ApiError> {
    require(mount, Operation::List)?;
    let entries = mount.backend.list(relative).await?;
    let body = ListResponse {
        path: path.to_string(),
        keys: entries.iter().map(|entry| entry.display_name()).collect(),
    };
    Ok(Json(body).into_response())
}

pub async fn write(
    State(state): State<AppState>,
    Extension(draft): Extension<AuditDraft>,
    Extension(principal): Extension<Principal>,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let path = secret_path(&uri)?;
    state
        .policies
        .authorize(&principal, &path, Capability::Write)?;
    let (mount, relative) = route(&state, &path)?;
    let relative = require_secret(relative, &path)?;
    require(mount, Operation::Write)?;

    let bytes = read_body(body, state.settings.max_request_bytes).await?;
    let request: WriteBody = serde_json::from_slice(&bytes).map_err(body_error)?;
    let data = SecretData::new(request.data.0)?;
    let options = WriteOptions {
        check_and_set: request.cas,
    };

    let metadata = mount.backend.write(&relative, data, options).await?;
    draft.update(|fields| fields.version = Some(metadata.version));
    tracing::info!(path = %path, version = metadata.version, "secret written");
    let body = WriteResponse {
        metadata: MetadataView::new(
            path.to_string(),
            mount.path.to_string(),
            mount.backend.kind(),
            &metadata,
        ),
    };
    Ok(Json(body).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    uri: Uri,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let path = secret_path(&uri)?;
    state
        .policies
        .authorize(&principal, &path, Capability::Delete)?;
    let (mount, relative) = route(&state, &path)?;
    let relative = require_secret(relative, &path)?;
    require(mount, Operation::Delete)?;

    let versions = parse_versions(query.versions.as_deref())?;
    let request = if query.destroy {
        DeleteRequest::Destroy { versions }
    } else {
        DeleteRequest::SoftDelete { versions }
    };
    mount.backend.delete(&relative, request).await?;
    tracing::info!(path = %path, destroy = query.destroy, "secret deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The secret path of a request, from the raw (still percent-encoded) URI path.
fn secret_path(uri: &Uri) -> Result<SecretPath, ApiError> {
    let raw = uri.path().strip_prefix(SECRETS_PREFIX).unwrap_or_default();
    Ok(SecretPath::parse(raw)?)
}

fn route<'state>(
    state: &'state AppState,
    path: &SecretPath,
) -> Result<(&'state Mount, Option<SecretPath>), ApiError> {
    state.mounts.route(path).ok_or_else(|| {
        ApiError::not_found(
            "mount_not_found",
            format!("no mount serves `{path}`; GET /v1/mounts lists the mounts"),
        )
    })
}

fn require_secret(relative: Option<SecretPath>, path: &SecretPath) -> Result<SecretPath, ApiError> {
    relative.ok_or_else(|| {
        ApiError::bad_request(
            "invalid_path",
            format!("`{path}` is a mount, not a secret; add the secret's path after it"),
        )
    })
}

fn require(mount: &Mount, operation: Operation) -> Result<(), ApiError> {
    if mount.allows(operation) {
        return Ok(());
    }
    let reason = if mount.read_only && mount.backend.supports(operation) {
        format!("mount `{}` is read-only", mount.path)
    } else {
        format!(
            "the {} backend of mount `{}`",
            mount.backend.kind(),
            mount.path
        )
    };
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "unsupported_operation",
        format!("{reason} does not support {operation}"),
    ))
}

fn parse_versions(text: Option<&str>) -> Result<Vec<u64>, ApiError> {
    let Some(text) = text.filter(|text| !text.is_empty()) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(|part| match part.trim().parse::<u64>() {
            Ok(version) => check_version(version).map(|()| version),
            Err(_) => Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "`versions` must be comma-separated numbers from 1, such as 1,3; got `{part}`"
                ),
            )),
        })
        .collect()
}

/// Versions start at 1 and fit in the databases' signed 64-bit integers.
fn check_version(version: u64) -> Result<(), ApiError> {
    if version == 0 || i64::try_from(version).is_err() {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("version {version} is out of range; versions start at 1"),
        ));
    }
    Ok(())
}

// FIXME: the collected body is a hyper buffer that is not zeroized, so a written secret can
// linger in freed heap memory until the allocator reuses it.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(_) => Err(ApiError::bad_request(
            "invalid_request",
            "the request body could not be read completely",
        )),
    }
}

/// Turns a JSON error into a message that never repeats a value from the body: serde's
/// "invalid type" and "invalid value" messages quote the offending value, which may be a
/// secret.
fn body_error(error: serde_json::Error) -> ApiError {
    let text = error.to_string();
    let message = if text.starts_with("invalid type") || text.starts_with("invalid value") {
        format!(
            "a value has the wrong type at line {} column {}; the body must look like \
             {{\"data\": {{\"name\": \"text\" or {{\"base64\": \"...\"}}}}, \"cas\": 1}}",
            error.line(),
            error.column()
        )
    } else if error.is_syntax() || error.is_eof() {
        format!(
            "the body is not valid JSON (line {} column {})",
            error.line(),
            error.column()
        )
    } else {
        format!("the body is not a valid secret: {text}")
    };
    ApiError::bad_request("invalid_request", message)
}

/// A JSON body rejection, without quoting the body.
pub fn json_error(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    use axum::extract::rejection::JsonRejection;
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the broker's limit (`server.max_request_bytes`)",
        );
    }
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::bad_request(
            "invalid_request",
            "the body does not have the expected fields; see docs/API.md",
        ),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request("invalid_request", "the body is not valid JSON")
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
            "invalid_request",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(_) => {
            ApiError::bad_request("invalid_request", "the body could not be read")
        }
        _ => ApiError::bad_request("invalid_request", "the body was refused"),
    }
}

fn query_error(error: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        format!("invalid query string: {}", error.body_text()),
    )
}
