//! A node's long-term Ed25519 identity and its key file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};

use crate::wire::PeerId;
use crate::wire::control::Signature;

/// A node's secret key and the peer ID derived from it.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

/// Why the identity file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but does not hold a key.
    #[error("identity file {path} is not a burrow key: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// First line of a key file; the second line is the 32-byte secret in hex.
const HEADER: &str = "burrow-ed25519-secret-v1";

impl Identity {
    /// An identity from 32 secret bytes (a seed from the simulator's RNG, or from the OS).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// A fresh random identity from the OS random source.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        Self::from_secret(secret)
    }

    /// The public peer ID.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.key.verifying_key().to_bytes())
    }

    /// The secret bytes (for building TLS certificates).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Signs a message.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature::from_bytes(self.key.sign(message).to_bytes())
    }

    /// The default key file: `$XDG_CONFIG_HOME/burrow/identity` (or the platform's config
    /// directory), falling back to `./burrow-identity`.
    pub fn default_path() -> PathBuf {
        dirs::config_dir()
            .map(|d| d.join("burrow").join("identity"))
            .unwrap_or_else(|| PathBuf::from("burrow-identity"))
    }

    /// Loads the key at `path`, creating it (mode 0600, parent directories 0700) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    create_private_dir(dir).map_err(io)?;
                }
                let mut opts = fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(path).map_err(io)?;
                writeln!(f, "{HEADER}\n{}", hex(&id.secret_bytes())).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &str| IdentityError::Format {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(HEADER) {
            return Err(bad("missing header line"));
        }
        let hex_key = lines
            .next()
            .map(str::trim)
            .ok_or_else(|| bad("missing key line"))?;
        let bytes = unhex(hex_key).ok_or_else(|| bad("key line is not 64 hex digits"))?;
        Ok(Self::from_secret(bytes))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.peer_id())
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_key_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity");
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        fs::write(&path, "hello\n").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not a burrow key"), "{err}");
    }

    #[test]
    fn signatures_verify_against_peer_id() {
        let id = Identity::from_secret([5; 32]);
        let sig = id.sign(b"msg");
        assert!(id.peer_id().verify(b"msg", &sig.to_bytes()));
    }
}
