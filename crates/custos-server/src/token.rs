//! Tokens: generation, hashing, and constant-time verification.
//!
//! A token is `cst_` followed by 256 random bits in URL-safe base64. Only its SHA-256 hash
//! is stored; a slow password hash is unnecessary because the token carries full entropy.
//! Verification compares the presented token's hash with every stored candidate in
//! constant time, so timing reveals neither which byte differed nor which token matched.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::BTreeMap;
use std::time::Duration;

use custos_storage::tokens::{StoredToken, TokenRepository};
use custos_storage::StorageError;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const TOKEN_PREFIX: &str = "cst_";

/// A token's text, held only as long as needed and wiped afterwards.
pub struct TokenSecret(Zeroizing<String>);

impl TokenSecret {
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// Generates a fresh random token.
    pub fn generate() -> Result<Self, TokenError> {
        let mut bytes = Zeroizing::new([0_u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| TokenError::Random)?;
        Ok(Self::new(format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes.as_ref())
        )))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 hash under which the token is stored.
    pub fn hash(&self) -> Vec<u8> {
        digest::digest(&digest::SHA256, self.0.as_bytes())
            .as_ref()
            .to_vec()
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("TokenSecret([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the system random number generator failed")]
    Random,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Who made a request, as far as authentication can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Non-secret handle of the token, used to manage it.
    pub accessor: String,
    pub display_name: String,
    pub is_root: bool,
    /// `root`, `token`, `kubernetes` or `approle`.
    pub auth_method: String,
    /// The identity the token stands for: `root`, `token:NAME`,
    /// `kubernetes:NAMESPACE/SERVICE_ACCOUNT` or `approle:ROLE`.
    pub name: String,
    pub policies: Vec<String>,
    /// Unix microseconds; `None` for tokens that never expire.
    pub expires_at: Option<i64>,
    pub max_expires_at: Option<i64>,
    pub ttl_seconds: Option<i64>,
    pub uses_remaining: Option<i64>,
    pub metadata: BTreeMap<String, String>,
}

/// The principal a stored token stands for.
pub fn principal_of(stored: &StoredToken) -> Principal {
    Principal::from_stored(stored)
}

impl Principal {
    fn from_stored(stored: &StoredToken) -> Self {
        Self {
            accessor: stored.accessor.clone(),
            display_name: stored.display_name.clone(),
            is_root: stored.is_root,
            auth_method: stored.auth_method.clone(),
            name: stored.principal.clone(),
            policies: serde_json::from_str(&stored.policies).unwrap_or_default(),
            expires_at: stored.expires_at,
            max_expires_at: stored.max_expires_at,
            ttl_seconds: stored.ttl_seconds,
            uses_remaining: stored.uses_remaining,
            metadata: serde_json::from_str(&stored.metadata).unwrap_or_default(),
        }
    }
}

/// What a new token carries.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub display_name: String,
    pub auth_method: String,
    pub principal: String,
    pub policies: Vec<String>,
    pub ttl: Duration,
    pub max_ttl: Duration,
    pub uses: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    pub parent_accessor: Option<String>,
}

/// A freshly created token: its text (shown once) and its stored form.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: TokenSecret,
    pub principal: Principal,
}

/// Creates a root token, stores its hash, and returns the token text (shown once).
pub async fn create_root_token(repository: &TokenRepository) -> Result<TokenSecret, TokenError> {
    let token = TokenSecret::generate()?;
    repository
        .insert(&StoredToken {
            token_hash: token.hash(),
            accessor: random_accessor()?,
            display_name: "root".to_owned(),
            is_root: true,
            created_at: custos_storage::unix_micros_now(),
            policies: "[\"root\"]".to_owned(),
            auth_method: "root".to_owned(),
            principal: "root".to_owned(),
            metadata: "{}".to_owned(),
            ttl_seconds: None,
            expires_at: None,
            max_expires_at: None,
            uses_remaining: None,
            parent_accessor: None,
        })
        .await?;
    Ok(token)
}

/// Creates a token that expires, stores its hash, and returns it.
pub async fn issue_token(
    repository: &TokenRepository,
    request: TokenRequest,
) -> Result<IssuedToken, TokenError> {
    let token = TokenSecret::generate()?;
    let now = custos_storage::unix_micros_now();
    let ttl = micros(request.ttl);
    let max_ttl = micros(request.max_ttl.max(request.ttl));
    let stored = StoredToken {
        token_hash: token.hash(),
        accessor: random_accessor()?,
        display_name: request.display_name,
        is_root: false,
        created_at: now,
        policies: serde_json::to_string(&request.policies).unwrap_or_else(|_| "[]".to_owned()),
        auth_method: request.auth_method,
        principal: request.principal,
        metadata: serde_json::to_string(&request.metadata).unwrap_or_else(|_| "{}".to_owned()),
        ttl_seconds: Some(i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX)),
        expires_at: Some(now.saturating_add(ttl)),
        max_expires_at: Some(now.saturating_add(max_ttl)),
        uses_remaining: request
            .uses
            .map(|uses| i64::try_from(uses).unwrap_or(i64::MAX)),
        parent_accessor: request.parent_accessor,
    };
    repository.insert(&stored).await?;
    Ok(IssuedToken {
        token,
        principal: Principal::from_stored(&stored),
    })
}

/// Microseconds in `duration`, the unit of every stored time.
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A random non-secret handle: `acc_` and 24 hex digits.
pub fn random_accessor() -> Result<String, TokenError> {
    let mut bytes = [0_u8; 12];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    Ok(format!(
        "acc_{}",
        bytes
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    ))
}

/// Checks presented tokens against the stored ones.
#[derive(Debug, Clone)]
pub struct Authenticator {
    repository: TokenRepository,
}

impl Authenticator {
    pub fn new(repository: TokenRepository) -> Self {
        Self { repository }
    }

    pub async fn has_root_token(&self) -> Result<bool, TokenError> {
        Ok(!self.repository.root_tokens().await?.is_empty())
    }

    /// The principal of `token`, or `None` when it is unknown, expired or used up.
    ///
    /// The token is found by the SHA-256 of its text. The index lookup's timing can only
    /// reveal something about a hash of 256 random bits, which helps no guesser; the
    /// found hash is still compared with the presented one in constant time.
    pub async fn verify(&self, token: &TokenSecret) -> Result<Option<Principal>, TokenError> {
        let presented = token.hash();
        let Some(stored) = self.repository.find_by_hash(&presented).await? else {
            return Ok(None);
        };
        let matches: bool = stored.token_hash.ct_eq(&presented).into();
        if !matches {
            return Ok(None);
        }

        let now = custos_storage::unix_micros_now();
        if stored
            .expires_at
            .is_some_and(|expires_at| expires_at <= now)
        {
            return Ok(None);
        }
        if stored.uses_remaining.is_some() && !self.repository.spend_use(&stored.accessor).await? {
            return Ok(None);
        }
        let mut principal = Principal::from_stored(&stored);
        principal.uses_remaining = stored.uses_remaining.map(|uses| uses - 1);
        Ok(Some(principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_prefixed_random_and_redacted_in_debug() {
        let first = TokenSecret::generate().unwrap();
        let second = TokenSecret::generate().unwrap();
        assert!(first.expose().starts_with("cst_"));
        assert_eq!(first.expose().len(), 4 + 43);
        assert_ne!(first.expose(), second.expose());
        assert_ne!(first.hash(), second.hash());
        assert!(!format!("{first:?}").contains(&first.expose()[4..]));
    }
}
