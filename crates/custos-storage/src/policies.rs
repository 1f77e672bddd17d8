//! Policies written through the API, stored as JSON text the server encodes.

use sqlx::{AnyPool, Row};

use crate::database::unix_micros_now;
use crate::error::StorageError;

#[derive(Debug, Clone)]
pub struct PolicyRepository {
    pool: AnyPool,
}

impl PolicyRepository {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Creates or replaces a policy.
    pub async fn put(&self, name: &str, rules: &str) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO policies (name, rules, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET rules = excluded.rules, \
             updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(rules)
        .bind(unix_micros_now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every stored policy as (name, rules).
    pub async fn all(&self) -> Result<Vec<(String, String)>, StorageError> {
        let rows = sqlx::query("SELECT name, rules FROM policies ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Deletes a policy; false when it did not exist.
    pub async fn delete(&self, name: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query("DELETE FROM policies WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(removed == 1)
    }
}
