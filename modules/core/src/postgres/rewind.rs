//! pg_rewind: an old primary made a standby of the new one by copying only
//! the blocks the two changed since they parted, not the whole directory.

use anyhow::Result;

use super::{Cluster, Lsn, Upstream};
use crate::command::Command;

/// What pg_rewind said.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewind {
    /// The two parted where the target's WAL ends: nothing to undo.
    NotNeeded { diverged: Option<Lsn> },
    /// The target wrote past the point where the two parted (`diverged`);
    /// those changes are undone.
    Rewound { diverged: Lsn },
    /// It can't be done (the WAL back to the fork is gone, say): pg_rewind's
    /// last words. The target was not modified.
    Impossible(String),
}

/// Runs pg_rewind on `target` (stopped cleanly) from `source` (the new
/// primary, through its `postgres` database). With `dry_run` nothing is
/// modified. A real run that fails part-way leaves the directory unusable:
/// that is an error, for the caller to copy the data anew.
pub fn rewind(target: &Cluster, source: &Upstream, dry_run: bool) -> Result<Rewind> {
    let conninfo = source.conninfo(&[("dbname", "postgres"), ("connect_timeout", "10")]);
    let mut command = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(target.bin_dir.join("pg_rewind"))
        .arg("--target-pgdata")
        .arg(&target.data_dir)
        .args(["--source-server", &conninfo])
        .env("LC_ALL", "C")
        .secret_env("PGPASSWORD", &source.password);
    if dry_run {
        command = command.arg("--dry-run");
    }
    let out = command.output()?;
    // pg_rewind writes its progress to stderr.
    let said = format!("{}\n{}", out.stdout, out.stderr);
    if !out.success() {
        if dry_run {
            return Ok(Rewind::Impossible(last_lines(&said, 3)));
        }
        anyhow::bail!(
            "pg_rewind failed part-way ({}): the data directory can't be used as it is",
            last_lines(&said, 3)
        );
    }
    let diverged = divergence(&said);
    Ok(match (said.contains("no rewind required"), diverged) {
        (false, Some(diverged)) => Rewind::Rewound { diverged },
        (_, diverged) => Rewind::NotNeeded { diverged },
    })
}

/// "servers diverged at WAL location 0/3000060 on timeline 1"
pub fn divergence(text: &str) -> Option<Lsn> {
    let rest = text.split("diverged at WAL location ").nth(1)?;
    Lsn::parse(rest.split_whitespace().next()?).ok()
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_divergence_is_read_from_pg_rewinds_words() {
        let said = "pg_rewind: servers diverged at WAL location 0/5000060 on timeline 1\n\
                    pg_rewind: rewinding from last common checkpoint at 0/4000028 on timeline 1\n";
        assert_eq!(divergence(said), Some(Lsn(0x5000060)));
        assert_eq!(divergence("pg_rewind: no rewind required\n"), None);
        assert_eq!(last_lines("a\n\nb\nc\nd\n", 2), "c; d");
    }
}
