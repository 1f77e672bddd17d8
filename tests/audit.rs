//! The audit log end to end: one record per request, no secrets in it, tamper evidence,
//! bounded fail-closed behaviour, search and retention, on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use custos_end_to_end::{
    describe, on_both_databases, run_custos, Broker, BrokerOptions, DatabaseKind, Reply,
};
use serde_json::{json, Value};

on_both_databases!(
    every_request_leaves_exactly_one_record_checked_field_by_field,
    records_never_hold_secret_values_or_tokens,
    verify_passes_on_an_intact_log_and_matches_the_json_lines_copy,
    an_edited_record_is_named,
    an_edited_search_column_is_named,
    a_deleted_record_is_named,
    reordered_records_are_named,
    a_truncated_tail_is_named,
    reads_are_refused_within_the_bound_while_the_audit_store_is_locked_and_recover,
    search_filters_and_pagination,
    prune_keeps_the_rest_verifiable_and_tampering_detectable,
    export_takes_a_time_range,
);

async fn root_accessor(broker: &Broker) -> String {
    let mut connection = broker.database_connection().await;
    let (accessor,): (String,) = sqlx::query_as("SELECT accessor FROM auth_tokens")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    accessor
}

fn audit_hash(broker: &Broker, value: &str) -> String {
    let output = run_custos(
        &[
            "audit",
            "hash",
            "--config",
            broker.config_path.to_str().unwrap(),
            value,
        ],
        &[],
    );
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn search_audit(broker: &Broker, query: &str) -> Reply {
    broker
        .send(broker.http().get(broker.url(&format!("/v1/audit?{query}"))))
        .await
}

/// The only record of `reply`'s request.
async fn record_of(broker: &Broker, reply: &Reply) -> Value {
    let records = broker.audit_records_of(&reply.request_id()).await;
    assert_eq!(
        records.len(),
        1,
        "exactly one record per request: {records:?}"
    );
    records[0].record.clone()
}

async fn every_request_leaves_exactly_one_record_checked_field_by_field(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let accessor_hash = audit_hash(&broker, &root_accessor(&broker).await);
    let root_hash = audit_hash(&broker, &broker.root_token);

    let write = broker
        .write("secret/app/db", json!({"password": "p1"}))
        .await;
    write.expect(200);
    let record = record_of(&broker, &write).await;
    assert_eq!(record["operation"], "write");
    assert_eq!(record["method"], "PUT");
    assert_eq!(record["path"], "secret/app/db");
    assert_eq!(record["mount"], "secret");
    assert_eq!(record["backend"], "local");
    assert_eq!(record["version"], 1);
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["status"], 200);
    assert_eq!(record["principal"], "root");
    assert_eq!(record["auth_method"], "root");
    assert_eq!(record["token_hash"], root_hash.as_str());
    assert_eq!(record["token_accessor_hash"], accessor_hash.as_str());
    assert!(record.get("lease_id").is_none(), "writes take no lease");

    let read = broker.read("secret/app/db").await;
    read.expect(200);
    let record = record_of(&broker, &read).await;
    assert_eq!(record["operation"], "read");
    assert_eq!(record["version"], 1);
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["lease_id"], read.body["lease"]["lease_id"]);
    assert_eq!(record["request_id"], read.request_id().as_str());
    assert!(record["client_address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(record["latency_ms"].as_f64().unwrap() >= 0.0);
    let time = record["time"].as_str().unwrap();
    assert!(
        time.ends_with('Z') && time.contains('.'),
        "sub-second UTC: {time}"
    );
    assert!(record.get("error_code").is_none());

    let bad_token = broker.url("/v1/secrets/secret/app/db");
    let denied = broker
        .http()
        .get(&bad_token)
        .bearer_auth("cst_forged")
        .send()
        .await
        .unwrap();
    let denied = Reply::from_response(denied).await;
    denied.expect_error(401, "invalid_token");
    let record = record_of(&broker, &denied).await;
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["status"], 401);
    assert_eq!(record["error_code"], "invalid_token");
    assert_eq!(record["path"], "secret/app/db");
    assert_eq!(
        record["token_hash"],
        audit_hash(&broker, "cst_forged").as_str()
    );
    assert!(record.get("principal").is_none());
    assert!(record.get("version").is_none());

    let anonymous = broker.http().get(&bad_token).send().await.unwrap();
    let anonymous = Reply::from_response(anonymous).await;
    let record = record_of(&broker, &anonymous).await;
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["error_code"], "missing_token");
    assert!(record.get("token_hash").is_none());

    let malformed = broker
        .raw("GET", "/v1/secrets/secret/%2e%2e/other", "")
        .await;
    assert_eq!(malformed.status, 400);
    let record = record_of(&broker, &malformed).await;
    assert_eq!(record["outcome"], "bad_request");
    assert_eq!(record["error_code"], "invalid_path");
    assert_eq!(record["requested_path"], "/secret/%2e%2e/other");
    assert!(record.get("path").is_none());
    assert_eq!(record["principal"], "root");

    // A token whose policy does not cover the path: refused by policy, recorded with
    // who asked and how they authenticated.
    broker
        .put_as(
            &broker.root_token,
            "/v1/policies/public-only",
            json!({"rules": [{"path": "secret/public/**", "capabilities": ["read"]}]}),
        )
        .await
        .expect(204);
    let limited = broker
        .post_as(
            Some(&broker.root_token),
            "/v1/auth/token/create",
            json!({"policies": ["public-only"], "display_name": "reporter"}),
        )
        .await;
    let limited = limited.expect(200).body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let forbidden = broker.get_as(&limited, "/v1/secrets/secret/app/db").await;
    forbidden.expect_error(403, "forbidden");
    let record = record_of(&broker, &forbidden).await;
    assert_eq!(record["operation"], "read");
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["status"], 403);
    assert_eq!(record["error_code"], "forbidden");
    assert_eq!(record["path"], "secret/app/db");
    assert_eq!(record["mount"], "secret");
    assert_eq!(record["principal"], "token:reporter");
    assert_eq!(record["auth_method"], "token");
    assert_eq!(record["token_hash"], audit_hash(&broker, &limited).as_str());
    assert!(record.get("version").is_none(), "nothing was read");
    assert!(record.get("lease_id").is_none(), "nothing was lent");

    let missing = broker.read("secret/app/none").await;
    let record = record_of(&broker, &missing).await;
    assert_eq!(record["outcome"], "not_found");
    assert_eq!(record["error_code"], "secret_not_found");

    // A backend error: the stored ciphertext was damaged.
    broker
        .execute("UPDATE local_secret_versions SET ciphertext = wrapped_key")
        .await;
    let broken = broker.read("secret/app/db").await;
    broken.expect_error(500, "decryption_failed");
    let record = record_of(&broker, &broken).await;
    assert_eq!(record["outcome"], "error");
    assert_eq!(record["status"], 500);
    assert_eq!(record["error_code"], "decryption_failed");

    // Ten requests, ten records: nothing else was recorded, nothing twice.
    let records = broker.audit_records().await;
    assert_eq!(records.len(), 10);
    let sequences: Vec<u64> = records.iter().map(|entry| entry.sequence).collect();
    assert_eq!(sequences, (1..=10).collect::<Vec<_>>());
    broker.finish().await;
}

async fn records_never_hold_secret_values_or_tokens(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    let values = ["value-alpha-7c1f", "value-beta-93ad"];
    broker
        .write(
            "secret/one",
            json!({"password": values[0], "api_key": values[1]}),
        )
        .await
        .expect(200);
    broker.read("secret/one").await.expect(200);
    broker
        .write_body("secret/one", json!({"data": values[0]}))
        .await
        .expect(400);
    let wrong_token = "cst_wrong-token-3f2e";
    broker
        .http()
        .get(broker.url("/v1/secrets/secret/one"))
        .header("x-custos-token", wrong_token)
        .send()
        .await
        .unwrap();
    broker.stop().await;

    let haystacks = [
        (
            "database",
            broker
                .audit_records()
                .await
                .iter()
                .map(|entry| entry.raw_record.clone())
                .collect::<String>(),
        ),
        (
            "json lines",
            std::fs::read_to_string(broker.directory.path().join("audit.jsonl")).unwrap(),
        ),
        ("broker log", broker.log()),
    ];
    for (name, haystack) in &haystacks {
        for needle in [
            values[0],
            values[1],
            broker.root_token.as_str(),
            wrong_token,
        ] {
            assert!(!haystack.contains(needle), "{name} contains {needle}");
        }
    }
    assert!(haystacks[0].1.contains("hmac-sha256:"));
    broker.finish().await;
}

async fn verify_passes_on_an_intact_log_and_matches_the_json_lines_copy(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    for index in 0..5 {
        broker
            .write(&format!("secret/s{index}"), json!({"k": "v"}))
            .await
            .expect(200);
    }
    broker.restart().await;
    broker.read("secret/s1").await.expect(200);
    broker.stop().await;

    let verified = broker.verify_audit();
    assert!(verified.status.success(), "{}", describe(&verified));
    assert_eq!(
        String::from_utf8_lossy(&verified.stdout),
        "Audit log intact: 6 records verified (records 1 to 6).\n"
    );

    // The JSON-lines sink holds the same records, byte for byte, with their MACs.
    let lines = std::fs::read_to_string(broker.directory.path().join("audit.jsonl")).unwrap();
    let records = broker.audit_records().await;
    assert_eq!(lines.lines().count(), records.len());
    for (line, entry) in lines.lines().zip(&records) {
        let expected = format!(
            "{{\"sequence\":{},\"mac\":\"{}\",\"record\":{}}}",
            entry.sequence, entry.mac, entry.raw_record
        );
        assert_eq!(line, expected);
    }

    // Export prints the same lines.
    let export = run_custos(
        &[
            "audit",
            "export",
            "--config",
            broker.config_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(export.status.success(), "{}", describe(&export));
    assert_eq!(String::from_utf8_lossy(&export.stdout), lines);
    broker.finish().await;
}

/// `--since` is inclusive and `--until` exclusive, on the records' own times.
async fn export_takes_a_time_range(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    for index in 0..5 {
        broker
            .write(&format!("secret/s{index}"), json!({"k": "v"}))
            .await
            .expect(200);
        // Distinct times, so that a boundary falls between two records.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.stop().await;
    let records = broker.audit_records().await;
    let time_of = |sequence: usize| records[sequence - 1].record["time"].as_str().unwrap();

    let export = |range: &[&str]| {
        let mut arguments = vec![
            "audit",
            "export",
            "--config",
            broker.config_path.to_str().unwrap(),
        ];
        arguments.extend_from_slice(range);
        let output = run_custos(&arguments, &[]);
        assert!(output.status.success(), "{}", describe(&output));
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["sequence"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(export(&["--since", time_of(3)]), [3, 4, 5]);
    assert_eq!(export(&["--until", time_of(3)]), [1, 2]);
    assert_eq!(
        export(&["--since", time_of(2), "--until", time_of(5)]),
        [2, 3, 4]
    );
    // A date is that day's midnight, UTC: the records' day holds all of them.
    let day = &time_of(1)[..10];
    assert_eq!(export(&["--since", day]), [1, 2, 3, 4, 5]);
    assert!(export(&["--until", day]).is_empty());
    assert!(export(&["--since", "2999-01-01"]).is_empty());

    // A time that is not one is refused, with the accepted forms named.
    let refused = run_custos(
        &[
            "audit",
            "export",
            "--config",
            broker.config_path.to_str().unwrap(),
            "--since",
            "yesterday",
        ],
        &[],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("RFC 3339"),
        "{}",
        describe(&refused)
    );
    broker.finish().await;
}

/// A stdout sink beside the file sink: both get every record, as the same lines, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_sink_and_a_file_sink_get_the_same_lines() {
    let mut options = BrokerOptions::new(DatabaseKind::Sqlite);
    options.extra_config = "[[audit.sinks]]\ntype = \"stdout\"\n".to_owned();
    let mut broker = Broker::start_with(options).await;
    broker
        .write("secret/app", json!({"password": "sunk"}))
        .await
        .expect(200);
    broker.read("secret/app").await.expect(200);
    broker.read("secret/missing").await.expect(404);
    broker.stop().await;

    let file = std::fs::read_to_string(broker.directory.path().join("audit.jsonl")).unwrap();
    // The broker's standard output and error both go to its log file in the harness;
    // the sink's lines are the ones that are records.
    let log = broker.log();
    let printed: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("{\"sequence\":"))
        .collect();
    assert_eq!(printed.len(), 3, "{log}");
    assert_eq!(printed, file.lines().collect::<Vec<_>>());
    assert!(!log.contains("sunk"));
    broker.finish().await;
}

/// A stopped broker with six records, for tampering.
async fn broker_with_six_records(kind: DatabaseKind) -> Broker {
    let mut broker = Broker::start(kind).await;
    for index in 0..6 {
        broker
            .write(&format!("secret/s{index}"), json!({"k": "v"}))
            .await
            .expect(200);
    }
    broker.stop().await;
    assert!(broker.verify_audit().status.success());
    broker
}

fn assert_tampered(broker: &Broker, expected: &str) {
    let verified = broker.verify_audit();
    assert_eq!(verified.status.code(), Some(3), "{}", describe(&verified));
    let stderr = String::from_utf8_lossy(&verified.stderr);
    assert!(
        stderr.contains(expected),
        "expected `{expected}` in: {stderr}"
    );
}

async fn an_edited_record_is_named(kind: DatabaseKind) {
    let broker = broker_with_six_records(kind).await;
    broker
        .execute(
            "UPDATE audit_records SET record = replace(record, '\"outcome\":\"ok\"', \
             '\"outcome\":\"denied\"'), outcome = 'denied' WHERE sequence = 3",
        )
        .await;
    assert_tampered(&broker, "record 3 does not match its MAC");
    broker.finish().await;
}

async fn an_edited_search_column_is_named(kind: DatabaseKind) {
    let broker = broker_with_six_records(kind).await;
    broker
        .execute("UPDATE audit_records SET path = 'secret/innocent' WHERE sequence = 4")
        .await;
    assert_tampered(&broker, "record 4: the `path` column was edited");
    broker.finish().await;
}

async fn a_deleted_record_is_named(kind: DatabaseKind) {
    let broker = broker_with_six_records(kind).await;
    broker
        .execute("DELETE FROM audit_records WHERE sequence = 2")
        .await;
    assert_tampered(&broker, "record 2 is missing");
    broker.finish().await;
}

async fn reordered_records_are_named(kind: DatabaseKind) {
    let broker = broker_with_six_records(kind).await;
    broker
        .execute("UPDATE audit_records SET sequence = 100 WHERE sequence = 2")
        .await;
    broker
        .execute("UPDATE audit_records SET sequence = 2 WHERE sequence = 5")
        .await;
    broker
        .execute("UPDATE audit_records SET sequence = 5 WHERE sequence = 100")
        .await;
    assert_tampered(&broker, "record 2 does not match its MAC");
    broker.finish().await;
}

async fn a_truncated_tail_is_named(kind: DatabaseKind) {
    let mut broker = broker_with_six_records(kind).await;
    broker
        .execute("DELETE FROM audit_records WHERE sequence >= 5")
        .await;
    assert_tampered(
        &broker,
        "records 5 to 6 are missing from the end of the log",
    );

    // A restarted broker does not paper over the gap by reusing the numbers.
    broker.launch().await;
    broker.read("secret/s0").await.expect(200);
    broker.stop().await;
    assert_tampered(&broker, "records 5 to 6 are missing");
    let last = broker.audit_records().await.pop().unwrap();
    assert_eq!(last.sequence, 7);
    broker.finish().await;
}

async fn reads_are_refused_within_the_bound_while_the_audit_store_is_locked_and_recover(
    kind: DatabaseKind,
) {
    let mut options = BrokerOptions::new(kind);
    options.audit_write_timeout = "1s".to_owned();
    let mut broker = Broker::start_with(options).await;
    broker
        .write("secret/app", json!({"password": "guarded"}))
        .await
        .expect(200);

    // Another session takes the lock the audit writer needs and holds it.
    let mut locker = broker.database_connection().await;
    match kind {
        DatabaseKind::Sqlite => {
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut locker)
                .await
                .unwrap();
        }
        DatabaseKind::Postgres => {
            sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
            sqlx::query("LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE")
                .execute(&mut locker)
                .await
                .unwrap();
        }
    }

    for _ in 0..3 {
        let started = Instant::now();
        let refused = broker.read("secret/app").await;
        let waited = started.elapsed();
        // The read's lease goes into the same commit as its record, so on both engines
        // the audit writer is what refuses, within its bound (the request timeout is 5 s).
        refused.expect_error(503, "audit_unavailable");
        assert!(
            refused.body.get("data").is_none(),
            "no secret without a record"
        );
        assert!(!refused.body.to_string().contains("guarded"));
        assert!(
            waited < Duration::from_secs(4),
            "refused after {waited:?}, not hung"
        );
    }

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);

    // The broker recovers by itself.
    let mut recovered = None;
    for _ in 0..50 {
        let reply = broker.read("secret/app").await;
        if reply.status == 200 {
            recovered = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = recovered.expect("reads succeed again after the audit store returns");
    assert_eq!(recovered.body["data"]["password"], "guarded");

    if kind == DatabaseKind::Postgres {
        // Every connection of the broker is dropped by the server; the pool reconnects.
        broker
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .await;
        let mut answered = false;
        for _ in 0..50 {
            if broker.read("secret/app").await.status == 200 {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            answered,
            "reads succeed again after the connections were dropped"
        );
    }

    // Every read that was served has its record; the refused ones have none saying ok.
    let records = broker.audit_records().await;
    let served_reads = records
        .iter()
        .filter(|entry| entry.record["operation"] == "read" && entry.record["status"] == 200)
        .count();
    assert!(served_reads >= 1);
    assert_eq!(record_of(&broker, &recovered).await["outcome"], "ok");
    // A lease exists for each served read and for none of the refused ones.
    let mut connection = broker.database_connection().await;
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(leases, served_reads as i64);
    assert!(broker
        .log()
        .contains("audit record not stored; request refused"));

    broker.stop_and_verify().await;
    broker.finish().await;
}

async fn search_filters_and_pagination(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    broker
        .write("secret/app/db", json!({"k": "v"}))
        .await
        .expect(200);
    broker
        .write("secret/app/api", json!({"k": "v"}))
        .await
        .expect(200);
    broker
        .write("secret/other", json!({"k": "v"}))
        .await
        .expect(200);
    broker.read("secret/app/db").await.expect(200);
    broker.read("secret/app/missing").await.expect(404);
    broker.read("secret/application").await.expect(404);
    let middle = broker.audit_records().await.pop().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    broker.read("secret/other").await.expect(200);

    let sequences = |reply: &Reply| -> Vec<u64> {
        reply.body["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["sequence"].as_u64().unwrap())
            .collect()
    };

    // Newest first; a path prefix matches whole segments only (not secret/application).
    let app = search_audit(&broker, "path=secret/app").await;
    assert_eq!(sequences(app.expect(200)), vec![5, 4, 2, 1]);
    let reads = search_audit(&broker, "operation=read&path=secret/app").await;
    assert_eq!(sequences(&reads), vec![5, 4]);
    let not_found = search_audit(&broker, "outcome=not_found").await;
    assert_eq!(sequences(&not_found), vec![6, 5]);
    assert_eq!(
        sequences(&search_audit(&broker, "mount=secret&operation=write").await),
        vec![3, 2, 1]
    );
    assert_eq!(
        sequences(&search_audit(&broker, "principal=root&path=secret/other").await),
        vec![7, 3]
    );
    assert!(sequences(&search_audit(&broker, "principal=kubernetes:nobody/none").await).is_empty());

    // Time range: only what came after the sixth record.
    let since = middle.record["time"].as_str().unwrap().to_owned();
    let after = search_audit(
        &broker,
        &format!("since={}&operation=read", since.replace('+', "%2B")),
    )
    .await;
    assert_eq!(sequences(&after), vec![7, 6]);
    let before = search_audit(&broker, &format!("until={since}&operation=read")).await;
    assert_eq!(sequences(&before), vec![5, 4]);

    // Pages of two, walked with the cursor, cover everything once, newest first. The
    // searches above were recorded too (operation audit.search), so filter them out.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("limit=2&mount=secret&cursor={cursor}"),
            None => "limit=2&mount=secret".to_owned(),
        };
        let page = search_audit(&broker, &query).await;
        let page_sequences = sequences(page.expect(200));
        assert!(page_sequences.len() <= 2);
        walked.extend(page_sequences);
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, vec![7, 6, 5, 4, 3, 2, 1]);

    search_audit(&broker, "limit=0")
        .await
        .expect_error(400, "invalid_request");
    search_audit(&broker, "outcome=maybe")
        .await
        .expect_error(400, "invalid_request");
    search_audit(&broker, "since=yesterday")
        .await
        .expect_error(400, "invalid_request");
    search_audit(&broker, "colour=blue")
        .await
        .expect_error(400, "invalid_request");

    // The CLI prints the same search as a table, CSV or JSON lines.
    let table = broker.cli(&[
        "audit",
        "search",
        "--path",
        "secret/app",
        "--operation",
        "read",
    ]);
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SEQUENCE  TIME"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].starts_with("5 ") && lines[1].contains("secret/app/missing"));
    assert!(lines[1].contains("not_found") && lines[1].contains("404"));

    let csv = broker.cli(&["audit", "search", "--operation", "write", "--format", "csv"]);
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "sequence,time,principal,operation,path,version,outcome,status,client"
    );
    assert_eq!(csv.lines().count(), 4);

    let lines = broker.cli(&[
        "audit", "search", "--limit", "1", "--all", "--format", "json", "--mount", "secret",
    ]);
    let lines = String::from_utf8(lines.stdout).unwrap();
    assert_eq!(lines.lines().count(), 7);
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["sequence"], 7);
    assert_eq!(first["record"]["path"], "secret/other");
    broker.finish().await;
}

async fn prune_keeps_the_rest_verifiable_and_tampering_detectable(kind: DatabaseKind) {
    let broker = broker_with_six_records(kind).await;
    let records = broker.audit_records().await;
    let boundary = records[3].record["time"].as_str().unwrap().to_owned();
    let config = broker.config_path.to_str().unwrap().to_owned();

    let prune = run_custos(
        &["audit", "prune", "--config", &config, "--before", &boundary],
        &[],
    );
    assert!(prune.status.success(), "{}", describe(&prune));
    assert_eq!(
        String::from_utf8_lossy(&prune.stdout),
        "Removed 3 records; the log now starts after record 3.\n"
    );
    let remaining: Vec<u64> = broker
        .audit_records()
        .await
        .iter()
        .map(|entry| entry.sequence)
        .collect();
    assert_eq!(remaining, vec![4, 5, 6]);

    let verified = broker.verify_audit();
    assert!(verified.status.success(), "{}", describe(&verified));
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("3 records verified (records 4 to 6)")
    );

    // Tampering after a prune is still caught.
    broker
        .execute(
            "UPDATE audit_records SET record = replace(record, 'PUT', 'GET') WHERE sequence = 5",
        )
        .await;
    assert_tampered(&broker, "record 5 does not match its MAC");

    // So is removing the checkpoint to pass off the missing records as never written.
    broker
        .execute(
            "UPDATE audit_records SET record = replace(record, 'GET', 'PUT') WHERE sequence = 5",
        )
        .await;
    assert!(broker.verify_audit().status.success());
    broker.execute("DELETE FROM audit_checkpoints").await;
    assert_tampered(&broker, "records 1 to 3 are missing");

    // A broken log is not pruned.
    let refused = run_custos(
        &[
            "audit",
            "prune",
            "--config",
            &config,
            "--before",
            "2999-01-01",
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(3), "{}", describe(&refused));
    assert_eq!(broker.audit_records().await.len(), 3);
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_reads_and_logs_the_lost_records() {
    // PostgreSQL lets the test lock the audit table alone; the read still stores its lease.
    let mut options = BrokerOptions::new(DatabaseKind::Postgres);
    options.audit_write_timeout = "500ms".to_owned();
    options.audit_fail_mode = "open".to_owned();
    let broker = Broker::start_with(options).await;
    assert!(
        broker.log().contains("AUDIT FAIL-OPEN"),
        "announced at start"
    );
    broker
        .write("secret/app", json!({"password": "open"}))
        .await
        .expect(200);

    let mut locker = broker.database_connection().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let served = broker.read("secret/app").await;
    assert_eq!(served.expect(200).body["data"]["password"], "open");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);

    assert!(broker.log().contains("audit record LOST (fail-open mode)"));
    assert!(broker
        .audit_records_of(&served.request_id())
        .await
        .is_empty());
    broker.finish().await;
}
