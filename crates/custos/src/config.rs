//! The broker's configuration: a TOML file, then `CUSTOS_<SECTION>_<KEY>` environment
//! overrides, then validation that names the key at fault and how to fix it.
//!
//! `config/custos.toml` shows every option with a comment. Unknown keys are errors, in the
//! file and in the environment, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use custos_audit::sink::SinkTarget;
use custos_audit::FailMode;
use custos_core::policy::Policy;
use custos_core::LeaseLimits;
use custos_core::SecretPath;
use custos_local::KeySource;
use custos_server::identity::{PolicyDocument, RuleDocument};
use custos_server::kubernetes::KubernetesRole;
use custos_server::rate_limit::Limit;
use custos_storage::DatabaseUrl;
use custos_vault::{VaultAuth, VaultBackendSettings, VaultConnection, VaultEngine};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub keys: KeysConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub token_ttl: Option<String>,
    pub token_max_ttl: Option<String>,
    pub sweep_interval: Option<String>,
    pub failed_attempts_per_address: Option<u32>,
    pub failed_attempts_per_role: Option<u32>,
    pub failure_window: Option<String>,
    pub kubernetes: Option<KubernetesConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    pub api_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub reviewer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub roles: Vec<KubernetesRoleConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesRoleConfig {
    pub name: String,
    pub namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub token_ttl: Option<String>,
    pub token_max_ttl: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub path: String,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub key_file: Option<PathBuf>,
    pub head_file: Option<PathBuf>,
    #[serde(default = "default_fail_mode")]
    pub fail_mode: String,
    #[serde(default = "default_write_timeout")]
    pub write_timeout: String,
    #[serde(default)]
    pub sinks: Vec<AuditSinkConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSinkConfig {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_request_bytes: default_max_request_bytes(),
            request_timeout: default_request_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: DatabaseUrl,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: String,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    pub path: String,
    pub backend: String,
    #[serde(default)]
    pub read_only: bool,
    pub max_versions: Option<u64>,
    pub lease_ttl: Option<String>,
    pub lease_max_ttl: Option<String>,
    pub vault: Option<VaultMountConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultMountConfig {
    pub address: String,
    pub namespace: Option<String>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub skip_tls_verify: bool,
    /// Where the engine is mounted in Vault.
    pub mount: String,
    /// `kv-v2` (default), `kv-v1` or `dynamic`.
    pub engine: Option<String>,
    pub timeout: Option<String>,
    pub auth: VaultAuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultAuthConfig {
    pub method: String,
    pub token_file: Option<PathBuf>,
    pub role_id_file: Option<PathBuf>,
    pub secret_id_file: Option<PathBuf>,
    pub role: Option<String>,
    pub jwt_file: Option<PathBuf>,
    /// Where the auth method is mounted in Vault (default: `approle` or `kubernetes`).
    pub mount: Option<String>,
}

/// Default listen address of `custos server` and `custos dev`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8270";

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

fn default_max_request_bytes() -> u64 {
    1024 * 1024
}

fn default_request_timeout() -> String {
    "10s".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_fail_mode() -> String {
    "closed".to_owned()
}

fn default_write_timeout() -> String {
    "2s".to_owned()
}

fn default_log_format() -> String {
    "text".to_owned()
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// The configuration after validation, in the types the broker uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub max_request_bytes: usize,
    pub request_timeout: Duration,
    pub storage_url: DatabaseUrl,
    pub key_source: KeySource,
    pub log_format: LogFormat,
    pub log_level: String,
    pub audit: AuditSettingsConfig,
    pub auth: AuthSettingsConfig,
    pub policies: Vec<(Policy, PolicyDocument)>,
    pub mounts: Vec<MountSettings>,
}

/// The validated `[auth]` section.
#[derive(Debug, Clone)]
pub struct AuthSettingsConfig {
    pub token_ttl: Duration,
    pub token_max_ttl: Duration,
    pub sweep_interval: Duration,
    pub per_address: Limit,
    pub per_role: Limit,
    pub kubernetes: Option<KubernetesSettings>,
}

impl Default for AuthSettingsConfig {
    fn default() -> Self {
        let window = Duration::from_secs(60);
        Self {
            token_ttl: Duration::from_secs(15 * 60),
            token_max_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(10),
            per_address: Limit {
                failures: 10,
                window,
            },
            per_role: Limit {
                failures: 50,
                window,
            },
            kubernetes: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    pub api_url: String,
    pub ca_file: Option<PathBuf>,
    pub reviewer_token_file: Option<PathBuf>,
    pub roles: Vec<KubernetesRole>,
}

/// The validated `[audit]` section.
#[derive(Debug, Clone)]
pub struct AuditSettingsConfig {
    /// `None` when auditing is disabled.
    pub key_file: Option<PathBuf>,
    pub head_file: Option<PathBuf>,
    pub fail_mode: FailMode,
    pub write_timeout: Duration,
    pub sinks: Vec<SinkTarget>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct MountSettings {
    pub path: SecretPath,
    pub read_only: bool,
    pub max_versions: u64,
    pub lease: LeaseLimits,
    /// Set for mounts served from Vault; `None` for the local store.
    pub vault: Option<VaultBackendSettings>,
}

/// Environment variables that override configuration keys, `CUSTOS_<SECTION>_<KEY>`.
const ENVIRONMENT_OVERRIDES: &[&str] = &[
    "CUSTOS_SERVER_LISTEN",
    "CUSTOS_SERVER_MAX_REQUEST_BYTES",
    "CUSTOS_SERVER_REQUEST_TIMEOUT",
    "CUSTOS_STORAGE_URL",
    "CUSTOS_KEYS_FILE",
    "CUSTOS_KEYS_ENV",
    "CUSTOS_LOG_FORMAT",
    "CUSTOS_LOG_LEVEL",
];

/// Prefixes of configuration sections: a variable with one of them that is not a known
/// override is a typo, and refused.
const CONFIG_PREFIXES: &[&str] = &[
    "CUSTOS_SERVER_",
    "CUSTOS_STORAGE_",
    "CUSTOS_KEYS_",
    "CUSTOS_LOG_",
];

impl Settings {
    /// Reads `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        let environment: Vec<(String, String)> = std::env::vars().collect();
        Self::from_text(&text, path.parent(), &environment)
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// Parses configuration text; relative key file paths are taken from `base_directory`.
    pub fn from_text(
        text: &str,
        base_directory: Option<&Path>,
        environment: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut config: Config =
            toml::from_str(text).map_err(|error| anyhow::anyhow!(toml_error(&error, text)))?;
        apply_environment(&mut config, environment)?;
        validate(config, base_directory, environment)
    }
}

/// A TOML error without the source line or value it quotes: the line may hold a database
/// password, and serde's "invalid type" messages repeat the value.
fn toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim();
    let message = match message.find(", expected") {
        Some(position) if message.starts_with("invalid") => {
            let kind = message.split(':').next().unwrap_or("invalid value");
            format!("{kind}{}", &message[position..])
        }
        _ => message.to_owned(),
    };
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

fn apply_environment(config: &mut Config, environment: &[(String, String)]) -> anyhow::Result<()> {
    for (name, value) in environment {
        let value = value.clone();
        match name.as_str() {
            "CUSTOS_SERVER_LISTEN" => config.server.listen = value,
            "CUSTOS_SERVER_MAX_REQUEST_BYTES" => {
                config.server.max_request_bytes = value.parse().with_context(|| {
                    format!("environment variable {name} must be a whole number")
                })?;
            }
            "CUSTOS_SERVER_REQUEST_TIMEOUT" => config.server.request_timeout = value,
            "CUSTOS_STORAGE_URL" => config.storage.url = DatabaseUrl::new(value),
            // A key source chosen in the environment replaces the file's choice of source.
            "CUSTOS_KEYS_FILE" => {
                config.keys.env = None;
                config.keys.file = Some(PathBuf::from(value));
            }
            "CUSTOS_KEYS_ENV" => {
                config.keys.file = None;
                config.keys.env = Some(value);
            }
            "CUSTOS_LOG_FORMAT" => config.log.format = value,
            "CUSTOS_LOG_LEVEL" => config.log.level = value,
            other
                if CONFIG_PREFIXES
                    .iter()
                    .any(|prefix| other.starts_with(prefix)) =>
            {
                bail!(
                    "environment variable {other} is not a setting; known overrides are {}",
                    ENVIRONMENT_OVERRIDES.join(", ")
                );
            }
            _ => {}
        }
    }

    let file_and_env = ["CUSTOS_KEYS_FILE", "CUSTOS_KEYS_ENV"]
        .iter()
        .all(|variable| environment.iter().any(|(name, _)| name == variable));
    if file_and_env {
        bail!("CUSTOS_KEYS_FILE and CUSTOS_KEYS_ENV are both set; keep only one");
    }
    Ok(())
}

fn validate(
    config: Config,
    base_directory: Option<&Path>,
    environment: &[(String, String)],
) -> anyhow::Result<Settings> {
    let listen: SocketAddr = config.server.listen.parse().with_context(|| {
        format!(
            "`server.listen` is `{}`; use IP:PORT, such as {DEFAULT_LISTEN}",
            config.server.listen
        )
    })?;

    let max_request_bytes = config.server.max_request_bytes;
    if !(1024..=64 * 1024 * 1024).contains(&max_request_bytes) {
        bail!("`server.max_request_bytes` is {max_request_bytes}; use 1024 to 67108864");
    }
    let request_timeout = parse_duration(&config.server.request_timeout).with_context(|| {
        format!(
            "`server.request_timeout` is `{}`; use a duration such as 500ms, 10s or 1m",
            config.server.request_timeout
        )
    })?;

    let storage_url = DatabaseUrl::new(resolve_sqlite_path(
        config.storage.url.expose().trim(),
        base_directory,
    ));
    let url = storage_url.expose();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        bail!(
            "`storage.url` must start with sqlite:// (embedded) or postgres:// (production), \
             such as sqlite:///var/lib/custos/custos.db"
        );
    }

    let key_source = match (config.keys.file, config.keys.env) {
        (Some(file), None) => KeySource::File(match base_directory {
            Some(base) if file.is_relative() => base.join(file),
            _ => file,
        }),
        (None, Some(variable)) if !variable.is_empty() => KeySource::Environment(variable),
        (None, _) => bail!(
            "`keys` needs `file` (a key file created by `custos init`) or `env` (the name of \
             an environment variable holding the keys)"
        ),
        (Some(_), Some(_)) => bail!("`keys.file` and `keys.env` are both set; keep only one"),
    };

    let log_format = match config.log.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => bail!("`log.format` is `{other}`; use `text` or `json`"),
    };
    tracing_subscriber::EnvFilter::try_new(&config.log.level).with_context(|| {
        format!(
            "`log.level` is `{}`; use error, warn, info, debug or trace",
            config.log.level
        )
    })?;

    let audit = validate_audit(config.audit, base_directory)?;
    let auth = validate_auth(config.auth, base_directory, environment)?;
    let policies = validate_policies(config.policies)?;
    let mounts = validate_mounts(config.mounts, base_directory)?;
    Ok(Settings {
        listen,
        max_request_bytes: usize::try_from(max_request_bytes)?,
        request_timeout,
        storage_url,
        key_source,
        log_format,
        log_level: config.log.level,
        audit,
        auth,
        policies,
        mounts,
    })
}

/// A duration setting, or its default, with an error naming the key.
fn duration_setting(
    value: Option<&String>,
    key: &str,
    default: Duration,
) -> anyhow::Result<Duration> {
    match value {
        None => Ok(default),
        Some(text) => parse_duration(text).with_context(|| {
            format!("`{key}` is `{text}`; use a duration such as 30s, 15m or 24h")
        }),
    }
}

fn validate_auth(
    auth: AuthConfig,
    base_directory: Option<&Path>,
    environment: &[(String, String)],
) -> anyhow::Result<AuthSettingsConfig> {
    let defaults = AuthSettingsConfig::default();
    let window = duration_setting(
        auth.failure_window.as_ref(),
        "auth.failure_window",
        defaults.per_address.window,
    )?;
    let resolve = |path: PathBuf| match base_directory {
        Some(base) if path.is_relative() => base.join(path),
        _ => path,
    };

    let kubernetes = match auth.kubernetes {
        None => None,
        Some(kubernetes) => {
            // Without an API server address the broker is taken to run in a pod, and
            // uses the pod's own API server, CA bundle and service-account token.
            let in_cluster = kubernetes.api_url.is_none();
            let api_url = match kubernetes.api_url {
                Some(url) => url,
                None => in_cluster_api_url(environment).context(
                    "`auth.kubernetes.api_url` is not set and the broker does not run in a \
                     pod (KUBERNETES_SERVICE_HOST is unset); set it",
                )?,
            };
            let mut roles = Vec::new();
            for (index, role) in kubernetes.roles.into_iter().enumerate() {
                let key = format!("auth.kubernetes.roles[{index}]");
                if role.namespaces.is_empty() || role.service_accounts.is_empty() {
                    bail!(
                        "`{key}` needs `namespaces` and `service_accounts` (use [\"*\"] for \
                         any)"
                    );
                }
                let token_ttl = duration_setting(
                    role.token_ttl.as_ref(),
                    &format!("{key}.token_ttl"),
                    defaults.token_ttl,
                )?;
                let token_max_ttl = duration_setting(
                    role.token_max_ttl.as_ref(),
                    &format!("{key}.token_max_ttl"),
                    Duration::from_secs(3600).max(token_ttl),
                )?;
                roles.push(KubernetesRole {
                    name: role.name,
                    namespaces: role.namespaces,
                    service_accounts: role.service_accounts,
                    policies: role.policies,
                    audiences: role.audiences,
                    token_ttl,
                    token_max_ttl,
                });
            }
            let pod_file =
                |name: &str| in_cluster.then(|| Path::new(SERVICE_ACCOUNT_DIRECTORY).join(name));
            Some(KubernetesSettings {
                api_url,
                ca_file: kubernetes
                    .ca_file
                    .map(resolve)
                    .or_else(|| pod_file("ca.crt")),
                reviewer_token_file: kubernetes
                    .reviewer_token_file
                    .map(resolve)
                    .or_else(|| pod_file("token")),
                roles,
            })
        }
    };

    Ok(AuthSettingsConfig {
        token_ttl: duration_setting(
            auth.token_ttl.as_ref(),
            "auth.token_ttl",
            defaults.token_ttl,
        )?,
        token_max_ttl: duration_setting(
            auth.token_max_ttl.as_ref(),
            "auth.token_max_ttl",
            defaults.token_max_ttl,
        )?,
        sweep_interval: duration_setting(
            auth.sweep_interval.as_ref(),
            "auth.sweep_interval",
            defaults.sweep_interval,
        )?,
        per_address: Limit {
            failures: auth
                .failed_attempts_per_address
                .unwrap_or(defaults.per_address.failures)
                .max(1),
            window,
        },
        per_role: Limit {
            failures: auth
                .failed_attempts_per_role
                .unwrap_or(defaults.per_role.failures)
                .max(1),
            window,
        },
        kubernetes,
    })
}

/// Where Kubernetes mounts a pod's service-account token and the API server's CA bundle.
const SERVICE_ACCOUNT_DIRECTORY: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The API server address a pod sees, from the variables Kubernetes sets in every pod.
fn in_cluster_api_url(environment: &[(String, String)]) -> Option<String> {
    let variable = |wanted: &str| {
        environment
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.clone())
    };
    let host = variable("KUBERNETES_SERVICE_HOST")?;
    let port = variable("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".to_owned());
    // An IPv6 service address needs brackets in a URL.
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Some(format!("https://{host}:{port}"))
}

fn validate_policies(policies: Vec<PolicyConfig>) -> anyhow::Result<Vec<(Policy, PolicyDocument)>> {
    let mut validated: Vec<(Policy, PolicyDocument)> = Vec::new();
    for (index, policy) in policies.into_iter().enumerate() {
        let document = PolicyDocument {
            rules: policy
                .rules
                .into_iter()
                .map(|rule| RuleDocument {
                    path: rule.path,
                    capabilities: rule.capabilities,
                })
                .collect(),
        };
        let parsed = document.to_policy(&policy.name).map_err(|message| {
            anyhow::anyhow!("`policies[{index}]` ({}): {message}", policy.name)
        })?;
        if policy.name == "root" || validated.iter().any(|(other, _)| other.name == policy.name) {
            bail!(
                "`policies[{index}].name` `{}` is taken; choose another name",
                policy.name
            );
        }
        validated.push((parsed, document));
    }
    Ok(validated)
}

fn validate_audit(
    audit: Option<AuditConfig>,
    base_directory: Option<&Path>,
) -> anyhow::Result<AuditSettingsConfig> {
    let Some(audit) = audit else {
        bail!(
            "the `[audit]` section is missing; every broker needs `audit.key_file` (created by \
             `custos init`), or `audit.enabled = false` for an unaudited test broker"
        );
    };
    let resolve = |path: PathBuf| match base_directory {
        Some(base) if path.is_relative() => base.join(path),
        _ => path,
    };

    let fail_mode = match audit.fail_mode.as_str() {
        "closed" => FailMode::Closed,
        "open" => FailMode::Open,
        other => bail!("`audit.fail_mode` is `{other}`; use `closed` (default) or `open`"),
    };
    let write_timeout = parse_duration(&audit.write_timeout).with_context(|| {
        format!(
            "`audit.write_timeout` is `{}`; use a duration such as 500ms or 2s",
            audit.write_timeout
        )
    })?;

    let mut sinks = Vec::new();
    for (index, sink) in audit.sinks.into_iter().enumerate() {
        let target = match (sink.kind.as_str(), sink.path) {
            ("file", Some(path)) => SinkTarget::File(resolve(path)),
            ("file", None) => bail!("`audit.sinks[{index}]` of type file needs a `path`"),
            ("stdout", None) => SinkTarget::Stdout,
            ("stdout", Some(_)) => bail!("`audit.sinks[{index}]` of type stdout takes no `path`"),
            (other, _) => {
                bail!("`audit.sinks[{index}].type` is `{other}`; use `file` or `stdout`")
            }
        };
        sinks.push(target);
    }

    if !audit.enabled {
        return Ok(AuditSettingsConfig {
            key_file: None,
            head_file: None,
            fail_mode,
            write_timeout,
            sinks,
        });
    }
    let Some(key_file) = audit.key_file.map(resolve) else {
        bail!("`audit.key_file` is required; `custos init` creates the key there");
    };
    let head_file = audit.head_file.map(resolve).unwrap_or_else(|| {
        key_file.parent().map_or_else(
            || PathBuf::from("audit.head"),
            |parent| parent.join("audit.head"),
        )
    });
    Ok(AuditSettingsConfig {
        key_file: Some(key_file),
        head_file: Some(head_file),
        fail_mode,
        write_timeout,
        sinks,
    })
}

fn validate_vault(
    vault: VaultMountConfig,
    key: &str,
    base_directory: Option<&Path>,
) -> anyhow::Result<VaultBackendSettings> {
    let resolve = |path: PathBuf| match base_directory {
        Some(base) if path.is_relative() => base.join(path),
        _ => path,
    };
    let engine = match vault.engine.as_deref().unwrap_or("kv-v2") {
        "kv-v2" => VaultEngine::KvVersion2,
        "kv-v1" => VaultEngine::KvVersion1,
        "dynamic" => VaultEngine::Dynamic,
        other => bail!("`{key}.vault.engine` is `{other}`; use kv-v2, kv-v1 or dynamic"),
    };
    let timeout = duration_setting(
        vault.timeout.as_ref(),
        &format!("{key}.vault.timeout"),
        custos_vault::backend::DEFAULT_TIMEOUT,
    )?;
    let auth = vault.auth;
    let required = |value: Option<PathBuf>, name: &str| {
        value
            .map(resolve)
            .with_context(|| format!("`{key}.vault.auth.{name}` is required for this method"))
    };
    let auth = match auth.method.as_str() {
        "token" => VaultAuth::TokenFile(required(auth.token_file, "token_file")?),
        "approle" => VaultAuth::AppRole {
            mount: auth.mount.unwrap_or_else(|| "approle".to_owned()),
            role_id_file: required(auth.role_id_file, "role_id_file")?,
            secret_id_file: required(auth.secret_id_file, "secret_id_file")?,
        },
        "kubernetes" => VaultAuth::Kubernetes {
            mount: auth.mount.unwrap_or_else(|| "kubernetes".to_owned()),
            role: auth
                .role
                .with_context(|| format!("`{key}.vault.auth.role` is required for kubernetes"))?,
            jwt_file: auth
                .jwt_file
                .map(resolve)
                .unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIRECTORY).join("token")),
        },
        other => bail!("`{key}.vault.auth.method` is `{other}`; use token, approle or kubernetes"),
    };
    if !(vault.address.starts_with("http://") || vault.address.starts_with("https://")) {
        bail!("`{key}.vault.address` must start with https:// (or http:// for development)");
    }
    let vault_mount = vault.mount.trim_matches('/').to_owned();
    if vault_mount.is_empty() {
        bail!("`{key}.vault.mount` is empty; name the Vault mount, such as \"secret\"");
    }
    Ok(VaultBackendSettings {
        connection: VaultConnection {
            address: vault.address,
            namespace: vault.namespace,
            ca_file: vault.ca_file.map(resolve),
            skip_tls_verify: vault.skip_tls_verify,
            timeout,
            auth,
        },
        vault_mount,
        engine,
    })
}

fn validate_mounts(
    mounts: Vec<MountConfig>,
    base_directory: Option<&Path>,
) -> anyhow::Result<Vec<MountSettings>> {
    if mounts.is_empty() {
        bail!(
            "no `[[mounts]]` are configured; add one, such as \
             path = \"secret\", backend = \"local\""
        );
    }

    let mut validated: Vec<MountSettings> = Vec::new();
    for (index, mount) in mounts.into_iter().enumerate() {
        let key = format!("mounts[{index}]");
        let path = SecretPath::parse(&mount.path)
            .with_context(|| format!("`{key}.path` `{}` is not a valid path", mount.path))?;
        if path.segments().next() == Some("sys") {
            bail!("`{key}.path` `{path}`: `sys` is reserved for the broker's own permissions");
        }
        if validated.iter().any(|other| other.path == path) {
            bail!("`{key}.path` `{path}` is used by another mount; give each mount its own path");
        }
        let vault = match (mount.backend.as_str(), mount.vault) {
            ("local", None) => None,
            ("local", Some(_)) => bail!("`{key}.vault` is set but `{key}.backend` is local"),
            ("vault", Some(vault)) => Some(validate_vault(vault, &key, base_directory)?),
            ("vault", None) => {
                bail!("`{key}` uses the vault backend; add a `[mounts.vault]` table")
            }
            (other, _) => {
                bail!("`{key}.backend` is `{other}`; the backends available are: local, vault")
            }
        };
        let max_versions = mount
            .max_versions
            .unwrap_or(custos_local::backend::DEFAULT_MAX_VERSIONS);
        if !(1..=1000).contains(&max_versions) {
            bail!("`{key}.max_versions` is {max_versions}; use 1 to 1000");
        }
        let defaults = LeaseLimits::default();
        let ttl = duration_setting(
            mount.lease_ttl.as_ref(),
            &format!("{key}.lease_ttl"),
            defaults.ttl,
        )?;
        let max_ttl = duration_setting(
            mount.lease_max_ttl.as_ref(),
            &format!("{key}.lease_max_ttl"),
            defaults.max_ttl.max(ttl),
        )?;
        if max_ttl < ttl {
            bail!("`{key}.lease_max_ttl` is shorter than `{key}.lease_ttl`");
        }
        validated.push(MountSettings {
            path,
            read_only: mount.read_only,
            max_versions,
            lease: LeaseLimits { ttl, max_ttl },
            vault,
        });
    }
    Ok(validated)
}

/// A relative SQLite path is taken from the configuration file's directory, like the key
/// file, so that a configuration means the same wherever the broker is started from.
fn resolve_sqlite_path(url: &str, base_directory: Option<&Path>) -> String {
    let Some(path) = url.strip_prefix("sqlite://") else {
        return url.to_owned();
    };
    match base_directory {
        Some(base) if !path.starts_with('/') && !path.starts_with(':') => {
            format!("sqlite://{}", base.join(path).display())
        }
        _ => url.to_owned(),
    }
}

/// Parses `500ms`, `10s`, `5m` or `1h`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().context("the duration has no number")?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => bail!("unknown unit `{unit}`"),
    };
    if duration.is_zero() {
        bail!("the duration must be longer than zero");
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [storage]
        url = "sqlite:///tmp/custos.db"
        [keys]
        file = "keyring"
        [audit]
        key_file = "audit.key"
        [[mounts]]
        path = "secret"
        backend = "local"
    "#;

    fn load(text: &str, environment: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let environment: Vec<(String, String)> = environment
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Settings::from_text(text, Some(Path::new("/etc/custos")), &environment)
    }

    fn error_of(text: &str, environment: &[(&str, &str)]) -> String {
        format!("{:#}", load(text, environment).unwrap_err())
    }

    #[test]
    fn minimal_configuration_gets_defaults() {
        let settings = load(MINIMAL, &[]).unwrap();
        assert_eq!(settings.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(settings.request_timeout, Duration::from_secs(10));
        assert_eq!(
            settings.key_source,
            KeySource::File(PathBuf::from("/etc/custos/keyring"))
        );
        assert_eq!(settings.mounts[0].max_versions, 10);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(
            settings.audit.head_file,
            Some(PathBuf::from("/etc/custos/audit.head"))
        );
        assert_eq!(settings.audit.fail_mode, FailMode::Closed);
        assert_eq!(settings.audit.write_timeout, Duration::from_secs(2));
        assert_eq!(settings.storage_url.expose(), "sqlite:///tmp/custos.db");

        let relative = load(&MINIMAL.replace("sqlite:///tmp/", "sqlite://data/"), &[]).unwrap();
        assert_eq!(
            relative.storage_url.expose(),
            "sqlite:///etc/custos/data/custos.db"
        );
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let text = include_str!("../../../config/custos.toml");
        load(text, &[]).unwrap();
    }

    #[test]
    fn kubernetes_login_in_a_pod_uses_the_pods_api_server_ca_and_token() {
        let text = format!("{MINIMAL}\n[auth.kubernetes]\n");
        let outside = error_of(&text, &[]);
        assert!(outside.contains("`auth.kubernetes.api_url`"), "{outside}");

        let settings = load(
            &text,
            &[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
        )
        .unwrap();
        let kubernetes = settings.auth.kubernetes.unwrap();
        assert_eq!(kubernetes.api_url, "https://10.96.0.1:443");
        let pod = Path::new(SERVICE_ACCOUNT_DIRECTORY);
        assert_eq!(kubernetes.ca_file, Some(pod.join("ca.crt")));
        assert_eq!(kubernetes.reviewer_token_file, Some(pod.join("token")));

        // An explicit API server keeps exactly the files configured for it.
        let explicit = load(
            &format!("{text}api_url = \"https://kube.internal:6443\"\n"),
            &[],
        )
        .unwrap();
        let kubernetes = explicit.auth.kubernetes.unwrap();
        assert_eq!(kubernetes.ca_file, None);
        assert_eq!(kubernetes.reviewer_token_file, None);
    }

    #[test]
    fn the_commented_vault_examples_are_valid() {
        let text = include_str!("../../../config/custos.toml");
        let (before, rest) = text
            .split_once("# --- vault examples ---\n")
            .expect("the example configuration has the vault examples");
        let (examples, _) = rest.split_once("# --- end of vault examples ---").unwrap();
        let uncommented: String = examples
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .unwrap_or(line.trim_start_matches('#'))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let settings = load(&format!("{before}\n{uncommented}\n"), &[]).unwrap();

        let vault_mounts: Vec<&MountSettings> = settings
            .mounts
            .iter()
            .filter(|mount| mount.vault.is_some())
            .collect();
        assert_eq!(vault_mounts.len(), 2);
        let kv = vault_mounts[0].vault.as_ref().unwrap();
        assert_eq!(kv.engine, VaultEngine::KvVersion2);
        assert_eq!(kv.vault_mount, "secret");
        assert!(matches!(kv.connection.auth, VaultAuth::AppRole { .. }));
        let dynamic = vault_mounts[1].vault.as_ref().unwrap();
        assert_eq!(dynamic.engine, VaultEngine::Dynamic);
        assert!(matches!(
            &dynamic.connection.auth,
            VaultAuth::Kubernetes { jwt_file, .. }
                if jwt_file.ends_with("serviceaccount/token")
        ));
    }

    #[test]
    fn environment_overrides_the_file() {
        let settings = load(
            MINIMAL,
            &[
                ("CUSTOS_SERVER_LISTEN", "0.0.0.0:9000"),
                ("CUSTOS_KEYS_ENV", "MY_KEYS"),
                ("CUSTOS_SERVER_MAX_REQUEST_BYTES", "4096"),
                ("CUSTOS_ADDR", "not a setting, ignored"),
            ],
        )
        .unwrap();
        assert_eq!(settings.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(
            settings.key_source,
            KeySource::Environment("MY_KEYS".to_owned())
        );
        assert_eq!(settings.max_request_bytes, 4096);
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let unknown = error_of(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n"), &[]);
        assert!(unknown.contains("listen_addr"), "{unknown}");

        let listen = error_of(MINIMAL, &[("CUSTOS_SERVER_LISTEN", "localhost")]);
        assert!(
            listen.contains("`server.listen`") && listen.contains("IP:PORT"),
            "{listen}"
        );

        let typo = error_of(MINIMAL, &[("CUSTOS_SERVER_LISTN", "x")]);
        assert!(
            typo.contains("CUSTOS_SERVER_LISTN is not a setting"),
            "{typo}"
        );

        let timeout = error_of(MINIMAL, &[("CUSTOS_SERVER_REQUEST_TIMEOUT", "10 parsecs")]);
        assert!(timeout.contains("`server.request_timeout`"), "{timeout}");

        let backend = error_of(&MINIMAL.replace("\"local\"", "\"consul\""), &[]);
        assert!(
            backend.contains("`mounts[0].backend`") && backend.contains("local, vault"),
            "{backend}"
        );

        let vault_table = error_of(&MINIMAL.replace("\"local\"", "\"vault\""), &[]);
        assert!(vault_table.contains("[mounts.vault]"), "{vault_table}");

        let vault = |table: &str| {
            let config = format!(
                "{}\n[mounts.vault]\n{table}",
                MINIMAL.replace("\"local\"", "\"vault\"")
            );
            error_of(&config, &[])
        };
        let engine = vault(
            "address = \"http://127.0.0.1:8200\"\nmount = \"secret\"\nengine = \"kv3\"\n\
             [mounts.vault.auth]\nmethod = \"token\"\ntoken_file = \"t\"\n",
        );
        assert!(
            engine.contains("`mounts[0].vault.engine`") && engine.contains("dynamic"),
            "{engine}"
        );
        let token_file = vault(
            "address = \"http://127.0.0.1:8200\"\nmount = \"secret\"\n\
             [mounts.vault.auth]\nmethod = \"token\"\n",
        );
        assert!(
            token_file.contains("`mounts[0].vault.auth.token_file`"),
            "{token_file}"
        );
        let address = vault(
            "address = \"vault:8200\"\nmount = \"secret\"\n\
             [mounts.vault.auth]\nmethod = \"token\"\ntoken_file = \"t\"\n",
        );
        assert!(address.contains("`mounts[0].vault.address`"), "{address}");

        let path = error_of(&MINIMAL.replace("\"secret\"", "\"a/../b\""), &[]);
        assert!(path.contains("`mounts[0].path`"), "{path}");

        let storage = error_of(
            &MINIMAL.replace("sqlite:///tmp/custos.db", "mysql://x"),
            &[],
        );
        assert!(storage.contains("`storage.url`"), "{storage}");

        let both = error_of(
            MINIMAL,
            &[("CUSTOS_KEYS_FILE", "a"), ("CUSTOS_KEYS_ENV", "B")],
        );
        assert!(both.contains("both set"), "{both}");
    }

    #[test]
    fn errors_never_quote_values_that_may_be_passwords() {
        let syntax = error_of(
            "[storage]\nurl = \"postgres://custos:hunter2@db/custos\n[keys]\n",
            &[],
        );
        assert!(!syntax.contains("hunter2"), "{syntax}");
        assert!(syntax.contains("line 2"), "{syntax}");

        let wrong_type = error_of(
            &format!("{MINIMAL}\n[server]\nmax_request_bytes = \"hunter2\"\n"),
            &[],
        );
        assert!(!wrong_type.contains("hunter2"), "{wrong_type}");
        assert!(wrong_type.contains("invalid type"), "{wrong_type}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10").is_err());
    }
}
