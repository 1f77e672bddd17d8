//! `custos audit ...`: search through the API; verify, export, prune and hash with direct
//! access to the broker's database and audit key.
//!
//! Verification needs only the audit key and the database, not the key-encryption keys:
//! a security team can check the log without being able to read a secret.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use custos_audit::{AuditKey, VerifyError};
use custos_storage::audit::AuditRepository;
use custos_storage::Database;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use zeroize::Zeroizing;

use crate::cli::{AuditCommand, AuditFormat, AuditSearchArguments};
use crate::client::{success, ApiClient};
use crate::config::Settings;

/// Exit status of `custos audit verify` when the log was tampered with.
const TAMPERED: u8 = 3;

pub async fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Search(arguments) => search(arguments).await,
        AuditCommand::Verify { config } => verify(&config).await,
        AuditCommand::Export {
            config,
            since,
            until,
        } => export(&config, since.as_deref(), until.as_deref()).await,
        AuditCommand::Prune { config, before } => prune(&config, &before).await,
        AuditCommand::Hash { config, value } => hash(&config, &value),
    }
}

async fn search(arguments: AuditSearchArguments) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(arguments.endpoint)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    let filters = [
        ("principal", &arguments.principal),
        ("path", &arguments.path),
        ("mount", &arguments.mount),
        ("operation", &arguments.operation),
        ("outcome", &arguments.outcome),
    ];
    for (name, value) in filters {
        if let Some(value) = value {
            query.push((name, value.clone()));
        }
    }
    if let Some(since) = &arguments.since {
        query.push(("since", rfc3339(parse_moment(since)?)));
    }
    if let Some(until) = &arguments.until {
        query.push(("until", rfc3339(parse_moment(until)?)));
    }
    query.push(("limit", arguments.limit.to_string()));

    let mut records: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut page_query = query.clone();
        if let Some(cursor) = &cursor {
            page_query.push(("cursor", cursor.clone()));
        }
        let url = format!("{}/v1/audit", client.address);
        let answer = client
            .send(client.http.get(&url).query(&page_query))
            .await?;
        let Some(body) = success(&answer)? else {
            return Ok(ExitCode::FAILURE);
        };
        records.extend(body["records"].as_array().cloned().unwrap_or_default());
        cursor = body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || !arguments.all {
            break;
        }
    }

    let mut out = std::io::stdout().lock();
    match arguments.format {
        AuditFormat::Json => {
            for record in &records {
                writeln!(out, "{}", serde_json::to_string(record)?)?;
            }
        }
        AuditFormat::Csv => {
            writeln!(out, "{}", COLUMNS.join(","))?;
            for record in &records {
                let row: Vec<String> = cells(record).iter().map(|cell| csv_cell(cell)).collect();
                writeln!(out, "{}", row.join(","))?;
            }
        }
        AuditFormat::Table => print_table(&mut out, &records)?,
    }
    Ok(ExitCode::SUCCESS)
}

const COLUMNS: [&str; 9] = [
    "sequence",
    "time",
    "principal",
    "operation",
    "path",
    "version",
    "outcome",
    "status",
    "client",
];

fn cells(entry: &Value) -> [String; 9] {
    let record = &entry["record"];
    let text = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let path = if record["path"].is_null() {
        &record["requested_path"]
    } else {
        &record["path"]
    };
    [
        text(&entry["sequence"]),
        text(&record["time"]),
        text(&record["principal"]),
        text(&record["operation"]),
        text(path),
        text(&record["version"]),
        text(&record["outcome"]),
        text(&record["status"]),
        text(&record["client_address"]),
    ]
}

fn print_table(out: &mut impl Write, records: &[Value]) -> std::io::Result<()> {
    let rows: Vec<[String; 9]> = records.iter().map(cells).collect();
    let mut widths: Vec<usize> = COLUMNS.iter().map(|column| column.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let header: Vec<String> = COLUMNS.iter().map(|column| column.to_uppercase()).collect();
    for row in std::iter::once(&header[..]).chain(rows.iter().map(|row| &row[..])) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

struct AuditStore {
    database: Database,
    repository: AuditRepository,
    key: AuditKey,
    head_file: Option<std::path::PathBuf>,
}

async fn open_store(config: &Path) -> anyhow::Result<AuditStore> {
    let settings = Settings::load(config)?;
    let Some(key_file) = &settings.audit.key_file else {
        bail!("auditing is disabled in {}", config.display());
    };
    let key = AuditKey::load(key_file)?;
    let database = Database::connect(settings.storage_url.expose()).await?;
    let repository = AuditRepository::new(&database);
    Ok(AuditStore {
        database,
        repository,
        key,
        head_file: settings.audit.head_file,
    })
}

async fn verify(config: &Path) -> anyhow::Result<ExitCode> {
    let store = open_store(config).await?;
    let report =
        custos_audit::verify(&store.repository, &store.key, store.head_file.as_deref()).await?;
    store.database.close().await;

    if let Some(problem) = report.problem {
        eprintln!("custos: AUDIT LOG TAMPERED: {problem}");
        eprintln!(
            "custos: {} records verified before it, from record {}",
            report.checked, report.first_sequence
        );
        return Ok(ExitCode::from(TAMPERED));
    }
    match report.last_sequence {
        Some(last) => println!(
            "Audit log intact: {} records verified (records {} to {last}).",
            report.checked, report.first_sequence
        ),
        None => println!("Audit log intact: no records yet."),
    }
    Ok(ExitCode::SUCCESS)
}

async fn export(
    config: &Path,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let since = since
        .map(parse_moment)
        .transpose()?
        .map_or(i64::MIN, micros);
    let until = until
        .map(parse_moment)
        .transpose()?
        .map_or(i64::MAX, micros);
    let store = open_store(config).await?;

    let mut out = std::io::stdout().lock();
    let mut after = 0;
    loop {
        let rows = store.repository.after(after, since, until, 1000).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.sequence;
        for row in &rows {
            writeln!(
                out,
                "{}",
                custos_audit::sink::line(row.sequence, &row.mac, &row.record)
            )?;
        }
    }
    out.flush()?;
    store.database.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn prune(config: &Path, before: &str) -> anyhow::Result<ExitCode> {
    let before = micros(parse_moment(before)?);
    let store = open_store(config).await?;
    let outcome = custos_audit::prune(
        &store.repository,
        &store.key,
        store.head_file.as_deref(),
        before,
    )
    .await;
    store.database.close().await;

    match outcome {
        Ok(report) => {
            match report.checkpoint_sequence {
                Some(sequence) => println!(
                    "Removed {} records; the log now starts after record {sequence}.",
                    report.removed
                ),
                None => println!("No records before that time; nothing removed."),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(VerifyError::Broken(problem)) => {
            eprintln!("custos: AUDIT LOG TAMPERED, nothing pruned: {problem}");
            Ok(ExitCode::from(TAMPERED))
        }
        Err(error) => Err(error.into()),
    }
}

fn hash(config: &Path, value: &str) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    let Some(key_file) = &settings.audit.key_file else {
        bail!("auditing is disabled in {}", config.display());
    };
    let key = AuditKey::load(key_file)?;

    let value = if value == "-" {
        let mut buffer = Zeroizing::new(String::new());
        std::io::stdin().read_to_string(&mut buffer)?;
        Zeroizing::new(buffer.trim_end_matches(['\n', '\r']).to_owned())
    } else {
        Zeroizing::new(value.to_owned())
    };
    println!("{}", key.hash(&value));
    Ok(ExitCode::SUCCESS)
}

/// Parses RFC 3339, or a plain date meaning midnight UTC.
fn parse_moment(text: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(moment) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(moment);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = Date::parse(text, &format).with_context(|| {
        format!(
            "`{text}` is not a time; use RFC 3339 (2026-12-03T10:00:00Z) or a date (2026-12-03)"
        )
    })?;
    Ok(date.midnight().assume_utc())
}

fn micros(moment: OffsetDateTime) -> i64 {
    i64::try_from(moment.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn rfc3339(moment: OffsetDateTime) -> String {
    moment.format(&Rfc3339).unwrap_or_default()
}
