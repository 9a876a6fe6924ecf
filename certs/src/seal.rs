//! Private keys at rest: sealed (ChaCha20-Poly1305) with the platform's secret key, so a copy of the database
//! alone reveals no key. The secret key lives outside PostgreSQL: a 32-byte file every role that needs keys
//! (the API that accepts uploads, the edge that serves them, the certificate role) is given.

use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key file is missing, unreadable or not 64 hex digits.
    #[error("secret key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The sealed bytes were not sealed with this key, or were altered.
    #[error("a sealed secret does not open with this secret key (another platform's key, or altered data)")]
    Open,
    /// The system's random source failed.
    #[error("no randomness available")]
    Random,
}

/// The platform's secret key.
pub struct SecretKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self { key: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32 bytes is the key length")) }
    }

    /// Reads a key file: 64 hex digits (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let err = |reason: String| SealError::KeyFile { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let bytes = hex::decode(text.trim()).map_err(|_| err("not hex".into()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| err("not 32 bytes (64 hex digits)".into()))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Reads the key file, creating it (mode 0600) with a fresh key when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        if !path.exists() {
            let mut bytes = [0u8; 32];
            SystemRandom::new().fill(&mut bytes).map_err(|_| SealError::Random)?;
            let err =
                |e: std::io::Error| SealError::KeyFile { path: path.display().to_string(), reason: e.to_string() };
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
            file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes()).map_err(err)?;
        }
        Self::from_file(path)
    }

    /// Seals `plain`: a fresh nonce, then the ciphertext with its tag.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what [`seal`](Self::seal) produced.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut data = data.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::empty(), &mut data).map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_unaltered() {
        let key = SecretKey::from_bytes(&[7; 32]);
        let sealed = key.seal(b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"), "no plaintext in the sealed bytes");
        assert_eq!(key.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert_ne!(key.seal(b"x").unwrap(), key.seal(b"x").unwrap(), "a fresh nonce each time");
        assert!(matches!(SecretKey::from_bytes(&[8; 32]).open(&sealed), Err(SealError::Open)));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(matches!(key.open(&altered), Err(SealError::Open)));
        assert!(matches!(key.open(&[1, 2, 3]), Err(SealError::Open)));
    }

    #[test]
    fn key_files_are_created_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = SecretKey::load_or_create(&path).unwrap();
        let sealed = a.seal(b"k").unwrap();
        let b = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(b.open(&sealed).unwrap(), b"k", "the second load reads the same key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "abc").unwrap();
        let e = SecretKey::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("secret.key") && e.contains("not"), "{e}");
    }
}
