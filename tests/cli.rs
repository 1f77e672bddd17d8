//! The `custos` command as people and scripts use it: pinned text output, JSON output,
//! errors, and the embedded dev mode.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use custos_end_to_end::{custos_binary, describe, free_port, run_custos, Broker, DatabaseKind};
use serde_json::Value;

fn stdout_of(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{}", describe(output));
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_list_delete_print_stable_text() {
    let broker = Broker::start(DatabaseKind::Sqlite).await;

    let put = broker.cli(&[
        "secret",
        "put",
        "secret/app/db",
        "username=app",
        "password=hunter2",
    ]);
    assert_eq!(stdout_of(&put), "Wrote secret/app/db version 1\n");

    let get = stdout_of(&broker.cli(&["secret", "get", "secret/app/db"]));
    let lines: Vec<&str> = get.lines().collect();
    assert_eq!(lines[0], "path      secret/app/db");
    assert_eq!(lines[1], "version   1");
    assert!(lines[2].starts_with("created   20"), "{get}");
    assert_eq!(&lines[3..], ["", "password  hunter2", "username  app"]);

    let field = broker.cli(&["secret", "get", "secret/app/db", "--field", "password"]);
    assert_eq!(stdout_of(&field), "hunter2\n");

    broker.cli(&["secret", "put", "secret/app/api", "key=abc"]);
    let list = broker.cli(&["secret", "list", "secret/app"]);
    assert_eq!(stdout_of(&list), "api\ndb\n");
    assert_eq!(
        stdout_of(&broker.cli(&["secret", "list", "secret"])),
        "app/\n"
    );

    let delete = broker.cli(&["secret", "delete", "secret/app/api"]);
    assert_eq!(
        stdout_of(&delete),
        "Deleted the latest version of secret/app/api\n"
    );
    let destroy = broker.cli(&["secret", "delete", "secret/app/api", "--destroy"]);
    assert_eq!(
        stdout_of(&destroy),
        "Destroyed every version of secret/app/api\n"
    );
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_read_back_over_http_and_versions_are_selectable() {
    let broker = Broker::start(DatabaseKind::Sqlite).await;
    broker.cli(&["secret", "put", "secret/svc", "token=first"]);
    broker.cli(&["secret", "put", "secret/svc", "token=second"]);

    // What the CLI wrote, plain HTTP (as curl would) reads back.
    let read = broker.read("secret/svc").await;
    assert_eq!(read.expect(200).body["data"]["token"], "second");

    let json = stdout_of(&broker.cli(&[
        "secret",
        "get",
        "secret/svc",
        "--version",
        "1",
        "--format",
        "json",
    ]));
    let body: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(body["data"]["token"], "first");
    assert_eq!(body["metadata"]["version"], 1);

    let stale = broker.cli(&["secret", "put", "secret/svc", "token=third", "--cas", "1"]);
    assert_eq!(stale.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(
        stderr.contains("(check_and_set_mismatch, HTTP 409)"),
        "{stderr}"
    );
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_come_from_files_and_standard_input() {
    let broker = Broker::start(DatabaseKind::Sqlite).await;
    let file = broker.directory.path().join("certificate.der");
    std::fs::write(&file, [0_u8, 159, 146, 150]).unwrap();
    let file_argument = format!("certificate=@{}", file.display());
    stdout_of(&broker.cli(&["secret", "put", "secret/tls", &file_argument]));
    assert_eq!(
        broker.read("secret/tls").await.body["data"]["certificate"]["base64"],
        "AJ+Slg=="
    );
    let raw = broker.cli(&["secret", "get", "secret/tls", "--field", "certificate"]);
    assert!(raw.status.success());
    assert_eq!(raw.stdout, [0_u8, 159, 146, 150]);

    let mut child = Command::new(custos_binary())
        .args(["secret", "put", "secret/piped", "password=-"])
        .env("CUSTOS_ADDR", format!("http://{}", broker.address))
        .env("CUSTOS_TOKEN", &broker.root_token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from-stdin")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(
        broker.read("secret/piped").await.body["data"]["password"],
        "from-stdin"
    );
    broker.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_clear_line_and_exit_status_one() {
    let broker = Broker::start(DatabaseKind::Sqlite).await;

    let missing = broker.cli(&["secret", "get", "secret/none"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "custos: no secret exists at this path (secret_not_found, HTTP 404)\n"
    );

    let no_token = run_custos(
        &["secret", "get", "secret/none"],
        &[("CUSTOS_ADDR", &format!("http://{}", broker.address))],
    );
    assert_eq!(no_token.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("set CUSTOS_TOKEN"));

    let traversal = broker.cli(&["secret", "delete", "secret/app/../other", "--destroy"]);
    assert_eq!(traversal.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&traversal.stderr);
    assert!(stderr.contains("invalid secret path"), "{stderr}");

    let bad_token = run_custos(
        &["secret", "get", "secret/none"],
        &[
            ("CUSTOS_ADDR", &format!("http://{}", broker.address)),
            ("CUSTOS_TOKEN", "cst_no"),
        ],
    );
    assert!(String::from_utf8_lossy(&bad_token.stderr).contains("(invalid_token, HTTP 401)"));

    let unreachable = run_custos(
        &["secret", "list", "secret"],
        &[
            ("CUSTOS_ADDR", &format!("http://127.0.0.1:{}", free_port())),
            ("CUSTOS_TOKEN", "x"),
        ],
    );
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the broker"));
    broker.finish().await;
}

#[test]
fn help_lists_every_command() {
    let help = run_custos(&["--help"], &[]);
    let text = stdout_of(&help);
    for command in ["server", "dev", "init", "key", "secret"] {
        assert!(text.contains(&format!("  {command} ")), "{text}");
    }
    let secret_help = stdout_of(&run_custos(&["secret", "--help"], &[]));
    for command in ["get", "put", "list", "delete"] {
        assert!(
            secret_help.contains(&format!("  {command} ")),
            "{secret_help}"
        );
    }
}

/// Starts `custos dev`, returns the child and the root token its banner printed.
fn start_dev(data_directory: &std::path::Path, address: &str) -> (std::process::Child, String) {
    let mut child = Command::new(custos_binary())
        .args([
            "dev",
            "--data-dir",
            data_directory.to_str().unwrap(),
            "--addr",
            address,
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut token = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(value) = line.trim().strip_prefix("root token:") {
            token = Some(value.trim().to_owned());
        }
        if line.contains("custos secret put") {
            break;
        }
    }
    (child, token.expect("the banner shows the root token"))
}

async fn wait_healthy(address: &str) {
    for _ in 0..200 {
        if let Ok(response) = reqwest::get(format!("http://{address}/v1/health")).await {
            if response.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the dev broker did not become healthy");
}

fn terminate(mut child: std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "dev mode exits cleanly on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_at_once_and_keeps_data_and_token_across_restarts() {
    let data_directory = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());

    let (child, token) = start_dev(data_directory.path(), &address);
    wait_healthy(&address).await;
    let environment = [
        ("CUSTOS_ADDR", format!("http://{address}")),
        ("CUSTOS_TOKEN", token.clone()),
    ];
    let environment: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let put = run_custos(
        &["secret", "put", "secret/hello", "greeting=world"],
        &environment,
    );
    assert!(put.status.success(), "{}", describe(&put));
    terminate(child);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["keyring", "root-token"] {
            let mode = std::fs::metadata(data_directory.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    let (child, token_again) = start_dev(data_directory.path(), &address);
    wait_healthy(&address).await;
    assert_eq!(token_again, token, "the dev root token is reused");
    let get = run_custos(
        &["secret", "get", "secret/hello", "--field", "greeting"],
        &environment,
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout),
        "world\n",
        "{}",
        describe(&get)
    );
    terminate(child);
}

/// The README's identity tour, command by command: a policy, an AppRole for a workload,
/// its login, what its token may read, and the incident-response revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_tour_of_the_readme_works_as_written() {
    use std::os::unix::fs::PermissionsExt;

    let broker = Broker::start(DatabaseKind::Sqlite).await;
    let directory = tempfile::tempdir().unwrap();
    let policy_file = directory.path().join("app-read.json");
    std::fs::write(
        &policy_file,
        r#"{"rules": [{"path": "secret/app/**", "capabilities": ["read"]}]}"#,
    )
    .unwrap();
    let policy_path = policy_file.to_str().unwrap();
    assert_eq!(
        stdout_of(&broker.cli(&["policy", "write", "app-read", policy_path])),
        "Wrote policy app-read\n"
    );
    let role =
        stdout_of(&broker.cli(&["approle", "write-role", "billing", "--policy", "app-read"]));
    assert!(role.contains("policies               app-read"), "{role}");
    let role_id = stdout_of(&broker.cli(&["approle", "role-id", "billing"]));
    let role_id = role_id.trim();

    // A file left over with a wider mode is narrowed, not merely overwritten.
    let secret_id_file = directory.path().join("custos_secret_id");
    std::fs::write(&secret_id_file, "old").unwrap();
    std::fs::set_permissions(&secret_id_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let issued = stdout_of(&broker.cli(&[
        "approle",
        "secret-id",
        "billing",
        "--output",
        secret_id_file.to_str().unwrap(),
    ]));
    assert!(
        issued.starts_with("Wrote a secret id for role billing to "),
        "{issued}"
    );
    let mode = std::fs::metadata(&secret_id_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret_id = std::fs::read_to_string(&secret_id_file).unwrap();
    assert!(
        !issued.contains(secret_id.trim()),
        "the secret id is not printed"
    );

    broker.cli(&["secret", "put", "secret/app/db", "password=for-billing"]);
    broker.cli(&[
        "secret",
        "put",
        "secret/other/db",
        "password=not-for-billing",
    ]);
    let login = broker.cli(&[
        "approle",
        "login",
        "--role-id",
        role_id,
        "--secret-id-file",
        secret_id_file.to_str().unwrap(),
        "--field",
        "token",
    ]);
    let workload_token = stdout_of(&login).trim().to_owned();
    assert!(workload_token.starts_with("cst_"), "{workload_token}");

    // The workload reads what its policy allows, and nothing else.
    let as_workload = |arguments: &[&str]| {
        run_custos(
            arguments,
            &[
                ("CUSTOS_ADDR", &broker.url("")),
                ("CUSTOS_TOKEN", &workload_token),
            ],
        )
    };
    let allowed = as_workload(&["secret", "get", "secret/app/db", "--field", "password"]);
    assert_eq!(stdout_of(&allowed), "for-billing\n");
    let denied = as_workload(&["secret", "get", "secret/other/db"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("forbidden"));

    // Incident response: everything under the path, then everything the workload holds.
    let by_prefix = stdout_of(&broker.cli(&["lease", "revoke-prefix", "secret/app"]));
    assert!(by_prefix.contains("revoked    1"), "{by_prefix}");
    as_workload(&["secret", "get", "secret/app/db"]);
    let by_principal = stdout_of(&broker.cli(&["lease", "revoke-principal", "approle:billing"]));
    assert!(by_principal.contains("revoked         1"), "{by_principal}");
    assert!(by_principal.contains("revoked_tokens  1"), "{by_principal}");
    // The workload's token went with its leases.
    let after = as_workload(&["secret", "get", "secret/app/db"]);
    assert_eq!(after.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&after.stderr).contains("invalid_token"));

    // A child token for a script, printed alone.
    let child = broker.cli(&[
        "token", "create", "--policy", "app-read", "--field", "token",
    ]);
    let child = stdout_of(&child);
    assert!(
        child.starts_with("cst_") && child.lines().count() == 1,
        "{child}"
    );
    broker.finish().await;
}

/// Ctrl-C (SIGINT) in a terminal stops the broker as SIGTERM does: requests finished,
/// every record committed, the audit log intact, exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_broker_cleanly_with_its_audit_log_intact() {
    let mut broker = Broker::start(DatabaseKind::Sqlite).await;
    broker
        .write("secret/app", serde_json::json!({"password": "kept"}))
        .await
        .expect(200);
    broker.read("secret/app").await.expect(200);

    // `stop_with` fails the test unless the broker exits with status 0.
    broker.stop_with("INT").await;
    let log = broker.log();
    assert!(log.contains("SIGINT received; shutting down"), "{log}");
    assert!(log.contains("custos stopped"), "{log}");

    let verified = broker.verify_audit();
    assert!(verified.status.success(), "{}", describe(&verified));
    assert_eq!(
        stdout_of(&verified),
        "Audit log intact: 2 records verified (records 1 to 2).\n"
    );
    broker.finish().await;
}
