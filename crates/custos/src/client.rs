//! `custos secret ...`: a client of the broker's HTTP API, configured like Vault's CLI
//! through CUSTOS_ADDR and CUSTOS_TOKEN.
//!
//! Text output is for people and stays stable for simple scripts; `--format json` prints
//! the API's own JSON. Errors print the API's code and message and exit with status 1.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use custos_core::SecretPath;

use crate::cli::{Connection, Endpoint, OutputFormat, SecretCommand};

pub async fn run(connection: Connection, command: SecretCommand) -> anyhow::Result<ExitCode> {
    let client = Client::new(connection)?;
    match command {
        SecretCommand::Get {
            path,
            version,
            field,
        } => client.get(&path, version, field.as_deref()).await,
        SecretCommand::Put { path, fields, cas } => client.put(&path, &fields, cas).await,
        SecretCommand::List { prefix } => client.list(&prefix).await,
        SecretCommand::Delete {
            path,
            versions,
            destroy,
        } => client.delete(&path, versions.as_deref(), destroy).await,
    }
}

struct Client {
    api: ApiClient,
    format: OutputFormat,
}

/// A response body, kept as bytes so that a secret can be wiped after printing.
pub struct Answer {
    pub status: StatusCode,
    pub body: Zeroizing<Vec<u8>>,
}

/// An HTTP client for the broker at `endpoint`, with its token.
pub struct ApiClient {
    pub http: reqwest::Client,
    pub address: String,
    pub token: Zeroizing<String>,
}

impl ApiClient {
    pub fn new(endpoint: Endpoint) -> anyhow::Result<Self> {
        let Some(token) = endpoint.token.filter(|token| !token.is_empty()) else {
            bail!("no token: set CUSTOS_TOKEN (or pass --token)");
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            address: endpoint.addr.trim_end_matches('/').to_owned(),
            token: Zeroizing::new(token),
        })
    }

    /// Sends a request to `path_and_query` (starting with `/v1/`) with the token.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request
            .bearer_auth(self.token.as_str())
            .send()
            .await
            .with_context(|| format!("cannot reach the broker at {}", self.address))?;
        let status = response.status();
        let body = Zeroizing::new(response.bytes().await?.to_vec());
        Ok(Answer { status, body })
    }
}

impl Client {
    fn new(connection: Connection) -> anyhow::Result<Self> {
        Ok(Self {
            api: ApiClient::new(connection.endpoint)?,
            format: connection.format,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> anyhow::Result<Answer> {
        // Parse here with the broker's own rules: a URL library would quietly resolve
        // `a/../b` to `b`, and `?` or `#` in a path would become part of the URL.
        let path = SecretPath::parse(path).context("invalid secret path")?;
        let url = format!("{}/v1/secrets/{path}", self.api.address);
        let mut request = self.api.http.request(method, &url).query(query);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        self.api.send(request).await
    }

    async fn get(
        &self,
        path: &str,
        version: Option<u64>,
        field: Option<&str>,
    ) -> anyhow::Result<ExitCode> {
        let query: Vec<(&str, String)> = version
            .map(|version| ("version", version.to_string()))
            .into_iter()
            .collect();
        let answer = self.send(Method::GET, path, &query, None).await?;
        let Some(body) = success(&answer)? else {
            return Ok(ExitCode::FAILURE);
        };

        let mut out = std::io::stdout().lock();
        if let Some(field) = field {
            let Some(value) = body["data"].get(field) else {
                bail!("the secret has no field `{field}`");
            };
            let bytes = Zeroizing::new(field_bytes(value)?);
            out.write_all(&bytes)?;
            if value.is_string() {
                out.write_all(b"\n")?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        if self.format == OutputFormat::Json {
            print_json(&mut out, &body)?;
            return Ok(ExitCode::SUCCESS);
        }

        let metadata = &body["metadata"];
        let mut rows = vec![
            ("path".to_owned(), text_of(&metadata["path"])),
            ("version".to_owned(), text_of(&metadata["version"])),
            ("created".to_owned(), text_of(&metadata["created_at"])),
        ];
        rows.push((String::new(), String::new()));
        if let Some(fields) = body["data"].as_object() {
            for (name, value) in fields {
                let shown = match value {
                    Value::String(text) => text.clone(),
                    other => format!("base64:{}", text_of(&other["base64"])),
                };
                rows.push((name.clone(), shown));
            }
        }
        print_rows(&mut out, &rows)?;
        Ok(ExitCode::SUCCESS)
    }

    async fn put(
        &self,
        path: &str,
        pairs: &[String],
        cas: Option<u64>,
    ) -> anyhow::Result<ExitCode> {
        let mut fields = BTreeMap::new();
        let mut stdin_used = false;
        for pair in pairs {
            let Some((name, value)) = pair.split_once('=') else {
                bail!(
                    "`{}` is not NAME=VALUE",
                    pair.chars().take(40).collect::<String>()
                );
            };
            let bytes = Zeroizing::new(if value == "-" {
                if stdin_used {
                    bail!("only one field can be read from standard input");
                }
                stdin_used = true;
                let mut buffer = Vec::new();
                std::io::stdin().read_to_end(&mut buffer)?;
                buffer
            } else if let Some(file) = value.strip_prefix('@') {
                std::fs::read(file)
                    .with_context(|| format!("cannot read {file} for field {name}"))?
            } else {
                value.as_bytes().to_vec()
            });
            let wire = match std::str::from_utf8(&bytes) {
                Ok(text) => Value::String(text.to_owned()),
                Err(_) => json!({ "base64": STANDARD.encode(bytes.as_slice()) }),
            };
            fields.insert(name.to_owned(), wire);
        }

        let mut request = json!({ "data": fields });
        if let Some(cas) = cas {
            request["cas"] = json!(cas);
        }
        let body = Zeroizing::new(serde_json::to_vec(&request)?);
        let answer = self.send(Method::PUT, path, &[], Some(body)).await?;
        let Some(body) = success(&answer)? else {
            return Ok(ExitCode::FAILURE);
        };

        let mut out = std::io::stdout().lock();
        match self.format {
            OutputFormat::Json => print_json(&mut out, &body)?,
            OutputFormat::Text => writeln!(
                out,
                "Wrote {} version {}",
                text_of(&body["metadata"]["path"]),
                text_of(&body["metadata"]["version"])
            )?,
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<ExitCode> {
        let answer = self
            .send(Method::GET, prefix, &[("list", "true".to_owned())], None)
            .await?;
        let Some(body) = success(&answer)? else {
            return Ok(ExitCode::FAILURE);
        };

        let mut out = std::io::stdout().lock();
        match self.format {
            OutputFormat::Json => print_json(&mut out, &body)?,
            OutputFormat::Text => {
                for key in body["keys"].as_array().into_iter().flatten() {
                    writeln!(out, "{}", text_of(key))?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn delete(
        &self,
        path: &str,
        versions: Option<&str>,
        destroy: bool,
    ) -> anyhow::Result<ExitCode> {
        let mut query = Vec::new();
        if let Some(versions) = versions {
            query.push(("versions", versions.to_owned()));
        }
        if destroy {
            query.push(("destroy", "true".to_owned()));
        }
        let answer = self.send(Method::DELETE, path, &query, None).await?;
        if success(&answer)?.is_none() {
            return Ok(ExitCode::FAILURE);
        }

        let mut out = std::io::stdout().lock();
        let action = if destroy { "Destroyed" } else { "Deleted" };
        let which = versions.map_or_else(
            || {
                if destroy {
                    "every version".to_owned()
                } else {
                    "the latest version".to_owned()
                }
            },
            |versions| format!("versions {versions}"),
        );
        match self.format {
            OutputFormat::Json => print_json(
                &mut out,
                &json!({ "path": path, "destroyed": destroy, "versions": versions }),
            )?,
            OutputFormat::Text => writeln!(out, "{action} {which} of {path}")?,
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// The parsed body of a successful answer, or `None` after printing the API's error.
pub fn success(answer: &Answer) -> anyhow::Result<Option<Value>> {
    if answer.status.is_success() {
        if answer.body.is_empty() {
            return Ok(Some(Value::Null));
        }
        return Ok(Some(serde_json::from_slice(&answer.body).context(
            "the broker answered with a body that is not JSON; is CUSTOS_ADDR a Custos broker?",
        )?));
    }

    let error: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let code = error["error"]["code"].as_str().unwrap_or("unknown");
    let message = error["error"]["message"]
        .as_str()
        .unwrap_or("the broker gave no error message");
    eprintln!(
        "custos: {message} ({code}, HTTP {})",
        answer.status.as_u16()
    );
    Ok(None)
}

fn field_bytes(value: &Value) -> anyhow::Result<Vec<u8>> {
    match value {
        Value::String(text) => Ok(text.as_bytes().to_vec()),
        other => {
            let encoded = other["base64"].as_str().context("unexpected field form")?;
            Ok(STANDARD.decode(encoded)?)
        }
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn print_rows(out: &mut impl Write, rows: &[(String, String)]) -> std::io::Result<()> {
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, value) in rows {
        if name.is_empty() && value.is_empty() {
            writeln!(out)?;
        } else {
            writeln!(out, "{name:width$}  {value}")?;
        }
    }
    Ok(())
}

fn print_json(out: &mut impl Write, value: &Value) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}
