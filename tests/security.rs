//! Authentication, hostile paths, oversized bodies, and secrets kept out of every answer
//! and log line.

use custos_end_to_end::{on_both_databases, Broker, DatabaseKind};
use serde_json::json;

on_both_databases!(
    requests_without_a_valid_token_are_refused,
    traversal_and_malformed_paths_are_refused_and_store_nothing,
    oversized_bodies_get_413_and_store_nothing,
    malformed_bodies_get_400_without_echoing_values,
    secret_values_and_tokens_never_reach_answers_or_logs,
);

async fn requests_without_a_valid_token_are_refused(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    broker
        .write("secret/guarded", json!({"k": "v"}))
        .await
        .expect(200);
    let url = broker.url("/v1/secrets/secret/guarded");
    let http = broker.http();

    let missing = http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");
    assert!(body.get("data").is_none());

    let wrong_tokens = [
        "cst_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        format!("{}x", broker.root_token),
        broker.root_token[..broker.root_token.len() - 1].to_owned(),
        String::new(),
    ];
    for token in &wrong_tokens {
        for header in ["authorization", "x-custos-token"] {
            let value = if header == "authorization" {
                format!("Bearer {token}")
            } else {
                token.clone()
            };
            let answer = http.get(&url).header(header, value).send().await.unwrap();
            assert_eq!(answer.status(), 401, "{header} {token}");
            let body: serde_json::Value = answer.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_token");
            assert!(body.get("data").is_none());
        }
    }

    let basic = http
        .get(&url)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await;
    assert_eq!(basic.unwrap().status(), 401);

    let good = http
        .get(&url)
        .header("x-custos-token", &broker.root_token)
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);

    // A write with a bad token changes nothing.
    let refused = http
        .put(&url)
        .bearer_auth("cst_wrong")
        .json(&json!({"data": {"k": "overwritten"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(broker.read("secret/guarded").await.body["data"]["k"], "v");
    assert_eq!(
        broker.read("secret/guarded").await.body["metadata"]["version"],
        1
    );

    // Health stays open for load balancers and probes.
    assert_eq!(
        http.get(broker.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    broker.finish().await;
}

async fn traversal_and_malformed_paths_are_refused_and_store_nothing(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let long_segment = "a".repeat(200);
    let deep = vec!["d"; 40].join("/");
    let hostile = [
        "/v1/secrets/secret/../escape".to_owned(),
        "/v1/secrets/secret/./here".to_owned(),
        "/v1/secrets/secret/%2e%2e/escape".to_owned(),
        "/v1/secrets/secret/%2E%2E/escape".to_owned(),
        "/v1/secrets/secret/.%2e/escape".to_owned(),
        "/v1/secrets/secret/a%2f..%2fescape".to_owned(),
        "/v1/secrets/secret/a%5c..%5cescape".to_owned(),
        "/v1/secrets/secret/%252e%252e/escape".to_owned(),
        "/v1/secrets/secret//double".to_owned(),
        "/v1/secrets/secret/a%00b".to_owned(),
        "/v1/secrets/secret/a%0ab".to_owned(),
        "/v1/secrets/secret/a%20b".to_owned(),
        "/v1/secrets/secret/%ff".to_owned(),
        format!("/v1/secrets/secret/{long_segment}"),
        format!("/v1/secrets/secret/{deep}"),
        "/v1/secrets/".to_owned(),
        "/v1/secrets/secret".to_owned(),
    ];

    for target in &hostile {
        let written = broker.raw("PUT", target, r#"{"data": {"k": "v"}}"#).await;
        assert_eq!(written.status, 400, "PUT {target}: {}", written.body);
        assert_eq!(
            written.body["error"]["code"], "invalid_path",
            "PUT {target}"
        );
        let read = broker.raw("GET", target, "").await;
        assert_eq!(read.status, 400, "GET {target}: {}", read.body);
        let deleted = broker.raw("DELETE", target, "").await;
        assert_eq!(deleted.status, 400, "DELETE {target}: {}", deleted.body);
    }

    // Nothing was stored anywhere.
    broker
        .list("secret")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .read("escape")
        .await
        .expect_error(404, "mount_not_found");
    broker.finish().await;
}

async fn oversized_bodies_get_413_and_store_nothing(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    // The test configuration allows 65536 bytes.
    let big = "x".repeat(70_000);
    broker
        .write("secret/big", json!({"k": big}))
        .await
        .expect_error(413, "payload_too_large");

    let fits = "x".repeat(60_000);
    broker
        .write("secret/fits", json!({"k": fits}))
        .await
        .expect(200);
    broker
        .read("secret/big")
        .await
        .expect_error(404, "secret_not_found");
    assert_eq!(broker.list("secret").await.body["keys"], json!(["fits"]));

    // The limit holds for every JSON body, the unauthenticated logins included, and the
    // refusal is audited like any other.
    let login = broker
        .post_as(
            None,
            "/v1/auth/approle/login",
            json!({"role_id": big, "secret_id": "x"}),
        )
        .await;
    login.expect_error(413, "payload_too_large");
    let records = broker.audit_records_of(&login.request_id()).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record["status"], 413);
    broker
        .put_as(
            &broker.root_token,
            "/v1/policies/big",
            json!({"rules": [{"path": big, "capabilities": ["read"]}]}),
        )
        .await
        .expect_error(413, "payload_too_large");
    broker.finish().await;
}

async fn malformed_bodies_get_400_without_echoing_values(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let cases = [
        json!({"data": "hunter2-in-the-wrong-place"}),
        json!({"data": {"k": 42}}),
        json!({"data": {"k": ["hunter2-in-a-list"]}}),
        json!({"data": {"k": {"base64": "hunter2 is not base64"}}}),
        json!({"data": {}}),
        json!({"data": {"": "empty name"}}),
        json!({"data": {"k": "v"}, "unexpected": true}),
        json!({"data": {"k": "v"}, "cas": -1}),
        json!({}),
    ];
    for body in cases {
        let reply = broker.write_body("secret/malformed", body.clone()).await;
        reply.expect(400);
        assert!(
            matches!(reply.code(), "invalid_request" | "invalid_secret"),
            "{body}: {}",
            reply.body
        );
        assert!(
            !reply.body.to_string().contains("hunter2"),
            "{}",
            reply.body
        );
    }

    let not_json = broker
        .raw("PUT", "/v1/secrets/secret/malformed", "{not json")
        .await;
    assert_eq!(not_json.status, 400);
    broker
        .read("secret/malformed")
        .await
        .expect_error(404, "secret_not_found");
    broker.finish().await;
}

async fn secret_values_and_tokens_never_reach_answers_or_logs(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    let secret_value = "s3cr3t-value-that-must-never-be-logged";
    broker
        .write("secret/app/db", json!({"password": secret_value}))
        .await
        .expect(200);
    broker.read("secret/app/db").await.expect(200);
    broker.read("secret/app/db?version=9").await.expect(404);
    broker
        .write_body("secret/app/db", json!({"data": secret_value}))
        .await
        .expect(400);
    broker
        .write_body(
            "secret/app/db",
            json!({"data": {"password": secret_value}, "cas": 0}),
        )
        .await
        .expect(409);
    broker
        .http()
        .get(broker.url("/v1/secrets/secret/app/db"))
        .bearer_auth("cst_guessed-token-value")
        .send()
        .await
        .unwrap();
    broker.restart().await;
    broker.read("secret/app/db").await.expect(200);
    broker.stop().await;

    // The broker logs at debug level in tests, the most it ever says.
    let log = broker.log();
    assert!(log.contains("request finished"), "the log was captured");
    for forbidden in [
        secret_value,
        broker.root_token.as_str(),
        "cst_guessed-token-value",
    ] {
        assert!(!log.contains(forbidden), "the log contains {forbidden}");
    }

    // The same in JSON logs, the production format: one object per line, with the
    // request's fields, and still no value or token.
    let config = std::fs::read_to_string(&broker.config_path).unwrap();
    std::fs::write(
        &broker.config_path,
        config.replace("[log]\n", "[log]\nformat = \"json\"\n"),
    )
    .unwrap();
    let text_log_length = broker.log().len();
    broker.launch().await;
    let read = broker.read("secret/app/db").await;
    read.expect(200);
    broker
        .http()
        .get(broker.url("/v1/secrets/secret/app/db"))
        .bearer_auth("cst_guessed-token-value")
        .send()
        .await
        .unwrap();
    broker.stop().await;
    let json_log = broker.log()[text_log_length..].to_owned();
    let lines: Vec<serde_json::Value> = json_log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines.iter().any(|line| {
            line["message"] == "request finished"
                && line["span"]["request_id"] == read.request_id().as_str()
        }),
        "{json_log}"
    );
    for forbidden in [
        secret_value,
        broker.root_token.as_str(),
        "cst_guessed-token-value",
    ] {
        assert!(
            !json_log.contains(forbidden),
            "the JSON log contains {forbidden}"
        );
    }

    // Nor does the database hold the value in clear.
    let mut connection = <sqlx::AnyConnection as sqlx::Connection>::connect(&broker.database_url)
        .await
        .unwrap();
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT ciphertext FROM local_secret_versions")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for (ciphertext,) in rows {
        let needle = secret_value.as_bytes();
        assert!(!ciphertext
            .windows(needle.len())
            .any(|window| window == needle));
    }
    let tokens: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT token_hash FROM auth_tokens")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    for (hash,) in tokens {
        assert_eq!(hash.len(), 32);
        assert!(!String::from_utf8_lossy(&hash).contains(&broker.root_token[4..20]));
    }
    drop(connection);
    broker.finish().await;
}
