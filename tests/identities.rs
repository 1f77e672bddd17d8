//! Identities, policies and leases end to end: Kubernetes and AppRole logins, policy
//! checks, token lifetimes, lease revocation and expiry, and failure limits, on SQLite and
//! PostgreSQL. Kubernetes is the kmock emulator with scripted TokenReview answers.

use std::time::Duration;

use custos_end_to_end::{
    describe, on_both_databases, Broker, BrokerOptions, DatabaseKind, KubernetesEmulator, Reply,
    REVIEWER_TOKEN,
};
use serde_json::{json, Value};

on_both_databases!(
    a_kubernetes_workload_reads_only_what_its_policy_allows_until_its_token_expires,
    an_approle_single_use_secret_id_works_once,
    revoke_prefix_takes_its_leases_and_revoke_principal_everything_one_workload_holds,
    leases_survive_a_restart_and_expire_on_time,
    repeated_failures_get_429_while_a_client_elsewhere_is_unaffected,
    tokens_pass_on_only_their_own_policies_and_die_with_their_parent,
    policies_written_through_the_api_take_effect,
);

const POLICIES: &str = r#"
[[policies]]
name = "payments-read"
[[policies.rules]]
path = "secret/payments/**"
capabilities = ["read", "list"]

[[policies]]
name = "app-read"
[[policies.rules]]
path = "secret/app/**"
capabilities = ["read"]
[[policies.rules]]
path = "secret/application"
capabilities = ["read"]
[[policies.rules]]
path = "short/**"
capabilities = ["read"]
"#;

fn options(kind: DatabaseKind, auth: &str) -> BrokerOptions {
    let mut options = BrokerOptions::new(kind);
    options.mounts.push_str(
        "\n[[mounts]]\npath = \"short\"\nbackend = \"local\"\nlease_ttl = \"2s\"\n\
         lease_max_ttl = \"3s\"\n",
    );
    options.extra_config = format!(
        "[auth]\nsweep_interval = \"1s\"\nfailed_attempts_per_address = 5\n\
         failed_attempts_per_role = 100\n\n{auth}\n{POLICIES}"
    );
    options
}

fn token_of(reply: &Reply) -> String {
    reply.body["token"]
        .as_str()
        .expect("a token was issued")
        .to_owned()
}

async fn approle_token(broker: &Broker, role: &str, policies: &[&str]) -> String {
    broker
        .put_as(
            &broker.root_token,
            &format!("/v1/auth/approle/roles/{role}"),
            json!({"policies": policies}),
        )
        .await
        .expect(200);
    let role_id = broker
        .get_as(
            &broker.root_token,
            &format!("/v1/auth/approle/roles/{role}"),
        )
        .await
        .body["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = broker
        .post_as(
            Some(&broker.root_token),
            &format!("/v1/auth/approle/roles/{role}/secret-id"),
            json!({}),
        )
        .await
        .body["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let login = broker
        .post_as(
            None,
            "/v1/auth/approle/login",
            json!({"role_id": role_id, "secret_id": secret_id}),
        )
        .await;
    token_of(login.expect(200))
}

async fn a_kubernetes_workload_reads_only_what_its_policy_allows_until_its_token_expires(
    kind: DatabaseKind,
) {
    let emulator = KubernetesEmulator::start(&[
        ("jwt-payments-api", "payments", "api", &["custos"]),
        ("jwt-payments-batch", "payments", "batch", &["custos"]),
        ("jwt-wrong-audience", "payments", "api", &["somebody-else"]),
    ]);
    let roles = r#"
[[auth.kubernetes.roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
policies = ["payments-read"]
audiences = ["custos"]
token_ttl = "3s"
token_max_ttl = "5s"
"#;
    let broker = Broker::start_with(options(kind, &emulator.auth_config(roles))).await;
    broker
        .write("secret/payments/db", json!({"password": "pay"}))
        .await
        .expect(200);
    broker
        .write("secret/other/db", json!({"password": "other"}))
        .await
        .expect(200);

    let login = broker
        .post_as(
            None,
            "/v1/auth/kubernetes/login",
            json!({"role": "payments", "jwt": "jwt-payments-api"}),
        )
        .await;
    login.expect(200);
    assert_eq!(login.body["principal"], "kubernetes:payments/api");
    assert_eq!(login.body["policies"], json!(["payments-read"]));
    assert_eq!(login.body["metadata"]["namespace"], "payments");
    assert!(login.body["ttl_seconds"].as_u64().unwrap() <= 3);
    assert_eq!(login.headers["cache-control"], "no-store");
    let token = token_of(&login);

    // The broker asked the API server with its own reviewer token and the role's audience.
    let reviews = emulator.reviews().await;
    let review = reviews.as_array().unwrap().last().unwrap().clone();
    assert_eq!(review["authorization"], format!("Bearer {REVIEWER_TOKEN}"));
    assert_eq!(review["audiences"], json!(["custos"]));

    let allowed = broker
        .get_as(&token, "/v1/secrets/secret/payments/db")
        .await;
    assert_eq!(allowed.expect(200).body["data"]["password"], "pay");
    assert!(allowed.body["lease"]["lease_id"]
        .as_str()
        .unwrap()
        .starts_with("lease_"));
    assert!(allowed.headers.contains_key("x-custos-lease-id"));
    broker
        .get_as(&token, "/v1/secrets/secret/payments?list=true")
        .await
        .expect(200);

    let denied = broker.get_as(&token, "/v1/secrets/secret/other/db").await;
    denied.expect_error(403, "forbidden");
    assert!(denied.body.get("data").is_none());
    let record = broker.audit_records_of(&denied.request_id()).await[0]
        .record
        .clone();
    assert_eq!(record["principal"], "kubernetes:payments/api");
    assert_eq!(record["auth_method"], "kubernetes");
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["path"], "secret/other/db");
    broker
        .put_as(
            &token,
            "/v1/secrets/secret/payments/db",
            json!({"data": {"k": "v"}}),
        )
        .await
        .expect_error(403, "forbidden");
    broker
        .get_as(&token, "/v1/audit")
        .await
        .expect_error(403, "forbidden");

    // Wrong service account, wrong audience, unknown token, unknown role: one coarse answer.
    for (role, jwt) in [
        ("payments", "jwt-payments-batch"),
        ("payments", "jwt-wrong-audience"),
        ("payments", "jwt-forged"),
        ("no-such-role", "jwt-payments-api"),
    ] {
        let refused = broker
            .post_as(
                None,
                "/v1/auth/kubernetes/login",
                json!({"role": role, "jwt": jwt}),
            )
            .await;
        refused.expect_error(401, "login_failed");
        assert_eq!(refused.body["error"]["message"], "login failed");
    }

    // Renewal extends the token, up to its maximum; after that it is refused.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewed = broker
        .post_as(Some(&token), "/v1/auth/token/renew-self", json!({}))
        .await;
    assert!(renewed.expect(200).body["ttl_seconds"].as_u64().unwrap() >= 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker
        .get_as(&token, "/v1/secrets/secret/payments/db")
        .await
        .expect(200);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    broker
        .get_as(&token, "/v1/secrets/secret/payments/db")
        .await
        .expect_error(401, "invalid_token");
    broker.finish().await;
}

async fn an_approle_single_use_secret_id_works_once(kind: DatabaseKind) {
    let broker = Broker::start_with(options(kind, "")).await;
    broker
        .write("secret/app/config", json!({"k": "v"}))
        .await
        .expect(200);

    let written = broker.cli(&[
        "approle",
        "write-role",
        "ci",
        "--policy",
        "app-read",
        "--secret-id-ttl",
        "10m",
        "--format",
        "json",
    ]);
    assert!(written.status.success(), "{}", describe(&written));
    let role_id = String::from_utf8(broker.cli(&["approle", "role-id", "ci"]).stdout).unwrap();
    let role_id = role_id.trim().to_owned();
    assert_eq!(role_id.len(), 36, "{role_id}");

    // Delivered as a file, like a Docker secret under /run/secrets/.
    let secret_file = broker.directory.path().join("custos_secret_id");
    let issued = broker.cli(&[
        "approle",
        "secret-id",
        "ci",
        "--output",
        secret_file.to_str().unwrap(),
    ]);
    assert!(issued.status.success(), "{}", describe(&issued));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let secret_id = std::fs::read_to_string(&secret_file)
        .unwrap()
        .trim()
        .to_owned();

    let login = broker.cli(&[
        "approle",
        "login",
        "--role-id",
        &role_id,
        "--secret-id-file",
        secret_file.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(login.status.success(), "{}", describe(&login));
    let answer: Value = serde_json::from_slice(&login.stdout).unwrap();
    assert_eq!(answer["principal"], "approle:ci");
    let token = answer["token"].as_str().unwrap().to_owned();
    broker
        .get_as(&token, "/v1/secrets/secret/app/config")
        .await
        .expect(200);

    // The same secret id again: refused, with the same answer as any bad login.
    let again = broker
        .post_as(
            None,
            "/v1/auth/approle/login",
            json!({"role_id": role_id, "secret_id": secret_id}),
        )
        .await;
    again.expect_error(401, "login_failed");
    let record = broker.audit_records_of(&again.request_id()).await[0]
        .record
        .clone();
    assert_eq!(record["operation"], "login.approle");
    assert_eq!(record["role"], "ci");
    assert_eq!(record["outcome"], "denied");
    assert!(!record.to_string().contains(&secret_id));
    broker.finish().await;
}

async fn revoke_prefix_takes_its_leases_and_revoke_principal_everything_one_workload_holds(
    kind: DatabaseKind,
) {
    let broker = Broker::start_with(options(kind, "")).await;
    for path in ["secret/app/db", "secret/app/api", "secret/application"] {
        broker.write(path, json!({"k": "v"})).await.expect(200);
    }
    let first = approle_token(&broker, "first", &["app-read"]).await;
    let second = approle_token(&broker, "second", &["app-read"]).await;

    let mut leases = std::collections::BTreeMap::new();
    for (who, token) in [("first", &first), ("second", &second)] {
        for path in ["secret/app/db", "secret/app/api", "secret/application"] {
            let read = broker.get_as(token, &format!("/v1/secrets/{path}")).await;
            let lease = read.expect(200).body["lease"]["lease_id"]
                .as_str()
                .unwrap()
                .to_owned();
            leases.insert((who, path), lease);
        }
    }
    let state = |lease: String| {
        let broker = &broker;
        async move {
            broker
                .get_as(&broker.root_token, &format!("/v1/leases/{lease}"))
                .await
                .body["state"]
                .clone()
        }
    };

    // Incident: every lease under secret/app, whoever holds it; not secret/application.
    let revoked = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/revoke-prefix",
            json!({"prefix": "secret/app"}),
        )
        .await;
    assert_eq!(revoked.expect(200).body["revoked"], 4);
    for who in ["first", "second"] {
        for path in ["secret/app/db", "secret/app/api"] {
            assert_eq!(
                state(leases[&(who, path)].clone()).await,
                "revoked",
                "{who} {path}"
            );
        }
        assert_eq!(
            state(leases[&(who, "secret/application")].clone()).await,
            "active"
        );
    }

    // Everything one workload holds, and nothing of the other.
    let revoked = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/revoke-principal",
            json!({"principal": "approle:first"}),
        )
        .await;
    assert_eq!(revoked.expect(200).body["revoked"], 1);
    assert_eq!(revoked.body["revoked_tokens"], 1, "{}", revoked.body);
    assert_eq!(
        state(leases[&("first", "secret/application")].clone()).await,
        "revoked"
    );
    assert_eq!(
        state(leases[&("second", "secret/application")].clone()).await,
        "active"
    );
    // Its token is gone too, so it cannot draw a new lease; the other workload's works.
    broker
        .get_as(&first, "/v1/secrets/secret/application")
        .await
        .expect_error(401, "invalid_token");
    broker
        .get_as(&second, "/v1/secrets/secret/application")
        .await
        .expect(200);

    // Holders learn their lease was revoked; workloads may not revoke in bulk.
    let own = broker
        .get_as(
            &second,
            &format!("/v1/leases/{}", leases[&("second", "secret/app/db")]),
        )
        .await;
    assert_eq!(own.expect(200).body["state"], "revoked");
    assert_eq!(own.body["revoke_reason"], "revoked by prefix");
    broker
        .get_as(
            &second,
            &format!("/v1/leases/{}", leases[&("first", "secret/app/db")]),
        )
        .await
        .expect_error(404, "lease_not_found");
    broker
        .post_as(
            Some(&second),
            "/v1/leases/revoke-prefix",
            json!({"prefix": "secret"}),
        )
        .await
        .expect_error(403, "forbidden");
    broker.finish().await;
}

async fn leases_survive_a_restart_and_expire_on_time(kind: DatabaseKind) {
    let mut broker = Broker::start_with(options(kind, "")).await;
    broker
        .write("short/app", json!({"k": "v"}))
        .await
        .expect(200);
    let read = broker.read("short/app").await;
    let lease = read.expect(200).body["lease"].clone();
    assert!(lease["ttl_seconds"].as_u64().unwrap() <= 2);
    assert_eq!(
        read.headers["x-custos-lease-id"],
        lease["lease_id"].as_str().unwrap()
    );
    let lease_id = lease["lease_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/leases/{lease_id}");

    broker.restart().await;
    assert_eq!(
        broker
            .get_as(&broker.root_token, &path)
            .await
            .expect(200)
            .body["state"],
        "active"
    );
    let renewed = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/renew",
            json!({"lease_id": lease_id}),
        )
        .await;
    assert_eq!(renewed.expect(200).body["state"], "active");

    // The mount's maximum is 3 s: past it the lease is expired, renewal refused.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = broker.get_as(&broker.root_token, &path).await;
    assert_eq!(after.expect(200).body["state"], "expired");
    broker
        .post_as(
            Some(&broker.root_token),
            "/v1/leases/renew",
            json!({"lease_id": lease_id}),
        )
        .await
        .expect_error(409, "lease_not_active");

    // The sweeper records the end in the store (it is what revokes a backend's own lease
    // when a lease expires), within a few sweep intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut connection = broker.database_connection().await;
        let reason: Option<String> =
            sqlx::query_scalar("SELECT revoke_reason FROM leases WHERE lease_id = $1")
                .bind(&lease_id)
                .fetch_one(&mut connection)
                .await
                .unwrap();
        if reason.as_deref() == Some("expired") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper never ended the lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.finish().await;
}

async fn repeated_failures_get_429_while_a_client_elsewhere_is_unaffected(kind: DatabaseKind) {
    let broker = Broker::start_with(options(kind, "")).await;
    broker
        .write("secret/app/x", json!({"k": "v"}))
        .await
        .expect(200);
    let bad_login = json!({"role_id": "guess", "secret_id": "guess"});

    // The test configuration allows 5 failures per address per minute.
    for _ in 0..5 {
        broker
            .post_as(None, "/v1/auth/approle/login", bad_login.clone())
            .await
            .expect_error(401, "login_failed");
    }
    let limited = broker
        .post_as(None, "/v1/auth/approle/login", bad_login.clone())
        .await;
    limited.expect_error(429, "too_many_attempts");
    let bad_token = broker
        .get_as("cst_guessing", "/v1/secrets/secret/app/x")
        .await;
    bad_token.expect_error(429, "too_many_attempts");
    let record = broker.audit_records_of(&limited.request_id()).await[0]
        .record
        .clone();
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["status"], 429);

    // Another address (127.0.0.2 is loopback too) is not affected.
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let answer = elsewhere
        .get(broker.url("/v1/secrets/secret/app/x"))
        .bearer_auth(&broker.root_token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    broker.finish().await;
}

async fn tokens_pass_on_only_their_own_policies_and_die_with_their_parent(kind: DatabaseKind) {
    let broker = Broker::start_with(options(kind, "")).await;
    broker
        .write("secret/app/x", json!({"k": "v"}))
        .await
        .expect(200);
    let root = broker.root_token.clone();

    let parent = broker
        .post_as(
            Some(&root),
            "/v1/auth/token/create",
            json!({"policies": ["app-read"], "ttl_seconds": 600}),
        )
        .await;
    let parent_token = token_of(parent.expect(200));
    let parent_accessor = parent.body["accessor"].as_str().unwrap().to_owned();

    broker
        .post_as(
            Some(&parent_token),
            "/v1/auth/token/create",
            json!({"policies": ["payments-read"]}),
        )
        .await
        .expect_error(403, "forbidden");
    broker
        .post_as(
            Some(&root),
            "/v1/auth/token/create",
            json!({"policies": ["no-such-policy"]}),
        )
        .await
        .expect_error(400, "invalid_request");

    // A single-use child: one request, then refused.
    let child = broker
        .post_as(
            Some(&parent_token),
            "/v1/auth/token/create",
            json!({"policies": ["app-read"], "uses": 1}),
        )
        .await;
    let child_token = token_of(child.expect(200));
    broker
        .get_as(&child_token, "/v1/secrets/secret/app/x")
        .await
        .expect(200);
    broker
        .get_as(&child_token, "/v1/secrets/secret/app/x")
        .await
        .expect_error(401, "invalid_token");

    // Revoking the parent revokes its other children and their leases.
    let other_child = broker
        .post_as(
            Some(&parent_token),
            "/v1/auth/token/create",
            json!({"policies": ["app-read"]}),
        )
        .await;
    let other_child_token = token_of(other_child.expect(200));
    let lease = broker
        .get_as(&other_child_token, "/v1/secrets/secret/app/x")
        .await
        .body["lease"]["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = broker
        .post_as(
            Some(&root),
            "/v1/auth/token/revoke",
            json!({"accessor": parent_accessor}),
        )
        .await;
    assert_eq!(revoked.expect(200).body["revoked_tokens"], 3);
    broker
        .get_as(&parent_token, "/v1/auth/token/lookup-self")
        .await
        .expect_error(401, "invalid_token");
    broker
        .get_as(&other_child_token, "/v1/auth/token/lookup-self")
        .await
        .expect_error(401, "invalid_token");
    let lease_state = broker.get_as(&root, &format!("/v1/leases/{lease}")).await;
    assert_eq!(lease_state.body["state"], "revoked");
    assert_eq!(lease_state.body["revoke_reason"], "token revoked");

    // The CLI shows a token's own view.
    let own = broker.cli(&["token", "lookup-self"]);
    let own = String::from_utf8(own.stdout).unwrap();
    assert!(own.contains("principal") && own.contains("root"), "{own}");
    broker.finish().await;
}

async fn policies_written_through_the_api_take_effect(kind: DatabaseKind) {
    let broker = Broker::start_with(options(kind, "")).await;
    let root = broker.root_token.clone();
    broker
        .write("secret/reports/q1", json!({"k": "v"}))
        .await
        .expect(200);
    let token = approle_token(&broker, "reports", &[]).await;
    broker
        .get_as(&token, "/v1/secrets/secret/reports/q1")
        .await
        .expect_error(403, "forbidden");

    let policy = json!({"rules": [{"path": "secret/reports/*", "capabilities": ["read"]}]});
    broker
        .put_as(&root, "/v1/policies/reports-read", policy)
        .await
        .expect(204);
    broker
        .put_as(
            &root,
            "/v1/auth/approle/roles/reports",
            json!({"policies": ["reports-read"]}),
        )
        .await
        .expect(200);
    let token = approle_token(&broker, "reports", &["reports-read"]).await;
    broker
        .get_as(&token, "/v1/secrets/secret/reports/q1")
        .await
        .expect(200);

    broker
        .put_as(&root, "/v1/policies/app-read", json!({"rules": []}))
        .await
        .expect_error(409, "policy_read_only");
    broker
        .put_as(
            &root,
            "/v1/policies/bad",
            json!({"rules": [{"path": "a/../b", "capabilities": ["read"]}]}),
        )
        .await
        .expect_error(400, "invalid_policy");
    broker
        .put_as(&token, "/v1/policies/mine", json!({"rules": []}))
        .await
        .expect_error(403, "forbidden");
    // Searching the audit log takes the `audit` capability on `sys/audit`, nothing else.
    broker
        .get_as(&token, "/v1/audit?limit=5")
        .await
        .expect_error(403, "forbidden");
    let auditor_policy = json!({"rules": [{"path": "sys/audit", "capabilities": ["audit"]}]});
    broker
        .put_as(&root, "/v1/policies/auditor", auditor_policy)
        .await
        .expect(204);
    let auditor = broker
        .post_as(
            Some(&root),
            "/v1/auth/token/create",
            json!({"policies": ["auditor"], "display_name": "security"}),
        )
        .await;
    let auditor = token_of(auditor.expect(200));
    let search = broker
        .get_as(&auditor, "/v1/audit?path=secret/reports&outcome=denied")
        .await;
    let records = search.expect(200).body["records"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["record"]["path"], "secret/reports/q1");
    assert_eq!(records[0]["record"]["principal"], "approle:reports");
    broker
        .get_as(&auditor, "/v1/secrets/secret/reports/q1")
        .await
        .expect_error(403, "forbidden");

    let listed = broker.get_as(&root, "/v1/policies").await;
    assert_eq!(
        listed.expect(200).body["policies"],
        json!(["app-read", "auditor", "payments-read", "reports-read"])
    );
    broker.finish().await;
}
