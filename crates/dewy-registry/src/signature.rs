//! Publisher signatures: minisign public keys and the `.minisig` file
//! published beside an artifact.
//!
//! Only pre-hashed signatures (minisign's default since 0.9, algorithm
//! `ED`) are accepted: they are verified while the artifact streams in, in
//! the same pass that computes its SHA-256. Legacy signatures (`Ed`, the
//! whole file signed) are refused with a hint to sign again.

use std::path::Path;

use base64::Engine as _;
use minisign_verify::{PublicKey, Signature, StreamVerifier};

/// The suffix of a signature file: `app_linux_amd64.tar.gz.minisig`.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// The largest signature file read (a minisign signature is about 300
/// bytes; the trusted comment makes it longer).
pub(crate) const SIGNATURE_MAX_BYTES: u64 = 64 << 10;

/// A key given to `--verify-key` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid minisign public key `{key}`: {reason}")]
pub struct KeyError {
    /// The key as given (a base64 string or `@PATH`).
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// The minisign public keys whose signatures are trusted. With two keys,
/// a signature by either is accepted (key rotation).
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, PublicKey)>,
}

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|(id, _)| id)).finish()
    }
}

/// A minisign key id, shown as minisign shows it (16 upper-case hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Decodes the base64 of a key (42 bytes) or of a signature's first line
/// (74 bytes) and returns its key id (bytes 2..10).
fn key_id_of(b64: &str) -> Option<KeyId> {
    let bin = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let mut id = [0u8; 8];
    id.copy_from_slice(bin.get(2..10)?);
    Some(KeyId(id))
}

impl TrustedKeys {
    /// Parses `--verify-key` values: each a minisign public key as its
    /// base64 string (`RWQ…`), or `@PATH` to a `minisign.pub` file (its
    /// untrusted comment line, then the key) or a file holding only the
    /// base64 string.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for spec in specs {
            let spec = spec.as_ref();
            let error = |reason: String| KeyError {
                key: spec.to_owned(),
                reason,
            };
            let b64 = match spec.strip_prefix('@') {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(path).map_err(|e| error(format!("cannot read `{path}`: {e}")))?;
                    text.lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
                        .map(str::to_owned)
                        .ok_or_else(|| error(format!("`{path}` holds no key")))?
                }
                None => spec.trim().to_owned(),
            };
            let key = PublicKey::from_base64(&b64).map_err(|e| {
                error(format!(
                    "{e} (expected the base64 line of a minisign public key, like `RWQ…`, or @PATH to its .pub file)"
                ))
            })?;
            let id = key_id_of(&b64).ok_or_else(|| error("not a minisign public key".into()))?;
            if !keys.iter().any(|(k, _)| *k == id) {
                keys.push((id, key));
            }
        }
        Ok(Self { keys })
    }

    /// Whether no key is trusted (signatures are not checked then).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted key ids.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// Reads the signature `text` fetched from `source` and picks the
    /// trusted key it names, before the artifact is downloaded: a malformed
    /// or legacy signature, or one by an unknown key, fails here.
    pub fn check(&self, text: &str, source: &str) -> Result<SignatureCheck, SignatureError> {
        let malformed = |reason: &str| SignatureError::Malformed {
            file: source.to_owned(),
            reason: reason.to_owned(),
        };
        let signature = Signature::decode(text).map_err(|e| malformed(&e.to_string()))?;
        let id = text
            .lines()
            .nth(1)
            .and_then(key_id_of)
            .ok_or_else(|| malformed("no key id"))?;
        let algorithm = text
            .lines()
            .nth(1)
            .and_then(|l| base64::engine::general_purpose::STANDARD.decode(l.trim()).ok())
            .and_then(|b| b.get(..2).map(<[u8]>::to_vec));
        if algorithm.as_deref() == Some(b"Ed") {
            return Err(SignatureError::Legacy {
                file: source.to_owned(),
            });
        }
        let Some((_, key)) = self.keys.iter().find(|(k, _)| *k == id) else {
            return Err(SignatureError::UnknownKey {
                file: source.to_owned(),
                key_id: id,
                trusted: self.ids(),
            });
        };
        Ok(SignatureCheck {
            key: key.clone(),
            key_id: id,
            signature,
            source: source.to_owned(),
        })
    }
}

/// A signature read and matched to a trusted key, ready to verify an
/// artifact.
#[derive(Clone)]
pub struct SignatureCheck {
    key: PublicKey,
    key_id: KeyId,
    signature: Signature,
    source: String,
}

impl std::fmt::Debug for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureCheck")
            .field("key_id", &self.key_id)
            .field("source", &self.source)
            .field("trusted_comment", &self.trusted_comment())
            .finish()
    }
}

impl SignatureCheck {
    /// The id of the key that made the signature.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The signature's trusted comment (signed with it: `timestamp:… file:…`
    /// by default, or what the publisher wrote with `-t`).
    pub fn trusted_comment(&self) -> &str {
        self.signature.trusted_comment()
    }

    /// A verifier to feed with the artifact's bytes as they arrive
    /// (BLAKE2b-512, as minisign's pre-hashed mode signs them).
    pub(crate) fn verifier(&self) -> Result<StreamVerifier<'_>, SignatureError> {
        self.key.verify_stream(&self.signature).map_err(|_| self.invalid())
    }

    /// The verdict once every byte was fed to `verifier`.
    pub(crate) fn finish(&self, mut verifier: StreamVerifier<'_>) -> Result<(), SignatureError> {
        verifier.finalize().map_err(|_| self.invalid())
    }

    /// Verifies the file at `path` (an artifact already in the cache),
    /// reading it once. Blocking.
    pub fn verify_file(&self, path: &Path) -> Result<(), SignatureError> {
        use std::io::Read;
        let unreadable = |e: std::io::Error| SignatureError::Unreadable {
            file: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut verifier = self.verifier()?;
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            verifier.update(&buf[..n]);
        }
        self.finish(verifier)
    }

    fn invalid(&self) -> SignatureError {
        SignatureError::Invalid {
            file: self.source.clone(),
            key_id: self.key_id,
        }
    }
}

/// Why an artifact's signature was refused. Each names the check that
/// failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No `<artifact>.minisig` is published beside the artifact.
    #[error("no signature: `{file}` is not published beside the artifact")]
    Missing {
        /// Where the signature was looked for.
        file: String,
    },
    /// The signature file is not a minisign signature.
    #[error("malformed signature `{file}`: {reason}")]
    Malformed {
        /// The signature file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A legacy (not pre-hashed) signature.
    #[error(
        "legacy signature `{file}`: only pre-hashed minisign signatures are accepted (sign again with minisign 0.9 or later, without -l)"
    )]
    Legacy {
        /// The signature file.
        file: String,
    },
    /// Signed by a key that is not trusted.
    #[error("signature `{file}` was made by key {key_id}, which is not trusted (trusted: {})", trusted.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    UnknownKey {
        /// The signature file.
        file: String,
        /// The key that signed.
        key_id: KeyId,
        /// The keys given with `--verify-key`.
        trusted: Vec<KeyId>,
    },
    /// The signature does not match the artifact (or its trusted comment).
    #[error("bad signature: the artifact does not match `{file}` (key {key_id})")]
    Invalid {
        /// The signature file.
        file: String,
        /// The key that signed.
        key_id: KeyId,
    },
    /// The artifact could not be read to verify it.
    #[error("cannot read `{file}` to verify its signature: {reason}")]
    Unreadable {
        /// The file.
        file: String,
        /// The cause.
        reason: String,
    },
}
