//! `custos token|approle|lease|policy ...`: thin clients of the broker's identity, lease
//! and policy endpoints.
//!
//! Text output prints the answer's top-level fields as aligned `name  value` rows;
//! `--format json` prints the API's JSON as it is.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use crate::cli::{
    AppRoleCommand, Connection, LeaseCommand, OutputFormat, PolicyCommand, TokenCommand,
};
use crate::client::{success, ApiClient};
use crate::config::parse_duration;

struct Admin {
    api: ApiClient,
    format: OutputFormat,
}

impl Admin {
    fn new(connection: Connection) -> anyhow::Result<Self> {
        Ok(Self {
            api: ApiClient::new(connection.endpoint)?,
            format: connection.format,
        })
    }

    /// Calls `path` and prints the answer; `Ok(None)` after printing an API error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Option<Value>> {
        let url = format!("{}{path}", self.api.address);
        let mut request = self.api.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = self.api.send(request).await?;
        success(&answer)
    }

    fn print(&self, value: &Value) -> anyhow::Result<ExitCode> {
        let mut out = std::io::stdout().lock();
        match (self.format, value) {
            (_, Value::Null) => {}
            (OutputFormat::Json, value) => {
                serde_json::to_writer_pretty(&mut out, value)?;
                writeln!(out)?;
            }
            (OutputFormat::Text, Value::Object(fields)) => print_fields(&mut out, fields)?,
            (OutputFormat::Text, other) => writeln!(out, "{other}")?,
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn run(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<ExitCode> {
        self.run_field(method, path, body, None).await
    }

    /// Like `run`, printing only `field` of the answer when one is named (as text, on one
    /// line, whatever the output format: it is for scripts).
    async fn run_field(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        field: Option<&str>,
    ) -> anyhow::Result<ExitCode> {
        let Some(value) = self.call(method, path, body).await? else {
            return Ok(ExitCode::FAILURE);
        };
        let Some(field) = field else {
            return self.print(&value);
        };
        let Some(selected) = value.get(field) else {
            bail!("the answer has no field `{field}`");
        };
        let text = match selected {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        writeln!(std::io::stdout().lock(), "{text}")?;
        Ok(ExitCode::SUCCESS)
    }
}

fn print_fields(out: &mut impl Write, fields: &Map<String, Value>) -> std::io::Result<()> {
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    for (name, value) in fields {
        let shown = match value {
            Value::String(text) => text.clone(),
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_owned)
                })
                .collect::<Vec<_>>()
                .join(", "),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        writeln!(out, "{name:width$}  {shown}")?;
    }
    Ok(())
}

fn seconds(text: Option<&String>) -> anyhow::Result<Option<u64>> {
    text.map(|text| {
        parse_duration(text)
            .map(|duration: Duration| duration.as_secs())
            .with_context(|| format!("`{text}` is not a duration; use 30s, 15m or 24h"))
    })
    .transpose()
}

pub async fn token(connection: Connection, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(connection)?;
    match command {
        TokenCommand::Create {
            policies,
            ttl,
            max_ttl,
            uses,
            display_name,
            metadata,
            field,
        } => {
            let mut entries = Map::new();
            for pair in metadata {
                let Some((key, value)) = pair.split_once('=') else {
                    bail!("metadata `{pair}` is not KEY=VALUE");
                };
                entries.insert(key.to_owned(), Value::String(value.to_owned()));
            }
            let body = json!({
                "policies": policies,
                "ttl_seconds": seconds(ttl.as_ref())?,
                "max_ttl_seconds": seconds(max_ttl.as_ref())?,
                "uses": uses,
                "display_name": display_name,
                "metadata": entries,
            });
            admin
                .run_field(
                    Method::POST,
                    "/v1/auth/token/create",
                    Some(without_nulls(body)),
                    field.as_deref(),
                )
                .await
        }
        TokenCommand::Lookup { accessor } => {
            let body = json!({ "accessor": accessor });
            admin
                .run(Method::POST, "/v1/auth/token/lookup", Some(body))
                .await
        }
        TokenCommand::LookupSelf => {
            admin
                .run(Method::GET, "/v1/auth/token/lookup-self", None)
                .await
        }
        TokenCommand::Renew {
            accessor,
            increment,
        } => {
            let body =
                json!({ "accessor": accessor, "increment_seconds": seconds(increment.as_ref())? });
            admin
                .run(
                    Method::POST,
                    "/v1/auth/token/renew",
                    Some(without_nulls(body)),
                )
                .await
        }
        TokenCommand::RenewSelf { increment } => {
            let body = json!({ "increment_seconds": seconds(increment.as_ref())? });
            admin
                .run(
                    Method::POST,
                    "/v1/auth/token/renew-self",
                    Some(without_nulls(body)),
                )
                .await
        }
        TokenCommand::Revoke { accessor } => {
            let body = json!({ "accessor": accessor });
            admin
                .run(Method::POST, "/v1/auth/token/revoke", Some(body))
                .await
        }
        TokenCommand::RevokeSelf => {
            admin
                .run(Method::POST, "/v1/auth/token/revoke-self", None)
                .await
        }
    }
}

pub async fn approle(connection: Connection, command: AppRoleCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(connection)?;
    match command {
        AppRoleCommand::WriteRole {
            name,
            policies,
            token_ttl,
            token_max_ttl,
            secret_id_ttl,
            secret_id_uses,
        } => {
            let body = json!({
                "policies": policies,
                "token_ttl_seconds": seconds(token_ttl.as_ref())?,
                "token_max_ttl_seconds": seconds(token_max_ttl.as_ref())?,
                "secret_id_ttl_seconds": seconds(secret_id_ttl.as_ref())?,
                "secret_id_uses": secret_id_uses,
            });
            let path = format!("/v1/auth/approle/roles/{name}");
            admin
                .run(Method::PUT, &path, Some(without_nulls(body)))
                .await
        }
        AppRoleCommand::ReadRole { name } => {
            admin
                .run(Method::GET, &format!("/v1/auth/approle/roles/{name}"), None)
                .await
        }
        AppRoleCommand::RoleId { name } => {
            let path = format!("/v1/auth/approle/roles/{name}");
            let Some(role) = admin.call(Method::GET, &path, None).await? else {
                return Ok(ExitCode::FAILURE);
            };
            println!("{}", role["role_id"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        AppRoleCommand::SecretId { name, output } => {
            let path = format!("/v1/auth/approle/roles/{name}/secret-id");
            let Some(issued) = admin.call(Method::POST, &path, None).await? else {
                return Ok(ExitCode::FAILURE);
            };
            let Some(output) = output else {
                return admin.print(&issued);
            };
            let secret_id =
                Zeroizing::new(issued["secret_id"].as_str().unwrap_or_default().to_owned());
            crate::broker::write_private_file(&output, &secret_id)?;
            println!(
                "Wrote a secret id for role {name} to {} (mode 0600); it expires at {}.",
                output.display(),
                issued["expires_at"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        AppRoleCommand::Login {
            role_id,
            secret_id_file,
            field,
        } => {
            let secret_id = Zeroizing::new(
                std::fs::read_to_string(&secret_id_file)
                    .with_context(|| format!("cannot read {}", secret_id_file.display()))?
                    .trim()
                    .to_owned(),
            );
            let body = json!({ "role_id": role_id, "secret_id": secret_id.as_str() });
            admin
                .run_field(
                    Method::POST,
                    "/v1/auth/approle/login",
                    Some(body),
                    field.as_deref(),
                )
                .await
        }
    }
}

pub async fn lease(connection: Connection, command: LeaseCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(connection)?;
    match command {
        LeaseCommand::Lookup { lease_id } => {
            admin
                .run(Method::GET, &format!("/v1/leases/{lease_id}"), None)
                .await
        }
        LeaseCommand::Renew {
            lease_id,
            increment,
        } => {
            let body =
                json!({ "lease_id": lease_id, "increment_seconds": seconds(increment.as_ref())? });
            admin
                .run(Method::POST, "/v1/leases/renew", Some(without_nulls(body)))
                .await
        }
        LeaseCommand::Revoke { lease_id } => {
            let body = json!({ "lease_id": lease_id });
            admin
                .run(Method::POST, "/v1/leases/revoke", Some(body))
                .await
        }
        LeaseCommand::RevokePrefix { prefix } => {
            let body = json!({ "prefix": prefix });
            admin
                .run(Method::POST, "/v1/leases/revoke-prefix", Some(body))
                .await
        }
        LeaseCommand::RevokePrincipal { principal } => {
            let body = json!({ "principal": principal });
            admin
                .run(Method::POST, "/v1/leases/revoke-principal", Some(body))
                .await
        }
    }
}

pub async fn policy(connection: Connection, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(connection)?;
    match command {
        PolicyCommand::Write { name, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let document: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let code = admin
                .run(Method::PUT, &format!("/v1/policies/{name}"), Some(document))
                .await?;
            if code == ExitCode::SUCCESS && admin.format == OutputFormat::Text {
                println!("Wrote policy {name}");
            }
            Ok(code)
        }
        PolicyCommand::Read { name } => {
            admin
                .run(Method::GET, &format!("/v1/policies/{name}"), None)
                .await
        }
        PolicyCommand::List => admin.run(Method::GET, "/v1/policies", None).await,
        PolicyCommand::Delete { name } => {
            admin
                .run(Method::DELETE, &format!("/v1/policies/{name}"), None)
                .await
        }
    }
}

/// The object without its null members, so that absent options keep the broker's defaults.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, value)| !value.is_null())
                .collect(),
        ),
        other => other,
    }
}
