//! The JSON-lines copy of the audit log, for shipping to a SIEM.
//!
//! One line per record: `{"sequence": N, "mac": "HEX", "record": {...}}`, where `record`
//! is the record's canonical JSON exactly as the MAC covers it, so a consumer holding the
//! audit key can verify the copy too. The database stays the system of record: a failing
//! sink is logged loudly but never refuses a request.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where JSON lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    File(PathBuf),
    Stdout,
}

/// An open JSON-lines sink.
#[derive(Debug)]
pub struct JsonLinesSink {
    target: SinkTarget,
    file: Option<std::fs::File>,
}

impl JsonLinesSink {
    /// Opens (appending) or prepares the sink.
    pub fn open(target: SinkTarget) -> std::io::Result<Self> {
        let file = match &target {
            SinkTarget::File(path) => Some(open_append(path)?),
            SinkTarget::Stdout => None,
        };
        Ok(Self { target, file })
    }

    pub fn target(&self) -> &SinkTarget {
        &self.target
    }

    /// Writes one batch of lines.
    pub fn write_batch(&mut self, lines: &[String]) -> std::io::Result<()> {
        let mut buffer = String::new();
        for line in lines {
            buffer.push_str(line);
            buffer.push('\n');
        }
        match &mut self.file {
            Some(file) => file.write_all(buffer.as_bytes()),
            None => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(buffer.as_bytes())?;
                stdout.flush()
            }
        }
    }
}

/// The JSON line of one record.
pub fn line(sequence: u64, mac: &str, record_json: &str) -> String {
    format!("{{\"sequence\":{sequence},\"mac\":\"{mac}\",\"record\":{record_json}}}")
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}
