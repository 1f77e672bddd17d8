//! The Vault backend against a real OpenBao dev server: KV v2 and v1 through the Custos
//! API; the broker's own Vault login (token file with renewal and replacement, AppRole,
//! Kubernetes) without a login stampede; dynamic PostgreSQL credentials whose Custos lease
//! renews and revokes the Vault lease; and errors mapped on purpose (down 502, slow 504,
//! denied 502), with Custos's policies and audit applying as to any mount.

use std::time::Duration;

use custos_end_to_end::{
    service_account_jwt, Broker, BrokerOptions, DatabaseKind, KubernetesEmulator, OpenBao,
};
use custos_storage::testing::TestDatabase;
use reqwest::Method;
use serde_json::json;

/// The broker's own Vault policy: the KV mounts, the database engine's credentials, and
/// the lease endpoints its leases renew and revoke through.
const BROKER_POLICY: &str = r#"
path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "kv1/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;

/// One `[[mounts]]` entry served from `bao` with the given `[mounts.vault]` settings,
/// logging in as `auth` (a TOML table body).
fn vault_mount(bao: &OpenBao, path: &str, vault: &str, auth: &str) -> String {
    vault_mount_with(bao, path, "", vault, auth)
}

/// Like [`vault_mount`], with extra mount settings such as `lease_ttl`.
fn vault_mount_with(bao: &OpenBao, path: &str, mount: &str, vault: &str, auth: &str) -> String {
    format!(
        "\n[[mounts]]\npath = \"{path}\"\nbackend = \"vault\"\n{mount}\n[mounts.vault]\n\
         address = \"{}\"\ntimeout = \"2s\"\n{vault}\n[mounts.vault.auth]\n{auth}\n",
        bao.address
    )
}

/// A broker with a `vault` mount (KV v2 at `secret/`) and a `legacy` mount (KV v1 at
/// `kv1/`), logging in to OpenBao as `auth` describes.
async fn broker_with_vault(bao: &OpenBao, auth: &str, extra: &str) -> Broker {
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options.mounts.push_str(&vault_mount(
        bao,
        "vault",
        "mount = \"secret\"\nengine = \"kv-v2\"",
        auth,
    ));
    options.mounts.push_str(&vault_mount(
        bao,
        "legacy",
        "mount = \"kv1\"\nengine = \"kv-v1\"",
        auth,
    ));
    options.extra_config = extra.to_owned();
    Broker::start_with(options).await
}

async fn prepared_openbao() -> OpenBao {
    let bao = OpenBao::start().await;
    bao.api(
        Method::POST,
        "sys/mounts/kv1",
        Some(json!({"type": "kv", "options": {"version": "1"}})),
    )
    .await;
    bao.policy("custos", BROKER_POLICY).await;
    bao
}

/// The `[mounts.vault.auth]` body for a token in a file.
fn token_auth(path: &std::path::Path) -> String {
    format!("method = \"token\"\ntoken_file = \"{}\"", path.display())
}

async fn token_file(bao: &OpenBao, directory: &std::path::Path, ttl: &str) -> String {
    let path = directory.join("vault-token");
    std::fs::write(&path, bao.token(&["custos"], ttl).await).unwrap();
    token_auth(&path)
}

/// A TCP relay to `target` that holds each new connection for `delay` before relaying:
/// a Vault at the end of a slow network, so that a login takes long enough for requests
/// to queue behind it.
async fn slow_relay(target: &str, delay: Duration) -> (String, tokio::task::JoinHandle<()>) {
    let target = target.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let relay = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (address, relay)
}

/// A Vault that accepts connections and never answers, kept up while this lives.
struct HungVault {
    holder: tokio::task::JoinHandle<()>,
    _directory: tempfile::TempDir,
}

impl Drop for HungVault {
    fn drop(&mut self) {
        self.holder.abort();
    }
}

/// Mounts a hung Vault at `vault/` in `options`, with `vault_timeout` as its bound.
async fn mount_hung_vault(options: &mut BrokerOptions, vault_timeout: &str) -> HungVault {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let directory = tempfile::tempdir().unwrap();
    let token = directory.path().join("token");
    std::fs::write(&token, "unused-token").unwrap();
    options.mounts.push_str(&format!(
        "\n[[mounts]]\npath = \"vault\"\nbackend = \"vault\"\n[mounts.vault]\n\
         address = \"{address}\"\nmount = \"secret\"\ntimeout = \"{vault_timeout}\"\n\
         [mounts.vault.auth]\n{}\n",
        token_auth(&token)
    ));
    HungVault {
        holder,
        _directory: directory,
    }
}

/// Enables AppRole in OpenBao with a role for the broker, writes its role id and a secret
/// id issued with `secret_id_options` to files in `directory`, and returns the
/// `[mounts.vault.auth]` body that uses them, with the secret id's text.
async fn approle_for_broker(
    bao: &OpenBao,
    directory: &std::path::Path,
    secret_id_options: serde_json::Value,
) -> (String, String) {
    bao.api(
        Method::POST,
        "sys/auth/approle",
        Some(json!({"type": "approle"})),
    )
    .await;
    bao.api(
        Method::POST,
        "auth/approle/role/custos",
        Some(json!({"token_policies": ["custos"], "token_ttl": "1h"})),
    )
    .await;
    let role_id = bao
        .api(Method::GET, "auth/approle/role/custos/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = bao
        .api(
            Method::POST,
            "auth/approle/role/custos/secret-id",
            Some(secret_id_options),
        )
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let role_id_file = directory.join("role-id");
    let secret_id_file = directory.join("secret-id");
    std::fs::write(&role_id_file, role_id).unwrap();
    std::fs::write(&secret_id_file, &secret_id).unwrap();
    let auth = format!(
        "method = \"approle\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"",
        role_id_file.display(),
        secret_id_file.display()
    );
    (auth, secret_id)
}

fn occurrences(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv2_reads_versions_lists_writes_and_deletes_through_custos() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let auth = token_file(&bao, directory.path(), "1h").await;
    let broker = broker_with_vault(&bao, &auth, "").await;

    let first = broker
        .write("vault/app/db", json!({"password": "one"}))
        .await;
    assert_eq!(first.expect(200).body["metadata"]["version"], 1);
    assert_eq!(first.body["metadata"]["backend"], "vault");
    broker
        .write("vault/app/db", json!({"password": "two", "user": "app"}))
        .await
        .expect(200);

    // What Custos wrote is in OpenBao, and Vault's version numbers are Custos's.
    let stored = bao.api(Method::GET, "secret/data/app/db", None).await;
    assert_eq!(stored["data"]["data"]["password"], "two");
    assert_eq!(stored["data"]["metadata"]["version"], 2);

    let latest = broker.read("vault/app/db").await;
    assert_eq!(
        latest.expect(200).body["data"],
        json!({"password": "two", "user": "app"})
    );
    assert_eq!(latest.body["metadata"]["version"], 2);
    assert!(latest.body["lease"]["lease_id"].is_string());
    let older = broker.read("vault/app/db?version=1").await;
    assert_eq!(older.expect(200).body["data"]["password"], "one");
    broker
        .read("vault/app/db?version=9")
        .await
        .expect_error(404, "version_not_found");

    broker
        .write("vault/app/api", json!({"key": "k"}))
        .await
        .expect(200);
    broker
        .write("vault/app/nested/x", json!({"key": "k"}))
        .await
        .expect(200);
    let listed = broker.list("vault/app").await;
    assert_eq!(
        listed.expect(200).body["keys"],
        json!(["api", "db", "nested/"])
    );

    // Check-and-set against a stale version: the same 409 as the local store, naming the
    // current version, and nothing written.
    let stale = broker
        .write_body("vault/app/db", json!({"data": {"k": "v"}, "cas": 1}))
        .await;
    stale.expect_error(409, "check_and_set_mismatch");
    assert!(stale.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("current version is 2"));
    let unchanged = bao.api(Method::GET, "secret/data/app/db", None).await;
    assert_eq!(unchanged["data"]["metadata"]["version"], 2);

    // Soft delete hides the latest version and says so; older versions stay readable.
    broker.delete("vault/app/db").await.expect(204);
    broker
        .read("vault/app/db")
        .await
        .expect_error(404, "version_deleted");
    broker.read("vault/app/db?version=1").await.expect(200);
    broker
        .delete("vault/app/db?versions=1&destroy=true")
        .await
        .expect(204);
    broker
        .read("vault/app/db?version=1")
        .await
        .expect_error(404, "version_destroyed");

    broker
        .delete("vault/app/api?destroy=true")
        .await
        .expect(204);
    broker
        .read("vault/app/api")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .delete("vault/app/never")
        .await
        .expect_error(404, "secret_not_found");

    // Binary fields cannot go to Vault KV: a clear 400, nothing written.
    broker
        .write("vault/app/binary", json!({"blob": {"base64": "AJ+Slg=="}}))
        .await
        .expect_error(400, "invalid_request");
    let (status, _) = bao
        .try_api(Method::GET, "secret/data/app/binary", None)
        .await;
    assert_eq!(status, 404);

    // The read was audited like any other, with Vault's version and the lease.
    let records = broker.audit_records_of(&older.request_id()).await;
    assert_eq!(records.len(), 1);
    let record = &records[0].record;
    assert_eq!(record["backend"], "vault");
    assert_eq!(record["mount"], "vault");
    assert_eq!(record["version"], 1);
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["lease_id"], older.body["lease"]["lease_id"]);
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv1_reads_writes_lists_and_deletes() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let auth = token_file(&bao, directory.path(), "1h").await;
    let broker = broker_with_vault(&bao, &auth, "").await;

    broker
        .write("legacy/app/db", json!({"password": "v1"}))
        .await
        .expect(200);
    let stored = bao.api(Method::GET, "kv1/app/db", None).await;
    assert_eq!(stored["data"]["password"], "v1");
    let read = broker.read("legacy/app/db").await;
    assert_eq!(read.expect(200).body["data"]["password"], "v1");
    assert_eq!(read.body["metadata"]["version"], 1);
    assert_eq!(
        broker.list("legacy/app").await.expect(200).body["keys"],
        json!(["db"])
    );
    broker
        .read("legacy/app/db?version=2")
        .await
        .expect_error(400, "invalid_request");
    broker
        .write_body("legacy/app/db", json!({"data": {"k": "v"}, "cas": 1}))
        .await
        .expect_error(400, "invalid_request");
    broker.delete("legacy/app/db").await.expect(204);
    broker
        .read("legacy/app/db")
        .await
        .expect_error(404, "secret_not_found");
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_brokers_short_lived_vault_token_is_renewed_and_a_replaced_file_is_used() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let token_path = directory.path().join("vault-token");
    std::fs::write(&token_path, bao.token(&["custos"], "3s").await).unwrap();
    let broker = broker_with_vault(&bao, &token_auth(&token_path), "").await;
    broker
        .write("vault/app/db", json!({"password": "p"}))
        .await
        .expect(200);

    // Twice the token's TTL with no request at all: the broker renewed it on its own, so
    // the next read still works.
    tokio::time::sleep(Duration::from_secs(6)).await;
    broker.read("vault/app/db").await.expect(200);
    assert!(
        occurrences(&broker.log(), "renewed the Vault token") >= 2,
        "{}",
        broker.log()
    );

    // An operator replaces the token file and revokes the old token: the new one is used.
    let old = std::fs::read_to_string(&token_path).unwrap();
    std::fs::write(&token_path, bao.token(&["custos"], "1h").await).unwrap();
    bao.api(
        Method::POST,
        "auth/token/revoke",
        Some(json!({"token": old})),
    )
    .await;
    broker.read("vault/app/db").await.expect(200);
    assert!(!broker.log().contains(&old));
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_logs_in_with_approle_and_once_for_many_requests_after_a_revocation() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let (auth, secret_id) = approle_for_broker(&bao, directory.path(), json!({})).await;
    let (relay_address, relay) = slow_relay(&bao.address, Duration::from_millis(300)).await;
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options.mounts.push_str(&format!(
        "\n[[mounts]]\npath = \"vault\"\nbackend = \"vault\"\n[mounts.vault]\n\
         address = \"{relay_address}\"\nmount = \"secret\"\n[mounts.vault.auth]\n{auth}\n"
    ));
    let broker = Broker::start_with(options).await;
    broker
        .write("vault/app/db", json!({"password": "approle"}))
        .await
        .expect(200);
    assert_eq!(
        broker.read("vault/app/db").await.expect(200).body["data"]["password"],
        "approle"
    );
    assert_eq!(occurrences(&broker.log(), "logged in to Vault"), 1);

    // Vault revokes the broker's token. Forty reads arrive at once: each sees Vault
    // refuse the old token, and they queue behind one slow login, which they all share.
    assert_eq!(
        bao.revoke_tokens_with_metadata("role_name", "custos").await,
        1
    );
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let request = broker
            .http()
            .get(broker.url("/v1/secrets/vault/app/db"))
            .bearer_auth(&broker.root_token);
        reads.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = reads.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let log = broker.log();
    assert_eq!(occurrences(&log, "logged in to Vault"), 2, "{log}");
    assert_eq!(occurrences(&log, "renewed the Vault token"), 0, "{log}");
    assert!(!log.contains(&secret_id));
    broker.finish().await;
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_on_one_vault_identity_share_one_login_even_with_a_single_use_secret_id() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let (auth, secret_id) =
        approle_for_broker(&bao, directory.path(), json!({"num_uses": 1})).await;

    // Two mounts, KV v2 and KV v1, one Vault identity: the one use of the secret id
    // serves both.
    let broker = broker_with_vault(&bao, &auth, "").await;
    broker
        .write("vault/app/db", json!({"password": "kv2"}))
        .await
        .expect(200);
    broker
        .write("legacy/app/db", json!({"password": "kv1"}))
        .await
        .expect(200);
    assert_eq!(
        broker.read("legacy/app/db").await.expect(200).body["data"]["password"],
        "kv1"
    );
    assert_eq!(occurrences(&broker.log(), "logged in to Vault"), 1);
    assert!(!broker.log().contains(&secret_id));
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_logs_in_to_vault_with_its_kubernetes_service_account() {
    let jwt = service_account_jwt("custos", "broker");
    let emulator = KubernetesEmulator::start(&[(jwt.as_str(), "custos", "broker", &[])]);
    let bao = prepared_openbao().await;
    bao.enable_kubernetes_auth(&emulator, "custos-broker", "custos", "broker", &["custos"])
        .await;
    let directory = tempfile::tempdir().unwrap();
    let jwt_file = directory.path().join("token");
    std::fs::write(&jwt_file, &jwt).unwrap();

    let auth = format!(
        "method = \"kubernetes\"\nrole = \"custos-broker\"\njwt_file = \"{}\"",
        jwt_file.display()
    );
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options
        .mounts
        .push_str(&vault_mount(&bao, "vault", "mount = \"secret\"", &auth));
    let broker = Broker::start_with(options).await;
    broker
        .write("vault/app/db", json!({"password": "from-kubernetes"}))
        .await
        .expect(200);
    assert_eq!(
        broker.read("vault/app/db").await.expect(200).body["data"]["password"],
        "from-kubernetes"
    );

    // OpenBao checked the broker's own service-account token with the API server.
    let reviews = emulator.reviews().await;
    assert!(
        reviews
            .as_array()
            .unwrap()
            .iter()
            .any(|review| review["token"] == jwt.as_str()),
        "{reviews}"
    );
    assert!(!broker.log().contains(&jwt));
    broker.finish().await;
}

/// Connects to PostgreSQL as a dynamic credential; the error text when it cannot.
async fn postgres_login(
    database: &TestDatabase,
    username: &str,
    password: &str,
) -> Result<String, String> {
    use sqlx::{ConnectOptions, Row};
    let url = url_without_credentials(&database.url);
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let mut connection = options
        .username(username)
        .password(password)
        .connect()
        .await
        .map_err(|error| error.to_string())?;
    let row = sqlx::query("SELECT current_user::text")
        .fetch_one(&mut connection)
        .await
        .map_err(|error| error.to_string())?;
    Ok(row.get(0))
}

fn url_without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_database_credentials_work_renew_and_stop_working_when_revoked() {
    let target = TestDatabase::create(DatabaseKind::Postgres).await;
    let bao = prepared_openbao().await;
    bao.enable_database_engine(&target.url, "app", "60s", "10m")
        .await;
    let directory = tempfile::tempdir().unwrap();
    let auth = token_file(&bao, directory.path(), "1h").await;

    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    // `db` leases for up to ten minutes; `shortdb` serves the same engine with two-second
    // leases, to show that an expiring Custos lease takes the credential with it.
    let dynamic = "mount = \"database\"\nengine = \"dynamic\"";
    options.mounts.push_str(&vault_mount_with(
        &bao,
        "db",
        "lease_ttl = \"10m\"\nlease_max_ttl = \"1h\"",
        dynamic,
        &auth,
    ));
    options.mounts.push_str(&vault_mount_with(
        &bao,
        "shortdb",
        "lease_ttl = \"2s\"\nlease_max_ttl = \"1m\"",
        dynamic,
        &auth,
    ));
    options.extra_config = "[auth]\nsweep_interval = \"1s\"\n".to_owned();
    let broker = Broker::start_with(options).await;

    // A read mints a credential that logs in to PostgreSQL. The Custos lease is no longer
    // than Vault's (60 s), although the mount would allow ten minutes.
    let read = broker.read("db/creds/app").await;
    read.expect(200);
    let username = read.body["data"]["username"].as_str().unwrap().to_owned();
    let password = read.body["data"]["password"].as_str().unwrap().to_owned();
    assert_eq!(
        postgres_login(&target, &username, &password).await,
        Ok(username.clone())
    );
    let lease_id = read.body["lease"]["lease_id"].as_str().unwrap().to_owned();
    let ttl = read.body["lease"]["ttl_seconds"].as_u64().unwrap();
    assert!((50..=60).contains(&ttl), "{ttl}");
    let vault_leases = bao.leases("database/creds/app/").await;
    assert_eq!(vault_leases.len(), 1);
    let vault_lease = vault_leases[0].clone();

    // Renewing the Custos lease renews Vault's.
    let renewed = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/renew",
            json!({"lease_id": lease_id, "increment_seconds": 300}),
        )
        .await;
    let renewed_ttl = renewed.expect(200).body["ttl_seconds"].as_u64().unwrap();
    assert!((290..=300).contains(&renewed_ttl), "{renewed_ttl}");
    let vault_ttl = bao.lease_ttl(&vault_lease).await.unwrap();
    assert!(
        vault_ttl > 200,
        "Vault's lease was not renewed: {vault_ttl}"
    );

    // Dynamic mounts only read.
    broker
        .write("db/creds/app", json!({"username": "x"}))
        .await
        .expect_error(405, "unsupported_operation");
    broker
        .list("db/creds")
        .await
        .expect_error(405, "unsupported_operation");

    // Revoking the Custos lease revokes Vault's, and the credential stops working.
    broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/revoke",
            json!({"lease_id": lease_id}),
        )
        .await
        .expect(204);
    assert_eq!(bao.lease_ttl(&vault_lease).await, None);
    let refused = postgres_login(&target, &username, &password).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.contains("does not exist")),
        "{refused:?}"
    );
    let lookup = broker
        .get_as(&broker.root_token, &format!("/v1/leases/{lease_id}"))
        .await;
    assert_eq!(lookup.expect(200).body["state"], "revoked");

    // A Custos lease that expires takes its credential with it.
    let short = broker.read("shortdb/creds/app").await;
    short.expect(200);
    let short_user = short.body["data"]["username"].as_str().unwrap().to_owned();
    let short_password = short.body["data"]["password"].as_str().unwrap().to_owned();
    assert!(short.body["lease"]["ttl_seconds"].as_u64().unwrap() <= 2);
    assert!(postgres_login(&target, &short_user, &short_password)
        .await
        .is_ok());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while postgres_login(&target, &short_user, &short_password)
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired lease's credential still works"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(bao.leases("database/creds/app/").await.is_empty());

    // Renewing a lease whose Vault lease is gone says so, and ends the Custos lease.
    let orphan = broker.read("db/creds/app").await;
    orphan.expect(200);
    let orphan_lease = orphan.body["lease"]["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for lease in bao.leases("database/creds/app/").await {
        bao.api(
            Method::PUT,
            "sys/leases/revoke",
            Some(json!({"lease_id": lease})),
        )
        .await;
    }
    broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/renew",
            json!({"lease_id": orphan_lease}),
        )
        .await
        .expect_error(409, "lease_not_active");
    let ended = broker
        .get_as(&broker.root_token, &format!("/v1/leases/{orphan_lease}"))
        .await;
    assert_eq!(ended.expect(200).body["state"], "revoked");
    assert_eq!(ended.body["revoke_reason"], "backend lease ended");

    // No credential reached the broker's log or its audit records.
    let log = broker.log();
    assert!(!log.contains(&password) && !log.contains(&short_password));
    let records = serde_json::to_string(
        &broker
            .audit_records()
            .await
            .iter()
            .map(|entry| entry.record.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(!records.contains(&password) && !records.contains(&short_password));
    broker.finish().await;
    target.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_errors_are_mapped_and_denied_reads_never_reach_vault() {
    let mut bao = prepared_openbao().await;
    bao.policy(
        "narrow",
        r#"path "secret/data/allowed/*" { capabilities = ["read"] }"#,
    )
    .await;
    let directory = tempfile::tempdir().unwrap();
    let narrow = directory.path().join("narrow-token");
    std::fs::write(&narrow, bao.token(&["narrow"], "1h").await).unwrap();
    bao.api(
        Method::POST,
        "secret/data/forbidden/x",
        Some(json!({"data": {"k": "v"}})),
    )
    .await;

    let policies = r#"
[[policies]]
name = "vault-reader"
[[policies.rules]]
path = "vault/**"
capabilities = ["read"]
"#;
    let broker = broker_with_vault(&bao, &token_auth(&narrow), policies).await;

    // Vault's own permission denied: 502, naming the broker's Vault identity and Vault's
    // reason.
    let denied = broker.read("vault/forbidden/x").await;
    denied.expect_error(502, "backend_denied");
    let message = denied.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("broker's own identity") && message.contains("permission denied"),
        "{message}"
    );
    let record = broker.audit_records_of(&denied.request_id()).await[0]
        .record
        .clone();
    assert_eq!(record["outcome"], "error");
    assert_eq!(record["error_code"], "backend_denied");

    // A workload without a Custos grant is refused before Vault is asked: with Vault
    // down, the denied read still says 403 while the allowed one says 502.
    let workload = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/auth/token/create",
            json!({"policies": ["vault-reader"]}),
        )
        .await;
    let workload = workload.body["token"].as_str().unwrap().to_owned();
    bao.stop();
    broker
        .get_as(&workload, "/v1/secrets/legacy/app")
        .await
        .expect_error(403, "forbidden");
    let down = broker
        .get_as(&workload, "/v1/secrets/vault/allowed/x")
        .await;
    down.expect_error(502, "backend_unavailable");
    assert!(down.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cannot reach Vault"));
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_that_does_not_answer_is_a_504_not_a_hang() {
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    let _vault = mount_hung_vault(&mut options, "1s").await;
    let broker = Broker::start_with(options).await;

    // The broker's request timeout is 5 s; Vault's 1 s bound answers first, with 504.
    let slow = broker.read("vault/app/db").await;
    slow.expect_error(504, "backend_timeout");
    assert!(slow.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("did not answer in time"));

    // Eight reads at once, once the last failure is stale: they queue behind one login
    // attempt and share its failure, rather than each waiting out Vault's timeout in turn
    // (which would push the last ones past the request timeout).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = broker
            .http()
            .get(broker.url("/v1/secrets/vault/app/db"))
            .bearer_auth(&broker.root_token);
        reads.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body["error"]["code"].as_str().unwrap().to_owned())
        });
    }
    while let Some(answer) = reads.join_next().await {
        assert_eq!(answer.unwrap(), (504, "backend_timeout".to_owned()));
    }

    // A client that hangs up while its request waits on Vault does not erase the request:
    // it is still handled to the end, and audited.
    let before = broker.audit_records().await.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut impatient = tokio::net::TcpStream::connect(&broker.address)
        .await
        .unwrap();
    let request = format!(
        "GET /v1/secrets/vault/app/impatient HTTP/1.1\r\nHost: {}\r\n\
         Authorization: Bearer {}\r\n\r\n",
        broker.address, broker.root_token
    );
    tokio::io::AsyncWriteExt::write_all(&mut impatient, request.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(impatient);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = broker.audit_records().await;
        if let Some(entry) = records[before..]
            .iter()
            .find(|entry| entry.record["path"] == "vault/app/impatient")
        {
            assert_eq!(entry.record["status"], 504);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned request left no record"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.finish().await;
}

/// When Vault's own bound is longer than the broker's request timeout, the request timeout
/// answers: 503 `request_timeout` within it, and the request is audited as such. A hung
/// Vault holds up neither the broker's start nor its other mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_outlasts_the_request_timeout_is_a_503_and_is_audited() {
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options.request_timeout = "1s".to_owned();
    // The broker starts at once although this Vault hangs: the start-up login runs in the
    // background (the harness gives up after 20 s, Vault's bound here is 30 s).
    let _vault = mount_hung_vault(&mut options, "30s").await;
    let broker = Broker::start_with(options).await;

    let started = std::time::Instant::now();
    let slow = broker.read("vault/app/db").await;
    let waited = started.elapsed();
    slow.expect_error(503, "request_timeout");
    assert!(
        slow.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not complete within 1000 ms"),
        "{}",
        slow.body
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");

    let records = broker.audit_records_of(&slow.request_id()).await;
    assert_eq!(records.len(), 1);
    let record = &records[0].record;
    assert_eq!(record["status"], 503);
    assert_eq!(record["error_code"], "request_timeout");
    assert_eq!(record["path"], "vault/app/db");
    assert!(record
        .get("lease_id")
        .is_none_or(serde_json::Value::is_null));

    // A local mount on the same broker is not held up by the stuck one.
    broker
        .write("secret/app", json!({"password": "local"}))
        .await
        .expect(200);
    broker.read("secret/app").await.expect(200);
    broker.finish().await;
}

/// A Vault that freezes while the broker's session is due for renewal: reads answer 504
/// within Vault's bound instead of hanging, the still-valid token is kept, and once Vault
/// thaws the keeper renews it, so reads keep working past the token's original end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_that_freezes_during_renewal_costs_504s_and_the_session_survives() {
    let bao = prepared_openbao().await;
    let directory = tempfile::tempdir().unwrap();
    let token_path = directory.path().join("vault-token");
    let issued = std::time::Instant::now();
    std::fs::write(&token_path, bao.token(&["custos"], "15s").await).unwrap();
    let broker = broker_with_vault(&bao, &token_auth(&token_path), "").await;
    broker
        .write("vault/app/db", json!({"password": "p"}))
        .await
        .expect(200);

    bao.pause();
    let started = std::time::Instant::now();
    let frozen = broker.read("vault/app/db").await;
    frozen.expect_error(504, "backend_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered after {:?}",
        started.elapsed()
    );

    // The keeper renews at two thirds of the 15 s, about 10 s in: let it try while Vault
    // is frozen, then thaw Vault before the token's end.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(issued.elapsed())).await;
    let renewals_before = occurrences(&broker.log(), "renewed the Vault token");
    bao.resume();
    broker.read("vault/app/db").await.expect(200);

    // Past the token's original end: only a renewal after the thaw keeps reads working.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(issued.elapsed())).await;
    broker.read("vault/app/db").await.expect(200);
    assert!(
        occurrences(&broker.log(), "renewed the Vault token") > renewals_before,
        "{}",
        broker.log()
    );
    broker.finish().await;
}
