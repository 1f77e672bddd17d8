//! AppRole roles and their secret ids (stored as SHA-256 hashes).

use sqlx::{AnyPool, Row};

use crate::error::StorageError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRow {
    pub name: String,
    pub role_id: String,
    /// JSON array of policy names.
    pub policies: String,
    pub token_ttl_seconds: i64,
    pub token_max_ttl_seconds: i64,
    pub secret_id_ttl_seconds: i64,
    /// Uses per secret id; 0 for unlimited.
    pub secret_id_uses: i64,
    pub created_at: i64,
}

#[derive(Clone, PartialEq, Eq)]
pub struct SecretIdRow {
    pub secret_id_hash: Vec<u8>,
    pub role_name: String,
    pub accessor: String,
    pub expires_at: i64,
    pub uses_remaining: Option<i64>,
    pub created_at: i64,
}

impl std::fmt::Debug for SecretIdRow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecretIdRow")
            .field("role_name", &self.role_name)
            .field("accessor", &self.accessor)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

const ROLE_COLUMNS: &str = "name, role_id, policies, token_ttl_seconds, token_max_ttl_seconds, \
                            secret_id_ttl_seconds, secret_id_uses, created_at";

#[derive(Debug, Clone)]
pub struct AppRoleRepository {
    pool: AnyPool,
}

impl AppRoleRepository {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Creates a role, or updates its settings keeping its role id.
    pub async fn put_role(&self, role: &RoleRow) -> Result<(), StorageError> {
        sqlx::query(&format!(
            "INSERT INTO approle_roles ({ROLE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (name) DO UPDATE SET policies = excluded.policies, \
             token_ttl_seconds = excluded.token_ttl_seconds, \
             token_max_ttl_seconds = excluded.token_max_ttl_seconds, \
             secret_id_ttl_seconds = excluded.secret_id_ttl_seconds, \
             secret_id_uses = excluded.secret_id_uses"
        ))
        .bind(&role.name)
        .bind(&role.role_id)
        .bind(&role.policies)
        .bind(role.token_ttl_seconds)
        .bind(role.token_max_ttl_seconds)
        .bind(role.secret_id_ttl_seconds)
        .bind(role.secret_id_uses)
        .bind(role.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn role(&self, name: &str) -> Result<Option<RoleRow>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {ROLE_COLUMNS} FROM approle_roles WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(role_row).transpose()
    }

    pub async fn role_by_role_id(&self, role_id: &str) -> Result<Option<RoleRow>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {ROLE_COLUMNS} FROM approle_roles WHERE role_id = $1"
        ))
        .bind(role_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(role_row).transpose()
    }

    pub async fn insert_secret_id(&self, secret_id: &SecretIdRow) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO approle_secret_ids (secret_id_hash, role_name, accessor, expires_at, \
             uses_remaining, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&secret_id.secret_id_hash)
        .bind(&secret_id.role_name)
        .bind(&secret_id.accessor)
        .bind(secret_id.expires_at)
        .bind(secret_id.uses_remaining)
        .bind(secret_id.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Spends one use of a secret id of `role_name` that has not expired by `now`.
    /// Returns false when there is no such usable secret id. A spent single-use id is
    /// deleted in the same transaction, so two logins cannot both use it.
    pub async fn consume_secret_id(
        &self,
        hash: &[u8],
        role_name: &str,
        now: i64,
    ) -> Result<bool, StorageError> {
        let mut transaction = self.pool.begin().await?;
        let spent = sqlx::query(
            "UPDATE approle_secret_ids SET uses_remaining = uses_remaining - 1 \
             WHERE secret_id_hash = $1 AND role_name = $2 AND expires_at > $3 \
             AND (uses_remaining IS NULL OR uses_remaining > 0)",
        )
        .bind(hash)
        .bind(role_name)
        .bind(now)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM approle_secret_ids WHERE secret_id_hash = $1 AND uses_remaining <= 0",
        )
        .bind(hash)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(spent == 1)
    }

    /// Deletes secret ids that expired before `now`.
    pub async fn delete_expired_secret_ids(&self, now: i64) -> Result<u64, StorageError> {
        Ok(
            sqlx::query("DELETE FROM approle_secret_ids WHERE expires_at <= $1")
                .bind(now)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

fn role_row(row: sqlx::any::AnyRow) -> Result<RoleRow, StorageError> {
    Ok(RoleRow {
        name: row.try_get(0)?,
        role_id: row.try_get(1)?,
        policies: row.try_get(2)?,
        token_ttl_seconds: row.try_get(3)?,
        token_max_ttl_seconds: row.try_get(4)?,
        secret_id_ttl_seconds: row.try_get(5)?,
        secret_id_uses: row.try_get(6)?,
        created_at: row.try_get(7)?,
    })
}
