//! Envelope encryption of one secret version.
//!
//! Every version gets a fresh random 256-bit data key. The fields are encrypted under it
//! with AES-256-GCM, and the data key is encrypted ("wrapped") under the active
//! key-encryption key. Both use random 96-bit nonces stored in front of their ciphertext:
//! a data key encrypts exactly once, and a KEK wraps one data key per version written, far
//! below the 2^32 messages per key that random GCM nonces allow.
//!
//! The associated data binds mount, path and version (and, for the wrap, the KEK id), so a
//! sealed value copied into another row, or a row whose key id was edited, fails to open.

use std::collections::BTreeMap;

use custos_core::{SecretData, SecretValue};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::keyring::KeyEncryptionKey;

const DATA_KEY_BYTES: usize = 32;
const FORMAT_VERSION: u8 = 1;

/// Where a sealed version belongs; bound into the associated data.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub mount: &'a str,
    pub path: &'a str,
    pub version: u64,
}

/// A sealed version: the wrapped data key and the encrypted fields.
pub struct Sealed {
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "Sealed {{ wrapped_key: {} bytes, ciphertext: {} bytes }}",
            self.wrapped_key.len(),
            self.ciphertext.len()
        )
    }
}

/// Why a version could not be sealed or opened. Deliberately coarse: a failed open says
/// only that authentication failed, never which byte or why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the system random number generator failed")]
    Random,
    #[error("the sealed data does not authenticate under this key and location")]
    Authentication,
    #[error("the decrypted data is not in the expected format")]
    Format,
}

/// Encrypts `data` for `binding` under `key`.
pub fn seal(
    data: &SecretData,
    binding: Binding<'_>,
    key: &KeyEncryptionKey,
) -> Result<Sealed, EnvelopeError> {
    let random = SystemRandom::new();
    let mut data_key = Zeroizing::new([0_u8; DATA_KEY_BYTES]);
    random
        .fill(data_key.as_mut())
        .map_err(|_| EnvelopeError::Random)?;

    let data_cipher = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, data_key.as_ref()).map_err(|_| EnvelopeError::Random)?,
    );
    let plaintext = encode_fields(data);
    let ciphertext = encrypt(&random, &data_cipher, &data_aad(binding), &plaintext)?;
    let wrapped_key = encrypt(
        &random,
        key.cipher(),
        &wrap_aad(binding, key.id()),
        data_key.as_ref(),
    )?;

    Ok(Sealed {
        wrapped_key,
        ciphertext,
    })
}

/// Decrypts a sealed version for `binding` with `key`.
pub fn open(
    sealed: &Sealed,
    binding: Binding<'_>,
    key: &KeyEncryptionKey,
) -> Result<SecretData, EnvelopeError> {
    let data_key = unwrap_data_key(&sealed.wrapped_key, binding, key)?;
    let data_cipher = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, data_key.as_ref()).map_err(|_| EnvelopeError::Format)?,
    );
    let plaintext = decrypt(&data_cipher, &data_aad(binding), &sealed.ciphertext)?;
    decode_fields(&plaintext)
}

/// Re-wraps a data key from `old_key` to `new_key` without touching the ciphertext.
pub fn rewrap(
    wrapped_key: &[u8],
    binding: Binding<'_>,
    old_key: &KeyEncryptionKey,
    new_key: &KeyEncryptionKey,
) -> Result<Vec<u8>, EnvelopeError> {
    let data_key = unwrap_data_key(wrapped_key, binding, old_key)?;
    encrypt(
        &SystemRandom::new(),
        new_key.cipher(),
        &wrap_aad(binding, new_key.id()),
        data_key.as_ref(),
    )
}

fn unwrap_data_key(
    wrapped_key: &[u8],
    binding: Binding<'_>,
    key: &KeyEncryptionKey,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let data_key = decrypt(key.cipher(), &wrap_aad(binding, key.id()), wrapped_key)?;
    if data_key.len() != DATA_KEY_BYTES {
        return Err(EnvelopeError::Format);
    }
    Ok(data_key)
}

fn data_aad(binding: Binding<'_>) -> Vec<u8> {
    let mut aad = b"custos.local.data.v1\0".to_vec();
    append_binding(&mut aad, binding);
    aad
}

fn wrap_aad(binding: Binding<'_>, key_id: &str) -> Vec<u8> {
    let mut aad = b"custos.local.wrap.v1\0".to_vec();
    append_binding(&mut aad, binding);
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

fn append_binding(aad: &mut Vec<u8>, binding: Binding<'_>) {
    // Length prefixes keep ("a/b", "c") and ("a", "b/c") apart.
    for part in [binding.mount.as_bytes(), binding.path.as_bytes()] {
        aad.extend_from_slice(&length_prefix(part));
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&binding.version.to_be_bytes());
}

/// Four-byte big-endian length. Parts are bounded far below 4 GiB by the request limit;
/// a larger one would be a bug, so saturating keeps the encoding unambiguous enough to fail
/// authentication rather than panic.
fn length_prefix(part: &[u8]) -> [u8; 4] {
    u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes()
}

fn encrypt(
    random: &SystemRandom,
    cipher: &LessSafeKey,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut nonce_bytes = [0_u8; NONCE_LEN];
    random
        .fill(&mut nonce_bytes)
        .map_err(|_| EnvelopeError::Random)?;

    let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
    sealed.extend_from_slice(&nonce_bytes);
    sealed.extend_from_slice(plaintext);
    let tag = cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut sealed[NONCE_LEN..],
        )
        .map_err(|_| EnvelopeError::Random)?;
    sealed.extend_from_slice(tag.as_ref());
    Ok(sealed)
}

fn decrypt(
    cipher: &LessSafeKey,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    if sealed.len() < NONCE_LEN {
        return Err(EnvelopeError::Authentication);
    }
    let (nonce_bytes, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce_bytes).map_err(|_| EnvelopeError::Authentication)?;

    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let plaintext_length = cipher
        .open_in_place(nonce, Aad::from(aad), buffer.as_mut_slice())
        .map_err(|_| EnvelopeError::Authentication)?
        .len();
    buffer.truncate(plaintext_length);
    Ok(buffer)
}

/// Fields as bytes: a format byte, then for each field a length-prefixed name and value.
fn encode_fields(data: &SecretData) -> Zeroizing<Vec<u8>> {
    let mut encoded = Zeroizing::new(vec![FORMAT_VERSION]);
    for (name, value) in data.fields() {
        for part in [name.as_bytes(), value.expose()] {
            encoded.extend_from_slice(&length_prefix(part));
            encoded.extend_from_slice(part);
        }
    }
    encoded
}

fn decode_fields(mut bytes: &[u8]) -> Result<SecretData, EnvelopeError> {
    let Some((&FORMAT_VERSION, rest)) = bytes.split_first() else {
        return Err(EnvelopeError::Format);
    };
    bytes = rest;

    let mut fields = BTreeMap::new();
    while !bytes.is_empty() {
        let name = take_part(&mut bytes)?;
        let value = take_part(&mut bytes)?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| EnvelopeError::Format)?;
        fields.insert(name, SecretValue::new(value.to_vec()));
    }
    SecretData::new(fields).map_err(|_| EnvelopeError::Format)
}

fn take_part<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], EnvelopeError> {
    if bytes.len() < 4 {
        return Err(EnvelopeError::Format);
    }
    let (length, rest) = bytes.split_at(4);
    let length = u32::from_be_bytes(length.try_into().map_err(|_| EnvelopeError::Format)?);
    let length = usize::try_from(length).map_err(|_| EnvelopeError::Format)?;
    if rest.len() < length {
        return Err(EnvelopeError::Format);
    }
    let (part, rest) = rest.split_at(length);
    *bytes = rest;
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> SecretData {
        let mut fields = BTreeMap::new();
        fields.insert("password".to_owned(), SecretValue::from("correct horse"));
        fields.insert("blob".to_owned(), SecretValue::new(vec![0, 159, 146, 150]));
        SecretData::new(fields).unwrap()
    }

    fn binding(path: &str, version: u64) -> Binding<'_> {
        Binding {
            mount: "secret",
            path,
            version,
        }
    }

    #[test]
    fn sealed_data_opens_only_at_its_own_location() {
        let key = KeyEncryptionKey::generate().unwrap();
        let sealed = seal(&data(), binding("app/db", 1), &key).unwrap();

        assert_eq!(open(&sealed, binding("app/db", 1), &key).unwrap(), data());
        for wrong in [binding("app/db", 2), binding("app/other", 1)] {
            assert_eq!(
                open(&sealed, wrong, &key),
                Err(EnvelopeError::Authentication)
            );
        }
        let other_mount = Binding {
            mount: "secret2",
            ..binding("app/db", 1)
        };
        assert_eq!(
            open(&sealed, other_mount, &key),
            Err(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn plaintext_never_appears_in_the_sealed_bytes_and_nonces_differ() {
        let key = KeyEncryptionKey::generate().unwrap();
        let first = seal(&data(), binding("a", 1), &key).unwrap();
        let second = seal(&data(), binding("a", 1), &key).unwrap();

        let needle = b"correct horse";
        assert!(!first
            .ciphertext
            .windows(needle.len())
            .any(|window| window == needle));
        assert_ne!(
            first.ciphertext[..NONCE_LEN],
            second.ciphertext[..NONCE_LEN]
        );
        assert_ne!(
            first.wrapped_key[..NONCE_LEN],
            second.wrapped_key[..NONCE_LEN]
        );
    }

    #[test]
    fn rewrapped_keys_open_under_the_new_key_only() {
        let old_key = KeyEncryptionKey::generate().unwrap();
        let new_key = KeyEncryptionKey::generate().unwrap();
        let sealed = seal(&data(), binding("a", 3), &old_key).unwrap();

        let rewrapped = Sealed {
            wrapped_key: rewrap(&sealed.wrapped_key, binding("a", 3), &old_key, &new_key).unwrap(),
            ciphertext: sealed.ciphertext,
        };
        assert_eq!(open(&rewrapped, binding("a", 3), &new_key).unwrap(), data());
        assert_eq!(
            open(&rewrapped, binding("a", 3), &old_key),
            Err(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn truncated_or_flipped_ciphertext_fails_cleanly() {
        let key = KeyEncryptionKey::generate().unwrap();
        let mut sealed = seal(&data(), binding("a", 1), &key).unwrap();
        let last = sealed.ciphertext.len() - 1;
        sealed.ciphertext[last] ^= 1;
        assert_eq!(
            open(&sealed, binding("a", 1), &key),
            Err(EnvelopeError::Authentication)
        );

        sealed.wrapped_key.truncate(5);
        assert_eq!(
            open(&sealed, binding("a", 1), &key),
            Err(EnvelopeError::Authentication)
        );
    }
}
