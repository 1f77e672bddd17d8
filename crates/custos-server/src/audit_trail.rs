//! What a request contributes to its audit record while it is handled.
//!
//! The `observe` middleware creates an [`AuditDraft`] for every audited request and
//! finishes it into a record after the response is built; authentication and handlers
//! fill in what only they know (the principal, the version served). Keeping one draft per
//! request is what makes "exactly one record per request" hold whatever path the request
//! takes through the code.

use std::sync::{Arc, Mutex};

use axum::http::Method;
use custos_audit::{AuditRecord, Outcome};
use custos_core::{MountTable, SecretPath};
use custos_storage::leases::LeaseRow;

/// Longest raw path kept for a request whose path was refused.
const MAX_REQUESTED_PATH: usize = 512;

/// The fields a request gathers before its record is written.
#[derive(Debug, Default, Clone)]
pub struct DraftFields {
    pub principal: Option<String>,
    pub auth_method: Option<String>,
    /// Hashed with the audit key when the record is finished.
    pub token_accessor: Option<String>,
    pub role: Option<String>,
    pub lease_id: Option<String>,
    pub token_hash: Option<String>,
    pub operation: String,
    pub mount: Option<String>,
    pub path: Option<String>,
    pub requested_path: Option<String>,
    pub version: Option<u64>,
    pub backend: Option<String>,
    /// Leases lent by this request, stored in the same commit as its record (when the
    /// audit log stores leases; see `LeaseManager::issue`).
    pub pending_leases: Vec<LeaseRow>,
}

/// A request's audit draft, shared by the middleware and the handlers.
#[derive(Debug, Clone, Default)]
pub struct AuditDraft(Arc<Mutex<DraftFields>>);

impl AuditDraft {
    /// A draft for a request to `route`, with what the URI alone tells.
    pub fn for_request(
        method: &Method,
        route: &str,
        raw_path: &str,
        query: Option<&str>,
        mounts: &MountTable,
    ) -> Self {
        let mut fields = DraftFields {
            operation: operation_of(method, route, query).to_owned(),
            ..DraftFields::default()
        };

        if route.starts_with("/v1/secrets") {
            let secret_path = raw_path.strip_prefix("/v1/secrets").unwrap_or_default();
            match SecretPath::parse(secret_path) {
                Ok(path) => {
                    if let Some((mount, _)) = mounts.route(&path) {
                        fields.mount = Some(mount.path.to_string());
                        fields.backend = Some(mount.backend.kind().to_owned());
                    }
                    fields.path = Some(path.to_string());
                }
                Err(_) => {
                    let mut requested: String =
                        secret_path.chars().take(MAX_REQUESTED_PATH).collect();
                    if requested.is_empty() {
                        requested.push('/');
                    }
                    fields.requested_path = Some(requested);
                }
            }
        }
        Self(Arc::new(Mutex::new(fields)))
    }

    /// Changes the draft.
    pub fn update(&self, change: impl FnOnce(&mut DraftFields)) {
        change(
            &mut self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
    }

    /// The finished record; `hash` turns the token accessor into its keyed hash.
    /// Takes the leases waiting to be stored with this request's record.
    pub fn take_leases(&self) -> Vec<LeaseRow> {
        let mut fields = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut fields.pending_leases)
    }

    pub fn finish(&self, finished: Finished, hash: impl Fn(&str) -> String) -> AuditRecord {
        let fields = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        AuditRecord {
            time: finished.time,
            request_id: finished.request_id,
            principal: fields.principal,
            auth_method: fields.auth_method,
            token_accessor_hash: fields.token_accessor.as_deref().map(hash),
            role: fields.role,
            token_hash: fields.token_hash,
            client_address: finished.client_address,
            method: finished.method,
            operation: fields.operation,
            mount: fields.mount,
            path: fields.path,
            requested_path: fields.requested_path,
            version: fields.version,
            backend: fields.backend,
            lease_id: fields.lease_id,
            outcome: Outcome::from_status(finished.status),
            error_code: finished.error_code,
            status: finished.status,
            latency_ms: finished.latency_ms,
        }
    }
}

/// What is known once the response exists.
#[derive(Debug)]
pub struct Finished {
    pub time: String,
    pub request_id: String,
    pub client_address: Option<String>,
    pub method: String,
    pub status: u16,
    pub error_code: Option<String>,
    pub latency_ms: f64,
}

/// The audit operation name of a request.
fn operation_of(method: &Method, route: &str, query: Option<&str>) -> &'static str {
    let listing = query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "list=true" || pair == "list=1")
    });
    match (route, method.as_str()) {
        (route, "GET") if route.starts_with("/v1/secrets") && listing => "list",
        (route, "GET") if route.starts_with("/v1/secrets") => "read",
        (route, "PUT") if route.starts_with("/v1/secrets") => "write",
        (route, "DELETE") if route.starts_with("/v1/secrets") => "delete",
        ("/v1/mounts", _) => "mounts.list",
        ("/v1/audit", _) => "audit.search",
        ("/v1/auth/kubernetes/login", _) => "login.kubernetes",
        ("/v1/auth/approle/login", _) => "login.approle",
        ("/v1/auth/token/create", _) => "token.create",
        ("/v1/auth/token/lookup-self", _) | ("/v1/auth/token/lookup", _) => "token.lookup",
        ("/v1/auth/token/renew-self", _) | ("/v1/auth/token/renew", _) => "token.renew",
        ("/v1/auth/token/revoke-self", _) | ("/v1/auth/token/revoke", _) => "token.revoke",
        (route, _) if route.starts_with("/v1/auth/approle/roles") => "approle.admin",
        ("/v1/leases/renew", _) => "lease.renew",
        ("/v1/leases/revoke", _) => "lease.revoke",
        ("/v1/leases/revoke-prefix", _) => "lease.revoke_prefix",
        ("/v1/leases/revoke-principal", _) => "lease.revoke_principal",
        ("/v1/leases/{lease_id}", _) => "lease.lookup",
        (route, "GET") if route.starts_with("/v1/policies") => "policy.read",
        (route, _) if route.starts_with("/v1/policies") => "policy.write",
        _ => "unknown",
    }
}
