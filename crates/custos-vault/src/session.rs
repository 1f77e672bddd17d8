//! The broker's own session with Vault.
//!
//! A session is a vaultrs client holding a Vault token and what is known of the token's
//! lifetime. Requests take the current session. When two thirds of its lifetime have
//! passed, it is renewed (or, when renewal is refused or impossible, replaced by a fresh
//! login) by whichever comes first: a request, or the keeper task that wakes up for it so
//! that an idle broker's token does not lapse. Refreshing holds a lock and re-checks after
//! taking it, so however many requests arrive at once, Vault sees one renewal or login.
//! A token given as a file is re-read when the file changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use custos_core::BackendError;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use zeroize::Zeroizing;

use crate::error::{map_error, refused_login};

/// How the broker proves itself to Vault.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VaultAuth {
    /// A Vault token read from a file, re-read whenever the file changes.
    TokenFile(PathBuf),
    /// AppRole: role id and secret id read from files at every login.
    AppRole {
        mount: String,
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
    /// Kubernetes auth with the broker's own service-account token, read at every login
    /// (the kubelet rotates it).
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl VaultAuth {
    fn method(&self) -> &'static str {
        match self {
            VaultAuth::TokenFile(_) => "token",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// Where Vault is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VaultConnection {
    pub address: String,
    pub namespace: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Development only: accept any server certificate.
    pub skip_tls_verify: bool,
    /// Longest wait for one Vault call.
    pub timeout: Duration,
    pub auth: VaultAuth,
}

/// One token and what is known of its lifetime.
struct Session {
    client: Arc<VaultClient>,
    /// When to renew: two thirds into the token's lifetime; `None` for a token that does
    /// not expire.
    renew_at: Option<Instant>,
    /// When the token stops working, if it expires.
    expires_at: Option<Instant>,
    /// The lifetime the token was last granted.
    lifetime: Option<Duration>,
    renewable: bool,
    /// Modification time of the token file the token was read from.
    token_file_modified: Option<SystemTime>,
}

/// The current session, and the lock that lets one refresh run at a time. One manager
/// serves every mount that logs in to the same Vault the same way, so a single-use AppRole
/// secret id or one Vault token is enough for all of them.
pub struct SessionManager {
    connection: VaultConnection,
    current: RwLock<Option<Arc<Session>>>,
    /// Held by the refresh in progress; owned, so that the refresh task holds it.
    refresh: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the keeper when the session changes, so that it plans for the new lifetime.
    changed: Arc<tokio::sync::Notify>,
    /// The last failed refresh, shared with the callers that queued behind it.
    last_failure: std::sync::Mutex<Option<(Instant, BackendError)>>,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SessionManager")
            .field("address", &self.connection.address)
            .field("auth", &self.connection.auth)
            .finish_non_exhaustive()
    }
}

/// How long the keeper waits before trying again when there is no session (Vault down or
/// a credential refused), and how soon a refresh that failed is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// How long a failed refresh answers for the callers that queued behind it.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// How often the keeper looks at a token that never expires (its file may change).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(60);

impl SessionManager {
    /// A manager for `connection`, with the keeper task that renews its token before it
    /// expires even while no request comes (it ends when the manager is dropped). Call it
    /// inside the Tokio runtime.
    pub fn start(connection: VaultConnection) -> Arc<Self> {
        if connection.skip_tls_verify {
            tracing::warn!(
                address = %connection.address,
                "VAULT TLS VERIFICATION IS OFF: any server can pose as this Vault; use only \
                 for development"
            );
        }
        let manager = Arc::new(Self {
            connection,
            current: RwLock::new(None),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
            changed: Arc::new(tokio::sync::Notify::new()),
            last_failure: std::sync::Mutex::new(None),
        });
        spawn_keeper(&manager);
        manager
    }

    pub fn connection(&self) -> &VaultConnection {
        &self.connection
    }

    /// A client with a valid token, renewing or logging in first when needed.
    ///
    /// The refresh runs in a task of its own that holds the lock: a caller that gives up
    /// (its client went away, its request timed out) neither cancels the refresh nor lets
    /// another one start beside it, and the callers queued behind it share its outcome.
    pub async fn client(self: &Arc<Self>) -> Result<Arc<VaultClient>, BackendError> {
        if let Some(session) = self.usable() {
            return Ok(session.client.clone());
        }

        let refreshing = Arc::clone(&self.refresh).lock_owned().await;
        if let Some(session) = self.usable() {
            return Ok(session.client.clone());
        }
        if let Some(error) = self.recent_failure() {
            return Err(error);
        }
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            let _refreshing = refreshing;
            manager.refresh_and_store().await
        })
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::Internal(
                "the Vault login task failed".to_owned(),
            ))
        })
    }

    /// Refreshes the session and records the outcome for everyone.
    async fn refresh_and_store(&self) -> Result<Arc<VaultClient>, BackendError> {
        let previous = self.snapshot();
        let session = match self.refresh_session().await {
            Ok(session) => {
                *self.failure_slot() = None;
                Arc::new(session)
            }
            Err(error) => {
                *self.failure_slot() = Some((Instant::now(), error.clone()));
                // A token that still works keeps serving while Vault is unreachable; the
                // refresh is tried again shortly, and no later than the token's end.
                let now = Instant::now();
                let still_valid = previous.as_ref().filter(|previous| {
                    previous
                        .expires_at
                        .is_none_or(|expires_at| now < expires_at)
                });
                let Some(previous) = still_valid else {
                    return Err(error);
                };
                tracing::warn!(%error, "cannot refresh the broker's Vault token; using it \
                    until it expires");
                let retry_at = now + RETRY_INTERVAL;
                Arc::new(Session {
                    client: previous.client.clone(),
                    renew_at: Some(
                        previous
                            .expires_at
                            .map_or(retry_at, |expires_at| retry_at.min(expires_at)),
                    ),
                    expires_at: previous.expires_at,
                    lifetime: previous.lifetime,
                    renewable: previous.renewable,
                    token_file_modified: previous.token_file_modified,
                })
            }
        };
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(session.clone());
        self.changed.notify_one();
        Ok(session.client.clone())
    }

    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<(Instant, BackendError)>> {
        self.last_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The error of a refresh that failed just now, if any.
    fn recent_failure(&self) -> Option<BackendError> {
        self.failure_slot()
            .as_ref()
            .filter(|(failed_at, _)| failed_at.elapsed() < FAILURE_HOLD)
            .map(|(_, error)| error.clone())
    }

    /// Forgets the session whose client is `failed` (Vault no longer accepts its token),
    /// so that the next caller logs in again. A session that already replaced it is kept.
    pub fn invalidate(&self, failed: &Arc<VaultClient>) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current
            .as_ref()
            .is_some_and(|session| Arc::ptr_eq(&session.client, failed))
        {
            *current = None;
        }
    }

    fn next_refresh_in(&self) -> Duration {
        match self.snapshot() {
            None => RETRY_INTERVAL,
            Some(session) => match session.renew_at {
                None => IDLE_CHECK_INTERVAL,
                Some(renew_at) => renew_at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100)),
            },
        }
    }

    fn snapshot(&self) -> Option<Arc<Session>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn usable(&self) -> Option<Arc<Session>> {
        let session = self.snapshot()?;
        let due = session
            .renew_at
            .is_some_and(|renew_at| Instant::now() >= renew_at);
        if due || self.token_file_changed(&session) {
            return None;
        }
        Some(session)
    }

    fn token_file_changed(&self, session: &Session) -> bool {
        match &self.connection.auth {
            VaultAuth::TokenFile(path) => modified_time(path) != session.token_file_modified,
            _ => false,
        }
    }

    /// Renews the current token when that can work, and logs in otherwise.
    async fn refresh_session(&self) -> Result<Session, BackendError> {
        if let Some(previous) = self.snapshot() {
            if previous.renewable && !self.token_file_changed(&previous) {
                match self.renew(&previous).await {
                    Ok(Some(session)) => return Ok(session),
                    Ok(None) => {}
                    // Vault refused: the token is gone or at its end; a login may work.
                    Err(
                        BackendError::PermissionDenied(reason) | BackendError::InvalidInput(reason),
                    ) => {
                        tracing::warn!(%reason, "Vault refused to renew the broker's token; \
                            logging in again");
                    }
                    // Vault did not answer: a login would not either.
                    Err(error) => return Err(error),
                }
            }
        }
        self.login().await
    }

    fn client_with_token(&self, token: &str) -> Result<VaultClient, BackendError> {
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(self.connection.address.as_str())
            .token(token)
            .timeout(Some(self.connection.timeout))
            .verify(!self.connection.skip_tls_verify);
        if let Some(ca_file) = &self.connection.ca_file {
            settings.ca_certs(vec![ca_file.display().to_string()]);
        }
        if let Some(namespace) = &self.connection.namespace {
            settings.namespace(Some(namespace.clone()));
        }
        let settings = settings.build().map_err(|error| {
            BackendError::Unavailable(format!("invalid Vault client settings: {error}"))
        })?;
        VaultClient::new(settings).map_err(map_error)
    }

    async fn login(&self) -> Result<Session, BackendError> {
        let started = Instant::now();
        let mut token_file_modified = None;
        let (token, lifetime, renewable) = match &self.connection.auth {
            VaultAuth::TokenFile(path) => {
                token_file_modified = modified_time(path);
                let token = read_credential_file(path)?;
                let client = self.client_with_token(&token)?;
                let info = vaultrs::token::lookup_self(&client)
                    .await
                    .map_err(|error| {
                        refused_login(
                            error,
                            "token",
                            "the token in the file is expired, revoked or unknown; replace it",
                        )
                    })?;
                let lifetime = (info.ttl > 0).then(|| Duration::from_secs(info.ttl));
                (token, lifetime, info.renewable)
            }
            VaultAuth::AppRole {
                mount,
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_credential_file(role_id_file)?;
                let secret_id = read_credential_file(secret_id_file)?;
                let client = self.client_with_token("")?;
                let auth = vaultrs::auth::approle::login(&client, mount, &role_id, &secret_id)
                    .await
                    .map_err(|error| {
                        refused_login(
                            error,
                            "AppRole",
                            "check the role id and secret id files and the secret id's expiry",
                        )
                    })?;
                let lifetime =
                    (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
                (Zeroizing::new(auth.client_token), lifetime, auth.renewable)
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_credential_file(jwt_file)?;
                let client = self.client_with_token("")?;
                let auth = vaultrs::auth::kubernetes::login(&client, mount, role, &jwt)
                    .await
                    .map_err(|error| {
                        refused_login(
                            error,
                            "Kubernetes",
                            "check the Vault role's bound service account and namespace",
                        )
                    })?;
                let lifetime =
                    (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
                (Zeroizing::new(auth.client_token), lifetime, auth.renewable)
            }
        };

        tracing::info!(
            address = %self.connection.address,
            method = self.connection.auth.method(),
            ttl_seconds = lifetime.map(|lifetime| lifetime.as_secs()),
            renewable,
            "logged in to Vault"
        );
        Ok(Session {
            client: Arc::new(self.client_with_token(&token)?),
            renew_at: lifetime.map(|lifetime| started + lifetime * 2 / 3),
            expires_at: lifetime.map(|lifetime| started + lifetime),
            lifetime,
            renewable,
            token_file_modified,
        })
    }

    /// Renews the session's token. `Ok(None)` means renewal worked but the token is near
    /// its maximum lifetime, so a fresh login serves better (a token file cannot log in,
    /// so its token is renewed as far as it goes).
    async fn renew(&self, previous: &Session) -> Result<Option<Session>, BackendError> {
        let started = Instant::now();
        let auth = vaultrs::token::renew_self(previous.client.as_ref(), None)
            .await
            .map_err(map_error)?;
        let granted = Duration::from_secs(auth.lease_duration);
        let can_log_in = !matches!(self.connection.auth, VaultAuth::TokenFile(_));
        let near_maximum = previous
            .lifetime
            .is_some_and(|lifetime| granted < lifetime / 3);
        if can_log_in && near_maximum {
            tracing::info!(
                ttl_seconds = granted.as_secs(),
                "the broker's Vault token is near its maximum lifetime; logging in again"
            );
            return Ok(None);
        }
        if granted.is_zero() {
            return Err(BackendError::PermissionDenied(
                "the broker's Vault token reached its maximum lifetime; replace the token \
                 file"
                    .to_owned(),
            ));
        }

        tracing::info!(ttl_seconds = granted.as_secs(), "renewed the Vault token");
        Ok(Some(Session {
            client: previous.client.clone(),
            renew_at: Some(started + granted * 2 / 3),
            expires_at: Some(started + granted),
            lifetime: previous.lifetime.max(Some(granted)),
            renewable: auth.renewable,
            token_file_modified: previous.token_file_modified,
        }))
    }
}

fn modified_time(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
}

fn read_credential_file(path: &Path) -> Result<Zeroizing<String>, BackendError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
        BackendError::Unavailable(format!(
            "cannot read the Vault credential file {}: {error}",
            path.display()
        ))
    })?);
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// The session managers of one broker, one per distinct Vault connection and identity.
#[derive(Debug, Default)]
pub struct VaultSessions {
    managers: std::collections::HashMap<VaultConnection, Arc<SessionManager>>,
}

impl VaultSessions {
    /// The manager for `connection`, started on first use.
    pub fn for_connection(&mut self, connection: &VaultConnection) -> Arc<SessionManager> {
        self.managers
            .entry(connection.clone())
            .or_insert_with(|| SessionManager::start(connection.clone()))
            .clone()
    }
}

/// Starts the task that renews `manager`'s token before it expires. It holds the manager
/// only weakly, and ends once the manager is dropped.
fn spawn_keeper(manager: &Arc<SessionManager>) {
    let changed = Arc::clone(&manager.changed);
    let manager = Arc::downgrade(manager);
    tokio::spawn(async move {
        loop {
            let Some(wait) = manager.upgrade().map(|manager| manager.next_refresh_in()) else {
                return;
            };
            let woken_early = tokio::select! {
                () = tokio::time::sleep(wait) => false,
                () = changed.notified() => true,
            };
            if woken_early {
                // The session changed: plan again for its lifetime.
                continue;
            }

            let Some(sessions) = manager.upgrade() else {
                return;
            };
            if let Err(error) = sessions.client().await {
                tracing::warn!(
                    address = %sessions.connection.address,
                    %error,
                    "cannot log in to Vault; will retry"
                );
            }
        }
    });
}
