//! Starting the broker (`server`, `dev`) and preparing its store (`init`, `key rotate`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use custos_audit::sink::{JsonLinesSink, SinkTarget};
use custos_audit::FailMode;
use custos_audit::{AuditKey, AuditLog, AuditSettings};
use custos_core::LeaseLimits;
use custos_core::{Mount, MountTable, SecretBackend, SecretPath};
use custos_local::LocalBackendSettings;
use custos_local::{KeyError, KeySource, Keyring, KeyringHandle, LocalBackend};
use custos_server::auth_routes::TokenDefaults;
use custos_server::identity::PolicyStore;
use custos_server::kubernetes::KubernetesAuth;
use custos_server::leases::{spawn_sweeper, LeaseManager};
use custos_server::rate_limit::FailureLimiter;
use custos_server::token::{create_root_token, TokenSecret};
use custos_server::{AppState, AuthSettings, Authenticator, ServerSettings};
use custos_storage::approle::AppRoleRepository;
use custos_storage::audit::AuditRepository;
use custos_storage::leases::LeaseRepository;
use custos_storage::local_secrets::LocalSecretRepository;
use custos_storage::policies::PolicyRepository;
use custos_storage::tokens::TokenRepository;
use custos_storage::{Database, DatabaseUrl};
use custos_vault::{VaultBackend, VaultSessions};

use crate::cli::{DevArguments, InitArguments, LogArguments, RotateArguments, ServerArguments};
use crate::config::{
    AuditSettingsConfig, AuthSettingsConfig, KubernetesSettings, LogFormat, MountSettings, Settings,
};
use crate::logging;

/// The mount every dev broker has.
const DEV_MOUNT: &str = "secret";

pub async fn server(arguments: ServerArguments) -> anyhow::Result<()> {
    let settings = Settings::load(&arguments.config)?;
    init_logging(&settings, &arguments.log);

    let (database, state) = open(&settings, false).await?;
    if !state.authenticator.has_root_token().await? {
        bail!(
            "the store has no root token yet; run `custos init --config {}` first",
            arguments.config.display()
        );
    }
    run(
        settings.listen,
        settings.auth.sweep_interval,
        database,
        state,
        None,
    )
    .await
}

pub async fn dev(arguments: DevArguments) -> anyhow::Result<()> {
    let data_directory = match arguments.data_dir {
        Some(directory) => directory,
        None => default_data_directory()?,
    };
    create_private_directory(&data_directory)?;
    let key_file = data_directory.join("keyring");
    if !key_file.exists() {
        Keyring::generate()?.save(&key_file)?;
    }
    AuditKey::create_if_missing(&data_directory.join("audit.key"))?;

    let settings = Settings {
        listen: arguments.addr,
        max_request_bytes: ServerSettings::default().max_request_bytes,
        request_timeout: ServerSettings::default().request_timeout,
        storage_url: DatabaseUrl::new(format!(
            "sqlite://{}",
            data_directory.join("custos.db").display()
        )),
        key_source: KeySource::File(key_file),
        log_format: arguments.log.log_format.unwrap_or(LogFormat::Text),
        log_level: arguments
            .log
            .log_level
            .clone()
            .unwrap_or_else(|| "info".to_owned()),
        auth: AuthSettingsConfig::default(),
        policies: Vec::new(),
        audit: AuditSettingsConfig {
            key_file: Some(data_directory.join("audit.key")),
            head_file: Some(data_directory.join("audit.head")),
            fail_mode: FailMode::Closed,
            write_timeout: Duration::from_secs(2),
            sinks: vec![SinkTarget::File(data_directory.join("audit.jsonl"))],
        },
        mounts: vec![MountSettings {
            path: SecretPath::parse(DEV_MOUNT).expect("the dev mount path is valid"),
            read_only: false,
            max_versions: custos_local::backend::DEFAULT_MAX_VERSIONS,
            lease: LeaseLimits::default(),
            vault: None,
        }],
    };
    init_logging(&settings, &arguments.log);

    let (database, state) = open(&settings, true).await?;
    let token = dev_root_token(&database, &state.authenticator, &data_directory).await?;

    let banner = DevBanner {
        data_directory,
        token,
    };
    run(
        settings.listen,
        settings.auth.sweep_interval,
        database,
        state,
        Some(banner),
    )
    .await
}

pub async fn init(arguments: InitArguments) -> anyhow::Result<()> {
    let settings = Settings::load(&arguments.config)?;
    logging::init(settings.log_format, &settings.log_level);

    // A new key file is made only for a store that has no key yet: for an initialised
    // store, a missing key file is a mistake to report, not to paper over.
    let database = Database::connect(settings.storage_url.expose()).await?;
    let repository = LocalSecretRepository::new(database.pool().clone());
    if let KeySource::File(path) = &settings.key_source {
        if !path.exists() {
            if let Some(active) = repository.active_key_id().await? {
                bail!(
                    "the store is initialised with key {active}, but the key file {} does \
                     not exist; restore it from your backup",
                    path.display()
                );
            }
            Keyring::generate()?.save(path)?;
            println!(
                "Created key file {} (mode 0600). Back it up: without it the",
                path.display()
            );
            println!("local store cannot be decrypted.");
        }
    }
    let keyring = KeyringHandle::load(settings.key_source.clone())?;
    check_active_key(&database, &keyring, true).await?;
    if let Some(key_file) = &settings.audit.key_file {
        if AuditKey::create_if_missing(key_file)? {
            println!(
                "Created audit key {} (mode 0600). Whoever verifies the audit log",
                key_file.display()
            );
            println!("needs it; it reveals no secret.");
        }
    }

    let tokens = TokenRepository::new(database.pool().clone());
    if !tokens.root_tokens().await?.is_empty() {
        bail!("this store is already initialised: it has a root token");
    }
    let token = create_root_token(&tokens).await?;
    println!("Initialised the {} store.", database.kind().as_str());
    println!();
    println!("Root token (shown once; store it in a password manager):");
    println!();
    println!("    {}", token.expose());
    database.close().await;
    Ok(())
}

pub async fn rotate(arguments: RotateArguments) -> anyhow::Result<()> {
    let settings = Settings::load(&arguments.config)?;
    logging::init(settings.log_format, &settings.log_level);

    let database = Database::connect(settings.storage_url.expose()).await?;
    let repository = LocalSecretRepository::new(database.pool().clone());
    let report = custos_local::rotate_key(&settings.key_source, &repository).await?;
    println!(
        "Rotated to key {}; re-wrapped {} data keys; retired {}.",
        report.new_key_id,
        report.rewrapped,
        report.old_key_ids.join(", ")
    );
    database.close().await;
    Ok(())
}

fn init_logging(settings: &Settings, overrides: &LogArguments) {
    let format = overrides.log_format.unwrap_or(settings.log_format);
    let level = overrides
        .log_level
        .as_deref()
        .unwrap_or(&settings.log_level);
    logging::init(format, level);
}

/// Connects to the store, checks the keyring against it and builds the handlers' state.
async fn open(settings: &Settings, initialise: bool) -> anyhow::Result<(Database, AppState)> {
    let database = Database::connect(settings.storage_url.expose()).await?;
    let keyring = Arc::new(KeyringHandle::load(settings.key_source.clone())?);
    check_active_key(&database, &keyring, initialise).await?;

    let repository = LocalSecretRepository::new(database.pool().clone());
    let mut mounts = Vec::new();
    let mut vault_sessions = VaultSessions::default();
    for mount in &settings.mounts {
        mounts.push(Mount {
            path: mount.path.clone(),
            backend: open_backend(mount, &repository, &keyring, &mut vault_sessions).await,
            read_only: mount.read_only,
            lease: mount.lease,
        });
    }

    let tokens = TokenRepository::new(database.pool().clone());
    let authenticator = Authenticator::new(tokens.clone());
    let audit = Arc::new(open_audit(&settings.audit, &database).await?);
    let mounts = Arc::new(MountTable::new(mounts)?);
    let policies = PolicyStore::new(
        settings.policies.clone(),
        PolicyRepository::new(database.pool().clone()),
    );
    policies.reload().await?;
    let leases = LeaseManager::new(
        LeaseRepository::new(&database),
        tokens.clone(),
        mounts.clone(),
        audit.stores_leases(),
    );
    let state = AppState {
        mounts,
        authenticator: Arc::new(authenticator),
        database: database.clone(),
        settings: ServerSettings {
            max_request_bytes: settings.max_request_bytes,
            request_timeout: settings.request_timeout,
        },
        audit,
        audit_repository: AuditRepository::new(&database),
        policies,
        leases,
        tokens,
        approles: AppRoleRepository::new(database.pool().clone()),
        limiter: Arc::new(FailureLimiter::new(
            settings.auth.per_address,
            settings.auth.per_role,
        )),
        auth: Arc::new(AuthSettings {
            token_defaults: TokenDefaults {
                ttl: settings.auth.token_ttl,
                max_ttl: settings.auth.token_max_ttl,
            },
            kubernetes: settings
                .auth
                .kubernetes
                .as_ref()
                .map(kubernetes_auth)
                .transpose()?,
        }),
    };
    Ok((database, state))
}

/// The Kubernetes login settings, with an HTTP client that trusts the cluster's CA.
/// The backend instance of one configured mount.
async fn open_backend(
    mount: &MountSettings,
    repository: &LocalSecretRepository,
    keyring: &Arc<KeyringHandle>,
    vault_sessions: &mut VaultSessions,
) -> Arc<dyn SecretBackend> {
    let Some(vault) = &mount.vault else {
        return Arc::new(LocalBackend::new(
            LocalBackendSettings {
                mount: mount.path.to_string(),
                max_versions: mount.max_versions,
            },
            repository.clone(),
            keyring.clone(),
        ));
    };

    let backend = Arc::new(VaultBackend::new(vault.clone(), vault_sessions));
    // Log in now so that a wrong address or credential shows at start, but in the
    // background: a Vault that hangs must not hold up the start of the broker and its
    // other mounts for the length of its timeout. A Vault that is down only warns: it may
    // come back. Requests that arrive meanwhile share this login.
    let checking = backend.clone();
    let (mount_path, address) = (mount.path.to_string(), vault.connection.address.clone());
    let (vault_mount, engine) = (vault.vault_mount.clone(), vault.engine.as_str());
    tokio::spawn(async move {
        match checking.connect().await {
            Ok(()) => tracing::info!(
                mount = %mount_path,
                %address,
                %vault_mount,
                engine,
                "Vault mount ready"
            ),
            Err(error) => tracing::warn!(
                mount = %mount_path,
                %error,
                "Vault is not usable yet; requests to this mount fail until it is"
            ),
        }
    });
    backend
}

fn kubernetes_auth(settings: &KubernetesSettings) -> anyhow::Result<KubernetesAuth> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(ca_file) = &settings.ca_file {
        let pem = std::fs::read(ca_file)
            .with_context(|| format!("cannot read the Kubernetes CA {}", ca_file.display()))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", ca_file.display()))?;
        builder = builder.add_root_certificate(certificate);
    }
    Ok(KubernetesAuth {
        api_url: settings.api_url.clone(),
        reviewer_token_file: settings.reviewer_token_file.clone(),
        http: builder.build()?,
        roles: settings.roles.clone(),
    })
}

/// Starts the audit writer, or a disabled audit log when the configuration says so.
async fn open_audit(
    settings: &AuditSettingsConfig,
    database: &Database,
) -> anyhow::Result<AuditLog> {
    let Some(key_file) = &settings.key_file else {
        // Credentials still get hashed under a key, just one nobody keeps.
        let key = AuditKey::from_bytes(&random_key()?);
        return Ok(AuditLog::disabled(Arc::new(key)));
    };
    let key = AuditKey::load(key_file)
        .with_context(|| "the audit key is needed to start; `custos init` creates it")?;

    let mut sinks = Vec::new();
    for target in &settings.sinks {
        let sink = JsonLinesSink::open(target.clone())
            .with_context(|| format!("cannot open the audit sink {target:?}"))?;
        sinks.push(sink);
    }
    let audit_settings = AuditSettings {
        fail_mode: settings.fail_mode,
        write_timeout: settings.write_timeout,
        head_file: settings.head_file.clone(),
        ..AuditSettings::default()
    };
    let repository = AuditRepository::new(database);
    Ok(AuditLog::start(repository, Arc::new(key), sinks, audit_settings).await?)
}

fn random_key() -> anyhow::Result<[u8; 32]> {
    let mut bytes = [0_u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(bytes)
}

/// Refuses to start with a keyring that does not hold the store's active key: every
/// write would fail and every read would be unreadable. Only `custos init` and
/// `custos dev` may record the active key of a new store (`initialise`).
async fn check_active_key(
    database: &Database,
    keyring: &KeyringHandle,
    initialise: bool,
) -> anyhow::Result<()> {
    let repository = LocalSecretRepository::new(database.pool().clone());
    let active = match repository.active_key_id().await? {
        Some(active) => active,
        None if initialise => {
            let newest = keyring.snapshot().newest().id().to_owned();
            repository.initialise_active_key(&newest).await?
        }
        None => bail!(
            "the {} store is not initialised; run `custos init --config FILE` first",
            database.kind().as_str()
        ),
    };

    if keyring.key(&active).is_none() {
        return Err(KeyError::ActiveKeyMissing {
            key_id: active,
            source_name: keyring.source().to_string(),
        }
        .into());
    }
    tracing::debug!(active_key_id = %active, "keyring matches the store");
    Ok(())
}

struct DevBanner {
    data_directory: PathBuf,
    token: TokenSecret,
}

async fn run(
    listen: SocketAddr,
    sweep_interval: Duration,
    database: Database,
    state: AppState,
    banner: Option<DevBanner>,
) -> anyhow::Result<()> {
    let mount_paths: Vec<String> = state
        .mounts
        .mounts()
        .iter()
        .map(|mount| mount.path.to_string())
        .collect();
    let audit = state.audit.clone();
    let sweeper = spawn_sweeper(state.leases.clone(), state.approles.clone(), sweep_interval);
    let router = custos_server::router(state);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, database = database.kind().as_str(), mounts = ?mount_paths,
        "custos is listening");
    if let Some(banner) = banner {
        print_banner(address, &banner);
    }

    custos_server::serve(listener, router, shutdown_signal()).await?;
    sweeper.abort();
    // Every answered request waited for its record, so this only stops the writer.
    audit.close().await;
    // Give in-flight database work a moment to finish before closing the pool.
    tokio::time::timeout(Duration::from_secs(5), database.close())
        .await
        .ok();
    tracing::info!("custos stopped");
    Ok(())
}

fn print_banner(address: SocketAddr, banner: &DevBanner) {
    let url = format!("http://{address}");
    let token = banner.token.expose();
    let mut out = std::io::stdout().lock();
    // The banner goes to standard output, never to the log: it carries the root token.
    let _ = writeln!(
        out,
        "Custos dev broker listening on {url}\n\n\
         \x20 data directory: {directory}\n\
         \x20 root token:     {token}\n\
         \x20 mount:          {DEV_MOUNT}/ (local, encrypted)\n\n\
         Try it:\n\n\
         \x20 export CUSTOS_ADDR={url}\n\
         \x20 export CUSTOS_TOKEN={token}\n\
         \x20 custos secret put {DEV_MOUNT}/hello greeting=world\n\
         \x20 curl -H \"Authorization: Bearer $CUSTOS_TOKEN\" \\\n\
         \x20      $CUSTOS_ADDR/v1/secrets/{DEV_MOUNT}/hello\n\n\
         Dev mode keeps the root token in the data directory. Do not use it in production.\n",
        directory = banner.data_directory.display()
    );
    let _ = out.flush();
}

/// The dev root token: reused from the data directory when the store still knows it,
/// created (and saved there) otherwise.
async fn dev_root_token(
    database: &Database,
    authenticator: &Authenticator,
    data_directory: &Path,
) -> anyhow::Result<TokenSecret> {
    let token_file = data_directory.join("root-token");
    if let Ok(text) = std::fs::read_to_string(&token_file) {
        let token = TokenSecret::new(text.trim().to_owned());
        if authenticator.verify(&token).await?.is_some() {
            return Ok(token);
        }
    }

    let token = create_root_token(&TokenRepository::new(database.pool().clone())).await?;
    write_private_file(&token_file, token.expose())?;
    Ok(token)
}

fn default_data_directory() -> anyhow::Result<PathBuf> {
    if let Some(data_home) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(data_home).join("custos"));
    }
    let Some(home) = std::env::var_os("HOME").filter(|value| !value.is_empty()) else {
        bail!("cannot find a home directory for the dev data; pass --data-dir DIR");
    };
    Ok(PathBuf::from(home).join(".local/share/custos"))
}

fn create_private_directory(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create the data directory {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
    }
    Ok(())
}

/// Writes `contents` and a newline to `path`, readable by its owner only (mode 0600), also
/// when the file existed before with a wider mode.
pub(crate) fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // The mode given at open applies only to a new file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
