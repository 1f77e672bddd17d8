//! Leases: every secret read through the broker is lent for a while, renewable up to a
//! maximum, and revocable one by one, by path prefix or by principal.
//!
//! A lease never outlives the token that took it, nor the backend's own lease when the
//! backend has one (Vault dynamic credentials): renewing renews the native lease, and
//! revoking or expiring revokes it. The sweeper expires due leases and tokens.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use custos_core::policy::Capability;
use custos_core::{BackendError, MountTable, NativeLease, SecretPath};
use custos_storage::approle::AppRoleRepository;
use custos_storage::leases::{LeaseRepository, LeaseRow, LeaseSelector};
use custos_storage::tokens::TokenRepository;
use custos_storage::{unix_micros_now, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::audit_trail::AuditDraft;
use crate::error::ApiError;
use crate::identity::system_path;
use crate::token::{micros, Principal};
use crate::wire::rfc3339;
use crate::AppState;

/// Header with the lease id of a read.
pub const LEASE_ID_HEADER: &str = "x-custos-lease-id";
/// Header with the lease's remaining seconds.
pub const LEASE_TTL_HEADER: &str = "x-custos-lease-ttl";

/// A lease as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    pub lease_id: String,
    pub path: String,
    pub mount: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub principal: String,
    pub issued_at: String,
    pub expires_at: String,
    pub ttl_seconds: u64,
    pub renewable: bool,
    /// `active`, `expired` or `revoked`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoke_reason: Option<String>,
}

impl LeaseView {
    pub fn of(row: &LeaseRow, now: i64) -> Self {
        let state = match (&row.revoked_at, &row.revoke_reason) {
            (Some(_), Some(reason)) if reason == "expired" => "expired",
            (Some(_), _) => "revoked",
            (None, _) if row.expires_at <= now => "expired",
            (None, _) => "active",
        };
        let ttl_seconds = if state == "active" {
            u64::try_from((row.expires_at - now) / 1_000_000).unwrap_or(0)
        } else {
            0
        };
        Self {
            lease_id: row.lease_id.clone(),
            path: row.path.clone(),
            mount: row.mount.clone(),
            version: row.version,
            principal: row.principal.clone(),
            issued_at: rfc3339(moment(row.issued_at)),
            expires_at: rfc3339(moment(row.expires_at)),
            ttl_seconds,
            renewable: row.renewable,
            state,
            revoke_reason: row.revoke_reason.clone(),
        }
    }
}

fn moment(micros: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Issues, renews and revokes leases.
#[derive(Debug, Clone)]
pub struct LeaseManager {
    repository: LeaseRepository,
    tokens: TokenRepository,
    mounts: Arc<MountTable>,
    /// The lease writer; `None` when new leases go into the commit of their read's audit
    /// record instead (fail-closed audit).
    writer: Option<mpsc::Sender<PendingLease>>,
}

/// A lease waiting for the batch that stores it.
#[derive(Debug)]
struct PendingLease {
    row: LeaseRow,
    stored: oneshot::Sender<Result<(), String>>,
}

/// Longest wait for a new lease to be stored before the read is refused.
const LEASE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl LeaseManager {
    /// `stored_with_audit`: whether the audit log stores each read's lease with its
    /// record (`AuditLog::stores_leases`). Otherwise a lease writer stores new leases in
    /// batches: every read takes a lease, and one durable commit per read would cap read
    /// throughput at the disk's sync rate.
    pub fn new(
        repository: LeaseRepository,
        tokens: TokenRepository,
        mounts: Arc<MountTable>,
        stored_with_audit: bool,
    ) -> Self {
        let writer = (!stored_with_audit).then(|| {
            let (writer, pending) = mpsc::channel::<PendingLease>(8192);
            tokio::spawn(write_leases(repository.clone(), pending));
            writer
        });
        Self {
            repository,
            tokens,
            mounts,
            writer,
        }
    }

    /// Lends a secret read from `mount_path` to `principal`. The lease becomes durable
    /// with the request's audit record when the audit log stores leases (the response
    /// waits for that record anyway, so the read costs one commit, and the lease exists
    /// exactly when the record of its read does); otherwise this waits for the lease
    /// writer.
    pub async fn issue(
        &self,
        principal: &Principal,
        mount_path: &SecretPath,
        path: &SecretPath,
        version: u64,
        native: Option<&NativeLease>,
        draft: &AuditDraft,
    ) -> Result<LeaseView, StorageError> {
        let limits = self
            .mounts
            .route(path)
            .map(|(mount, _)| mount.lease)
            .unwrap_or_default();
        let now = unix_micros_now();
        let mut expires_at = now.saturating_add(micros(limits.ttl));
        let mut max_expires_at = now.saturating_add(micros(limits.max_ttl));
        // Never outlive the token, nor the backend's own lease.
        if let Some(token_end) = principal.max_expires_at.or(principal.expires_at) {
            max_expires_at = max_expires_at.min(token_end);
        }
        if let Some(token_now) = principal.expires_at {
            expires_at = expires_at.min(token_now);
        }
        if let Some(native) = native {
            expires_at = expires_at.min(now.saturating_add(micros(native.ttl)));
        }
        expires_at = expires_at.min(max_expires_at);

        let row = LeaseRow {
            lease_id: format!("lease_{}", uuid::Uuid::new_v4().simple()),
            token_accessor: principal.accessor.clone(),
            principal: principal.name.clone(),
            mount: mount_path.to_string(),
            path: path.to_string(),
            version: Some(version),
            issued_at: now,
            expires_at,
            max_expires_at,
            renewable: native.is_none_or(|native| native.renewable),
            revoked_at: None,
            revoke_reason: None,
            native_lease_id: native.map(|native| native.id.clone()),
        };
        let view = LeaseView::of(&row, now);
        let Some(writer) = &self.writer else {
            draft.update(|fields| fields.pending_leases.push(row));
            return Ok(view);
        };

        let (stored, answer) = oneshot::channel();
        let unavailable = |reason: &str| {
            StorageError::Corrupt(format!("the lease could not be stored: {reason}"))
        };
        let pending = PendingLease {
            row: row.clone(),
            stored,
        };
        let outcome = match writer.try_send(pending) {
            Err(_) => Err(unavailable("too many leases are waiting")),
            Ok(()) => match tokio::time::timeout(LEASE_WRITE_TIMEOUT, answer).await {
                Ok(Ok(Ok(()))) => Ok(view),
                Ok(Ok(Err(reason))) => Err(unavailable(&reason)),
                Ok(Err(_)) => Err(unavailable("the lease writer stopped")),
                Err(_) => Err(unavailable("the database did not answer in time")),
            },
        };
        if outcome.is_err() {
            // A credential the client will never receive must not stay alive in its
            // backend.
            self.revoke_native(&row).await;
        }
        outcome
    }

    /// Revokes the leases a selector takes, and their native leases.
    pub async fn revoke_many(
        &self,
        selector: &LeaseSelector,
        reason: &str,
    ) -> Result<Vec<LeaseRow>, StorageError> {
        let revoked = self
            .repository
            .revoke_many(selector, reason, unix_micros_now())
            .await?;
        for lease in &revoked {
            self.revoke_native(lease).await;
        }
        Ok(revoked)
    }

    /// Revokes the backend's own lease behind `lease`, if it has one; failures are logged.
    pub async fn revoke_native(&self, lease: &LeaseRow) {
        let Some(native_id) = &lease.native_lease_id else {
            return;
        };
        let Ok(path) = SecretPath::parse(&lease.path) else {
            return;
        };
        if let Some((mount, _)) = self.mounts.route(&path) {
            if let Err(error) = mount.backend.revoke_native_lease(native_id).await {
                tracing::error!(lease_id = %lease.lease_id, %error,
                    "the backend's own lease could not be revoked");
            }
        }
    }

    /// Expires due leases and deletes expired tokens (revoking what they held). Returns
    /// how many leases and tokens ended.
    pub async fn sweep(&self) -> Result<(usize, usize), StorageError> {
        let now = unix_micros_now();
        let expired = self
            .revoke_many(&LeaseSelector::ExpiredBy(now), "expired")
            .await?;
        let tokens = self.tokens.delete_expired(now).await?;
        if !tokens.is_empty() {
            self.revoke_many(&LeaseSelector::Tokens(tokens.clone()), "token expired")
                .await?;
        }
        Ok((expired.len(), tokens.len()))
    }

    pub fn repository(&self) -> &LeaseRepository {
        &self.repository
    }
}

/// Stores pending leases in batches until every sender is gone.
async fn write_leases(repository: LeaseRepository, mut pending: mpsc::Receiver<PendingLease>) {
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match pending.try_recv() {
                Ok(lease) => batch.push(lease),
                Err(_) => break,
            }
        }

        let (rows, waiting): (Vec<LeaseRow>, Vec<_>) = batch
            .into_iter()
            .map(|lease| (lease.row, lease.stored))
            .unzip();
        let outcome = repository
            .insert_batch(rows)
            .await
            .map_err(|error| error.to_string());
        for stored in waiting {
            let _ = stored.send(outcome.clone());
        }
    }
}

/// Runs the sweeper every `interval` until the process ends: it expires due leases and
/// tokens, and deletes AppRole secret ids past their expiry.
pub fn spawn_sweeper(
    manager: LeaseManager,
    approles: AppRoleRepository,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            match manager.sweep().await {
                Ok((0, 0)) => {}
                Ok((leases, tokens)) => {
                    tracing::info!(leases, tokens, "expired leases and tokens swept");
                }
                Err(error) => tracing::warn!(%error, "lease sweep failed; will retry"),
            }
            match approles.delete_expired_secret_ids(unix_micros_now()).await {
                Ok(0) => {}
                Ok(secret_ids) => tracing::info!(secret_ids, "expired AppRole secret ids swept"),
                Err(error) => tracing::warn!(%error, "secret id sweep failed; will retry"),
            }
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    lease_id: String,
    /// Requested extension in seconds; default: the mount's lease TTL.
    #[serde(default)]
    increment_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    lease_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokePrefixBody {
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokePrincipalBody {
    principal: String,
}

/// `GET /v1/leases/{lease_id}`: a lease's state, for its holder or an admin.
pub async fn lookup(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(draft): Extension<AuditDraft>,
    Path(lease_id): Path<String>,
) -> Result<Response, ApiError> {
    draft.update(|fields| fields.lease_id = Some(lease_id.clone()));
    let lease = owned_lease(&state, &principal, &lease_id).await?;
    Ok(Json(LeaseView::of(&lease, unix_micros_now())).into_response())
}

/// `POST /v1/leases/renew`.
pub async fn renew(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(draft): Extension<AuditDraft>,
    body: Result<Json<RenewBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(crate::secrets::json_error)?;
    draft.update(|fields| fields.lease_id = Some(body.lease_id.clone()));
    let lease = owned_lease(&state, &principal, &body.lease_id).await?;
    let now = unix_micros_now();
    let view = LeaseView::of(&lease, now);
    if view.state != "active" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "lease_not_active",
            format!(
                "the lease is {}; read the secret again for a new one",
                view.state
            ),
        ));
    }
    if !lease.renewable {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "lease_not_renewable",
            "this lease cannot be renewed; read the secret again before it expires",
        ));
    }

    let path = SecretPath::parse(&lease.path).map_err(|_| ApiError::internal())?;
    let (mount, _) = state.mounts.route(&path).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "lease_not_active",
            "the lease's mount is gone",
        )
    })?;
    let increment = body
        .increment_seconds
        .map_or(mount.lease.ttl, Duration::from_secs);
    let mut expires_at = now
        .saturating_add(micros(increment))
        .min(lease.max_expires_at);
    if let Some(native_id) = &lease.native_lease_id {
        let granted = match mount.backend.renew_native_lease(native_id, increment).await {
            Ok(granted) => granted,
            Err(BackendError::NotFound) => {
                // The backend already ended its lease (it expired there, or someone
                // revoked it): the secret no longer works, so neither does this lease.
                state
                    .leases
                    .repository()
                    .revoke(&lease.lease_id, "backend lease ended", now)
                    .await
                    .map_err(store_error)?;
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "lease_not_active",
                    "the backend's own lease has ended, so the secret no longer works; \
                     read the secret again for a new one",
                ));
            }
            Err(error) => return Err(error.into()),
        };
        expires_at = expires_at.min(now.saturating_add(micros(granted)));
    }

    if !state
        .leases
        .repository()
        .renew(&lease.lease_id, expires_at, now)
        .await
        .map_err(store_error)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "lease_not_active",
            "the lease ended while it was being renewed",
        ));
    }
    let renewed = state
        .leases
        .repository()
        .get(&lease.lease_id)
        .await
        .map_err(store_error)?
        .ok_or_else(ApiError::internal)?;
    Ok(Json(LeaseView::of(&renewed, unix_micros_now())).into_response())
}

/// `POST /v1/leases/revoke`: ends one lease (its holder's or, for an admin, any).
pub async fn revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(draft): Extension<AuditDraft>,
    body: Result<Json<RevokeBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(crate::secrets::json_error)?;
    draft.update(|fields| fields.lease_id = Some(body.lease_id.clone()));
    let lease = owned_lease(&state, &principal, &body.lease_id).await?;
    let revoked = state
        .leases
        .repository()
        .revoke(&lease.lease_id, "revoked", unix_micros_now())
        .await
        .map_err(store_error)?;
    if revoked {
        state.leases.revoke_native(&lease).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/leases/revoke-prefix`: every active lease on the path and below (admin).
pub async fn revoke_prefix(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<RevokePrefixBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(crate::secrets::json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("leases"), Capability::Admin)?;
    let prefix = SecretPath::parse(&body.prefix)?;
    let revoked = state
        .leases
        .revoke_many(
            &LeaseSelector::PathPrefix(prefix.to_string()),
            "revoked by prefix",
        )
        .await
        .map_err(store_error)?;
    Ok(revoked_answer(&revoked))
}

/// `POST /v1/leases/revoke-principal`: everything one workload holds (admin): its tokens
/// (with the tokens they created) first, so that it cannot draw new leases meanwhile, then
/// every lease it or those tokens hold. Root tokens are never revoked this way.
pub async fn revoke_principal(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<RevokePrincipalBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(crate::secrets::json_error)?;
    state
        .policies
        .authorize(&principal, &system_path("leases"), Capability::Admin)?;
    if body.principal.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`principal` is empty",
        ));
    }

    let mut tokens = Vec::new();
    for accessor in state
        .tokens
        .accessors_of(&body.principal)
        .await
        .map_err(store_error)?
    {
        tokens.extend(
            state
                .tokens
                .revoke_tree(&accessor)
                .await
                .map_err(store_error)?,
        );
    }

    let mut revoked = state
        .leases
        .revoke_many(
            &LeaseSelector::Principal(body.principal),
            "revoked by principal",
        )
        .await
        .map_err(store_error)?;
    if !tokens.is_empty() {
        // Leases of child tokens issued under another principal name.
        revoked.extend(
            state
                .leases
                .revoke_many(&LeaseSelector::Tokens(tokens.clone()), "token revoked")
                .await
                .map_err(store_error)?,
        );
    }
    let mut answer = revoked_body(&revoked);
    answer["revoked_tokens"] = json!(tokens.len());
    Ok(Json(answer).into_response())
}

fn revoked_answer(revoked: &[LeaseRow]) -> Response {
    Json(revoked_body(revoked)).into_response()
}

fn revoked_body(revoked: &[LeaseRow]) -> serde_json::Value {
    let ids: Vec<&str> = revoked
        .iter()
        .map(|lease| lease.lease_id.as_str())
        .collect();
    json!({ "revoked": ids.len(), "lease_ids": ids })
}

/// The lease, if `principal` holds it or may administer leases. Someone else's lease is
/// reported as not found, so lease ids cannot be probed.
async fn owned_lease(
    state: &AppState,
    principal: &Principal,
    lease_id: &str,
) -> Result<LeaseRow, ApiError> {
    let not_found = || ApiError::not_found("lease_not_found", "no such lease");
    let lease = state
        .leases
        .repository()
        .get(lease_id)
        .await
        .map_err(store_error)?
        .ok_or_else(not_found)?;
    let is_admin = state
        .policies
        .decide(principal, &system_path("leases"), Capability::Admin)
        .is_allowed();
    if lease.token_accessor != principal.accessor && !is_admin {
        return Err(not_found());
    }
    Ok(lease)
}

pub fn store_error(error: StorageError) -> ApiError {
    tracing::error!(%error, "the broker's database failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the broker's own database did not answer; retry shortly",
    )
}
