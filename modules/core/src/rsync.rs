//! rsync: a directory pulled from the peer over SSH, as the cluster account.
//!
//! rsync runs as root here, so that owners (by number), modes, ACLs and
//! extended attributes are written as they are on the peer; its transport
//! is ssh run as the cluster account ([`crate::ssh::peer_transport`]), so
//! on the peer it reads what that account may read. What an operator
//! expects of a copy: `-a` plus hard links, ACLs and xattrs (`-a` alone has
//! none of them), sparse files kept sparse, numeric ids, deletions decided during the transfer and
//! made at its end, partial files kept, updates put in place together at
//! the end. Arguments are protected (`-s`): a path reaches the peer's rsync
//! through its protocol, never its shell.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::account::Account;
use crate::command::{Command, Output};

/// Where each file sync records its outcome, for the report: runtime state
/// in root's directory (after a reboot the timer's first run writes it).
/// The file sync's timer unit (`.timer` and `.service`), and the options
/// its runs take, written by `cluster_replicate_files timer=present`.
pub const SYNC_UNIT: &str = "hapair-files-sync";
pub const SYNC_ARGS: &str = "/etc/hapair/files-sync.args.json";

pub const SYNC_RECORD: &str = "/run/hapair/files-sync.json";

/// One directory pulled from the peer into the same path here.
#[derive(Debug, Clone)]
pub struct Pull<'a> {
    pub account: &'a Account,
    pub peer: Ipv4Addr,
    pub directory: &'a Path,
    /// rsync patterns, relative to `directory` (`/cache/` anchors).
    pub excludes: &'a [String],
    /// The most deletions a run may make.
    pub max_delete: u32,
    pub timeout: Duration,
}

/// What a dry run found: rsync's itemized changes, and how many of them
/// are deletions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Preview {
    pub changes: Vec<String>,
    pub deletions: usize,
}

/// What a run did, from `--stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub files_transferred: u64,
    pub bytes_transferred: u64,
    pub files_deleted: u64,
}

impl Stats {
    /// Adds another run's figures (saturating: they are reports).
    pub fn add(&mut self, other: &Stats) {
        self.files_transferred = self
            .files_transferred
            .saturating_add(other.files_transferred);
        self.bytes_transferred = self
            .bytes_transferred
            .saturating_add(other.bytes_transferred);
        self.files_deleted = self.files_deleted.saturating_add(other.files_deleted);
    }
}

impl Pull<'_> {
    fn command(&self, dry_run: bool) -> Result<Command> {
        let transport = crate::ssh::peer_transport(self.account, self.timeout);
        // rsync splits -e on spaces and honours quotes, not backslashes.
        if let Some(word) = transport
            .iter()
            .find(|w| w.contains([' ', '\'', '"', '\\']))
        {
            bail!("can't hand rsync the ssh command: {word:?} holds a space or a quote");
        }
        let source = format!(
            "{}@{}:{}/",
            self.account.name,
            self.peer,
            self.directory.display()
        );
        let mut command = Command::new("rsync")
            .args([
                "-aHAXS",
                "--numeric-ids",
                "--protect-args",
                "--itemize-changes",
            ])
            .args(["--delete", "--delete-delay", "--partial", "--delay-updates"])
            .args(["-e", &transport.join(" ")]);
        for pattern in self.excludes {
            command = command.arg(format!("--exclude={pattern}"));
        }
        // A dry run counts every deletion; a run stops deleting past the
        // bound too, should the primary change between the two.
        command = match dry_run {
            true => command.arg("--dry-run"),
            false => command
                .arg("--stats")
                .arg(format!("--max-delete={}", self.max_delete.max(1))),
        };
        Ok(command
            .arg(source)
            .arg(format!("{}/", self.directory.display())))
    }

    /// A dry run: what a run would change, nothing changed.
    pub fn preview(&self) -> Result<Preview> {
        let out = self.command(true)?.output()?;
        self.check(&out)?;
        Ok(parse_itemized(&out.stdout))
    }

    /// The run. A `max_delete` exceeded fails it (rsync stops deleting
    /// there): callers preview first, and refuse before any change. With
    /// `progress`, for a person at a terminal, rsync's whole-transfer
    /// progress and its itemized changes are shown on stderr as they come.
    pub fn run(&self, progress: bool) -> Result<(Stats, Option<String>)> {
        let command = self.command(false)?;
        let out = match progress {
            true => {
                eprintln!("pulling {} from {}:", self.directory.display(), self.peer);
                command
                    .arg("--info=progress2")
                    .output_echoing(&mut std::io::stderr())?
            }
            false => command.output()?,
        };
        let warning = self.check(&out)?;
        Ok((parse_stats(&out.stdout), warning))
    }

    /// rsync's exit: 0, or 24 (files vanished on the peer while it ran: a
    /// warning); anything else fails, with what rsync said.
    fn check(&self, out: &Output) -> Result<Option<String>> {
        match out.code {
            Some(0) => Ok(None),
            Some(24) => Ok(Some(format!(
                "some files of {} vanished on {} during the sync",
                self.directory.display(),
                self.peer
            ))),
            code => {
                let said = crate::protocol::excerpt(out.stderr.trim());
                let why = match code {
                    Some(25) => "more deletions than max_delete; the rest were skipped",
                    Some(23) => {
                        "some files or directories could not be read on the peer (missing, or \
                         unreadable by the cluster account)"
                    }
                    Some(255) | Some(12) => {
                        "the peer could not be reached over SSH as the cluster account"
                    }
                    _ => "rsync failed",
                };
                bail!(
                    "syncing {} from {}: {why} (rsync exited with {code:?}): {said}",
                    self.directory.display(),
                    self.peer
                )
            }
        }
    }
}

/// rsync's itemized lines (`>f+++++++++ path`, `*deleting   path`); the
/// directory's own `./` line with only times changed is not a change.
pub fn parse_itemized(text: &str) -> Preview {
    let changes: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.starts_with(".d..t") && l.ends_with(" ./")))
        .map(String::from)
        .collect();
    let deletions = changes
        .iter()
        .filter(|l| l.starts_with("*deleting"))
        .count();
    Preview { changes, deletions }
}

/// The figures of `--stats`.
pub fn parse_stats(text: &str) -> Stats {
    let figure = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| {
                let digits: String = rest
                    .trim_start_matches(':')
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == ',')
                    .filter(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    };
    Stats {
        files_transferred: figure("Number of regular files transferred"),
        bytes_transferred: figure("Total transferred file size"),
        files_deleted: figure("Number of deleted files"),
    }
}

/// The rsync patterns that keep `protected` paths (this host's own state)
/// out of a sync of `directory`: each one under it, anchored.
pub fn protecting(directory: &Path, protected: &[PathBuf]) -> Vec<String> {
    protected
        .iter()
        .filter_map(|p| p.strip_prefix(directory).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(|rel| format!("/{}", rel.display()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itemized_changes_and_deletions_are_counted() {
        let text = ".d..t...... ./\n>f+++++++++ a file\n*deleting   old\n*deleting   dir/\ncd+++++++++ new/\n";
        let preview = parse_itemized(text);
        assert_eq!(preview.deletions, 2);
        assert_eq!(preview.changes.len(), 4);
        assert!(parse_itemized(".d..t...... ./\n").changes.is_empty());
    }

    #[test]
    fn stats_are_read_with_thousands_separators() {
        let text = "Number of files: 12 (reg: 10, dir: 2)\n\
                    Number of created files: 3\n\
                    Number of deleted files: 1 (reg: 1)\n\
                    Number of regular files transferred: 4\n\
                    Total file size: 9,999 bytes\n\
                    Total transferred file size: 1,234,567 bytes\n";
        assert_eq!(
            parse_stats(text),
            Stats {
                files_transferred: 4,
                bytes_transferred: 1_234_567,
                files_deleted: 1
            }
        );
        assert_eq!(parse_stats(""), Stats::default());
    }

    #[test]
    fn this_hosts_state_is_excluded_where_it_lies_under_a_directory() {
        let protected = [
            PathBuf::from("/etc/hapair"),
            PathBuf::from("/var/lib/hapair/.ssh"),
        ];
        assert_eq!(protecting(Path::new("/etc"), &protected), vec!["/hapair"]);
        assert_eq!(
            protecting(Path::new("/var/lib"), &protected),
            vec!["/hapair/.ssh"]
        );
        assert!(protecting(Path::new("/srv/app"), &protected).is_empty());
    }
}
