//! Custos's HTTP API over axum: routes, authentication, limits and JSON errors.
//!
//! - [`middleware`]: request ids, one span and one log line per request, the request
//!   timeout, the audit record of every request, and bearer-token authentication.
//! - [`audit_trail`]: the audit draft a request fills in while it is handled.
//! - [`audit_search`]: `GET /v1/audit`.
//! - [`identity`]: policies as held in memory, and the one place requests are authorised.
//! - [`auth_routes`]: tokens, Kubernetes and AppRole logins; [`kubernetes`] asks the API
//!   server's TokenReview; [`rate_limit`] counts failed logins and bad tokens.
//! - [`leases`]: leases on every read, their renewal, revocation and sweeping.
//! - [`policy_routes`] serves `/v1/policies`.
//! - [`secrets`]: `/v1/secrets/...` handlers over the mount table.
//! - [`wire`]: the JSON shapes, stable across backends.
//! - [`error`]: the error body and the mapping of every failure to a status.
//! - [`token`]: token generation, hashing and constant-time verification.

#![forbid(unsafe_code)]

pub mod audit_search;
pub mod audit_trail;
pub mod auth_routes;
pub mod error;
pub mod identity;
pub mod kubernetes;
pub mod leases;
pub mod middleware;
pub mod policy_routes;
pub mod rate_limit;
pub mod secrets;
pub mod token;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use custos_audit::AuditLog;
use custos_core::MountTable;
use custos_storage::approle::AppRoleRepository;
use custos_storage::audit::AuditRepository;
use custos_storage::tokens::TokenRepository;
use custos_storage::Database;

use crate::auth_routes::TokenDefaults;
use crate::identity::PolicyStore;
use crate::kubernetes::KubernetesAuth;
use crate::leases::LeaseManager;
use crate::rate_limit::FailureLimiter;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::ApiError;
pub use crate::token::{Authenticator, Principal, TokenSecret};

/// Limits and timeouts of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Largest accepted request body.
    pub max_request_bytes: usize,
    /// Longest time a request may take before it is answered with 503.
    pub request_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub mounts: Arc<MountTable>,
    pub authenticator: Arc<Authenticator>,
    pub database: Database,
    pub settings: ServerSettings,
    pub audit: Arc<AuditLog>,
    pub audit_repository: AuditRepository,
    pub policies: Arc<PolicyStore>,
    pub leases: LeaseManager,
    pub tokens: TokenRepository,
    pub approles: AppRoleRepository,
    pub limiter: Arc<FailureLimiter>,
    pub auth: Arc<AuthSettings>,
}

/// How workloads log in and how long their tokens live.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub token_defaults: TokenDefaults,
    pub kubernetes: Option<KubernetesAuth>,
}

/// The complete router of the API.
pub fn router(state: AppState) -> Router {
    let secret_routes = || {
        get(secrets::read)
            .put(secrets::write)
            .delete(secrets::delete)
    };
    let authenticated = Router::new()
        .route("/v1/secrets/{*path}", secret_routes())
        // Without a path these answer 400 `invalid_path`, not 404: the endpoint exists.
        .route("/v1/secrets", secret_routes())
        .route("/v1/secrets/", secret_routes())
        .route("/v1/mounts", get(list_mounts))
        .route("/v1/audit", get(audit_search::search))
        .route("/v1/auth/token/create", post(auth_routes::create))
        .route("/v1/auth/token/lookup-self", get(auth_routes::lookup_self))
        .route("/v1/auth/token/renew-self", post(auth_routes::renew_self))
        .route("/v1/auth/token/revoke-self", post(auth_routes::revoke_self))
        .route("/v1/auth/token/lookup", post(auth_routes::lookup))
        .route("/v1/auth/token/renew", post(auth_routes::renew))
        .route("/v1/auth/token/revoke", post(auth_routes::revoke))
        .route(
            "/v1/auth/approle/roles/{name}",
            get(auth_routes::get_role).put(auth_routes::put_role),
        )
        .route(
            "/v1/auth/approle/roles/{name}/secret-id",
            post(auth_routes::issue_secret_id),
        )
        .route("/v1/leases/renew", post(leases::renew))
        .route("/v1/leases/revoke", post(leases::revoke))
        .route("/v1/leases/revoke-prefix", post(leases::revoke_prefix))
        .route(
            "/v1/leases/revoke-principal",
            post(leases::revoke_principal),
        )
        .route("/v1/leases/{lease_id}", get(leases::lookup))
        .route("/v1/policies", get(policy_routes::list))
        .route(
            "/v1/policies/{name}",
            get(policy_routes::read)
                .put(policy_routes::write)
                .delete(policy_routes::delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ));

    // Logins carry no token: they are how a workload gets one.
    let logins = Router::new()
        .route(
            "/v1/auth/kubernetes/login",
            post(auth_routes::kubernetes_login),
        )
        .route("/v1/auth/approle/login", post(auth_routes::approle_login));

    Router::new()
        .route("/v1/health", get(health))
        .merge(logins)
        .merge(authenticated)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Every JSON body is held to the configured limit, the unauthenticated logins
        // included; secret writes read their body with the same limit themselves.
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_request_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then drains open requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Longest a health check waits for the database: a load balancer needs an answer, and a
/// database that takes longer than this is as good as down to it.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn health(State(state): State<AppState>) -> Response {
    let failure = match tokio::time::timeout(HEALTH_TIMEOUT, state.database.ping()).await {
        Ok(Ok(())) => {
            return Json(json!({
                "status": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "database": state.database.kind().as_str(),
            }))
            .into_response();
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {} ms", HEALTH_TIMEOUT.as_millis()),
    };
    tracing::warn!(error = %failure, "health check: database unavailable");
    ApiError::not_ready("the broker's database is not answering").into_response()
}

async fn list_mounts(State(state): State<AppState>) -> Response {
    let mounts: Vec<_> = state
        .mounts
        .mounts()
        .iter()
        .map(|mount| {
            json!({
                "path": mount.path.as_str(),
                "backend": mount.backend.kind(),
                "read_only": mount.read_only,
            })
        })
        .collect();
    Json(json!({ "mounts": mounts })).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "route_not_found",
        "no such endpoint; the API lives under /v1 (see docs/API.md)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that HTTP method",
    )
}
