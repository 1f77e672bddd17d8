//! Verification of the audit chain, and pruning that keeps it verifiable.
//!
//! Verification starts at the newest pruning checkpoint (or at record 1), walks every
//! record in sequence order, and stops at the first problem:
//! - a gap in the sequence: records were deleted;
//! - a MAC that does not match: a record was edited, reordered or inserted (any change to
//!   a record, its sequence or its predecessor changes the MAC, and only the audit key's
//!   holder can compute a new one);
//! - a search column that disagrees with the authenticated record;
//! - a chain that ends before the head file's sequence: the newest records were removed.

use std::fmt;
use std::path::Path;

use custos_storage::audit::{AuditRepository, Checkpoint};
use custos_storage::StorageError;

use crate::head;
use crate::key::AuditKey;
use crate::record::AuditRecord;
use crate::writer::GENESIS_MAC;

const PAGE: u32 = 1000;

/// The first thing found wrong with the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The record's MAC does not match its content and position.
    Altered { sequence: u64 },
    /// A search column disagrees with the authenticated record.
    ColumnMismatch { sequence: u64, column: &'static str },
    /// Records from `first_missing` up to `next_present - 1` are gone.
    Missing {
        first_missing: u64,
        next_present: u64,
    },
    /// The chain ends at `last_present`, but the head file vouches for `head_sequence`.
    Truncated {
        first_missing: u64,
        head_sequence: u64,
    },
    /// The checkpoint is not authentic.
    ForgedCheckpoint { sequence: u64 },
    /// The head file does not match the record it names.
    HeadMismatch { sequence: u64 },
    /// The head file exists but cannot be trusted.
    HeadUnusable { reason: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Altered { sequence } => write!(
                formatter,
                "record {sequence} does not match its MAC: it was edited, reordered or inserted"
            ),
            Problem::ColumnMismatch { sequence, column } => write!(
                formatter,
                "record {sequence}: the `{column}` column was edited (it disagrees with the \
                 authenticated record)"
            ),
            Problem::Missing {
                first_missing,
                next_present,
            } => {
                if next_present - first_missing == 1 {
                    write!(formatter, "record {first_missing} is missing (deleted)")
                } else {
                    write!(
                        formatter,
                        "records {first_missing} to {} are missing (deleted)",
                        next_present - 1
                    )
                }
            }
            Problem::Truncated {
                first_missing,
                head_sequence,
            } => write!(
                formatter,
                "records {first_missing} to {head_sequence} are missing from the end of the \
                 log (truncated); the head file vouches for record {head_sequence}"
            ),
            Problem::ForgedCheckpoint { sequence } => write!(
                formatter,
                "the pruning checkpoint at record {sequence} is not authentic"
            ),
            Problem::HeadMismatch { sequence } => write!(
                formatter,
                "record {sequence} differs from the one the head file vouches for"
            ),
            Problem::HeadUnusable { reason } => write!(formatter, "{reason}"),
        }
    }
}

impl Problem {
    /// The sequence number of the record the problem is about.
    pub fn sequence(&self) -> Option<u64> {
        match self {
            Problem::Altered { sequence }
            | Problem::ColumnMismatch { sequence, .. }
            | Problem::ForgedCheckpoint { sequence }
            | Problem::HeadMismatch { sequence } => Some(*sequence),
            Problem::Missing { first_missing, .. } | Problem::Truncated { first_missing, .. } => {
                Some(*first_missing)
            }
            Problem::HeadUnusable { .. } => None,
        }
    }
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: u64,
    /// Where the remaining chain starts (after a checkpoint, or 1).
    pub first_sequence: u64,
    pub last_sequence: Option<u64>,
    pub problem: Option<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the audit log is broken, so it was not pruned: {0}")]
    Broken(Problem),
}

/// Verifies the whole chain in the database against `key` and the head file.
pub async fn verify(
    repository: &AuditRepository,
    key: &AuditKey,
    head_file: Option<&Path>,
) -> Result<VerifyReport, VerifyError> {
    let checkpoint = repository.latest_checkpoint().await?;
    let (mut sequence, mut previous_mac) = match &checkpoint {
        Some(checkpoint) => (checkpoint.sequence, checkpoint.mac.clone()),
        None => (0, GENESIS_MAC.to_owned()),
    };
    let mut report = VerifyReport {
        checked: 0,
        first_sequence: sequence + 1,
        last_sequence: None,
        problem: None,
    };
    if let Some(checkpoint) = &checkpoint {
        if !checkpoint_is_authentic(key, checkpoint) {
            report.problem = Some(Problem::ForgedCheckpoint {
                sequence: checkpoint.sequence,
            });
            return Ok(report);
        }
    }

    let head = match head_file.map(|path| head::read(path, key)) {
        Some(Ok(head)) => head,
        Some(Err(error)) => {
            report.problem = Some(Problem::HeadUnusable {
                reason: error.to_string(),
            });
            return Ok(report);
        }
        None => None,
    };

    loop {
        let rows = repository.after(sequence, i64::MIN, i64::MAX, PAGE).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let expected = sequence + 1;
            if row.sequence != expected {
                report.problem = Some(Problem::Missing {
                    first_missing: expected,
                    next_present: row.sequence,
                });
                return Ok(report);
            }

            let mac = key.chain_mac(&previous_mac, row.sequence, &row.record);
            if !AuditKey::macs_equal(&mac, &row.mac) {
                report.problem = Some(Problem::Altered {
                    sequence: row.sequence,
                });
                return Ok(report);
            }
            if let Some(column) = mismatched_column(&row) {
                report.problem = Some(Problem::ColumnMismatch {
                    sequence: row.sequence,
                    column,
                });
                return Ok(report);
            }
            if let Some(head) = &head {
                if head.sequence == row.sequence && !AuditKey::macs_equal(&head.mac, &row.mac) {
                    report.problem = Some(Problem::HeadMismatch {
                        sequence: row.sequence,
                    });
                    return Ok(report);
                }
            }

            sequence = row.sequence;
            previous_mac = row.mac;
            report.checked += 1;
            report.last_sequence = Some(sequence);
        }
    }

    if let Some(head) = head {
        if head.sequence > sequence {
            report.problem = Some(Problem::Truncated {
                first_missing: sequence + 1,
                head_sequence: head.sequence,
            });
        }
    }
    Ok(report)
}

/// What a prune did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: u64,
    pub checkpoint_sequence: Option<u64>,
}

/// Removes records recorded before `before` (Unix microseconds), leaving a checkpoint so
/// that the rest still verifies. Refuses when the chain is broken: pruning must not erase
/// the evidence of tampering.
pub async fn prune(
    repository: &AuditRepository,
    key: &AuditKey,
    head_file: Option<&Path>,
    before: i64,
) -> Result<PruneReport, VerifyError> {
    let report = verify(repository, key, head_file).await?;
    if let Some(problem) = report.problem {
        return Err(VerifyError::Broken(problem));
    }

    let Some(last) = repository.last_before(before).await? else {
        return Ok(PruneReport {
            removed: 0,
            checkpoint_sequence: None,
        });
    };
    let checkpoint = Checkpoint {
        sequence: last.sequence,
        checkpoint_mac: key.checkpoint_mac(last.sequence, &last.mac, before),
        mac: last.mac,
        pruned_before: before,
        created_at: custos_storage::unix_micros_now(),
    };
    let removed = repository.prune(&checkpoint).await?;
    Ok(PruneReport {
        removed,
        checkpoint_sequence: Some(checkpoint.sequence),
    })
}

fn checkpoint_is_authentic(key: &AuditKey, checkpoint: &Checkpoint) -> bool {
    let expected = key.checkpoint_mac(
        checkpoint.sequence,
        &checkpoint.mac,
        checkpoint.pruned_before,
    );
    AuditKey::macs_equal(&expected, &checkpoint.checkpoint_mac)
}

fn mismatched_column(row: &custos_storage::audit::AuditRow) -> Option<&'static str> {
    let Ok(record) = serde_json::from_str::<AuditRecord>(&row.record) else {
        return Some("record");
    };
    if record.request_id != row.request_id {
        return Some("request_id");
    }
    if record.principal != row.principal {
        return Some("principal");
    }
    if record.operation != row.operation {
        return Some("operation");
    }
    if record.mount != row.mount {
        return Some("mount");
    }
    if record.path != row.path {
        return Some("path");
    }
    if record.outcome.as_str() != row.outcome {
        return Some("outcome");
    }
    if crate::writer::unix_micros(&record.time) != row.recorded_at {
        return Some("recorded_at");
    }
    None
}
