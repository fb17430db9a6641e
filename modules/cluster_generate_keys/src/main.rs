//! `cluster_generate_keys`: seed step 2.
//!
//! Makes sure the cluster account exists and has an ed25519 key pair, and
//! returns the public key and its fingerprint for the key exchange (seed
//! step 3, `replication_helper`). An existing key is kept: replacing it would
//! lock this host out of its peer. Only `force: true` replaces it, and even
//! then the old pair is kept beside the new one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::account::{self, Account};
use hapair_core::files::{self, Owner};
use hapair_core::protocol::{self, ansible_bool};
use hapair_core::ssh::{self, KeyPair, PRIVATE_KEY_MODE, PUBLIC_KEY_MODE, SSH_DIR_MODE};
use hapair_core::{Action, Context, Diff, Outcome, Plan, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_generate_keys",
    doc: include_str!("../cluster_generate_keys.yml"),
    shorthand: None,
};

const HOME_MODE: u32 = 0o750;

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    #[serde(default = "account::default_name")]
    account: String,
    /// Home of the account when it has to be created.
    #[serde(default)]
    home: Option<PathBuf>,
    /// Replace an existing key pair.
    #[serde(default, deserialize_with = "ansible_bool")]
    force: bool,
    /// The key's comment; `<account>@<hostname>` when not given.
    #[serde(default)]
    comment: Option<String>,
}

/// One thing to do to the host, in order.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    CreateAccount {
        home: PathBuf,
    },
    /// The account exists without its home: a creation that was killed.
    MakeHome {
        home: PathBuf,
    },
    MakeSshDir,
    FixSshDir,
    /// Move the current pair aside to these paths, then generate.
    SetAsideKey {
        private: PathBuf,
        public: PathBuf,
    },
    GenerateKey,
    FixPrivateKey,
    WritePublicKey,
}

impl Step {
    fn describe(&self, account: &str, pair: &KeyPair) -> String {
        match self {
            Step::CreateAccount { home } => {
                format!("create account {account} with home {}", home.display())
            }
            Step::MakeHome { home } => {
                format!("create the missing home {} of {account}", home.display())
            }
            Step::MakeSshDir => "create ~/.ssh (0700)".to_string(),
            Step::FixSshDir => format!("give ~/.ssh mode 0700 and owner {account}"),
            Step::SetAsideKey { private, .. } => {
                format!("keep the old key pair as {}", private.display())
            }
            Step::GenerateKey => {
                format!("generate an ed25519 key pair at {}", pair.private.display())
            }
            Step::FixPrivateKey => format!(
                "give {} mode 0600 and owner {account}",
                pair.private.display()
            ),
            Step::WritePublicKey => {
                format!("write {} from the private key", pair.public.display())
            }
        }
    }
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_generate_keys)
}

fn cluster_generate_keys(args: Args, ctx: &mut Context) -> Result<Outcome> {
    account::check_name(&args.account)?;
    let existing = Account::lookup(&args.account)?;
    let home = match (&existing, &args.home) {
        (Some(found), _) => found.home.clone(),
        (None, Some(home)) => home.clone(),
        (None, None) => Path::new(account::DEFAULT_HOME_BASE).join(&args.account),
    };
    let pair = KeyPair::in_ssh_dir(&home.join(".ssh"), Some(&args.account));
    let before_public = match &existing {
        Some(_) => pair.read_public()?,
        None => None,
    };

    let mut plan: Plan<Described> = Plan::default();
    for step in plan_steps(&args, existing.as_ref(), &home, &pair, ctx)? {
        let text = step.describe(&args.account, &pair);
        plan.push(Described { step, text });
    }
    let changes = !plan.is_empty();
    let unchanged = format!("{} already has its key pair", args.account);
    let mut account = existing;
    let outcome = plan.run(ctx, unchanged, |plan, _| {
        for Described { step, .. } in &plan.actions {
            apply(step, &args, &mut account, &pair)?;
        }
        Ok(Vec::new())
    })?;

    let public = match &account {
        Some(_) => pair.read_public()?,
        None => None,
    };
    let fingerprint = match &public {
        Some(_) => Some(pair.fingerprint()?.hash),
        None => None,
    };
    let mut outcome = outcome
        .with("account", &args.account)
        .with("private_key_path", &pair.private)
        .with("public_key_path", &pair.public)
        .with("public_key", &public)
        .with("fingerprint", fingerprint);
    if changes && !ctx.check_mode {
        let public = public.context("the public key is missing after generating it")?;
        outcome = outcome.with_diff(Diff {
            before: before_public.map(|k| k + "\n").unwrap_or_default(),
            after: format!("{public}\n"),
            before_header: pair.public.display().to_string(),
            after_header: pair.public.display().to_string(),
        });
    }
    Ok(outcome)
}

/// A step with what it says it does.
struct Described {
    step: Step,
    text: String,
}

impl Action for Described {
    fn describe(&self) -> String {
        self.text.clone()
    }
}

/// Compares the host with what it should be, and lists the steps between.
fn plan_steps(
    args: &Args,
    existing: Option<&Account>,
    home: &Path,
    pair: &KeyPair,
    ctx: &mut Context,
) -> Result<Vec<Step>> {
    let Some(account) = existing else {
        return Ok(vec![
            Step::CreateAccount {
                home: home.to_path_buf(),
            },
            Step::MakeSshDir,
            Step::GenerateKey,
        ]);
    };
    let owner = Some(account.owner());
    let mut steps = Vec::new();
    let ssh_dir = pair.private.parent().expect("the key is in ~/.ssh");
    if files::state(home)?.is_none() {
        return Ok(vec![
            Step::MakeHome {
                home: home.to_path_buf(),
            },
            Step::MakeSshDir,
            Step::GenerateKey,
        ]);
    }
    match files::state(ssh_dir)? {
        None => steps.push(Step::MakeSshDir),
        Some(state) if state.kind == files::Kind::Symlink => bail!(
            "{} is a symlink: hapair does not follow links in a directory the account can \
             write. Replace it with a directory",
            ssh_dir.display()
        ),
        Some(state) if !state.is_dir() => {
            bail!(
                "{} exists but is not a directory; move it away",
                ssh_dir.display()
            )
        }
        Some(state) if !files::has_mode_owner(&state, SSH_DIR_MODE, owner) => {
            steps.push(Step::FixSshDir)
        }
        Some(_) => {}
    }
    let Some(private) = files::state(&pair.private)? else {
        steps.push(Step::GenerateKey);
        return Ok(steps);
    };
    // A key cut short by a killed run was never used: make it anew, keeping
    // the broken one beside it.
    let broken = pair.private_is_truncated()?;
    if broken {
        ctx.warn(format!(
            "{} was cut short (a run was killed while writing it); a new pair is made and the \
             broken one kept beside it",
            pair.private.display()
        ));
    }
    if args.force || broken {
        let why = if broken { "broken" } else { "replaced" };
        let suffix = format!("{why}-{}", files::unix_time());
        steps.push(Step::SetAsideKey {
            private: files::with_suffix(&pair.private, &suffix),
            public: files::with_suffix(&pair.public, &suffix),
        });
        steps.push(Step::GenerateKey);
        return Ok(steps);
    }
    let derived = derived_ed25519(pair)?;
    if !files::has_mode_owner(&private, PRIVATE_KEY_MODE, owner) {
        steps.push(Step::FixPrivateKey);
    }
    let written = pair.read_public()?;
    let public_ok = written
        .as_deref()
        .is_some_and(|w| ssh::same_key(w, &derived))
        && files::state(&pair.public)?
            .is_some_and(|s| files::has_mode_owner(&s, PUBLIC_KEY_MODE, owner));
    if !public_ok {
        steps.push(Step::WritePublicKey);
    }
    Ok(steps)
}

/// The public key of the existing private key, which must be ed25519: a
/// key of another type is not ours to keep or to replace silently.
fn derived_ed25519(pair: &KeyPair) -> Result<String> {
    let derived = pair.derive_public().with_context(|| {
        format!(
            "{} exists but can't be read as a key without a passphrase; move it away, \
             or pass force: true to replace it (the old one is kept beside it)",
            pair.private.display()
        )
    })?;
    if !derived.starts_with("ssh-ed25519 ") {
        bail!(
            "{} holds a {} key, not ed25519; pass force: true to replace it \
             (the old one is kept beside it)",
            pair.private.display(),
            derived.split_whitespace().next().unwrap_or("different")
        );
    }
    Ok(derived)
}

fn apply(step: &Step, args: &Args, account: &mut Option<Account>, pair: &KeyPair) -> Result<()> {
    let owner = |account: &Option<Account>| -> Result<Owner> {
        Ok(account
            .as_ref()
            .context("the account exists by now")?
            .owner())
    };
    let ssh_dir = pair.private.parent().expect("the key is in ~/.ssh");
    match step {
        Step::CreateAccount { home } => *account = Some(Account::create(&args.account, home)?),
        Step::MakeHome { home } => {
            files::ensure_dir(home, HOME_MODE, Some(owner(account)?))?;
        }
        Step::MakeSshDir | Step::FixSshDir => {
            files::ensure_dir(ssh_dir, SSH_DIR_MODE, Some(owner(account)?))?;
        }
        Step::SetAsideKey { private, public } => {
            let (dir, name) = files::Dir::of(&pair.private)?;
            dir.rename(&name, file_name(private)?)?;
            let public_name = file_name(&pair.public)?;
            if dir.state(public_name)?.is_some() {
                dir.rename(public_name, file_name(public)?)?;
            }
        }
        Step::GenerateKey => {
            let comment = match &args.comment {
                Some(comment) => comment.clone(),
                None => format!("{}@{}", args.account, hostname()),
            };
            pair.generate(&comment)?;
            let owner = Some(owner(account)?);
            files::ensure_mode_owner(&pair.private, PRIVATE_KEY_MODE, owner)?;
            files::ensure_mode_owner(&pair.public, PUBLIC_KEY_MODE, owner)?;
        }
        Step::FixPrivateKey => {
            files::ensure_mode_owner(&pair.private, PRIVATE_KEY_MODE, Some(owner(account)?))?;
        }
        Step::WritePublicKey => {
            let derived = pair.derive_public()?;
            files::write_atomic(
                &pair.public,
                format!("{derived}\n").as_bytes(),
                PUBLIC_KEY_MODE,
                Some(owner(account)?),
            )?;
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> Result<&std::ffi::OsStr> {
    path.file_name()
        .with_context(|| format!("{} names no file", path.display()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({}));

    #[test]
    fn a_missing_account_plans_everything() {
        let args: Args = serde_json::from_value(json!({})).unwrap();
        let pair = KeyPair::in_ssh_dir(Path::new("/var/lib/hapair/.ssh"), None);
        let steps = plan_steps(
            &args,
            None,
            Path::new("/var/lib/hapair"),
            &pair,
            &mut Context::default(),
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::CreateAccount {
                    home: "/var/lib/hapair".into()
                },
                Step::MakeSshDir,
                Step::GenerateKey
            ]
        );
    }

    fn scratch_account(name: &str) -> (Account, KeyPair) {
        let home = std::env::temp_dir().join(format!("hapair-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let account = Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: home.clone(),
        };
        let pair = KeyPair::in_ssh_dir(&home.join(".ssh"), None);
        (account, pair)
    }

    #[test]
    fn an_account_left_without_its_home_gets_one() {
        let args: Args = serde_json::from_value(json!({})).unwrap();
        let (account, pair) = scratch_account("nohome");
        let steps = plan_steps(
            &args,
            Some(&account),
            &account.home,
            &pair,
            &mut Context::default(),
        );
        assert_eq!(
            steps.unwrap(),
            vec![
                Step::MakeHome {
                    home: account.home.clone()
                },
                Step::MakeSshDir,
                Step::GenerateKey
            ]
        );
    }

    #[test]
    fn a_key_cut_short_is_made_anew_and_the_broken_one_kept() {
        let args: Args = serde_json::from_value(json!({})).unwrap();
        let (account, pair) = scratch_account("truncated");
        std::fs::create_dir_all(account.home.join(".ssh")).unwrap();
        files::ensure_dir(
            &account.home.join(".ssh"),
            SSH_DIR_MODE,
            Some(account.owner()),
        )
        .unwrap();
        std::fs::write(
            &pair.private,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r",
        )
        .unwrap();
        let mut ctx = Context::default();
        let steps = plan_steps(&args, Some(&account), &account.home, &pair, &mut ctx).unwrap();
        assert!(
            matches!(&steps[..], [Step::SetAsideKey { private, .. }, Step::GenerateKey]
                if private.to_string_lossy().contains(".broken-")),
            "{steps:?}"
        );
        // A whole key that can't be read is still not ours to replace.
        std::fs::write(
            &pair.private,
            "-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = plan_steps(&args, Some(&account), &account.home, &pair, &mut ctx).unwrap_err();
        assert!(format!("{err:#}").contains("force"), "{err:#}");
        std::fs::remove_dir_all(&account.home).unwrap();
    }

    #[test]
    fn backups_get_a_suffix() {
        assert_eq!(
            files::with_suffix(Path::new("/h/.ssh/id_ed25519"), "replaced-5"),
            PathBuf::from("/h/.ssh/id_ed25519.replaced-5")
        );
    }
}
