//! Stored authentication tokens, kept only as SHA-256 hashes of the token text.

use sqlx::{AnyPool, Row};

use crate::error::StorageError;

/// A stored token, without any way back to the token text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub token_hash: Vec<u8>,
    /// A non-secret handle that names the token in logs and audit records.
    pub accessor: String,
    pub display_name: String,
    pub is_root: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct TokenRepository {
    pool: AnyPool,
}

impl TokenRepository {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    pub async fn insert(&self, token: &StoredToken) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO auth_tokens (token_hash, accessor, display_name, is_root, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&token.token_hash)
        .bind(&token.accessor)
        .bind(&token.display_name)
        .bind(i64::from(token.is_root))
        .bind(token.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every root token. There is normally one; a handful at most.
    pub async fn root_tokens(&self) -> Result<Vec<StoredToken>, StorageError> {
        let rows = sqlx::query(
            "SELECT token_hash, accessor, display_name, is_root, created_at FROM auth_tokens \
             WHERE is_root = 1 ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;

        rows.into_iter()
            .map(|row| {
                Ok(StoredToken {
                    token_hash: row.try_get(0)?,
                    accessor: row.try_get(1)?,
                    display_name: row.try_get(2)?,
                    is_root: row.try_get::<i64, _>(3)? == 1,
                    created_at: row.try_get(4)?,
                })
            })
            .collect()
    }
}
