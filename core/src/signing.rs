//! Bundle signing: the appliance's Ed25519 key, its fingerprint, and the
//! signature a loader checks before it runs a bundle.
//!
//! A network-booted loader knows nothing but what iPXE put on its kernel
//! command line: the appliance address and `rackcast.key=<fingerprint>`
//! (BLAKE3 of the appliance's public key). The appliance shows its public
//! key in `Welcome` and signs every bundle hash it serves; the loader
//! accepts the key only if it has that fingerprint, and a bundle only with
//! a valid signature. So a machine that booted from this appliance runs
//! only bundles this appliance built, even if another host answers on the
//! control address.
//!
//! Owns: key generation and storage (`<state_dir>/signing.key`, 32-byte
//! seed, mode 0600), signing, verification. Must not: do network I/O or
//! decide what to sign.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use thiserror::Error;

/// Domain separation: a bundle signature can never be mistaken for a
/// signature over anything else this key might sign later.
/// v2: the message binds the device and its boot, so a bundle signed for
/// one machine (or an earlier boot) is refused by another.
const BUNDLE_CONTEXT: &[u8] = b"rackcast bundle v2\0";

/// Ed25519 public key bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Ed25519 signature bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key could not be loaded or a bundle not trusted.
#[derive(Debug, Error)]
pub enum SigningError {
    /// The key file could not be read or made.
    #[error("signing key {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file is not a 32-byte seed.
    #[error("signing key {path}: expected a 32-byte seed, found {len} bytes")]
    BadKeyFile {
        /// The key file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// The appliance showed no key, but the device trusts one.
    #[error("the appliance sent no signing key, but this device trusts key {expected}")]
    NoKey {
        /// The trusted fingerprint.
        expected: String,
    },
    /// The appliance showed another key than the trusted one.
    #[error("the appliance's key {got} is not the trusted key {expected}")]
    WrongKey {
        /// The fingerprint of the key shown.
        got: String,
        /// The trusted fingerprint.
        expected: String,
    },
    /// The key shown is not an Ed25519 public key.
    #[error("malformed public key: {0}")]
    BadPublicKey(String),
    /// The bundle's signature does not verify.
    #[error("bundle {hash}: bad or missing signature")]
    BadSignature {
        /// The bundle's address.
        hash: String,
    },
    /// A fingerprint is not 64 hex digits.
    #[error("fingerprint must be 64 hex digits (BLAKE3 of the public key), got {0:?}")]
    BadFingerprint(String),
}

/// BLAKE3 of a public key, as 64 hex digits.
pub fn fingerprint(public_key: &[u8]) -> String {
    blake3::hash(public_key).to_hex().to_string()
}

/// A fingerprint as given by a user or on a kernel command line.
pub fn parse_fingerprint(s: &str) -> Result<String, SigningError> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(SigningError::BadFingerprint(s))
    }
}

/// The appliance's signing key.
pub struct BundleSigner {
    key: SigningKey,
}

impl BundleSigner {
    /// Load the key at `path`, or make one there (readable by root only)
    /// on first start.
    pub fn load_or_create(path: &Path) -> Result<BundleSigner, SigningError> {
        let io = |source| SigningError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let seed: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| SigningError::BadKeyFile {
                            path: path.display().to_string(),
                            len: bytes.len(),
                        })?;
                Ok(BundleSigner::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let seed: [u8; 32] = rand::random();
                // create_new: two appliances starting on one state dir
                // must not overwrite each other's key.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                f.write_all(&seed).and_then(|_| f.sync_all()).map_err(io)?;
                Ok(BundleSigner::from_seed(seed))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The signer of a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> BundleSigner {
        BundleSigner {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The public key, shown in `Welcome`.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.key.verifying_key().to_bytes()
    }

    /// BLAKE3 of the public key, hex: what devices are told to trust.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key())
    }

    /// The key's seed: the control listeners' TLS key is this key, so the
    /// fingerprint a loader trusts is proven in every handshake.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Signature over a bundle's content hash (64 hex digits), for this
    /// device and boot.
    pub fn sign_bundle(&self, hash: &str, device: &str, boot: u64) -> [u8; SIGNATURE_LEN] {
        self.key
            .sign(&bundle_message(hash, device, boot))
            .to_bytes()
    }
}

/// Context, then each field length-prefixed (no two field lists give the
/// same bytes).
fn bundle_message(hash: &str, device: &str, boot: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(BUNDLE_CONTEXT.len() + hash.len() + device.len() + 24);
    m.extend_from_slice(BUNDLE_CONTEXT);
    for f in [hash.as_bytes(), device.as_bytes()] {
        m.extend_from_slice(&(f.len() as u64).to_be_bytes());
        m.extend_from_slice(f);
    }
    m.extend_from_slice(&boot.to_be_bytes());
    m
}

/// What a device knows of the appliance: the fingerprint it was told to
/// trust, and the public key the appliance showed that matches it.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    key: VerifyingKey,
}

impl TrustedKey {
    /// Accept `public_key` only if its fingerprint is `expected`.
    pub fn check(public_key: &[u8], expected: &str) -> Result<TrustedKey, SigningError> {
        if public_key.is_empty() {
            return Err(SigningError::NoKey {
                expected: expected.to_string(),
            });
        }
        let got = fingerprint(public_key);
        if got != expected {
            return Err(SigningError::WrongKey {
                got,
                expected: expected.to_string(),
            });
        }
        let bytes: [u8; PUBLIC_KEY_LEN] = public_key
            .try_into()
            .map_err(|_| SigningError::BadPublicKey(format!("{} bytes", public_key.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| SigningError::BadPublicKey(e.to_string()))?;
        Ok(TrustedKey { key })
    }

    /// BLAKE3 of the trusted key, hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.key.as_bytes())
    }

    /// The trusted public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.key.to_bytes()
    }

    /// Check `signature` over bundle address `hash` for this device and
    /// boot.
    pub fn verify_bundle(
        &self,
        hash: &str,
        device: &str,
        boot: u64,
        signature: &[u8],
    ) -> Result<(), SigningError> {
        let bad = || SigningError::BadSignature {
            hash: hash.to_string(),
        };
        let sig: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| bad())?;
        self.key
            .verify(
                &bundle_message(hash, device, boot),
                &Signature::from_bytes(&sig),
            )
            .map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "1da86c08c8fc5d3226f88411ba1ceaf329f37df70c1ae37b005a16105a1fd44c";
    const H2: &str = "2da86c08c8fc5d3226f88411ba1ceaf329f37df70c1ae37b005a16105a1fd44c";

    #[test]
    fn a_signed_bundle_verifies_under_the_fingerprinted_key_only() {
        let s = BundleSigner::from_seed([7; 32]);
        let t = TrustedKey::check(&s.public_key(), &s.fingerprint()).unwrap();
        assert_eq!(t.fingerprint(), s.fingerprint());
        let sig = s.sign_bundle(H1, "rc-1", 2);
        t.verify_bundle(H1, "rc-1", 2, &sig).unwrap();
        // Another bundle, device or boot, a flipped bit, a short or
        // missing signature.
        assert!(t.verify_bundle(H2, "rc-1", 2, &sig).is_err());
        assert!(t.verify_bundle(H1, "rc-2", 2, &sig).is_err());
        assert!(t.verify_bundle(H1, "rc-1", 3, &sig).is_err());
        let mut flipped = sig;
        flipped[10] ^= 1;
        assert!(t.verify_bundle(H1, "rc-1", 2, &flipped).is_err());
        assert!(t.verify_bundle(H1, "rc-1", 2, &sig[..63]).is_err());
        assert!(t.verify_bundle(H1, "rc-1", 2, &[]).is_err());
        // Another appliance's key does not pass the fingerprint check, and
        // its signatures do not pass ours.
        let rogue = BundleSigner::from_seed([8; 32]);
        assert!(matches!(
            TrustedKey::check(&rogue.public_key(), &s.fingerprint()),
            Err(SigningError::WrongKey { .. })
        ));
        assert!(t
            .verify_bundle(H1, "rc-1", 2, &rogue.sign_bundle(H1, "rc-1", 2))
            .is_err());
        assert!(matches!(
            TrustedKey::check(&[], &s.fingerprint()),
            Err(SigningError::NoKey { .. })
        ));
    }

    #[test]
    fn the_key_file_is_made_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/signing.key");
        let a = BundleSigner::load_or_create(&p).unwrap();
        let b = BundleSigner::load_or_create(&p).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(
            BundleSigner::load_or_create(&p),
            Err(SigningError::BadKeyFile { len: 5, .. })
        ));
    }

    #[test]
    fn fingerprints_are_checked_for_shape() {
        let f = BundleSigner::from_seed([1; 32]).fingerprint();
        assert_eq!(parse_fingerprint(&f.to_uppercase()).unwrap(), f);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"g".repeat(64)).is_err());
    }
}
