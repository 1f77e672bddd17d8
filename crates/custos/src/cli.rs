//! Command-line arguments of `custos`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::LogFormat;

/// Custos: a secret broker that hands short-lived secrets to workloads and audits every
/// access.
#[derive(Debug, Parser)]
#[command(name = "custos", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker with a configuration file.
    Server(ServerArguments),

    /// Run a broker for development: SQLite and a generated key under a data directory,
    /// reused on the next run.
    Dev(DevArguments),

    /// Prepare a configured broker: create the key file if missing, the database tables
    /// and the root token (printed once).
    Init(InitArguments),

    /// Manage the key-encryption keys of the local store.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },

    /// Read and write secrets through a running broker's HTTP API.
    Secret {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: SecretCommand,
    },

    /// Search, verify, export and prune the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },

    /// Create, inspect, renew and revoke tokens.
    Token {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: TokenCommand,
    },

    /// Manage AppRole roles and secret ids, and log in with them.
    Approle {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: AppRoleCommand,
    },

    /// Inspect, renew and revoke leases (revoke-prefix and revoke-principal for incidents).
    Lease {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: LeaseCommand,
    },

    /// Write, read, list and delete policies.
    Policy {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a child token of CUSTOS_TOKEN (its text is printed once).
    Create {
        /// A policy to attach; repeat for several.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Lifetime, such as 15m (default: the broker's auth.token_ttl).
        #[arg(long)]
        ttl: Option<String>,
        /// Longest lifetime renewals may reach, such as 24h.
        #[arg(long)]
        max_ttl: Option<String>,
        /// Number of requests the token may make (1 for a single-use bootstrap token).
        #[arg(long)]
        uses: Option<u64>,
        #[arg(long)]
        display_name: Option<String>,
        /// Metadata as KEY=VALUE; repeat for several.
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Print only this field of the answer, such as `token`, for scripts.
        #[arg(long)]
        field: Option<String>,
    },
    /// Show a token by accessor (admin).
    Lookup { accessor: String },
    /// Show CUSTOS_TOKEN itself.
    LookupSelf,
    /// Extend a token by accessor (admin).
    Renew {
        accessor: String,
        #[arg(long)]
        increment: Option<String>,
    },
    /// Extend CUSTOS_TOKEN itself, up to its maximum lifetime.
    RenewSelf {
        #[arg(long)]
        increment: Option<String>,
    },
    /// Revoke a token by accessor, the tokens it created and their leases (admin).
    Revoke { accessor: String },
    /// Revoke CUSTOS_TOKEN itself.
    RevokeSelf,
}

#[derive(Debug, Subcommand)]
pub enum AppRoleCommand {
    /// Create or update a role (admin).
    WriteRole {
        name: String,
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Lifetime of the tokens a login issues (default 15m).
        #[arg(long)]
        token_ttl: Option<String>,
        #[arg(long)]
        token_max_ttl: Option<String>,
        /// Lifetime of a secret id (default 10m).
        #[arg(long)]
        secret_id_ttl: Option<String>,
        /// Logins per secret id; 0 for unlimited (default 1: single use).
        #[arg(long)]
        secret_id_uses: Option<u64>,
    },
    /// Show a role and its role id (admin).
    ReadRole { name: String },
    /// Print a role's role id (admin).
    RoleId { name: String },
    /// Issue a secret id (admin). With --output, write it to a file with mode 0600 (for
    /// a Docker secret) instead of printing it.
    SecretId {
        name: String,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Log in with a role id and a secret id read from a file; prints the token.
    Login {
        #[arg(long)]
        role_id: String,
        /// File holding the secret id, such as /run/secrets/custos_secret_id.
        #[arg(long)]
        secret_id_file: PathBuf,
        /// Print only this field of the answer, such as `token`, for scripts.
        #[arg(long)]
        field: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Show a lease's state.
    Lookup { lease_id: String },
    /// Extend a lease.
    Renew {
        lease_id: String,
        #[arg(long)]
        increment: Option<String>,
    },
    /// End a lease.
    Revoke { lease_id: String },
    /// End every lease on a path and below it (admin).
    RevokePrefix { prefix: String },
    /// End every lease one principal holds, such as kubernetes:payments/api (admin).
    RevokePrincipal { principal: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy from a JSON file: {"rules": [{"path", "capabilities"}]}.
    Write { name: String, file: PathBuf },
    /// Show a policy.
    Read { name: String },
    /// List policy names.
    List,
    /// Delete a policy.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Search the audit log through a running broker's API, newest first.
    Search(AuditSearchArguments),

    /// Check the whole hash chain and name the first broken record. Exit status 3 when the
    /// log was tampered with.
    Verify {
        /// Configuration file of the broker whose log to check.
        #[arg(long, short, env = "CUSTOS_CONFIG")]
        config: PathBuf,
    },

    /// Print records as JSON lines, oldest first: `{"sequence", "mac", "record"}`.
    Export {
        #[arg(long, short, env = "CUSTOS_CONFIG")]
        config: PathBuf,
        /// Only records at or after this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long)]
        until: Option<String>,
    },

    /// Remove records recorded before a date, leaving a checkpoint so that the rest still
    /// verifies. Refuses to prune a broken log.
    Prune {
        #[arg(long, short, env = "CUSTOS_CONFIG")]
        config: PathBuf,
        /// Remove records before this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long)]
        before: String,
    },

    /// Print the keyed hash the audit log shows for a credential, to find its records.
    Hash {
        #[arg(long, short, env = "CUSTOS_CONFIG")]
        config: PathBuf,
        /// The value to hash, or `-` to read it from standard input (keeps it out of shell
        /// history).
        value: String,
    },
}

#[derive(Debug, Args)]
pub struct AuditSearchArguments {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Only this principal (a token accessor).
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this path and everything below it, such as secret/app.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this mount.
    #[arg(long)]
    pub mount: Option<String>,
    /// Only this operation: read, list, write, delete, mounts.list, audit.search, unknown.
    #[arg(long)]
    pub operation: Option<String>,
    /// Only this outcome: ok, denied, not_found, bad_request, error.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Only records at or after this time (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records before this time (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub until: Option<String>,
    /// Records per page (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Follow the pages to the oldest matching record.
    #[arg(long)]
    pub all: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = AuditFormat::Table)]
    pub format: AuditFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    /// An aligned table for people.
    Table,
    /// One JSON object per line, as the audit sinks write them.
    Json,
    /// Comma-separated values with a header row.
    Csv,
}

#[derive(Debug, Args)]
pub struct LogArguments {
    /// Log format; overrides the configuration file.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter such as `info` or `info,custos_server=debug`; overrides the
    /// configuration file. RUST_LOG wins over both.
    #[arg(long)]
    pub log_level: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServerArguments {
    /// Configuration file (see config/custos.toml for every option).
    #[arg(long, short, env = "CUSTOS_CONFIG")]
    pub config: PathBuf,

    #[command(flatten)]
    pub log: LogArguments,
}

#[derive(Debug, Args)]
pub struct DevArguments {
    /// Where the dev broker keeps its database, key file and root token. Defaults to
    /// $XDG_DATA_HOME/custos or ~/.local/share/custos.
    #[arg(long, env = "CUSTOS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address to listen on. Keep it on loopback: dev mode prints its root token.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub addr: SocketAddr,

    #[command(flatten)]
    pub log: LogArguments,
}

#[derive(Debug, Args)]
pub struct InitArguments {
    /// Configuration file of the broker to prepare.
    #[arg(long, short, env = "CUSTOS_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new key-encryption key and re-wrap every data key under it. Safe while
    /// the broker runs; safe to run again if interrupted.
    Rotate(RotateArguments),
}

#[derive(Debug, Args)]
pub struct RotateArguments {
    /// Configuration file of the broker whose keys to rotate.
    #[arg(long, short, env = "CUSTOS_CONFIG")]
    pub config: PathBuf,
}

/// Where the broker is and how to authenticate to it.
#[derive(Args)]
pub struct Endpoint {
    /// Broker address.
    #[arg(
        long,
        env = "CUSTOS_ADDR",
        default_value = "http://127.0.0.1:8270",
        global = true
    )]
    pub addr: String,

    /// Token to authenticate with. Prefer the environment variable: arguments are visible
    /// to other users in the process list.
    #[arg(long, env = "CUSTOS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct Connection {
    #[command(flatten)]
    pub endpoint: Endpoint,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Print a secret's fields (the latest version, or --version N).
    Get {
        /// Secret path, such as secret/app/db.
        path: String,
        /// Read this version instead of the latest.
        #[arg(long)]
        version: Option<u64>,
        /// Print only this field's value, as raw bytes (useful in scripts).
        #[arg(long)]
        field: Option<String>,
    },

    /// Write a new version of a secret from NAME=VALUE pairs.
    ///
    /// VALUE may be `@FILE` to read a file or `-` to read standard input, which keeps
    /// secret values out of shell history.
    Put {
        /// Secret path, such as secret/app/db.
        path: String,
        /// Fields as NAME=VALUE, NAME=@FILE or NAME=-.
        #[arg(required = true, value_name = "NAME=VALUE")]
        fields: Vec<String>,
        /// Write only if the current version is this one (0: only if it does not exist).
        #[arg(long)]
        cas: Option<u64>,
    },

    /// List the secrets and folders under a prefix.
    List {
        /// A mount or a folder, such as secret or secret/app.
        prefix: String,
    },

    /// Delete the latest version (restorable), given versions, or destroy for good.
    Delete {
        /// Secret path, such as secret/app/db.
        path: String,
        /// Comma-separated versions, such as 1,2. Default: the latest (or all with
        /// --destroy).
        #[arg(long)]
        versions: Option<String>,
        /// Erase the content for good instead of hiding it.
        #[arg(long)]
        destroy: bool,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl std::fmt::Debug for SecretCommand {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Field values given on the command line are secrets; show only their names.
        match self {
            SecretCommand::Get {
                path,
                version,
                field,
            } => formatter
                .debug_struct("Get")
                .field("path", path)
                .field("version", version)
                .field("field", field)
                .finish(),
            SecretCommand::Put { path, fields, cas } => {
                let names: Vec<&str> = fields
                    .iter()
                    .map(|pair| pair.split_once('=').map_or("?", |(name, _)| name))
                    .collect();
                formatter
                    .debug_struct("Put")
                    .field("path", path)
                    .field("field_names", &names)
                    .field("cas", cas)
                    .finish()
            }
            SecretCommand::List { prefix } => formatter
                .debug_struct("List")
                .field("prefix", prefix)
                .finish(),
            SecretCommand::Delete {
                path,
                versions,
                destroy,
            } => formatter
                .debug_struct("Delete")
                .field("path", path)
                .field("versions", versions)
                .field("destroy", destroy)
                .finish(),
        }
    }
}
