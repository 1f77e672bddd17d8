//! `GET /v1/audit`: search the audit log, newest first, a page at a time.
//!
//! Only principals with the audit permission may search; until identities and policies
//! exist, that is the root token alone.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use custos_storage::audit::AuditFilter;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;
use crate::token::Principal;
use crate::AppState;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    principal: Option<String>,
    /// Whole-segment path prefix.
    path: Option<String>,
    mount: Option<String>,
    operation: Option<String>,
    outcome: Option<String>,
    /// RFC 3339, inclusive.
    since: Option<String>,
    /// RFC 3339, exclusive.
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// One record as the API and the JSON-lines sink show it.
#[derive(Debug, Serialize)]
pub struct RecordView {
    pub sequence: u64,
    pub mac: String,
    pub record: Box<RawValue>,
}

#[derive(Debug, Serialize)]
struct SearchResponse {
    records: Vec<RecordView>,
    /// Pass as `cursor` to get the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

pub async fn search(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    state.policies.authorize(
        &principal,
        &crate::identity::system_path("audit"),
        custos_core::policy::Capability::Audit,
    )?;
    let Query(query) = query.map_err(|error| {
        ApiError::bad_request(
            "invalid_request",
            format!("invalid query string: {}", error.body_text()),
        )
    })?;

    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("`limit` must be 1 to {MAX_LIMIT}"),
        ));
    }
    if let Some(outcome) = &query.outcome {
        let known = ["ok", "denied", "not_found", "bad_request", "error"];
        if !known.contains(&outcome.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`outcome` must be one of {}", known.join(", ")),
            ));
        }
    }
    let filter = AuditFilter {
        principal: query.principal,
        path_prefix: query.path.map(|path| path.trim_matches('/').to_owned()),
        mount: query.mount.map(|mount| mount.trim_matches('/').to_owned()),
        operation: query.operation,
        outcome: query.outcome,
        since: query
            .since
            .as_deref()
            .map(|text| moment("since", text))
            .transpose()?,
        until: query
            .until
            .as_deref()
            .map(|text| moment("until", text))
            .transpose()?,
        before_sequence: query.cursor.as_deref().map(cursor_sequence).transpose()?,
    };

    // One more than asked tells whether another page exists.
    let mut rows = state
        .audit_repository
        .search(&filter, limit + 1)
        .await
        .map_err(|error| {
            tracing::error!(%error, "audit search failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the audit store did not answer; retry shortly",
            )
        })?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|row| row.sequence.to_string()))
        .flatten();

    let records = rows
        .into_iter()
        .map(|row| {
            let record = RawValue::from_string(row.record).map_err(|_| ApiError::internal())?;
            Ok(RecordView {
                sequence: row.sequence,
                mac: row.mac,
                record,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(SearchResponse {
        records,
        next_cursor,
    })
    .into_response())
}

fn moment(name: &str, text: &str) -> Result<i64, ApiError> {
    let parsed = time::OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            format!("`{name}` must be an RFC 3339 time such as 2026-12-03T10:00:00Z"),
        )
    })?;
    Ok(i64::try_from(parsed.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX))
}

fn cursor_sequence(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            "`cursor` must be a `next_cursor` value from a previous page",
        )
    })
}
