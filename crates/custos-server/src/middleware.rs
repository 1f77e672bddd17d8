//! Cross-cutting request handling: request ids, the per-request span and log line,
//! the request timeout, and token authentication.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::audit_trail::{AuditDraft, Finished};
use crate::auth_routes::too_many;
use crate::error::{ApiError, ErrorCode};
use crate::token::TokenSecret;
use crate::{wire, AppState};

/// The one route that is not audited: load balancers poll it constantly, it needs no
/// token and it reveals nothing.
const HEALTH_ROUTE: &str = "/v1/health";

/// Header carrying the request id back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Header alternative to `Authorization: Bearer`.
pub const TOKEN_HEADER: &str = "x-custos-token";

/// The client's IP address (without port), for rate limits.
#[derive(Debug, Clone)]
pub struct ClientAddress(pub Option<String>);

/// The id of the request being handled, for handlers and error reports.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives every request an id, a span, a timeout, one summary log line and, except for
/// the health check, one durable audit record before the response leaves.
///
/// The request is handled in a task of its own: a client that disconnects does not cancel
/// it halfway, so what it did is still recorded, and a lease it drew up is still stored
/// or, with its backend lease, revoked. The request timeout bounds the work.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    tokio::spawn(handle(state, request, next))
        .await
        .unwrap_or_else(|error| {
            tracing::error!(%error, "request handling panicked");
            ApiError::internal().into_response()
        })
}

async fn handle(state: AppState, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| *address);
    let client_address = peer.map(|address| address.to_string());
    request
        .extensions_mut()
        .insert(ClientAddress(peer.map(|address| address.ip().to_string())));
    let audited = route != HEALTH_ROUTE;
    let draft = AuditDraft::for_request(
        &method,
        &route,
        request.uri().path(),
        request.uri().query(),
        &state.mounts,
    );
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    request.extensions_mut().insert(draft.clone());

    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method,
        route = %route,
        principal = tracing::field::Empty,
    );
    let timeout = state.settings.request_timeout;
    let mut response = async move {
        match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => timed_out(timeout),
        }
    }
    .instrument(span.clone())
    .await;

    if audited {
        // Leases are stored only with a successful read: a read that ended otherwise (a
        // timeout, say) delivered no secret.
        let leases = draft.take_leases();
        let (leases, mut undelivered) = if response.status().is_success() {
            (leases, Vec::new())
        } else {
            (Vec::new(), leases)
        };
        let record = draft.finish(
            Finished {
                time: wire::rfc3339(time::OffsetDateTime::now_utc()),
                request_id: request_id.clone(),
                client_address,
                method: method.to_string(),
                status: response.status().as_u16(),
                error_code: response
                    .extensions()
                    .get::<ErrorCode>()
                    .map(|code| code.0.to_owned()),
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            },
            |accessor| state.audit.key().hash(accessor),
        );
        let with_backend_lease = leases
            .iter()
            .filter(|lease| lease.native_lease_id.is_some())
            .cloned()
            .collect::<Vec<_>>();
        let audited = state
            .audit
            .record(record, leases)
            .instrument(span.clone())
            .await;
        if audited.is_err() {
            undelivered.extend(with_backend_lease);
        }
        if !undelivered.is_empty() {
            // A credential the client never receives must not stay alive in its backend;
            // revoking it must not hold up the answer either.
            let lease_manager = state.leases.clone();
            tokio::spawn(
                async move {
                    for lease in &undelivered {
                        lease_manager.revoke_native(lease).await;
                    }
                }
                .instrument(span.clone()),
            );
        }
        if let Err(error) = audited {
            // Fail closed: whatever was about to be sent, secret included, is dropped.
            response = ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("the request was refused because it could not be audited: {error}"),
            )
            .into_response();
        }
    }

    let status = response.status().as_u16();
    let error_code = response.extensions().get::<ErrorCode>().map(|code| code.0);
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        tracing::info!(status, error_code, latency_ms, "request finished");
    });

    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

fn timed_out(timeout: Duration) -> Response {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "request_timeout",
        format!(
            "the request did not complete within {} ms; retry later",
            timeout.as_millis()
        ),
    )
    .into_response()
}

/// Refuses requests without a valid token and records the principal for handlers. Bad
/// tokens count against the client's address; too many get 429 before any lookup.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let address = request
        .extensions()
        .get::<ClientAddress>()
        .and_then(|address| address.0.clone());
    if let Some(wait) = state.limiter.blocked(address.as_deref(), None) {
        return too_many(wait).into_response();
    }

    let token = match presented_token(request.headers()) {
        Ok(Some(token)) => token,
        Ok(None) => return ApiError::missing_token().into_response(),
        Err(error) => return error.into_response(),
    };

    let token_hash = state.audit.key().hash(token.expose());
    let principal = match state.authenticator.verify(&token).await {
        Ok(principal) => principal,
        Err(error) => {
            tracing::error!(%error, "token lookup failed");
            return ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the broker's own database did not answer; retry shortly",
            )
            .into_response();
        }
    };
    if let Some(draft) = request.extensions().get::<AuditDraft>() {
        draft.update(|fields| {
            fields.token_hash = Some(token_hash);
            fields.auth_method = principal
                .as_ref()
                .map(|principal| principal.auth_method.clone());
            fields.principal = principal.as_ref().map(|principal| principal.name.clone());
            fields.token_accessor = principal
                .as_ref()
                .map(|principal| principal.accessor.clone());
        });
    }

    let Some(principal) = principal else {
        state.limiter.record_failure(address.as_deref(), None);
        tracing::info!("request refused: invalid token");
        return ApiError::invalid_token().into_response();
    };
    tracing::Span::current().record("principal", principal.name.as_str());
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn presented_token(headers: &HeaderMap) -> Result<Option<TokenSecret>, ApiError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let text = value.to_str().map_err(|_| ApiError::invalid_token())?;
        let Some((scheme, token)) = text.split_once(' ') else {
            return Err(ApiError::invalid_token());
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "unsupported_authorization",
                "only `Authorization: Bearer TOKEN` is supported",
            ));
        }
        return Ok(Some(TokenSecret::new(token.trim().to_owned())));
    }
    if let Some(value) = headers.get(TOKEN_HEADER) {
        let text = value.to_str().map_err(|_| ApiError::invalid_token())?;
        return Ok(Some(TokenSecret::new(text.trim().to_owned())));
    }
    Ok(None)
}
