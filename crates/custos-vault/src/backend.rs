//! A Custos mount served from Vault: a KV engine (version 1 or 2), or a dynamic-secrets
//! engine such as `database`, whose every read mints a fresh credential under a Vault
//! lease.
//!
//! Field values: Vault stores JSON values. A string is the field's text; any other JSON
//! value (a number, an object) is shown as its JSON text. Writes send text fields as
//! strings and refuse binary ones, since Vault KV holds text.
//!
//! Versions: KV v2's version numbers are the versions Custos reports and audits. KV v1
//! keeps one version, reported as 1. A dynamic credential has no history; each read is a
//! new secret, reported as version 1, and identified by its lease.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use custos_core::{
    BackendError, DeleteRequest, ListEntry, NativeLease, Operation, SecretBackend, SecretData,
    SecretPath, SecretValue, SecretVersion, VersionMetadata, WriteOptions,
};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequestOptions};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use crate::error::{is_permission_denied, map_error};
use crate::lease::{RenewLeaseRequest, RevokeLeaseRequest};
use crate::session::{SessionManager, VaultConnection, VaultSessions};

/// How long one Vault call may take by default before the request is a 504.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the Vault mount behind a Custos mount is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultEngine {
    /// KV version 1: one unversioned value per path.
    KvVersion1,
    /// KV version 2: versioned, with soft delete and destroy.
    KvVersion2,
    /// A dynamic-secrets engine (database, AWS, ...): reading `creds/ROLE` returns a fresh
    /// credential with a Vault lease. Read-only.
    Dynamic,
}

impl VaultEngine {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultEngine::KvVersion1 => "kv-v1",
            VaultEngine::KvVersion2 => "kv-v2",
            VaultEngine::Dynamic => "dynamic",
        }
    }
}

/// Settings of one Custos mount served from Vault.
#[derive(Debug, Clone)]
pub struct VaultBackendSettings {
    pub connection: VaultConnection,
    /// Where the engine is mounted in Vault, such as `secret` or `database`.
    pub vault_mount: String,
    pub engine: VaultEngine,
}

/// A Custos mount backed by a Vault engine.
#[derive(Debug)]
pub struct VaultBackend {
    vault_mount: String,
    engine: VaultEngine,
    sessions: Arc<SessionManager>,
}

impl VaultBackend {
    /// Creates the backend on the broker's session for its connection (mounts on the same
    /// Vault with the same identity share one login); call it inside the Tokio runtime.
    pub fn new(settings: VaultBackendSettings, sessions: &mut VaultSessions) -> Self {
        Self {
            sessions: sessions.for_connection(&settings.connection),
            vault_mount: settings.vault_mount,
            engine: settings.engine,
        }
    }

    /// Logs in now, so that a wrong address or credential shows at start rather than at
    /// the first request.
    pub async fn connect(&self) -> Result<(), BackendError> {
        self.sessions.client().await.map(|_| ())
    }

    /// Runs `call` with a valid client. A 403 may mean that Vault no longer accepts the
    /// broker's token (Vault says "permission denied" for both); if the token's own lookup
    /// fails too, the broker logs in again and retries once.
    async fn with_client<T, F, Fut>(&self, call: F) -> Result<T, BackendError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = self.sessions.client().await?;
        match call(client.clone()).await {
            Err(error) if is_permission_denied(&error) => {
                // Only Vault's refusal of the token's own lookup says the token is gone; a
                // lookup that fails otherwise (Vault away) keeps the session.
                match vaultrs::token::lookup_self(client.as_ref()).await {
                    Err(lookup) if is_permission_denied(&lookup) => {}
                    _ => return Err(map_error(error)),
                }
                tracing::warn!("Vault no longer accepts the broker's token; logging in again");
                self.sessions.invalidate(&client);
                let client = self.sessions.client().await?;
                call(client).await.map_err(map_error)
            }
            other => other.map_err(map_error),
        }
    }

    fn unsupported(&self, operation: Operation) -> BackendError {
        BackendError::Unsupported {
            backend: format!("vault {}", self.engine.as_str()),
            operation,
        }
    }

    async fn read_kv2(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<SecretVersion, BackendError> {
        let mount = self.vault_mount.as_str();
        let response = self
            .with_client(|client| async move {
                let request = ReadSecretRequest::builder()
                    .mount(mount)
                    .path(path.as_str())
                    .version(version)
                    .build()
                    .expect("the read request has every required field");
                vaultrs::api::exec_with_result(client.as_ref(), request).await
            })
            .await
            .map_err(|error| match (error, version) {
                (BackendError::NotFound, Some(version)) => {
                    BackendError::VersionNotFound { version }
                }
                (error, _) => error,
            })?;
        Ok(SecretVersion {
            data: fields_of(response.data)?,
            metadata: VersionMetadata {
                version: response.metadata.version,
                created_at: parse_time(&response.metadata.created_time),
                deleted_at: None,
                destroyed: false,
            },
            native_lease: None,
        })
    }

    async fn read_unversioned(&self, path: &SecretPath) -> Result<SecretVersion, BackendError> {
        let mount = self.vault_mount.as_str();
        let response = self
            .with_client(|client| async move {
                vaultrs::kv1::get_raw(client.as_ref(), mount, path.as_str()).await
            })
            .await?;
        let native_lease = (!response.lease_id.is_empty()).then(|| NativeLease {
            id: response.lease_id.clone(),
            ttl: Duration::from_secs(u64::try_from(response.lease_duration).unwrap_or(0)),
            renewable: response.renewable,
        });
        if let Some(lease) = &native_lease {
            tracing::info!(
                vault_lease_id = %lease.id,
                ttl_seconds = lease.ttl.as_secs(),
                "Vault issued a leased secret"
            );
        }
        Ok(SecretVersion {
            data: fields_of(response.data)?,
            metadata: VersionMetadata {
                version: 1,
                created_at: OffsetDateTime::now_utc(),
                deleted_at: None,
                destroyed: false,
            },
            native_lease,
        })
    }

    async fn write_kv2(
        &self,
        path: &SecretPath,
        fields: &HashMap<&str, &str>,
        check_and_set: Option<u64>,
    ) -> Result<VersionMetadata, BackendError> {
        let mount = self.vault_mount.as_str();
        let written = match check_and_set {
            None => {
                self.with_client(|client| async move {
                    vaultrs::kv2::set(client.as_ref(), mount, path.as_str(), fields).await
                })
                .await?
            }
            Some(expected) => {
                let cas = u32::try_from(expected).map_err(|_| {
                    BackendError::InvalidInput(format!(
                        "`cas` {expected} is larger than Vault accepts"
                    ))
                })?;
                let outcome = self
                    .with_client(|client| async move {
                        let options = SetSecretRequestOptions { cas };
                        vaultrs::kv2::set_with_options(
                            client.as_ref(),
                            mount,
                            path.as_str(),
                            fields,
                            options,
                        )
                        .await
                    })
                    .await;
                match outcome {
                    Err(BackendError::InvalidInput(reason)) if reason.contains("check-and-set") => {
                        let current = self.current_version(path).await?;
                        return Err(BackendError::CheckAndSetMismatch { expected, current });
                    }
                    other => other?,
                }
            }
        };
        Ok(VersionMetadata {
            version: written.version,
            created_at: parse_time(&written.created_time),
            deleted_at: None,
            destroyed: false,
        })
    }

    /// The newest version of a KV v2 secret, 0 when it does not exist.
    async fn current_version(&self, path: &SecretPath) -> Result<u64, BackendError> {
        let mount = self.vault_mount.as_str();
        let metadata = self
            .with_client(|client| async move {
                vaultrs::kv2::read_metadata(client.as_ref(), mount, path.as_str()).await
            })
            .await;
        match metadata {
            Ok(metadata) => Ok(metadata.current_version),
            Err(BackendError::NotFound) => Ok(0),
            Err(error) => Err(error),
        }
    }

    async fn delete_kv2(
        &self,
        path: &SecretPath,
        request: DeleteRequest,
    ) -> Result<(), BackendError> {
        let mount = self.vault_mount.as_str();
        let path_text = path.as_str();
        // Vault answers 204 even for a path that never existed; Custos says 404, as the
        // local store does.
        if self.current_version(path).await? == 0 {
            return Err(BackendError::NotFound);
        }
        match request {
            DeleteRequest::SoftDelete { versions } if versions.is_empty() => {
                self.with_client(|client| async move {
                    vaultrs::kv2::delete_latest(client.as_ref(), mount, path_text).await
                })
                .await
            }
            DeleteRequest::SoftDelete { versions } => {
                let versions = &versions;
                self.with_client(|client| async move {
                    vaultrs::kv2::delete_versions(
                        client.as_ref(),
                        mount,
                        path_text,
                        versions.clone(),
                    )
                    .await
                })
                .await
            }
            DeleteRequest::Destroy { versions } if versions.is_empty() => {
                self.with_client(|client| async move {
                    vaultrs::kv2::delete_metadata(client.as_ref(), mount, path_text).await
                })
                .await
            }
            DeleteRequest::Destroy { versions } => {
                let versions = &versions;
                self.with_client(|client| async move {
                    vaultrs::kv2::destroy_versions(
                        client.as_ref(),
                        mount,
                        path_text,
                        versions.clone(),
                    )
                    .await
                })
                .await
            }
        }
    }

    async fn delete_kv1(
        &self,
        path: &SecretPath,
        request: DeleteRequest,
    ) -> Result<(), BackendError> {
        let (DeleteRequest::SoftDelete { versions } | DeleteRequest::Destroy { versions }) =
            request;
        if !versions.is_empty() {
            return Err(kv1_has_no_versions());
        }
        self.read_unversioned(path).await?;
        let mount = self.vault_mount.as_str();
        self.with_client(|client| async move {
            vaultrs::kv1::delete(client.as_ref(), mount, path.as_str()).await
        })
        .await
    }
}

#[async_trait]
impl SecretBackend for VaultBackend {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn supports(&self, operation: Operation) -> bool {
        match self.engine {
            VaultEngine::KvVersion1 | VaultEngine::KvVersion2 => true,
            VaultEngine::Dynamic => operation == Operation::Read,
        }
    }

    async fn read(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<SecretVersion, BackendError> {
        match self.engine {
            VaultEngine::KvVersion2 => self.read_kv2(path, version).await,
            VaultEngine::KvVersion1 | VaultEngine::Dynamic => {
                if version.is_some_and(|version| version != 1) {
                    return Err(kv1_has_no_versions());
                }
                self.read_unversioned(path).await
            }
        }
    }

    async fn list(&self, prefix: Option<&SecretPath>) -> Result<Vec<ListEntry>, BackendError> {
        let mount = self.vault_mount.as_str();
        let folder = prefix
            .map(|prefix| format!("{prefix}/"))
            .unwrap_or_default();
        let folder = folder.as_str();
        let keys = match self.engine {
            VaultEngine::KvVersion2 => {
                self.with_client(|client| async move {
                    vaultrs::kv2::list(client.as_ref(), mount, folder).await
                })
                .await?
            }
            VaultEngine::KvVersion1 => {
                self.with_client(|client| async move {
                    vaultrs::kv1::list(client.as_ref(), mount, folder)
                        .await
                        .map(|response| response.data.keys)
                })
                .await?
            }
            VaultEngine::Dynamic => return Err(self.unsupported(Operation::List)),
        };
        let mut entries: Vec<ListEntry> = keys
            .into_iter()
            .map(|key| match key.strip_suffix('/') {
                Some(folder) => ListEntry::Folder(folder.to_owned()),
                None => ListEntry::Secret(key),
            })
            .collect();
        entries.sort();
        Ok(entries)
    }

    async fn write(
        &self,
        path: &SecretPath,
        data: SecretData,
        options: WriteOptions,
    ) -> Result<VersionMetadata, BackendError> {
        let fields = text_fields(&data)?;
        match self.engine {
            VaultEngine::KvVersion2 => self.write_kv2(path, &fields, options.check_and_set).await,
            VaultEngine::KvVersion1 => {
                if options.check_and_set.is_some() {
                    return Err(BackendError::InvalidInput(
                        "check-and-set needs KV version 2; this Vault mount runs version 1"
                            .to_owned(),
                    ));
                }
                let mount = self.vault_mount.as_str();
                let fields = &fields;
                self.with_client(|client| async move {
                    vaultrs::kv1::set(client.as_ref(), mount, path.as_str(), fields).await
                })
                .await?;
                Ok(VersionMetadata {
                    version: 1,
                    created_at: OffsetDateTime::now_utc(),
                    deleted_at: None,
                    destroyed: false,
                })
            }
            VaultEngine::Dynamic => Err(self.unsupported(Operation::Write)),
        }
    }

    async fn delete(&self, path: &SecretPath, request: DeleteRequest) -> Result<(), BackendError> {
        match self.engine {
            VaultEngine::KvVersion2 => self.delete_kv2(path, request).await,
            VaultEngine::KvVersion1 => self.delete_kv1(path, request).await,
            VaultEngine::Dynamic => Err(self.unsupported(Operation::Delete)),
        }
    }

    async fn renew_native_lease(
        &self,
        lease_id: &str,
        increment: Duration,
    ) -> Result<Duration, BackendError> {
        let answer = self
            .with_client(|client| async move {
                let request = RenewLeaseRequest {
                    lease_id: lease_id.to_owned(),
                    increment: increment.as_secs(),
                };
                vaultrs::api::exec_with_no_result(client.as_ref(), request).await
            })
            .await
            .map_err(lease_error)?;
        tracing::info!(
            vault_lease_id = %answer.lease_id,
            ttl_seconds = answer.lease_duration,
            renewable = answer.renewable,
            "renewed a Vault lease"
        );
        Ok(Duration::from_secs(answer.lease_duration))
    }

    async fn revoke_native_lease(&self, lease_id: &str) -> Result<(), BackendError> {
        self.with_client(|client| async move {
            let request = RevokeLeaseRequest {
                lease_id: lease_id.to_owned(),
            };
            vaultrs::api::exec_with_empty(client.as_ref(), request).await
        })
        .await
        .map_err(lease_error)?;
        tracing::info!(vault_lease_id = %lease_id, "revoked a Vault lease");
        Ok(())
    }
}

/// Vault answers 400 "lease not found", "lease expired" or "lease not found or lease is
/// not renewable" for a lease it already ended.
fn lease_error(error: BackendError) -> BackendError {
    match error {
        BackendError::InvalidInput(reason)
            if reason.contains("lease not found") || reason.contains("lease expired") =>
        {
            BackendError::NotFound
        }
        other => other,
    }
}

fn kv1_has_no_versions() -> BackendError {
    BackendError::InvalidInput(
        "this Vault mount keeps no versions (KV version 1 or dynamic secrets); leave out \
         `version`"
            .to_owned(),
    )
}

fn fields_of(data: Value) -> Result<SecretData, BackendError> {
    let Value::Object(map) = data else {
        return Err(BackendError::Internal(
            "Vault returned a secret that is not an object".to_owned(),
        ));
    };
    let fields: BTreeMap<String, SecretValue> = map
        .into_iter()
        .map(|(name, value)| {
            let bytes = match value {
                Value::String(text) => text.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            (name, SecretValue::new(bytes))
        })
        .collect();
    SecretData::new(fields).map_err(|error| {
        BackendError::Internal(format!(
            "Vault returned a secret Custos cannot show: {error}"
        ))
    })
}

/// The fields as text, borrowed so that no copy of a value outlives the request's
/// zeroizing `SecretData`.
fn text_fields(data: &SecretData) -> Result<HashMap<&str, &str>, BackendError> {
    data.fields()
        .iter()
        .map(|(name, value)| match value.as_text() {
            Some(text) => Ok((name.as_str(), text)),
            None => Err(BackendError::InvalidInput(format!(
                "field `{name}` is binary; Vault KV stores text, so send it base64-encoded \
                 as text"
            ))),
        })
        .collect()
}

fn parse_time(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|_| OffsetDateTime::now_utc())
}
