//! `/v1/policies`: list, read, write and delete policies (admin on `sys/policies`).
//!
//! Policies from the configuration file are read-only here: the file is their source.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use custos_core::policy::Capability;
use serde_json::json;

use crate::error::ApiError;
use crate::identity::{system_path, PolicyDocument, ROOT_POLICY};
use crate::leases::store_error;
use crate::secrets::json_error;
use crate::token::Principal;
use crate::AppState;

fn require_admin(state: &AppState, principal: &Principal) -> Result<(), ApiError> {
    state
        .policies
        .authorize(principal, &system_path("policies"), Capability::Admin)
}

/// `GET /v1/policies`.
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    require_admin(&state, &principal)?;
    Ok(Json(json!({ "policies": state.policies.names() })).into_response())
}

/// `GET /v1/policies/{name}`.
pub async fn read(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state, &principal)?;
    let (document, source) = state
        .policies
        .document(&name)
        .ok_or_else(|| ApiError::not_found("policy_not_found", "no such policy"))?;
    Ok(Json(json!({ "name": name, "rules": document.rules, "source": source })).into_response())
}

/// `PUT /v1/policies/{name}`: create or replace.
pub async fn write(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<PolicyDocument>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(document) = body.map_err(json_error)?;
    require_admin(&state, &principal)?;
    if name == ROOT_POLICY || state.policies.is_configured(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "policy_read_only",
            format!("policy `{name}` comes from the configuration file; change it there"),
        ));
    }
    document
        .to_policy(&name)
        .map_err(|message| ApiError::bad_request("invalid_policy", message))?;

    let rules = serde_json::to_string(&document).map_err(|_| ApiError::internal())?;
    state
        .policies
        .repository()
        .put(&name, &rules)
        .await
        .map_err(store_error)?;
    state.policies.reload().await.map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /v1/policies/{name}`.
pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state, &principal)?;
    if state.policies.is_configured(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "policy_read_only",
            format!("policy `{name}` comes from the configuration file; change it there"),
        ));
    }
    let removed = state
        .policies
        .repository()
        .delete(&name)
        .await
        .map_err(store_error)?;
    if !removed {
        return Err(ApiError::not_found("policy_not_found", "no such policy"));
    }
    state.policies.reload().await.map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
