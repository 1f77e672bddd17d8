//! Key-encryption keys end to end: a broker refuses a keyring that lacks the store's key,
//! and `custos key rotate` re-wraps everything while the broker keeps serving.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_end_to_end::{
    custos_binary, describe, on_both_databases, run_custos, Broker, DatabaseKind,
};
use serde_json::json;

on_both_databases!(
    a_server_never_initialises_a_store_by_itself,
    a_keyring_without_the_store_key_is_refused_with_the_key_id,
    rotation_keeps_every_read_working,
);

/// Runs `custos server` expecting it to exit by itself; returns its standard error.
fn server_exit_output(broker: &Broker) -> (bool, String) {
    server_exit_output_with(broker, &[])
}

fn server_exit_output_with(broker: &Broker, environment: &[(&str, &str)]) -> (bool, String) {
    let mut child = Command::new(custos_binary())
        .args(["server", "--config", broker.config_path.to_str().unwrap()])
        .envs(environment.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the broker started although its keyring is wrong");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn keyring_lines(broker: &Broker) -> Vec<String> {
    let text = std::fs::read_to_string(&broker.key_file).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn a_server_never_initialises_a_store_by_itself(kind: DatabaseKind) {
    let broker = Broker::start(kind).await;
    let fresh = custos_storage::testing::TestDatabase::create(kind).await;
    let config = broker.directory.path().join("fresh.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"{}\"\n[keys]\nfile = \"fresh-keyring\"\n\
             [audit]\nkey_file = \"fresh-audit.key\"\n\
             [[mounts]]\npath = \"secret\"\nbackend = \"local\"\n",
            fresh.url
        ),
    )
    .unwrap();
    // A valid keyring line: base64 of 32 bytes.
    let key_line = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7_u8; 32]);
    std::fs::write(broker.directory.path().join("fresh-keyring"), key_line).unwrap();

    let server = run_custos(&["server", "--config", config.to_str().unwrap()], &[]);
    assert!(!server.status.success());
    let stderr = String::from_utf8_lossy(&server.stderr);
    assert!(
        stderr.contains("store is not initialised; run `custos init"),
        "{stderr}"
    );

    // Init still works afterwards, with the key file the operator meant.
    let init = run_custos(&["init", "--config", config.to_str().unwrap()], &[]);
    assert!(init.status.success(), "{}", describe(&init));
    fresh.drop_database().await;
    broker.finish().await;
}

async fn a_keyring_without_the_store_key_is_refused_with_the_key_id(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    broker
        .write("secret/app", json!({"password": "kept-safe"}))
        .await
        .expect(200);
    broker.stop().await;
    let original_keyring = std::fs::read(&broker.key_file).unwrap();

    // Another installation's keyring in place of the right one.
    let other_config = broker.directory.path().join("other.toml");
    let other_directory = broker.directory.path().join("other");
    std::fs::create_dir_all(&other_directory).unwrap();
    std::fs::write(
        &other_config,
        format!(
            "[storage]\nurl = \"sqlite://{}/other.db\"\n[keys]\nfile = \"other/keyring\"\n\
             [audit]\nkey_file = \"other/audit.key\"\n\
             [[mounts]]\npath = \"secret\"\nbackend = \"local\"\n",
            other_directory.display()
        ),
    )
    .unwrap();
    let init = run_custos(&["init", "--config", other_config.to_str().unwrap()], &[]);
    assert!(init.status.success(), "{}", describe(&init));
    std::fs::copy(other_directory.join("keyring"), &broker.key_file).unwrap();

    let (succeeded, stderr) = server_exit_output(&broker);
    assert!(!succeeded);
    let text = String::from_utf8_lossy(&original_keyring);
    assert!(stderr.contains("the store's active key kek-"), "{stderr}");
    assert!(
        stderr.contains(broker.key_file.to_str().unwrap()),
        "{stderr}"
    );
    assert!(!stderr.contains("kept-safe"));
    assert!(text
        .lines()
        .all(|line| line.starts_with('#') || !stderr.contains(line)));

    // A missing key file is named too.
    std::fs::remove_file(&broker.key_file).unwrap();
    let (succeeded, stderr) = server_exit_output(&broker);
    assert!(!succeeded);
    assert!(stderr.contains("cannot read the key file"), "{stderr}");

    // With the right keyring back, the secret is intact.
    std::fs::write(&broker.key_file, original_keyring).unwrap();
    broker.launch().await;
    assert_eq!(
        broker.read("secret/app").await.expect(200).body["data"]["password"],
        "kept-safe"
    );
    broker.finish().await;
}

async fn rotation_keeps_every_read_working(kind: DatabaseKind) {
    let mut broker = Broker::start(kind).await;
    for index in 0..40 {
        broker
            .write(
                &format!("secret/s{index}"),
                json!({"value": format!("value-{index}")}),
            )
            .await
            .expect(200);
    }
    let keys_before = keyring_lines(&broker);
    assert_eq!(keys_before.len(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let reads_done = Arc::new(AtomicU32::new(0));
    let reader = {
        let stop = stop.clone();
        let reads_done = reads_done.clone();
        let url_base = broker.url("/v1/secrets/secret");
        let token = broker.root_token.clone();
        let http = broker.http().clone();
        tokio::spawn(async move {
            let mut reads = 0_u32;
            while !stop.load(Ordering::Relaxed) || reads < 50 {
                let index = reads % 40;
                let answer = http
                    .get(format!("{url_base}/s{index}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200, "read {reads} failed during rotation");
                let body: serde_json::Value = answer.json().await.unwrap();
                assert_eq!(body["data"]["value"], format!("value-{index}"));
                reads += 1;
                reads_done.store(reads, Ordering::Relaxed);
            }
            reads
        })
    };

    while reads_done.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reads_before = reads_done.load(Ordering::Relaxed);
    let config = broker.config_path.to_str().unwrap().to_owned();
    let rotation = tokio::task::spawn_blocking(move || {
        run_custos(&["key", "rotate", "--config", &config], &[])
    })
    .await
    .unwrap();
    assert!(rotation.status.success(), "{}", describe(&rotation));
    let reads_during = reads_done.load(Ordering::Relaxed) - reads_before;
    assert!(
        reads_during > 0,
        "the broker kept serving while the rotation ran"
    );
    assert!(String::from_utf8_lossy(&rotation.stdout).contains("re-wrapped 40 data keys"));

    // Writes after the rotation use the new key and read back.
    broker
        .write("secret/after", json!({"value": "after"}))
        .await
        .expect(200);
    stop.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() >= 50);

    let keys_after = keyring_lines(&broker);
    assert_eq!(keys_after.len(), 1);
    assert_ne!(keys_after, keys_before);

    // A restarted broker holds only the new key and reads everything.
    broker.restart().await;
    for index in 0..40 {
        let read = broker.read(&format!("secret/s{index}")).await;
        assert_eq!(
            read.expect(200).body["data"]["value"],
            format!("value-{index}")
        );
    }
    assert_eq!(
        broker.read("secret/after").await.body["data"]["value"],
        "after"
    );
    broker.finish().await;
}

/// The keyring can come from an environment variable (a secret injected by an
/// orchestrator) instead of a file: the same text, the same store, never in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyring_can_come_from_an_environment_variable() {
    let mut broker = Broker::start(DatabaseKind::Sqlite).await;
    broker
        .write("secret/app", json!({"password": "from-env"}))
        .await
        .expect(200);
    broker.stop().await;
    let keyring = std::fs::read_to_string(&broker.key_file).unwrap();
    let key_lines = keyring_lines(&broker);
    std::fs::remove_file(&broker.key_file).unwrap();

    // The environment's choice of source replaces the file named in the configuration.
    broker
        .launch_with_environment(&[
            ("CUSTOS_KEYS_ENV", "CUSTOS_TEST_KEYRING"),
            ("CUSTOS_TEST_KEYRING", &keyring),
        ])
        .await;
    assert_eq!(
        broker.read("secret/app").await.expect(200).body["data"]["password"],
        "from-env"
    );
    broker.stop().await;
    let log = broker.log();
    assert!(key_lines.iter().all(|line| !log.contains(line.as_str())));

    // A variable that is not set is named, and the broker does not start.
    let (succeeded, stderr) =
        server_exit_output_with(&broker, &[("CUSTOS_KEYS_ENV", "CUSTOS_TEST_KEYRING")]);
    assert!(!succeeded);
    assert!(
        stderr.contains("cannot read the environment variable CUSTOS_TEST_KEYRING: it is not set"),
        "{stderr}"
    );
    broker.finish().await;
}
