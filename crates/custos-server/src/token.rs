//! Tokens: generation, hashing, and constant-time verification.
//!
//! A token is `cst_` followed by 256 random bits in URL-safe base64. Only its SHA-256 hash
//! is stored; a slow password hash is unnecessary because the token carries full entropy.
//! Verification compares the presented token's hash with every stored candidate in
//! constant time, so timing reveals neither which byte differed nor which token matched.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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
    /// Non-secret handle of the token, safe for logs and audit records.
    pub accessor: String,
    pub display_name: String,
    pub is_root: bool,
}

/// Creates a root token, stores its hash, and returns the token text (shown once).
pub async fn create_root_token(repository: &TokenRepository) -> Result<TokenSecret, TokenError> {
    let token = TokenSecret::generate()?;
    let accessor = random_accessor()?;
    repository
        .insert(&StoredToken {
            token_hash: token.hash(),
            accessor,
            display_name: "root".to_owned(),
            is_root: true,
            created_at: custos_storage::unix_micros_now(),
        })
        .await?;
    Ok(token)
}

fn random_accessor() -> Result<String, TokenError> {
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

/// Checks presented tokens against the stored root tokens.
#[derive(Debug, Clone)]
pub struct Authenticator {
    root_tokens: Vec<StoredToken>,
}

impl Authenticator {
    /// Loads the stored root tokens once; they change only through `custos init`.
    pub async fn load(repository: &TokenRepository) -> Result<Self, TokenError> {
        Ok(Self {
            root_tokens: repository.root_tokens().await?,
        })
    }

    pub fn has_root_token(&self) -> bool {
        !self.root_tokens.is_empty()
    }

    /// The principal of `token`, or `None` when it matches no stored token.
    pub fn verify(&self, token: &TokenSecret) -> Option<Principal> {
        let presented = token.hash();
        let mut found = None;
        // Compare against every candidate, even after a match, so that the time taken
        // does not depend on which token (if any) matched.
        for stored in &self.root_tokens {
            let matches: bool = stored.token_hash.ct_eq(&presented).into();
            if matches {
                found = Some(Principal {
                    accessor: stored.accessor.clone(),
                    display_name: stored.display_name.clone(),
                    is_root: stored.is_root,
                });
            }
        }
        found
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

    #[test]
    fn verification_matches_only_the_stored_token() {
        let token = TokenSecret::generate().unwrap();
        let authenticator = Authenticator {
            root_tokens: vec![StoredToken {
                token_hash: token.hash(),
                accessor: "acc_1".to_owned(),
                display_name: "root".to_owned(),
                is_root: true,
                created_at: 0,
            }],
        };

        let principal = authenticator.verify(&TokenSecret::new(token.expose().to_owned()));
        assert_eq!(
            principal.map(|principal| principal.accessor),
            Some("acc_1".to_owned())
        );
        let mut altered = token.expose().to_owned();
        altered.push('x');
        assert_eq!(authenticator.verify(&TokenSecret::new(altered)), None);
    }
}
