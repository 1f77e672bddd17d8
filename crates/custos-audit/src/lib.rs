//! The audit log: one record for every request, chained with a keyed MAC, written durably
//! by a single group-commit writer, and verifiable end to end.
//!
//! - [`record`]: what a record holds, and its canonical JSON.
//! - [`key`]: the per-installation audit key, the chain MACs and the keyed hashes that
//!   stand in for credentials.
//! - [`head`]: the chain head kept outside the database, so a truncated tail shows.
//! - [`writer`]: [`AuditLog`], the bounded, fail-closed front of the group-commit writer.
//! - [`sink`]: the JSON-lines copy for log shippers.
//! - [`verify`]: walks the chain and names the first broken record; prunes with a
//!   checkpoint.

#![forbid(unsafe_code)]

pub mod head;
pub mod key;
pub mod record;
pub mod sink;
pub mod verify;
pub mod writer;

pub use key::{AuditKey, AuditKeyError};
pub use record::{AuditRecord, Outcome};
pub use sink::JsonLinesSink;
pub use verify::{prune, verify, Problem, PruneReport, VerifyError, VerifyReport};
pub use writer::{AuditError, AuditLog, AuditSettings, FailMode};
