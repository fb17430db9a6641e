//! Files: atomic writes with the owner and mode asked for, and the state
//! idempotency compares against.
//!
//! A write goes to a temporary file in the same directory, which gets its
//! owner and mode, is fsynced, and is renamed over the target; then the
//! directory is fsynced. A reader sees the old file or the new one, never
//! half of one, and a crash leaves one or the other.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::protocol::Diff;

/// Who should own a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What is on disk at a path, for comparing with what should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub mode: u32,
    pub owner: Owner,
    pub is_dir: bool,
}

/// The state of `path`, or `None` when nothing is there.
pub fn state(path: &Path) -> Result<Option<FileState>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(FileState {
            mode: meta.mode() & 0o7777,
            owner: Owner {
                uid: meta.uid(),
                gid: meta.gid(),
            },
            is_dir: meta.is_dir(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("can't read {}", path.display())),
    }
}

/// The state of `path`, which must exist (a service's configuration, say).
pub fn existing(path: &Path) -> Result<FileState> {
    state(path)?.with_context(|| {
        format!(
            "{} does not exist: is the service installed?",
            path.display()
        )
    })
}

/// `path` with `.suffix` appended to its name: `/a/main` -> `/a/main.old`.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    PathBuf::from(name)
}

/// Seconds since the epoch, for naming what is set aside.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads `path` as text, or `None` when it doesn't exist.
pub fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("can't read {}", path.display())),
    }
}

/// Writes `contents` to `path` atomically, with `mode`, owned by `owner`
/// (or by whoever runs the module).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let temp = dir.join(format!(
        ".{}.hapair-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = write_new(&temp, contents, mode, owner).and_then(|()| {
        fs::rename(&temp, path)
            .with_context(|| format!("can't rename {} to {}", temp.display(), path.display()))
    });
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(&dir)
}

fn write_new(temp: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // no wider than asked while it is being filled
        .open(temp)
        .with_context(|| format!("can't create {}", temp.display()))?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("can't chown {}", temp.display()))?;
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("can't chmod {}", temp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("can't write {}", temp.display()))
}

/// Makes `path` a directory with `mode` and `owner`. Returns whether
/// anything changed. Parents are not created: a missing parent is a sign
/// of a wrong path, not something to paper over.
pub fn ensure_dir(path: &Path, mode: u32, owner: Option<Owner>) -> Result<bool> {
    let before = state(path)?;
    if before.is_none() {
        fs::create_dir(path).with_context(|| format!("can't create {}", path.display()))?;
    } else if !before.as_ref().is_some_and(|s| s.is_dir) {
        anyhow::bail!("{} exists but is not a directory", path.display());
    }
    let fixed = ensure_mode_owner(path, mode, owner)?;
    Ok(before.is_none() || fixed)
}

/// Gives an existing `path` its `mode` and `owner`. Returns whether anything
/// changed.
pub fn ensure_mode_owner(path: &Path, mode: u32, owner: Option<Owner>) -> Result<bool> {
    let current = state(path)?.with_context(|| format!("{} does not exist", path.display()))?;
    let mut changed = false;
    if let Some(owner) = owner.filter(|o| *o != current.owner) {
        std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("can't chown {}", path.display()))?;
        changed = true;
    }
    if current.mode != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("can't chmod {}", path.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// Whether `path` has `mode` and (if given) `owner`.
pub fn has_mode_owner(current: &FileState, mode: u32, owner: Option<Owner>) -> bool {
    current.mode == mode && owner.is_none_or(|o| o == current.owner)
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("can't sync directory {}", dir.display()))
}

/// Files to rewrite, each with its new text, owner and mode: planned first
/// (so check mode can report them), written together by [`FilePlan::apply`].
#[derive(Debug, Default)]
pub struct FilePlan {
    pub changes: Vec<FileChange>,
}

/// One file of a [`FilePlan`].
#[derive(Debug)]
pub struct FileChange {
    pub path: PathBuf,
    pub text: String,
    pub mode: u32,
    pub owner: Option<Owner>,
    /// What will be done, for messages.
    pub action: String,
    pub diff: Diff,
}

impl FilePlan {
    /// Like [`FilePlan::file`], for a file that holds a secret: its diff
    /// says that it changed, not what it holds.
    pub fn secret_file(
        &mut self,
        path: &Path,
        edit: impl FnOnce(&str) -> String,
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<()> {
        let planned = self.changes.len();
        self.file(path, edit, mode, owner)?;
        if let Some(change) = self.changes.get_mut(planned) {
            change.diff.before = "(not shown: the file holds a secret)\n".into();
            change.diff.after = "(not shown: the file holds a secret; it changes)\n".into();
        }
        Ok(())
    }

    /// Whether a change to `path` is planned.
    pub fn changes(&self, path: &Path) -> bool {
        self.changes.iter().any(|c| c.path == path)
    }

    /// Plans `path` to hold `edit(current text)`, with `mode` and `owner`.
    pub fn file(
        &mut self,
        path: &Path,
        edit: impl FnOnce(&str) -> String,
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<()> {
        let current = read_optional(path)?;
        let text = edit(current.as_deref().unwrap_or(""));
        let state_ok = state(path)?.is_some_and(|s| has_mode_owner(&s, mode, owner));
        if current.as_deref() == Some(text.as_str()) && state_ok {
            return Ok(());
        }
        self.changes.push(FileChange {
            path: path.to_path_buf(),
            action: format!("write {}", path.display()),
            diff: Diff {
                before: current.unwrap_or_default(),
                after: text.clone(),
                before_header: path.display().to_string(),
                after_header: path.display().to_string(),
            },
            text,
            mode,
            owner,
        });
        Ok(())
    }

    pub fn apply(&self) -> Result<()> {
        for change in &self.changes {
            write_atomic(
                &change.path,
                change.text.as_bytes(),
                change.mode,
                change.owner,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hapair-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_write_replaces_contents_sets_mode_and_leaves_no_temp_file() {
        let dir = scratch("write");
        let path = dir.join("instance.json");
        fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new\n", 0o640, None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(state(&path).unwrap().unwrap().mode, 0o640);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("instance.json")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = scratch("fail");
        let path = dir.join("missing-dir").join("x");
        assert!(write_atomic(&path, b"x", 0o600, None).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ensure_dir_reports_change_once() {
        let dir = scratch("dir");
        let sub = dir.join("ssh");
        assert!(ensure_dir(&sub, 0o700, None).unwrap());
        assert!(!ensure_dir(&sub, 0o700, None).unwrap());
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ensure_dir(&sub, 0o700, None).unwrap());
        assert_eq!(state(&sub).unwrap().unwrap().mode, 0o700);
        fs::remove_dir_all(dir).unwrap();
    }
}
