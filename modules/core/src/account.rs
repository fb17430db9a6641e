//! The cluster account: the OS user that owns the pair's SSH keys, and that
//! rsync and the primary's checks of the secondary log in as.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::command::Command;
use crate::files::Owner;

/// The default cluster account.
pub const DEFAULT_NAME: &str = "hapair";
/// [`DEFAULT_NAME`], for `#[serde(default = "...")]`.
pub fn default_name() -> String {
    DEFAULT_NAME.to_string()
}

/// Where a new cluster account's home goes, under this directory.
pub const DEFAULT_HOME_BASE: &str = "/var/lib";

/// An OS account, as the system's user database reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Account {
    /// Looks `name` up through NSS (`getent passwd`), so accounts from LDAP
    /// and the like are found too.
    pub fn lookup(name: &str) -> Result<Option<Account>> {
        check_name(name)?;
        let output = Command::new("getent").args(["passwd", name]).output()?;
        match output.code {
            Some(0) => parse_passwd_line(output.stdout.trim()).map(Some),
            Some(2) => Ok(None), // getent: key not found
            _ => bail!(
                "can't look up account {name}: getent exited with {:?}: {}",
                output.code,
                output.stderr.trim()
            ),
        }
    }

    /// Creates a system account `name` with its own group and a home at
    /// `home`. The shell is a real one: rsync over SSH needs it.
    pub fn create(name: &str, home: &std::path::Path) -> Result<Account> {
        check_name(name)?;
        Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--create-home",
                "--shell",
                "/bin/bash",
            ])
            .arg("--home-dir")
            .arg(home)
            .args(["--comment", "hapair cluster account", name])
            .run()?;
        Account::lookup(name)?
            .with_context(|| format!("account {name} was created but can't be found"))
    }

    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Refuses names that are not plain POSIX account names, before they reach
/// a command line.
pub fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        bail!(
            "{name:?} is not a valid account name: use lowercase letters, digits, _ and -, \
             starting with a letter, at most 32 characters"
        );
    }
    Ok(())
}

/// Parses one `passwd` line: `name:x:uid:gid:gecos:home:shell`.
pub fn parse_passwd_line(line: &str) -> Result<Account> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() != 7 {
        bail!("unexpected passwd entry: {line:?}");
    }
    let number = |i: usize, what: &str| {
        fields[i]
            .parse::<u32>()
            .with_context(|| format!("bad {what} in passwd entry {line:?}"))
    };
    Ok(Account {
        name: fields[0].to_string(),
        uid: number(2, "uid")?,
        gid: number(3, "gid")?,
        home: PathBuf::from(fields[5]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_passwd_line() {
        let account =
            parse_passwd_line("hapair:x:998:997:hapair cluster account:/var/lib/hapair:/bin/bash")
                .unwrap();
        assert_eq!(
            account,
            Account {
                name: "hapair".into(),
                uid: 998,
                gid: 997,
                home: "/var/lib/hapair".into()
            }
        );
        assert!(parse_passwd_line("broken:x:1").is_err());
        assert!(parse_passwd_line("a:x:uid:1::/h:/bin/sh").is_err());
    }

    #[test]
    fn account_names_are_checked_before_any_command() {
        for good in ["hapair", "_svc", "ha-pair2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Root", "1abc", "a b", "x;rm", "-rf", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn root_is_found_and_a_missing_account_is_none() {
        let root = Account::lookup("root").unwrap().unwrap();
        assert_eq!(root.uid, 0);
        assert_eq!(Account::lookup("hapair-no-such-user").unwrap(), None);
    }
}
