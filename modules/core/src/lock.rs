//! One run at a time: a lock a long step holds while it works, and the
//! trace it leaves for the next run when it is killed.
//!
//! A step that copies for hours (seed step 8) must never run twice at once
//! on a host: after the controller dies, its async copy goes on, and a
//! re-run would race it. The lock is a file under `/run/hapair` (root's),
//! locked with `flock` while the run lives; the kernel drops it when the
//! process dies, however it dies. The file also records the process group
//! of the program the run started, so that the next run can end what a
//! killed run left behind (pg_basebackup's WAL streamer, holding the slot).

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Where the locks live: root's, never a world-writable directory.
pub const LOCK_DIR: &str = "/run/hapair";

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// What a killed earlier run left running, and this run ended.
    pub ended_orphan: Option<u32>,
}

impl RunLock {
    /// Takes the lock `name` for `what` (words for messages), without
    /// waiting. Held by a live run: an error naming its process. Left by a
    /// killed run: its orphaned process group is ended first.
    pub fn take(name: &str, what: &str) -> Result<RunLock> {
        Self::take_in(Path::new(LOCK_DIR), name, what, std::time::Duration::ZERO)
    }

    /// Like [`RunLock::take`], but a live run's lock is waited for, up to
    /// `patience`: for short steps that a timer may be running right now.
    pub fn take_waiting(name: &str, what: &str, patience: std::time::Duration) -> Result<RunLock> {
        Self::take_in(Path::new(LOCK_DIR), name, what, patience)
    }

    pub fn take_in(
        dir: &Path,
        name: &str,
        what: &str,
        patience: std::time::Duration,
    ) -> Result<RunLock> {
        crate::files::ensure_dir(dir, 0o755, None)?;
        let path = dir.join(format!("{name}.lock"));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("can't open {}", path.display()))?;
        let mut attempt = file.try_lock();
        if matches!(attempt, Err(TryLockError::WouldBlock)) && !patience.is_zero() {
            crate::wait::until(patience, std::time::Duration::from_millis(250), || {
                attempt = file.try_lock();
                !matches!(attempt, Err(TryLockError::WouldBlock))
            });
        }
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = recorded(&mut file, "pid").map_or("unknown".into(), |p| p.to_string());
                bail!(
                    "another run of {what} is under way on this host (pid {holder}); two must \
                     never run at once. Wait for it to finish (or stop it), then run again"
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("can't lock {}", path.display()))
            }
        }
        let ended_orphan = recorded(&mut file, "group").filter(|g| {
            let alive = crate::command::group_is_alive(*g);
            if alive {
                crate::command::end_group(*g);
            }
            alive
        });
        let lock = RunLock {
            file,
            path,
            ended_orphan,
        };
        lock.write(None)?;
        Ok(lock)
    }

    /// Records the process group of a program this run started.
    pub fn record_group(&self, group: u32) -> Result<()> {
        self.write(Some(group))
    }

    fn write(&self, group: Option<u32>) -> Result<()> {
        let mut file = &self.file;
        let mut text = format!("pid={}\n", std::process::id());
        if let Some(group) = group {
            text.push_str(&format!("group={group}\n"));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("can't write {}", self.path.display()))
    }
}

/// The number recorded as `key=` in the lock file.
fn recorded(file: &mut File, key: &str) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_patient_run_waits_for_the_lock_to_be_released() {
        let dir = std::env::temp_dir().join(format!("hapair-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let first = RunLock::take_in(&dir, "sync", "the sync", Duration::ZERO).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = RunLock::take_in(&dir, "sync", "the sync", Duration::from_secs(10));
        releaser.join().unwrap();
        assert!(second.is_ok());
        drop(second);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_second_run_is_refused_and_a_killed_runs_group_is_ended() {
        let dir = std::env::temp_dir().join(format!("hapair-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let first = RunLock::take_in(&dir, "copy", "the copy", Duration::ZERO).unwrap();
        let err = RunLock::take_in(&dir, "copy", "the copy", Duration::ZERO).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // A run killed while its program ran: the program's child lives on
        // in the group, its parent gone.
        let mut shell = std::process::Command::new("sh");
        std::os::unix::process::CommandExt::process_group(&mut shell, 0);
        let mut shell = shell
            .args(["-c", "sleep 300 >/dev/null 2>&1 &"])
            .spawn()
            .unwrap();
        let group = shell.id();
        shell.wait().unwrap();
        assert!(crate::command::group_is_alive(group));
        first.record_group(group).unwrap();
        drop(first);
        let second = RunLock::take_in(&dir, "copy", "the copy", Duration::ZERO).unwrap();
        assert_eq!(second.ended_orphan, Some(group));
        assert!(!crate::command::group_is_alive(group));
        drop(second);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
