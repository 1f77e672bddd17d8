//! `/v1/auth/...`: tokens (create, look up, renew, revoke), workload logins (Kubernetes
//! service accounts and AppRole), and AppRole administration.
//!
//! Login failures are deliberately coarse (`401 login_failed`, whatever the reason:
//! unknown role, bad secret, wrong namespace) and counted by the failure limiter, which
//! answers 429 once an address or a role has failed too often.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use custos_core::policy::Capability;
use custos_storage::approle::{RoleRow, SecretIdRow};
use custos_storage::leases::LeaseSelector;
use custos_storage::unix_micros_now;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit_trail::AuditDraft;
use crate::error::ApiError;
use crate::identity::system_path;
use crate::kubernetes::ReviewError;
use crate::leases::store_error;
use crate::middleware::ClientAddress;
use crate::secrets::json_error;
use crate::token::{issue_token, IssuedToken, Principal, TokenRequest, TokenSecret};
use crate::wire::rfc3339;
use crate::AppState;

/// Token lifetimes when a request or role does not say.
#[derive(Debug, Clone, Copy)]
pub struct TokenDefaults {
    pub ttl: Duration,
    pub max_ttl: Duration,
}

/// A token as the API shows it (never its text, except once at creation).
#[derive(Debug, Serialize)]
pub struct TokenView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub accessor: String,
    pub display_name: String,
    pub principal: String,
    pub auth_method: String,
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uses_remaining: Option<i64>,
    pub metadata: BTreeMap<String, String>,
}

impl TokenView {
    fn of(principal: &Principal, token: Option<&TokenSecret>) -> Self {
        let now = unix_micros_now();
        let moment = |micros: i64| {
            rfc3339(
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            )
        };
        Self {
            token: token.map(|token| token.expose().to_owned()),
            accessor: principal.accessor.clone(),
            display_name: principal.display_name.clone(),
            principal: principal.name.clone(),
            auth_method: principal.auth_method.clone(),
            policies: principal.policies.clone(),
            expires_at: principal.expires_at.map(moment),
            ttl_seconds: principal.expires_at.map(|expires_at| {
                u64::try_from((expires_at - now).max(0) / 1_000_000).unwrap_or(0)
            }),
            max_expires_at: principal.max_expires_at.map(moment),
            uses_remaining: principal.uses_remaining,
            metadata: principal.metadata.clone(),
        }
    }
}

fn issued(issued: IssuedToken) -> Response {
    let view = TokenView::of(&issued.principal, Some(&issued.token));
    let mut response = Json(view).into_response();
    // The body carries a credential: nothing on the way may keep a copy.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default)]
    policies: Vec<String>,
    ttl_seconds: Option<u64>,
    max_ttl_seconds: Option<u64>,
    /// Number of requests the token may make; absent for unlimited.
    uses: Option<u64>,
    display_name: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// `POST /v1/auth/token/create`: a child token of the caller.
///
/// An admin may grant any known policies; anyone else only a subset of their own, for no
/// longer than their own token lives.
pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let is_admin = state
        .policies
        .decide(&principal, &system_path("tokens"), Capability::Admin)
        .is_allowed();

    if let Some(unknown) = state.policies.unknown(&body.policies) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("policy `{unknown}` does not exist"),
        ));
    }
    if !is_admin {
        if let Some(extra) = body
            .policies
            .iter()
            .find(|name| !principal.policies.contains(name))
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("a token can only pass on its own policies; it lacks `{extra}`"),
            ));
        }
    }
    if body
        .policies
        .iter()
        .any(|name| name == crate::identity::ROOT_POLICY)
        && !principal.is_root
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a root token can create tokens with the root policy",
        ));
    }
    if body.metadata.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "at most 64 metadata entries",
        ));
    }

    let ttl = body
        .ttl_seconds
        .map_or(state.auth.token_defaults.ttl, Duration::from_secs);
    let mut max_ttl = body
        .max_ttl_seconds
        .map_or(state.auth.token_defaults.max_ttl, Duration::from_secs)
        .max(ttl);
    if ttl.is_zero() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`ttl_seconds` must be at least 1",
        ));
    }
    if let Some(parent_end) = principal.max_expires_at.or(principal.expires_at) {
        let remaining =
            u64::try_from((parent_end - unix_micros_now()).max(0) / 1_000_000).unwrap_or(0);
        max_ttl = max_ttl.min(Duration::from_secs(remaining));
    }

    let display_name = body.display_name.unwrap_or_else(|| "token".to_owned());
    let request = TokenRequest {
        principal: format!("token:{display_name}"),
        display_name,
        auth_method: "token".to_owned(),
        policies: body.policies,
        ttl: ttl.min(max_ttl),
        max_ttl,
        uses: body.uses,
        metadata: body.metadata,
        parent_accessor: Some(principal.accessor.clone()),
    };
    let token = issue_token(&state.tokens, request)
        .await
        .map_err(token_error)?;
    Ok(issued(token))
}

/// `GET /v1/auth/token/lookup-self`.
pub async fn lookup_self(Extension(principal): Extension<Principal>) -> Response {
    Json(TokenView::of(&principal, None)).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    accessor: Option<String>,
    increment_seconds: Option<u64>,
}

/// `POST /v1/auth/token/renew-self`.
pub async fn renew_self(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Option<Json<RenewBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|Json(body)| body).unwrap_or_default();
    renew_token(&state, &principal.accessor, body.increment_seconds).await
}

/// `POST /v1/auth/token/renew` (admin): renew a token by accessor.
pub async fn renew(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<RenewBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("tokens"), Capability::Admin)?;
    let Some(accessor) = body.accessor else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`accessor` is required",
        ));
    };
    renew_token(&state, &accessor, body.increment_seconds).await
}

async fn renew_token(
    state: &AppState,
    accessor: &str,
    increment_seconds: Option<u64>,
) -> Result<Response, ApiError> {
    let stored = state
        .tokens
        .find_by_accessor(accessor)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("token_not_found", "no such token"))?;
    let now = unix_micros_now();
    if let (Some(ttl), Some(max_expires_at)) = (stored.ttl_seconds, stored.max_expires_at) {
        let increment =
            increment_seconds.map_or(ttl, |seconds| i64::try_from(seconds).unwrap_or(ttl));
        let expires_at = now
            .saturating_add(increment.saturating_mul(1_000_000))
            .min(max_expires_at);
        if !state
            .tokens
            .renew(accessor, expires_at)
            .await
            .map_err(store_error)?
        {
            return Err(ApiError::not_found(
                "token_not_found",
                "no such token (expired?)",
            ));
        }
    }
    let renewed = state
        .tokens
        .find_by_accessor(accessor)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("token_not_found", "no such token"))?;
    Ok(Json(TokenView::of(&crate::token::principal_of(&renewed), None)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessorBody {
    accessor: String,
}

/// `POST /v1/auth/token/lookup` (admin).
pub async fn lookup(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<AccessorBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("tokens"), Capability::Admin)?;
    let stored = state
        .tokens
        .find_by_accessor(&body.accessor)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("token_not_found", "no such token"))?;
    Ok(Json(TokenView::of(&crate::token::principal_of(&stored), None)).into_response())
}

/// `POST /v1/auth/token/revoke` (admin): the token, the tokens it created, and their
/// leases.
pub async fn revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<AccessorBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("tokens"), Capability::Admin)?;
    revoke_tree(&state, &body.accessor).await
}

/// `POST /v1/auth/token/revoke-self`.
pub async fn revoke_self(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    if principal.is_root {
        return Err(ApiError::bad_request(
            "invalid_request",
            "root tokens are not revoked through the API",
        ));
    }
    revoke_tree(&state, &principal.accessor).await
}

async fn revoke_tree(state: &AppState, accessor: &str) -> Result<Response, ApiError> {
    let revoked = state
        .tokens
        .revoke_tree(accessor)
        .await
        .map_err(store_error)?;
    if revoked.is_empty() {
        return Err(ApiError::not_found(
            "token_not_found",
            "no such token (or a root token)",
        ));
    }
    let leases = state
        .leases
        .revoke_many(&LeaseSelector::Tokens(revoked.clone()), "token revoked")
        .await
        .map_err(store_error)?;
    Ok(
        Json(json!({ "revoked_tokens": revoked.len(), "revoked_leases": leases.len() }))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesLoginBody {
    role: String,
    jwt: String,
}

impl std::fmt::Debug for KubernetesLoginBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KubernetesLoginBody")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/auth/kubernetes/login`.
pub async fn kubernetes_login(
    State(state): State<AppState>,
    Extension(draft): Extension<AuditDraft>,
    Extension(address): Extension<ClientAddress>,
    body: Result<Json<KubernetesLoginBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    draft.update(|fields| {
        fields.auth_method = Some("kubernetes".to_owned());
        fields.role = Some(body.role.clone());
    });
    check_limit(&state, &address, Some(&body.role))?;
    let jwt = zeroize::Zeroizing::new(body.jwt);

    let Some(kubernetes) = &state.auth.kubernetes else {
        return Err(login_failed(&state, &address, &body.role));
    };
    let Some(role) = kubernetes.role(&body.role) else {
        return Err(login_failed(&state, &address, &body.role));
    };
    let account = match kubernetes.review(&jwt, &role.audiences).await {
        Ok(account) => account,
        Err(ReviewError::Rejected) => return Err(login_failed(&state, &address, &body.role)),
        Err(ReviewError::Unavailable(reason)) => {
            tracing::error!(%reason, "Kubernetes login could not be checked");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "login_unavailable",
                "the Kubernetes API could not check the token; retry shortly",
            ));
        }
    };
    if !role.admits(&account) {
        return Err(login_failed(&state, &address, &body.role));
    }

    let metadata = BTreeMap::from([
        ("role".to_owned(), role.name.clone()),
        ("namespace".to_owned(), account.namespace.clone()),
        ("service_account".to_owned(), account.name.clone()),
    ]);
    let request = TokenRequest {
        display_name: format!("kubernetes-{}-{}", account.namespace, account.name),
        auth_method: "kubernetes".to_owned(),
        principal: format!("kubernetes:{}/{}", account.namespace, account.name),
        policies: role.policies.clone(),
        ttl: role.token_ttl,
        max_ttl: role.token_max_ttl,
        uses: None,
        metadata,
        parent_accessor: None,
    };
    let token = issue_token(&state.tokens, request)
        .await
        .map_err(token_error)?;
    record_login(&draft, &token.principal);
    Ok(issued(token))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleLoginBody {
    role_id: String,
    secret_id: String,
}

impl std::fmt::Debug for AppRoleLoginBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AppRoleLoginBody")
            .field("role_id", &self.role_id)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/auth/approle/login`.
pub async fn approle_login(
    State(state): State<AppState>,
    Extension(draft): Extension<AuditDraft>,
    Extension(address): Extension<ClientAddress>,
    body: Result<Json<AppRoleLoginBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    draft.update(|fields| fields.auth_method = Some("approle".to_owned()));
    let secret_id = TokenSecret::new(body.secret_id);

    let role = state
        .approles
        .role_by_role_id(&body.role_id)
        .await
        .map_err(store_error)?;
    let role_key = role
        .as_ref()
        .map_or(body.role_id.as_str(), |role| role.name.as_str());
    check_limit(&state, &address, Some(role_key))?;
    let Some(role) = role else {
        return Err(login_failed(&state, &address, &body.role_id));
    };
    draft.update(|fields| fields.role = Some(role.name.clone()));

    let consumed = state
        .approles
        .consume_secret_id(&secret_id.hash(), &role.name, unix_micros_now())
        .await
        .map_err(store_error)?;
    if !consumed {
        return Err(login_failed(&state, &address, &role.name));
    }

    let request = TokenRequest {
        display_name: format!("approle-{}", role.name),
        auth_method: "approle".to_owned(),
        principal: format!("approle:{}", role.name),
        policies: serde_json::from_str(&role.policies).unwrap_or_default(),
        ttl: Duration::from_secs(u64::try_from(role.token_ttl_seconds).unwrap_or(900)),
        max_ttl: Duration::from_secs(u64::try_from(role.token_max_ttl_seconds).unwrap_or(3600)),
        uses: None,
        metadata: BTreeMap::from([("role".to_owned(), role.name.clone())]),
        parent_accessor: None,
    };
    let token = issue_token(&state.tokens, request)
        .await
        .map_err(token_error)?;
    record_login(&draft, &token.principal);
    Ok(issued(token))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    #[serde(default)]
    policies: Vec<String>,
    token_ttl_seconds: Option<u64>,
    token_max_ttl_seconds: Option<u64>,
    secret_id_ttl_seconds: Option<u64>,
    /// Logins per secret id; 0 for unlimited. Default 1 (single use).
    secret_id_uses: Option<u64>,
}

#[derive(Debug, Serialize)]
struct RoleView {
    name: String,
    role_id: String,
    policies: Vec<String>,
    token_ttl_seconds: i64,
    token_max_ttl_seconds: i64,
    secret_id_ttl_seconds: i64,
    secret_id_uses: i64,
}

impl RoleView {
    fn of(role: &RoleRow) -> Self {
        Self {
            name: role.name.clone(),
            role_id: role.role_id.clone(),
            policies: serde_json::from_str(&role.policies).unwrap_or_default(),
            token_ttl_seconds: role.token_ttl_seconds,
            token_max_ttl_seconds: role.token_max_ttl_seconds,
            secret_id_ttl_seconds: role.secret_id_ttl_seconds,
            secret_id_uses: role.secret_id_uses,
        }
    }
}

/// `PUT /v1/auth/approle/roles/{name}` (admin): create or update a role.
pub async fn put_role(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<RoleBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("approle"), Capability::Admin)?;
    custos_core::policy::Policy::new(&name, vec![]).map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            "role names are 1 to 64 ASCII letters, digits, `-` and `_`",
        )
    })?;
    if let Some(unknown) = state.policies.unknown(&body.policies) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("policy `{unknown}` does not exist"),
        ));
    }

    let existing = state.approles.role(&name).await.map_err(store_error)?;
    let seconds = |value: Option<u64>, default: u64| {
        i64::try_from(value.unwrap_or(default)).unwrap_or(i64::MAX)
    };
    let role = RoleRow {
        role_id: existing.as_ref().map_or_else(
            || uuid::Uuid::new_v4().to_string(),
            |role| role.role_id.clone(),
        ),
        name: name.clone(),
        policies: serde_json::to_string(&body.policies).unwrap_or_else(|_| "[]".to_owned()),
        token_ttl_seconds: seconds(body.token_ttl_seconds, 900),
        token_max_ttl_seconds: seconds(body.token_max_ttl_seconds, 3600),
        secret_id_ttl_seconds: seconds(body.secret_id_ttl_seconds, 600),
        secret_id_uses: seconds(body.secret_id_uses, 1),
        created_at: unix_micros_now(),
    };
    state.approles.put_role(&role).await.map_err(store_error)?;
    Ok(Json(RoleView::of(&role)).into_response())
}

/// `GET /v1/auth/approle/roles/{name}` (admin): the role and its role id.
pub async fn get_role(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state
        .policies
        .authorize(&principal, &system_path("approle"), Capability::Admin)?;
    let role = state
        .approles
        .role(&name)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("role_not_found", "no such role"))?;
    Ok(Json(RoleView::of(&role)).into_response())
}

/// `POST /v1/auth/approle/roles/{name}/secret-id` (admin): a new secret id, shown once.
pub async fn issue_secret_id(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state
        .policies
        .authorize(&principal, &system_path("approle"), Capability::Admin)?;
    let role = state
        .approles
        .role(&name)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("role_not_found", "no such role"))?;

    let secret_id = TokenSecret::generate().map_err(token_error)?;
    let now = unix_micros_now();
    let row = SecretIdRow {
        secret_id_hash: secret_id.hash(),
        role_name: role.name.clone(),
        accessor: crate::token::random_accessor().map_err(token_error)?,
        expires_at: now.saturating_add(role.secret_id_ttl_seconds.saturating_mul(1_000_000)),
        uses_remaining: (role.secret_id_uses > 0).then_some(role.secret_id_uses),
        created_at: now,
    };
    state
        .approles
        .insert_secret_id(&row)
        .await
        .map_err(store_error)?;

    let mut response = Json(json!({
        "role": role.name,
        "secret_id": secret_id.expose(),
        "secret_id_accessor": row.accessor,
        "expires_at": rfc3339(
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(row.expires_at) * 1_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        ),
        "uses": row.uses_remaining,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn check_limit(
    state: &AppState,
    address: &ClientAddress,
    role: Option<&str>,
) -> Result<(), ApiError> {
    match state.limiter.blocked(address.0.as_deref(), role) {
        Some(wait) => Err(too_many(wait)),
        None => Ok(()),
    }
}

/// The 429 answer, with `Retry-After` in the message (headers are added by the caller's
/// middleware from the code).
pub fn too_many(wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!(
            "too many failed attempts; retry in {} seconds",
            wait.as_secs().max(1)
        ),
    )
}

fn login_failed(state: &AppState, address: &ClientAddress, role: &str) -> ApiError {
    state
        .limiter
        .record_failure(address.0.as_deref(), Some(role));
    ApiError::new(StatusCode::UNAUTHORIZED, "login_failed", "login failed")
}

fn record_login(draft: &AuditDraft, principal: &Principal) {
    draft.update(|fields| {
        fields.principal = Some(principal.name.clone());
        fields.token_accessor = Some(principal.accessor.clone());
    });
}

fn token_error(error: crate::token::TokenError) -> ApiError {
    match error {
        crate::token::TokenError::Storage(error) => store_error(error),
        crate::token::TokenError::Random => ApiError::internal(),
    }
}
