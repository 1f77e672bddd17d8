//! Stored authentication tokens, kept only as SHA-256 hashes of the token text.
//!
//! Lists (policies) and maps (metadata) are stored as JSON text that callers encode; the
//! repository does not interpret them.

use sqlx::{AnyPool, Row};

use crate::database::{to_i64, unix_micros_now};
use crate::error::StorageError;

/// A stored token, without any way back to the token text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub token_hash: Vec<u8>,
    /// A non-secret handle that names the token in logs, audit records and the API.
    pub accessor: String,
    pub display_name: String,
    pub is_root: bool,
    pub created_at: i64,
    /// JSON array of policy names.
    pub policies: String,
    /// `root`, `token`, `kubernetes` or `approle`.
    pub auth_method: String,
    /// Who the token stands for, such as `kubernetes:payments/api` or `approle:ci`.
    pub principal: String,
    /// JSON object of string metadata.
    pub metadata: String,
    /// Renewal increment; `None` for tokens that never expire.
    pub ttl_seconds: Option<i64>,
    pub expires_at: Option<i64>,
    pub max_expires_at: Option<i64>,
    /// `None` for unlimited use.
    pub uses_remaining: Option<i64>,
    /// The accessor of the token that created this one.
    pub parent_accessor: Option<String>,
}

const COLUMNS: &str = "token_hash, accessor, display_name, is_root, created_at, policies, \
                       auth_method, principal, metadata, ttl_seconds, expires_at, \
                       max_expires_at, uses_remaining, parent_accessor";

#[derive(Debug, Clone)]
pub struct TokenRepository {
    pool: AnyPool,
}

impl TokenRepository {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    pub async fn insert(&self, token: &StoredToken) -> Result<(), StorageError> {
        sqlx::query(&format!(
            "INSERT INTO auth_tokens ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ))
        .bind(&token.token_hash)
        .bind(&token.accessor)
        .bind(&token.display_name)
        .bind(i64::from(token.is_root))
        .bind(token.created_at)
        .bind(&token.policies)
        .bind(&token.auth_method)
        .bind(&token.principal)
        .bind(&token.metadata)
        .bind(token.ttl_seconds)
        .bind(token.expires_at)
        .bind(token.max_expires_at)
        .bind(token.uses_remaining)
        .bind(&token.parent_accessor)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every root token. There is normally one; a handful at most.
    pub async fn root_tokens(&self) -> Result<Vec<StoredToken>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM auth_tokens WHERE is_root = 1 ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(stored_token).collect()
    }

    /// The token with this hash, if any (expired or not: callers decide).
    pub async fn find_by_hash(&self, hash: &[u8]) -> Result<Option<StoredToken>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM auth_tokens WHERE token_hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(stored_token).transpose()
    }

    pub async fn find_by_accessor(
        &self,
        accessor: &str,
    ) -> Result<Option<StoredToken>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM auth_tokens WHERE accessor = $1"
        ))
        .bind(accessor)
        .fetch_optional(&self.pool)
        .await?;
        row.map(stored_token).transpose()
    }

    /// Accessors of the tokens issued to `principal`, root tokens aside.
    pub async fn accessors_of(&self, principal: &str) -> Result<Vec<String>, StorageError> {
        let rows =
            sqlx::query("SELECT accessor FROM auth_tokens WHERE principal = $1 AND is_root = 0")
                .bind(principal)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StorageError::from))
            .collect()
    }

    /// Spends one use of a use-limited token. Returns false when none was left (another
    /// request may have spent the last one at the same moment).
    pub async fn spend_use(&self, accessor: &str) -> Result<bool, StorageError> {
        let changed = sqlx::query(
            "UPDATE auth_tokens SET uses_remaining = uses_remaining - 1 \
             WHERE accessor = $1 AND uses_remaining > 0",
        )
        .bind(accessor)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Sets a token's expiry; only for tokens not yet expired.
    pub async fn renew(&self, accessor: &str, expires_at: i64) -> Result<bool, StorageError> {
        let changed = sqlx::query(
            "UPDATE auth_tokens SET expires_at = $2 WHERE accessor = $1 AND expires_at > $3",
        )
        .bind(accessor)
        .bind(expires_at)
        .bind(unix_micros_now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Deletes a token and every token it created, transitively. Returns their accessors.
    pub async fn revoke_tree(&self, accessor: &str) -> Result<Vec<String>, StorageError> {
        let mut transaction = self.pool.begin().await?;
        let mut revoked = vec![accessor.to_owned()];
        let mut frontier = vec![accessor.to_owned()];
        while let Some(parent) = frontier.pop() {
            let children =
                sqlx::query("SELECT accessor FROM auth_tokens WHERE parent_accessor = $1")
                    .bind(&parent)
                    .fetch_all(&mut *transaction)
                    .await?;
            for child in children {
                let child: String = child.try_get(0)?;
                revoked.push(child.clone());
                frontier.push(child);
            }
        }
        let mut existing = Vec::new();
        for accessor in revoked {
            let removed =
                sqlx::query("DELETE FROM auth_tokens WHERE accessor = $1 AND is_root = 0")
                    .bind(&accessor)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
            if removed > 0 {
                existing.push(accessor);
            }
        }
        transaction.commit().await?;
        Ok(existing)
    }

    /// Deletes tokens that expired before `now`; returns their accessors.
    pub async fn delete_expired(&self, now: i64) -> Result<Vec<String>, StorageError> {
        let rows = sqlx::query(
            "SELECT accessor FROM auth_tokens WHERE expires_at IS NOT NULL AND expires_at <= $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let accessors: Vec<String> = rows
            .into_iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        for accessor in &accessors {
            sqlx::query("DELETE FROM auth_tokens WHERE accessor = $1 AND expires_at <= $2")
                .bind(accessor)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(accessors)
    }

    /// Seconds as stored microseconds, for callers computing expiries.
    pub fn micros(seconds: u64) -> Result<i64, StorageError> {
        to_i64(seconds.saturating_mul(1_000_000))
    }
}

fn stored_token(row: sqlx::any::AnyRow) -> Result<StoredToken, StorageError> {
    Ok(StoredToken {
        token_hash: row.try_get(0)?,
        accessor: row.try_get(1)?,
        display_name: row.try_get(2)?,
        is_root: row.try_get::<i64, _>(3)? == 1,
        created_at: row.try_get(4)?,
        policies: row.try_get(5)?,
        auth_method: row.try_get(6)?,
        principal: row.try_get(7)?,
        metadata: row.try_get(8)?,
        ttl_seconds: row.try_get(9)?,
        expires_at: row.try_get(10)?,
        max_expires_at: row.try_get(11)?,
        uses_remaining: row.try_get(12)?,
        parent_accessor: row.try_get(13)?,
    })
}
