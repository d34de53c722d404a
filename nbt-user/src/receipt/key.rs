//! The node's signing key: ed25519, made at first use, kept as a PKCS#8 PEM file of mode 0600.
//! The public half is exported as SPKI PEM (`nbt receipts pubkey`), which openssl reads too.
//! The key is read without following a link, and only from a file nbt's own user owns that
//! group and others cannot read (`sys::private`): a key others could read signs nothing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::EncodePublicKey as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// Where nbt keeps its receipts and key unless told otherwise (`NBT_HOME`).
pub fn home() -> PathBuf {
    std::env::var_os("NBT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/nbt"))
}

/// Makes the directory `path` is in: `$NBT_HOME` itself is made private (0700) or checked (one
/// nbt made wider before is tightened); another directory is made 0700 when missing and otherwise
/// left as the user has it.
pub fn make_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir == home() {
        crate::sys::private::private_dir(dir, "nbt's home ($NBT_HOME)")?;
    } else {
        crate::sys::private::make_dir(dir)?;
    }
    Ok(())
}

/// The node key's file: `NBT_KEY`, else `node.key` in [`home`].
pub fn default_key_path() -> PathBuf {
    std::env::var_os("NBT_KEY")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join("node.key"))
}

pub struct NodeKey {
    signing: SigningKey,
}

impl NodeKey {
    /// Reads the key at `path`, or makes one there when no file exists.
    pub fn load_or_create(path: &Path) -> Result<NodeKey> {
        match Self::load(path) {
            Ok(key) => Ok(key),
            Err(err) if !path.exists() => {
                Self::create(path).with_context(|| format!("{err:#}; making a new node key"))
            }
            // Absent when read, present now: another run made it in between.
            Err(err)
                if err
                    .root_cause()
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                Self::load(path)
            }
            Err(err) => Err(err),
        }
    }

    pub fn load(path: &Path) -> Result<NodeKey> {
        let pem = crate::sys::private::read_private(
            path,
            "the node key",
            crate::sys::private::WideMode::Refuse,
        )?;
        let pem = String::from_utf8(pem).map_err(|_| {
            anyhow::anyhow!("the node key {} is not a PEM text file", path.display())
        })?;
        let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "the node key {} is not an ed25519 PKCS#8 PEM private key: {e}",
                path.display()
            )
        })?;
        Ok(NodeKey { signing })
    }

    fn create(path: &Path) -> Result<NodeKey> {
        make_parent(path)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("reading randomness: {e}"))?;
        let signing = SigningKey::from_bytes(&seed);
        let pem = signing
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("encoding the node key: {e}"))?;
        // Written whole under a name of this process's own, then linked into place: two runs
        // making the key at once must not overwrite each other's, and neither may read the
        // other's half-written file (a plain create_new let the loser read it while it was empty).
        let made = crate::sys::private::create_private(path, pem.as_bytes())
            .with_context(|| format!("making the node key {}", path.display()))?;
        if made {
            Ok(NodeKey { signing })
        } else {
            Self::load(path)
        }
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }
}

/// The key's id as receipts name it: `ed25519:` and the sha256 of the 32 raw public-key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    format!("ed25519:{}", hex(&Sha256::digest(key.as_bytes())))
}

pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an ed25519 public key always encodes")
}

/// Reads a public key written by `nbt receipts pubkey` (SPKI PEM).
pub fn read_public(path: &Path) -> Result<VerifyingKey> {
    let pem = fs::read_to_string(path)
        .with_context(|| format!("--pubkey: reading {}", path.display()))?;
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
        anyhow::anyhow!(
            "--pubkey: {} is not an ed25519 public key in PEM (as `nbt receipts pubkey` writes): {e}",
            path.display()
        )
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn made_once_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let made = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(made.public(), again.public());
        let sig = again.sign(b"x");
        made.public()
            .verify_strict(b"x", &ed25519_dalek::Signature::from_bytes(&sig))
            .unwrap();
        let pub_path = dir.path().join("node.pub");
        fs::write(&pub_path, public_pem(&made.public())).unwrap();
        assert_eq!(read_public(&pub_path).unwrap(), made.public());
    }

    #[test]
    fn runs_making_the_key_at_once_all_get_the_same_whole_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("node.key");
            let keys: Vec<VerifyingKey> = std::thread::scope(|scope| {
                let makers: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| NodeKey::load_or_create(&path).map(|k| k.public())))
                    .collect();
                makers
                    .into_iter()
                    .map(|m| m.join().unwrap().unwrap())
                    .collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]));
            // Nothing staged is left beside the key.
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        NodeKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", NodeKey::load_or_create(&path).err().unwrap());
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn a_key_behind_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        NodeKey::load_or_create(&real).unwrap();
        let link = dir.path().join("node.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = format!("{:#}", NodeKey::load_or_create(&link).err().unwrap());
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none() && unhex("zz").is_none());
    }
}
