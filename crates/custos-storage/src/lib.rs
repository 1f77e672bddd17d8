//! Custos's persistence layer: one sqlx code path over SQLite and PostgreSQL.
//!
//! Both databases are reached through sqlx's `Any` driver with portable SQL (`$1`
//! placeholders, BIGINT times in Unix microseconds, byte columns), so every repository
//! behaves the same on both. Only the migrations differ, in `migrations/sqlite` and
//! `migrations/postgres` at the top of the repository. This crate stores bytes; it knows
//! nothing of encryption or HTTP. The one exception to the single code path is the SQLite
//! append connection (`append`), which commits the batches of audit records and leases that
//! every read adds without sqlx's per-statement thread handoffs.

#![forbid(unsafe_code)]

mod append;
pub mod approle;
pub mod audit;
mod database;
mod error;
pub mod leases;
pub mod local_secrets;
pub mod policies;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;

pub use database::{
    describe as describe_url, unix_micros_now, Database, DatabaseKind, DatabaseUrl,
};
pub use error::StorageError;
