//! The pair's SSH keys, and the trust between the two hosts: the peer's key
//! in `authorized_keys` (only from the peer's address), and the peer's host
//! key pinned in `known_hosts`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::command::Command;
use crate::files::{config_lines, join_lines, line_content};

/// The modes OpenSSH expects of an account's files (and sshd's
/// StrictModes enforces): `~/.ssh` and the private key its owner's alone.
pub const SSH_DIR_MODE: u32 = 0o700;
pub const PRIVATE_KEY_MODE: u32 = 0o600;
pub const PUBLIC_KEY_MODE: u32 = 0o644;
pub const AUTHORIZED_KEYS_MODE: u32 = 0o600;
/// As ssh itself writes it when it adds a host key.
pub const KNOWN_HOSTS_MODE: u32 = 0o600;

/// Where sshd keeps this host's ed25519 host key.
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key.pub";

/// Key types an OpenSSH public key line may start with.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An OpenSSH public key: `TYPE BASE64 [COMMENT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key_type: String,
    pub base64: String,
    pub comment: String,
}

impl PublicKey {
    /// Parses a public key line without asking ssh-keygen; see
    /// [`PublicKey::validate`] for the full check.
    pub fn parse(line: &str) -> Result<PublicKey> {
        let line = line.trim();
        let example = "expected one line such as 'ssh-ed25519 AAAAC3Nza... hapair@peer'";
        if line.contains('\n') || line.contains('\r') {
            bail!("an SSH public key is one line; {example}");
        }
        let mut words = line.split_whitespace();
        let (Some(key_type), Some(base64)) = (words.next(), words.next()) else {
            bail!("{line:?} is not an SSH public key: {example}");
        };
        if !KEY_TYPES.contains(&key_type) {
            bail!("{key_type:?} is not an SSH key type: {example}");
        }
        let base64_ok = base64.len() >= 16
            && base64
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
        if !base64_ok {
            bail!("the key data of {key_type} is not base64: {example}");
        }
        Ok(PublicKey {
            key_type: key_type.to_string(),
            base64: base64.to_string(),
            comment: words.collect::<Vec<_>>().join(" "),
        })
    }

    /// Parses the line, then has ssh-keygen read it: a key that passes is a
    /// real key, not just something shaped like one.
    pub fn validate(line: &str) -> Result<PublicKey> {
        let key = PublicKey::parse(line)?;
        let out = Command::new("ssh-keygen")
            .args(["-l", "-f", "-"])
            .stdin(format!("{}\n", key.line()))
            .output()?;
        if !out.success() {
            bail!(
                "ssh-keygen can't read the {} key {}...: it is damaged or truncated \
                 (copy the whole line)",
                key.key_type,
                &key.base64[..12.min(key.base64.len())]
            );
        }
        Ok(key)
    }

    /// `TYPE BASE64`: what identifies the key, comment aside.
    pub fn material(&self) -> String {
        format!("{} {}", self.key_type, self.base64)
    }

    /// The whole line, comment included.
    pub fn line(&self) -> String {
        if self.comment.is_empty() {
            self.material()
        } else {
            format!("{} {}", self.material(), self.comment)
        }
    }
}

/// This host's ed25519 host key.
pub fn own_host_key() -> Result<PublicKey> {
    let text = std::fs::read_to_string(HOST_KEY_PATH)
        .with_context(|| format!("can't read this host's SSH host key {HOST_KEY_PATH}"))?;
    PublicKey::parse(&text)
}

/// Asks `host` for its ed25519 host key over the network (trust on first
/// use: prefer a key read on the host itself).
pub fn scan_host_key(host: Ipv4Addr, timeout: Duration) -> Result<PublicKey> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", &timeout.as_secs().max(1).to_string(), "-t", "ed25519"])
        .arg(host.to_string())
        .output()?;
    let line = out
        .stdout
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .with_context(|| {
            format!("{host} did not answer ssh-keyscan on port 22 within {timeout:?}")
        })?;
    let key = line.split_once(' ').map_or("", |(_, key)| key);
    PublicKey::parse(key)
}

/// The command that reaches the peer as the cluster account `account`:
/// ssh run as that account (so its own files are read as it, never by
/// root), with its own key and its pinned known_hosts only: strict host key
/// checking, no agent, no prompt. The peer's address and the remote
/// command follow.
pub fn peer_transport(account: &crate::account::Account, timeout: Duration) -> Vec<String> {
    let ssh_dir = account.home.join(".ssh");
    let option = |name: &str, value: &str| ["-o".to_string(), format!("{name}={value}")];
    let mut words: Vec<String> = vec![
        "runuser".into(),
        "-u".into(),
        account.name.clone(),
        "--".into(),
        "ssh".into(),
    ];
    words.extend(option("BatchMode", "yes"));
    words.extend(option("StrictHostKeyChecking", "yes"));
    words.extend(option("GlobalKnownHostsFile", "/dev/null"));
    words.extend(option(
        "UserKnownHostsFile",
        &ssh_dir.join("known_hosts").display().to_string(),
    ));
    words.extend(option("IdentitiesOnly", "yes"));
    words.extend(option(
        "ConnectTimeout",
        &timeout.as_secs().max(1).to_string(),
    ));
    words.extend([
        "-i".into(),
        ssh_dir.join("id_ed25519").display().to_string(),
    ]);
    words
}

/// Runs the program and arguments `argv` on `peer` as the cluster account
/// `account` (see [`peer_transport`]). ssh hands the remote shell one line:
/// each word is quoted for it here, so no argument can add a command.
pub fn run_on_peer(
    account: &crate::account::Account,
    peer: Ipv4Addr,
    argv: &[&str],
    timeout: Duration,
) -> Result<crate::command::Output> {
    let mut words = peer_transport(account, timeout);
    words.extend([peer.to_string(), remote_command(argv)]);
    Command::new(words.remove(0)).args(words).output()
}

/// The one line a remote shell runs for `argv`, every word quoted.
pub fn remote_command(argv: &[&str]) -> String {
    argv.iter()
        .map(|word| crate::command::shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `authorized_keys` line that lets `key` in from `from` only, with no
/// forwarding and no pty: enough for rsync and commands, nothing more.
pub fn authorized_entry(key: &PublicKey, from: Ipv4Addr) -> String {
    format!("from=\"{from}\",restrict {}", key.line())
}

/// `current` (an authorized_keys file) with `key` let in from `from` only.
/// Any other entry for the same key is replaced, so an old entry without
/// `from=` can't outlive this one. Every other line stays as it is, byte
/// for byte.
pub fn authorized_keys_with(current: &str, key: &PublicKey, from: Ipv4Addr) -> String {
    let entry = authorized_entry(key, from);
    let material = key.material();
    let lines: Vec<&str> = config_lines(current).collect();
    let for_key = |line: &str| line_key_material(line).as_deref() == Some(material.as_str());
    // Already there, alone: leave the file as it is, order included.
    if lines
        .iter()
        .filter(|l| for_key(l))
        .map(|l| line_content(l))
        .eq([entry.as_str()])
    {
        return join_lines(lines);
    }
    let kept = lines.iter().copied().filter(|line| !for_key(line));
    join_lines(kept.chain([entry.as_str()]))
}

/// The key in an authorized_keys line, past any options.
fn line_key_material(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| KEY_TYPES.contains(w))?;
    Some(format!("{} {}", words[at], words.get(at + 1)?))
}

/// What pinning a host key did to a known_hosts file.
#[derive(Debug, PartialEq, Eq)]
pub struct Pinned {
    pub text: String,
    /// The key that was pinned for this host before, when it was another.
    pub replaced: Option<String>,
}

/// The ed25519 host key pinned for `host` in `known_hosts`, if any, read as
/// ssh reads the file (leading blanks skipped, host lists split).
pub fn pinned_key(known_hosts: &str, host: Ipv4Addr) -> Option<PublicKey> {
    let host = host.to_string();
    config_lines(known_hosts).find_map(|line| {
        let (hosts, key) = known_hosts_entry(line)?;
        hosts
            .contains(&host.as_str())
            .then(|| PublicKey::parse(key).ok())
            .flatten()
            .filter(|k| k.key_type == "ssh-ed25519")
    })
}

/// A known_hosts line as ssh reads it: leading blanks skipped, then the
/// host list (split at commas) and the rest (`TYPE BASE64 ...`).
fn known_hosts_entry(line: &str) -> Option<(Vec<&str>, &str)> {
    let (hosts, rest) = line_content(line)
        .trim_start()
        .split_once(char::is_whitespace)?;
    Some((hosts.split(',').collect(), rest.trim_start()))
}

/// `current` (a known_hosts file) with `key` pinned for `host`. An earlier
/// key of the same type for the host is replaced (and reported); a line that
/// also names other hosts keeps them, without this one. Every other line
/// stays as it is, byte for byte.
pub fn known_hosts_with(current: &str, host: Ipv4Addr, key: &PublicKey) -> Pinned {
    let host = host.to_string();
    let lines: Vec<&str> = config_lines(current).collect();
    // (hosts, rest) of a line that pins a key of this type for this host.
    // (other hosts, rest) of a line that pins a key of this type for this
    // host; read as ssh reads it, or an old pin would survive.
    let for_host = |line: &str| -> Option<(Vec<String>, String)> {
        let (names, rest) = known_hosts_entry(line)?;
        (names.contains(&host.as_str()) && rest.split_whitespace().next() == Some(&key.key_type))
            .then(|| {
                let others = names.iter().filter(|h| **h != host).map(|h| h.to_string());
                (others.collect(), rest.to_string())
            })
    };
    let pins: Vec<(Vec<String>, String)> = lines.iter().filter_map(|l| for_host(l)).collect();
    // Already pinned, alone: leave the file as it is. ssh itself appends the
    // peer's other host keys after it (UpdateHostKeys); they are no change.
    if let [(_, rest)] = pins.as_slice() {
        if rest.split_whitespace().nth(1) == Some(key.base64.as_str()) {
            return Pinned {
                text: join_lines(lines),
                replaced: None,
            };
        }
    }
    let replaced = pins
        .iter()
        .filter_map(|(_, rest)| rest.split_whitespace().nth(1))
        .find(|k| *k != key.base64)
        .map(|k| format!("{} {k}", key.key_type));
    let mut kept: Vec<String> = Vec::new();
    for line in &lines {
        match for_host(line) {
            None => kept.push(line.to_string()),
            Some((others, _)) if others.is_empty() => {}
            Some((others, rest)) => kept.push(format!("{} {rest}", others.join(","))),
        }
    }
    kept.push(format!("{host} {}", key.material()));
    Pinned {
        text: join_lines(kept.iter().map(String::as_str)),
        replaced,
    }
}

/// An ed25519 key pair on disk: `<dir>/id_ed25519` and its `.pub`.
///
/// ssh-keygen runs as the account that owns the pair (`owner`): the
/// directory is that account's to write, and root must not read or write
/// through a link it left there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
    /// The account ssh-keygen runs as; `None`: whoever runs the module.
    pub owner: Option<String>,
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

/// The last line of every complete OpenSSH private key file.
const PRIVATE_KEY_END: &str = "-----END OPENSSH PRIVATE KEY-----";

impl KeyPair {
    /// The key pair in `ssh_dir` (`~/.ssh`) of `owner`.
    pub fn in_ssh_dir(ssh_dir: &Path, owner: Option<&str>) -> KeyPair {
        KeyPair {
            private: ssh_dir.join("id_ed25519"),
            public: ssh_dir.join("id_ed25519.pub"),
            owner: owner.map(String::from),
        }
    }

    /// ssh-keygen, as the account when it writes in the account's
    /// directory.
    fn ssh_keygen_as_owner(&self) -> Command {
        match &self.owner {
            Some(account) => Command::new("runuser").args(["-u", account, "--", "ssh-keygen"]),
            None => Command::new("ssh-keygen"),
        }
    }

    /// Generates a new pair without a passphrase (the account uses it
    /// unattended). It is made under temporary names and renamed into place,
    /// public key first: a run killed half-way leaves no truncated key.
    pub fn generate(&self, comment: &str) -> Result<()> {
        let (dir, name) = crate::files::Dir::of(&self.private)?;
        let temp = format!(".{}.hapair-new", name.to_string_lossy());
        let temp_pub = format!("{temp}.pub");
        dir.remove_all(temp.as_ref())?;
        dir.remove_all(temp_pub.as_ref())?;
        self.ssh_keygen_as_owner()
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(dir.path().join(&temp))
            .run()?;
        let public_name = self.public.file_name().context("the public key's name")?;
        dir.rename(temp_pub.as_ref(), public_name)?;
        dir.rename(temp.as_ref(), &name)
    }

    /// The public key as written in the `.pub` file, if there is one.
    pub fn read_public(&self) -> Result<Option<String>> {
        Ok(crate::files::read_optional(&self.public)?.map(|t| t.trim().to_string()))
    }

    /// Whether the private key file was cut short (a write that was killed):
    /// empty, or without the line every complete key ends with.
    pub fn private_is_truncated(&self) -> Result<bool> {
        Ok(crate::files::read_optional(&self.private)?
            .is_some_and(|text| !text.trim_end().ends_with(PRIVATE_KEY_END)))
    }

    /// The public key computed from the private key (`ssh-keygen -y`). The
    /// key is read here, without following a link, and handed to ssh-keygen
    /// on stdin: ssh-keygen opens no path in the account's directory.
    pub fn derive_public(&self) -> Result<String> {
        let private = crate::files::read_optional(&self.private)?
            .with_context(|| format!("{} is missing", self.private.display()))?;
        let out = Command::new("ssh-keygen")
            .args(["-y", "-P", "", "-f", "/dev/stdin"])
            .stdin(private)
            .run()
            .with_context(|| format!("can't read the private key {}", self.private.display()))?;
        Ok(out.stdout.trim().to_string())
    }

    /// The fingerprint of the public key file, read the same way.
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let public = crate::files::read_optional(&self.public)?
            .with_context(|| format!("{} is missing", self.public.display()))?;
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f", "-"])
            .stdin(public)
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

    const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOdJ0pq7aN9aX8Q7m3kGq4uYQm1g0hQb5g2w4WZ3v0aA hapair@primary";
    const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBpq7aN9aX8Q7m3kGq4uYQm1g0hQb5g2w4WZ3v0aA hapair@secondary";

    #[test]
    fn public_keys_are_parsed_and_bad_ones_explained() {
        let key = PublicKey::parse(KEY_A).unwrap();
        assert_eq!(key.key_type, "ssh-ed25519");
        assert_eq!(key.comment, "hapair@primary");
        for (bad, says) in [
            ("", "is not an SSH public key"),
            ("ssh-ed25519", "is not an SSH public key"),
            ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "is not an SSH key type"),
            ("ssh-ed25519 not*base64*at*all!!", "is not base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\nssh-rsa AAAA", "one line"),
        ] {
            let err = PublicKey::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn authorized_keys_gain_one_restricted_entry_per_key() {
        let a = PublicKey::parse(KEY_A).unwrap();
        let peer = Ipv4Addr::new(198, 18, 0, 12);
        let other = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ someone@else";
        let stale = format!("no-pty {KEY_A}");
        let text = authorized_keys_with(&format!("{other}\n{stale}\n"), &a, peer);
        assert_eq!(
            text,
            format!("{other}\nfrom=\"198.18.0.12\",restrict {KEY_A}\n")
        );
        // Idempotent.
        assert_eq!(authorized_keys_with(&text, &a, peer), text);
        let grown = format!("{text}{other}\n");
        assert_eq!(authorized_keys_with(&grown, &a, peer), grown);
    }

    #[test]
    fn known_hosts_pin_one_key_per_host_and_report_a_replacement() {
        let (a, b) = (
            PublicKey::parse(KEY_A).unwrap(),
            PublicKey::parse(KEY_B).unwrap(),
        );
        let peer = Ipv4Addr::new(198, 18, 0, 12);
        let first = known_hosts_with("198.18.0.99 ssh-ed25519 AAAAother\n", peer, &a);
        assert_eq!(first.replaced, None);
        assert_eq!(
            first.text,
            format!(
                "198.18.0.99 ssh-ed25519 AAAAother\n198.18.0.12 {}\n",
                a.material()
            )
        );
        assert_eq!(known_hosts_with(&first.text, peer, &a).text, first.text);
        // Lines that ssh appends later (other key types) don't move the pin.
        let grown = format!(
            "{}198.18.0.12 ssh-rsa AAAArsa\n|1|hashed|entry ecdsa AAAA\n",
            first.text
        );
        assert_eq!(
            known_hosts_with(&grown, peer, &a),
            Pinned {
                text: grown.clone(),
                replaced: None
            }
        );
        let changed = known_hosts_with(&first.text, peer, &b);
        assert_eq!(changed.replaced, Some(a.material()));
        assert!(!changed.text.contains(&a.base64));
    }

    #[test]
    fn a_remote_argument_can_never_add_a_command() {
        let forged = "/dev/null; echo '{\"cluster\": {\"protected_instance\": false}}'";
        let line = remote_command(&["cat", "--", forged]);
        // A real shell runs it: cat is asked for the one odd file name.
        let out = Command::new("sh").args(["-c", &line]).output().unwrap();
        assert_eq!(out.stdout, "", "the forged config was printed: {line}");
        assert!(out.stderr.contains("No such file"), "{}", out.stderr);
        assert_eq!(remote_command(&["cat", "/etc/x"]), "cat /etc/x");
    }

    #[test]
    fn edits_keep_every_other_line_byte_for_byte() {
        let a = PublicKey::parse(KEY_A).unwrap();
        let peer = Ipv4Addr::new(198, 18, 0, 12);
        let crlf = "ssh-rsa AAAAB3Nza other\r\n# note\r";
        let edited = authorized_keys_with(crlf, &a, peer);
        assert!(
            edited.starts_with("ssh-rsa AAAAB3Nza other\r\n# note\r\n"),
            "{edited:?}"
        );
        assert_eq!(authorized_keys_with(&edited, &a, peer), edited);
        let shared = "198.18.0.99,198.18.0.12 ssh-ed25519 AAAAold\n";
        let pinned = known_hosts_with(shared, peer, &a);
        assert_eq!(
            pinned.text,
            format!(
                "198.18.0.99 ssh-ed25519 AAAAold\n198.18.0.12 {}\n",
                a.material()
            )
        );
        assert_eq!(pinned.replaced, Some("ssh-ed25519 AAAAold".into()));
        assert_eq!(known_hosts_with(&pinned.text, peer, &a).text, pinned.text);
        // A pin indented with blanks is a pin to ssh: it is replaced too.
        let indented = "\x0b 198.18.0.12 ssh-ed25519 AAAAold\n";
        let repinned = known_hosts_with(indented, peer, &a);
        assert_eq!(repinned.text, format!("198.18.0.12 {}\n", a.material()));
        assert_eq!(repinned.replaced, Some("ssh-ed25519 AAAAold".into()));
    }

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
        let pair = KeyPair::in_ssh_dir(&dir, None);
        pair.generate("test@host").unwrap();
        let public = pair.read_public().unwrap().unwrap();
        assert!(public.starts_with("ssh-ed25519 ") && public.ends_with(" test@host"));
        assert!(same_key(&public, &pair.derive_public().unwrap()));
        assert_eq!(pair.fingerprint().unwrap().key_type, "ED25519");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
