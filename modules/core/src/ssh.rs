//! The pair's SSH keys.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::command::Command;

/// An ed25519 key pair on disk: `<dir>/id_ed25519` and its `.pub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
}

/// A key's fingerprint as `ssh-keygen -l` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub bits: u32,
    /// e.g. `SHA256:...`
    pub hash: String,
    /// e.g. `ED25519`
    pub key_type: String,
}

impl KeyPair {
    /// The cluster account's key pair in `~/.ssh`.
    pub fn in_ssh_dir(ssh_dir: &Path) -> KeyPair {
        KeyPair {
            private: ssh_dir.join("id_ed25519"),
            public: ssh_dir.join("id_ed25519.pub"),
        }
    }

    /// Generates a new pair without a passphrase (the account uses it
    /// unattended). The files must not exist: ssh-keygen would prompt.
    pub fn generate(&self, comment: &str) -> Result<()> {
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(&self.private)
            .run()?;
        Ok(())
    }

    /// The public key as written in the `.pub` file, if there is one.
    pub fn read_public(&self) -> Result<Option<String>> {
        Ok(crate::files::read_optional(&self.public)?.map(|t| t.trim().to_string()))
    }

    /// The public key computed from the private key (`ssh-keygen -y`).
    pub fn derive_public(&self) -> Result<String> {
        let out = Command::new("ssh-keygen")
            .args(["-y", "-f"])
            .arg(&self.private)
            .run()
            .with_context(|| format!("can't read the private key {}", self.private.display()))?;
        Ok(out.stdout.trim().to_string())
    }

    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(&self.public)
            .run()?;
        parse_fingerprint(out.stdout.trim())
    }
}

/// Whether two public key lines hold the same key (type and key material;
/// the comment may differ).
pub fn same_key(a: &str, b: &str) -> bool {
    fn material(line: &str) -> Vec<&str> {
        line.split_whitespace().take(2).collect()
    }
    let (a, b) = (material(a), material(b));
    a.len() == 2 && a == b
}

/// Parses `256 SHA256:abc comment words (ED25519)`.
pub fn parse_fingerprint(line: &str) -> Result<Fingerprint> {
    let mut words = line.split_whitespace();
    let (Some(bits), Some(hash), Some(last)) =
        (words.next(), words.next(), line.split_whitespace().last())
    else {
        bail!("unexpected ssh-keygen -l output: {line:?}");
    };
    let key_type = last
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .filter(|_| hash.contains(':'));
    match (bits.parse::<u32>(), key_type) {
        (Ok(bits), Some(key_type)) => Ok(Fingerprint {
            bits,
            hash: hash.to_string(),
            key_type: key_type.to_string(),
        }),
        _ => bail!("unexpected ssh-keygen -l output: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fingerprints() {
        let fp = parse_fingerprint("256 SHA256:q1w2e3/r4+t5 hapair@primary (ED25519)").unwrap();
        assert_eq!(fp.bits, 256);
        assert_eq!(fp.hash, "SHA256:q1w2e3/r4+t5");
        assert_eq!(fp.key_type, "ED25519");
        let no_comment = parse_fingerprint("3072 SHA256:abc (RSA)").unwrap();
        assert_eq!(no_comment.key_type, "RSA");
        for bad in [
            "",
            "256",
            "x SHA256:a (ED25519)",
            "256 SHA256:a ED25519",
            "256 nohash (ED25519)",
        ] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn same_key_ignores_the_comment() {
        assert!(same_key(
            "ssh-ed25519 AAAA one",
            "ssh-ed25519 AAAA two words"
        ));
        assert!(!same_key("ssh-ed25519 AAAA", "ssh-ed25519 BBBB"));
        assert!(!same_key("", ""));
    }

    #[test]
    fn generates_a_pair_whose_halves_match() {
        let dir = std::env::temp_dir().join(format!("hapair-ssh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pair = KeyPair::in_ssh_dir(&dir);
        pair.generate("test@host").unwrap();
        let public = pair.read_public().unwrap().unwrap();
        assert!(public.starts_with("ssh-ed25519 ") && public.ends_with(" test@host"));
        assert!(same_key(&public, &pair.derive_public().unwrap()));
        assert_eq!(pair.fingerprint().unwrap().key_type, "ED25519");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
