//! The secrets API end to end: the real binary, over HTTP, on SQLite and PostgreSQL.

use custos_end_to_end::{on_both_databases, Broker, DatabaseKind};
use serde_json::json;

on_both_databases!(
    written_secrets_read_back_with_text_and_binary_fields,
    every_kept_version_reads_back,
    listing_shows_secrets_and_folders,
    delete_hides_and_destroy_erases,
    check_and_set_refuses_a_stale_write,
    read_only_mounts_refuse_writes_with_405_and_store_nothing,
    restart_keeps_secrets,
    health_reports_the_database,
);

async fn written_secrets_read_back_with_text_and_binary_fields(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;

    let written = broker
        .write(
            "secret/app/db",
            json!({"username": "app", "certificate": {"base64": "AJ+Slg=="}}),
        )
        .await;
    written.expect(200);
    assert_eq!(written.body["metadata"]["version"], 1);
    assert_eq!(written.body["metadata"]["path"], "secret/app/db");

    let read = broker.read("secret/app/db").await;
    read.expect(200);
    assert_eq!(
        read.body["data"],
        json!({"username": "app", "certificate": {"base64": "AJ+Slg=="}})
    );
    assert_eq!(read.body["metadata"]["version"], 1);
    assert_eq!(read.body["metadata"]["mount"], "secret");
    assert_eq!(read.body["metadata"]["backend"], "local");
    assert!(read.body["metadata"]["created_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert!(read.headers.contains_key("x-request-id"));

    // The same secret through differently spelled but equivalent paths.
    broker.read("secret/app/db/").await.expect(200);
    broker.read("secret/app/d%62").await.expect(200);

    broker
        .read("secret/app/nothing")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .read("elsewhere/app")
        .await
        .expect_error(404, "mount_not_found");
    broker.finish().await;
}

async fn every_kept_version_reads_back(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    // The test configuration keeps 5 versions on the `secret` mount.
    for version in 1..=7 {
        let reply = broker
            .write("secret/rotating", json!({"value": format!("v{version}")}))
            .await;
        assert_eq!(reply.expect(200).body["metadata"]["version"], version);
    }

    for version in 3..=7 {
        let read = broker
            .read(&format!("secret/rotating?version={version}"))
            .await;
        assert_eq!(
            read.expect(200).body["data"]["value"],
            format!("v{version}")
        );
        assert_eq!(read.body["metadata"]["version"], version);
    }
    assert_eq!(
        broker.read("secret/rotating").await.body["data"]["value"],
        "v7"
    );
    broker
        .read("secret/rotating?version=1")
        .await
        .expect_error(404, "version_not_found");
    broker
        .read("secret/rotating?version=0")
        .await
        .expect_error(400, "invalid_request");
    broker
        .read("secret/rotating?version=9223372036854775808")
        .await
        .expect_error(400, "invalid_request");
    broker
        .read("secret/rotating?version=latest")
        .await
        .expect_error(400, "invalid_request");
    broker
        .read("secret/rotating?verison=2")
        .await
        .expect_error(400, "invalid_request");
    broker.finish().await;
}

async fn listing_shows_secrets_and_folders(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    for path in [
        "secret/app/db",
        "secret/app/api",
        "secret/app/team/key",
        "secret/top",
    ] {
        broker.write(path, json!({"k": "v"})).await.expect(200);
    }

    let root = broker.list("secret").await;
    assert_eq!(root.expect(200).body["keys"], json!(["top", "app/"]));
    let app = broker.list("secret/app").await;
    assert_eq!(app.expect(200).body["keys"], json!(["api", "db", "team/"]));
    assert_eq!(app.body["path"], "secret/app");
    broker
        .list("secret/none")
        .await
        .expect_error(404, "secret_not_found");
    broker.finish().await;
}

async fn delete_hides_and_destroy_erases(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    for value in ["one", "two", "three"] {
        broker
            .write("secret/app/db", json!({"v": value}))
            .await
            .expect(200);
    }

    broker.delete("secret/app/db").await.expect(204);
    broker
        .read("secret/app/db")
        .await
        .expect_error(404, "version_deleted");
    assert_eq!(
        broker.read("secret/app/db?version=2").await.body["data"]["v"],
        "two"
    );

    broker
        .delete("secret/app/db?versions=1,2&destroy=true")
        .await
        .expect(204);
    broker
        .read("secret/app/db?version=2")
        .await
        .expect_error(404, "version_destroyed");

    broker
        .delete("secret/app/db?destroy=true")
        .await
        .expect(204);
    broker
        .read("secret/app/db?version=3")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .list("secret")
        .await
        .expect_error(404, "secret_not_found");

    broker
        .delete("secret/app/db")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .delete("secret/app/db?versions=x")
        .await
        .expect_error(400, "invalid_request");
    broker.finish().await;
}

async fn check_and_set_refuses_a_stale_write(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let create = json!({"data": {"k": "first"}, "cas": 0});
    broker
        .write_body("secret/cas", create.clone())
        .await
        .expect(200);
    broker
        .write_body("secret/cas", create)
        .await
        .expect_error(409, "check_and_set_mismatch");
    assert_eq!(broker.read("secret/cas").await.body["data"]["k"], "first");
    broker.finish().await;
}

async fn read_only_mounts_refuse_writes_with_405_and_store_nothing(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let refused = broker.write("frozen/app", json!({"k": "v"})).await;
    refused.expect_error(405, "unsupported_operation");
    assert!(refused.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("read-only"));
    broker
        .delete("frozen/app")
        .await
        .expect_error(405, "unsupported_operation");
    broker
        .read("frozen/app")
        .await
        .expect_error(404, "secret_not_found");
    broker
        .list("frozen")
        .await
        .expect_error(404, "secret_not_found");
    broker.finish().await;
}

async fn restart_keeps_secrets(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    broker
        .write("secret/persistent", json!({"k": "before"}))
        .await
        .expect(200);
    broker
        .write("secret/persistent", json!({"k": "after"}))
        .await
        .expect(200);

    broker.restart().await;
    assert_eq!(
        broker.read("secret/persistent").await.expect(200).body["data"]["k"],
        "after"
    );
    assert_eq!(
        broker.read("secret/persistent?version=1").await.body["data"]["k"],
        "before"
    );
    broker.finish().await;
}

async fn health_reports_the_database(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let health = broker
        .http()
        .get(broker.url("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let expected = match kind {
        DatabaseKind::Sqlite => "sqlite",
        DatabaseKind::Postgres => "postgres",
    };
    assert_eq!(body["database"], expected);

    let mounts = broker
        .send(broker.http().get(broker.url("/v1/mounts")))
        .await;
    assert_eq!(
        mounts.expect(200).body["mounts"],
        json!([
            {"path": "frozen", "backend": "local", "read_only": true},
            {"path": "secret", "backend": "local", "read_only": false},
        ])
    );
    broker.finish().await;
}

/// While PostgreSQL refuses the broker's connections, health says so within its bound
/// (503 `not_ready`, for a load balancer to act on) rather than hanging, and it recovers by
/// itself when the database takes connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_ready_while_postgres_refuses_connections_and_recovers() {
    use sqlx::{Connection, Executor};

    let broker = Broker::start(DatabaseKind::Postgres).await;
    let name = broker.database_url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::AnyConnection::connect(&custos_storage::testing::postgres_admin_url())
        .await
        .unwrap();
    admin
        .execute(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false").as_str())
        .await
        .unwrap();
    admin
        .execute(
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            .as_str(),
        )
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let health = broker
        .send(broker.http().get(broker.url("/v1/health")))
        .await;
    let waited = started.elapsed();
    health.expect_error(503, "not_ready");
    assert!(
        waited < std::time::Duration::from_secs(4),
        "answered after {waited:?}"
    );

    admin
        .execute(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true").as_str())
        .await
        .unwrap();
    admin.close().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let health = broker
            .send(broker.http().get(broker.url("/v1/health")))
            .await;
        if health.status == 200 {
            assert_eq!(health.body["status"], "ok");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health did not recover"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    broker.read("secret/missing").await.expect(404);
    broker.finish().await;
}
