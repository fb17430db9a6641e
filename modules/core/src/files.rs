//! Files: atomic writes with the owner and mode asked for, and the state
//! idempotency compares against, done so that root can't be turned against
//! itself.
//!
//! The modules run as root, often in directories that another account can
//! write: `~hapair/.ssh` (the cluster account), `/etc/postgresql/15/main`
//! (postgres), `/etc/redis` (redis), a data directory. Whatever that account
//! left there is hostile. So every read, write, chmod and chown goes through
//! a [`Dir`]:
//! - the directory is reached by a walk from `/` that follows a symlink only
//!   in a directory no one but root can write (a link root itself made);
//! - each file is opened relative to that directory with `O_NOFOLLOW`, and
//!   must be what it should be (a regular file, a directory), else it is
//!   refused with a message naming it;
//! - modes and owners are set on the open file descriptor, never by path.
//!
//! A write goes to a new temporary file in the same directory (`O_EXCL`),
//! which gets its owner and mode, is fsynced, and is renamed over the
//! target; then the directory is fsynced. A reader sees the old file or the
//! new one, never half of one, and a crash leaves one or the other.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::protocol::Diff;

/// Who should own a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What kind of thing is at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device, fifo or socket: never something hapair writes.
    Other,
}

/// What is on disk at a path (the path itself: a symlink is not followed),
/// for comparing with what should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub mode: u32,
    pub owner: Owner,
    pub kind: Kind,
}

impl FileState {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    /// The mode to give a rewritten configuration file: the one found, less
    /// what no configuration file should have (execute, setuid, setgid,
    /// sticky, world-writable). What another account left there is not
    /// copied unbounded.
    pub fn config_mode(&self) -> u32 {
        self.mode & 0o664
    }

    fn of(stat: &rustix::fs::Stat) -> FileState {
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        FileState {
            mode: stat.st_mode & 0o7777,
            owner: Owner {
                uid: stat.st_uid,
                gid: stat.st_gid,
            },
            kind,
        }
    }
}

/// The most a file read by a module may hold: configuration files and keys
/// are small, and a huge one planted by another account must not exhaust
/// memory.
const MAX_READ: u64 = 64 * 1024 * 1024;

/// Symlinks followed in one walk, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// A directory, opened so that what it holds can be read and written
/// without following symlinks. Made by [`Dir::open`].
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory at `path` (absolute, or relative to the current
    /// directory). A symlink on the way is followed only when the directory
    /// holding it is owned by root and writable by no one else: a link
    /// another account planted is refused, with a message naming it.
    pub fn open(path: &Path) -> Result<Dir> {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .context("can't tell the current directory")?
                .join(path)
        };
        let mut pending: Vec<OsString> = Vec::new();
        for component in absolute.components().rev() {
            match component {
                Component::Normal(name) => pending.push(name.to_owned()),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir => bail!(
                    "{} has a '..' in it: give the path without it",
                    path.display()
                ),
                Component::Prefix(_) => bail!("{} is not a Unix path", path.display()),
            }
        }
        let root = || open_dir_fd(rustix::fs::CWD, "/");
        let mut fd = root().context("can't open /")?;
        let mut at = PathBuf::from("/");
        let mut links = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                // Only from a link root made: the parent, found by the
                // kernel, as no link was followed on the way here.
                fd = open_dir_fd(&fd, "..").map_err(|e| io_error(e, &at))?;
                at.pop();
                continue;
            }
            let stat = rustix::fs::statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_error(e, &at.join(&name)))?;
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {
                    fd = open_dir_fd(&fd, name.as_os_str())
                        .map_err(|e| io_error(e, &at.join(&name)))?;
                    at.push(&name);
                }
                FileType::Symlink => {
                    let holder = FileState::of(&rustix::fs::fstat(&fd)?);
                    if holder.owner.uid != 0 || holder.mode & 0o022 != 0 {
                        bail!(
                            "{} is a symlink in {}, a directory that another account can \
                             write: hapair does not follow it. Replace the link with the \
                             directory itself, or give the real path",
                            at.join(&name).display(),
                            at.display()
                        );
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        bail!("too many symlinks on the way to {}", path.display());
                    }
                    let target = rustix::fs::readlinkat(&fd, name.as_os_str(), Vec::new())
                        .map_err(|e| io_error(e, &at.join(&name)))?;
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        fd = root()?;
                        at = PathBuf::from("/");
                    }
                    for component in target.components().rev() {
                        match component {
                            Component::Normal(part) => pending.push(part.to_owned()),
                            Component::ParentDir => pending.push("..".into()),
                            _ => {}
                        }
                    }
                }
                _ => bail!("{} is not a directory", at.join(&name).display()),
            }
        }
        Ok(Dir { fd, path: at })
    }

    /// The parent directory of `path`, opened, and the name in it.
    pub fn of(path: &Path) -> Result<(Dir, OsString)> {
        let name = path
            .file_name()
            .with_context(|| format!("{} does not name a file", path.display()))?;
        if path.to_string_lossy().ends_with('/') {
            bail!(
                "{} ends with a slash: give the path without it",
                path.display()
            );
        }
        Ok((Dir::open(&parent_of(path))?, name.to_owned()))
    }

    /// Where this directory is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn show(&self, name: &OsStr) -> String {
        self.path.join(name).display().to_string()
    }

    /// The state of `name` (a symlink is reported as one), or `None`.
    pub fn state(&self, name: &OsStr) -> Result<Option<FileState>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(FileState::of(&stat))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_error(e, &self.path.join(name))),
        }
    }

    /// Opens `name` for reading without following a symlink; it must be a
    /// regular file.
    fn open_file(&self, name: &OsStr) -> Result<Option<File>> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => bail!("{}", self.not_regular(name, Kind::Symlink)),
            Err(e) => return Err(io_error(e, &self.path.join(name))),
        };
        let state = FileState::of(&rustix::fs::fstat(&fd)?);
        if state.kind != Kind::File {
            bail!("{}", self.not_regular(name, state.kind));
        }
        Ok(Some(File::from(fd)))
    }

    fn not_regular(&self, name: &OsStr, kind: Kind) -> String {
        let what = match kind {
            Kind::Symlink => "a symlink",
            Kind::Dir => "a directory",
            _ => "not a regular file",
        };
        format!(
            "{} is {what}: hapair reads and writes only regular files there, and never \
             follows a link. Replace it with the file itself",
            self.show(name)
        )
    }

    /// Reads `name` as text, or `None` when it doesn't exist.
    pub fn read(&self, name: &OsStr) -> Result<Option<String>> {
        let Some(file) = self.open_file(name)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        file.take(MAX_READ + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("can't read {}", self.show(name)))?;
        if bytes.len() as u64 > MAX_READ {
            bail!(
                "{} is larger than {} MiB: not a file hapair wrote or reads",
                self.show(name),
                MAX_READ >> 20
            );
        }
        String::from_utf8(bytes)
            .map(Some)
            .with_context(|| format!("{} is not UTF-8 text", self.show(name)))
    }

    /// Writes `contents` to `name` atomically, with `mode`, owned by `owner`
    /// (or by whoever runs the module). Whatever was at `name` (a symlink
    /// included) is replaced, never written through; a directory is refused.
    pub fn write_atomic(
        &self,
        name: &OsStr,
        contents: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<()> {
        if self.state(name)?.is_some_and(|s| s.is_dir()) {
            bail!("{} is a directory, not a file", self.show(name));
        }
        let mut temp = OsString::from(".");
        temp.push(name);
        temp.push(format!(".hapair-{}", std::process::id()));
        // A temp file left by a killed run of this same pid is ours to drop.
        let _ = rustix::fs::unlinkat(&self.fd, temp.as_os_str(), AtFlags::empty());
        let written = self.write_new(&temp, contents, mode, owner).and_then(|()| {
            rustix::fs::renameat(&self.fd, temp.as_os_str(), &self.fd, name)
                .with_context(|| format!("can't rename into {}", self.show(name)))
        });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_os_str(), AtFlags::empty());
        }
        written?;
        rustix::fs::fsync(&self.fd)
            .with_context(|| format!("can't sync directory {}", self.path.display()))
    }

    fn write_new(
        &self,
        temp: &OsStr,
        contents: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<()> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // No wider than 0600 while it is being filled.
        let fd = rustix::fs::openat(&self.fd, temp, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| io_error(e, &self.path.join(temp)))?;
        set_owner_mode(&fd, owner, mode).with_context(|| self.show(temp))?;
        let mut file = File::from(fd);
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("can't write {}", self.show(temp)))
    }

    /// Makes `name` a directory with `mode` and `owner`. Returns whether
    /// anything changed. A symlink there is refused, not followed.
    pub fn ensure_dir(&self, name: &OsStr, mode: u32, owner: Option<Owner>) -> Result<bool> {
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io_error(e, &self.path.join(name))),
        };
        let fd = open_dir_fd(&self.fd, name).map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => anyhow::anyhow!(
                "{} exists but is not a directory (a symlink or a file); move it away",
                self.show(name)
            ),
            e => io_error(e, &self.path.join(name)),
        })?;
        let fixed = fix_owner_mode(&fd, mode, owner).with_context(|| self.show(name))?;
        Ok(created || fixed)
    }

    /// Gives `name` (a regular file or a directory, never a link) its `mode`
    /// and `owner`. Returns whether anything changed.
    pub fn ensure_mode_owner(&self, name: &OsStr, mode: u32, owner: Option<Owner>) -> Result<bool> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => bail!("{}", self.not_regular(name, Kind::Symlink)),
            Err(e) => return Err(io_error(e, &self.path.join(name))),
        };
        let kind = FileState::of(&rustix::fs::fstat(&fd)?).kind;
        if kind != Kind::File && kind != Kind::Dir {
            bail!("{}", self.not_regular(name, kind));
        }
        fix_owner_mode(&fd, mode, owner).with_context(|| self.show(name))
    }

    /// Renames `from` to `to`, both in this directory. Neither is followed.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)
            .with_context(|| format!("can't rename {} to {}", self.show(from), self.show(to)))?;
        rustix::fs::fsync(&self.fd)
            .with_context(|| format!("can't sync directory {}", self.path.display()))
    }

    /// Removes `name` and, for a directory, everything in it, without
    /// following a symlink anywhere. Nothing there is not an error.
    pub fn remove_all(&self, name: &OsStr) -> Result<()> {
        remove_tree(&self.fd, name)
            .map_err(|e| anyhow::anyhow!("can't remove {}: {e}", self.show(name)))
    }

    /// Where the symlink `name` points (read, never followed).
    pub fn read_link(&self, name: &OsStr) -> Result<PathBuf> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map_err(|e| io_error(e, &self.path.join(name)))?;
        Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
    }

    /// Makes `name` a symlink to `target`, owned by `owner`, replacing what
    /// is there in one rename.
    pub fn replace_link(&self, name: &OsStr, target: &Path, owner: Owner) -> Result<()> {
        let mut temp = OsString::from(".");
        temp.push(name);
        temp.push(format!(".hapair-{}", std::process::id()));
        let _ = rustix::fs::unlinkat(&self.fd, temp.as_os_str(), AtFlags::empty());
        rustix::fs::symlinkat(target, &self.fd, temp.as_os_str())
            .map_err(|e| io_error(e, &self.path.join(&temp)))?;
        rustix::fs::chownat(
            &self.fd,
            temp.as_os_str(),
            Some(rustix::fs::Uid::from_raw(owner.uid)),
            Some(rustix::fs::Gid::from_raw(owner.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_error(e, &self.path.join(&temp)))?;
        self.rename(&temp, name)
    }

    /// Whether `name` is a mount point: on another filesystem than this
    /// directory, or a bind mount of the same one (another mount id).
    pub fn is_mount_point(&self, name: &OsStr) -> Result<bool> {
        use rustix::fs::{statx, StatxFlags};
        let mask = StatxFlags::MNT_ID | StatxFlags::BASIC_STATS;
        let here =
            statx(&self.fd, "", AtFlags::EMPTY_PATH, mask).map_err(|e| io_error(e, &self.path))?;
        let there = statx(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW, mask)
            .map_err(|e| io_error(e, &self.path.join(name)))?;
        let other_device =
            (here.stx_dev_major, here.stx_dev_minor) != (there.stx_dev_major, there.stx_dev_minor);
        let mount_ids = here.stx_mask & there.stx_mask & StatxFlags::MNT_ID.bits() != 0;
        Ok(other_device || mount_ids && here.stx_mnt_id != there.stx_mnt_id)
    }

    /// The names in this directory, `.` and `..` left out.
    pub fn names(&self) -> Result<Vec<OsString>> {
        let fd = open_dir_fd(&self.fd, ".")?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
}

fn open_dir_fd<P: rustix::path::Arg, Fd: std::os::fd::AsFd>(
    at: Fd,
    name: P,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn remove_tree(at: &OwnedFd, name: &OsStr) -> rustix::io::Result<()> {
    let stat = match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(at, name, AtFlags::empty());
    }
    let dir = open_dir_fd(at, name)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let entry_name = OsStr::from_bytes(entry.file_name().to_bytes());
        if entry_name != "." && entry_name != ".." {
            names.push(entry_name.to_owned());
        }
    }
    for entry_name in names {
        remove_tree(&dir, &entry_name)?;
    }
    rustix::fs::unlinkat(at, name, AtFlags::REMOVEDIR)
}

fn set_owner_mode(fd: &OwnedFd, owner: Option<Owner>, mode: u32) -> Result<()> {
    if let Some(owner) = owner {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(owner.uid)),
            Some(rustix::fs::Gid::from_raw(owner.gid)),
        )
        .context("can't chown")?;
    }
    // After chown, which clears setuid and setgid bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).context("can't chmod")
}

fn fix_owner_mode(fd: &OwnedFd, mode: u32, owner: Option<Owner>) -> Result<bool> {
    let current = FileState::of(&rustix::fs::fstat(fd)?);
    let owner_off = owner.is_some_and(|o| o != current.owner);
    if !owner_off && current.mode == mode {
        return Ok(false);
    }
    set_owner_mode(fd, owner.filter(|_| owner_off), mode)?;
    Ok(true)
}

fn io_error(errno: Errno, path: &Path) -> anyhow::Error {
    let error = std::io::Error::from(errno);
    let kind = error.kind();
    anyhow::Error::new(std::io::Error::new(
        kind,
        format!("{}: {error}", path.display()),
    ))
}

/// Whether `error` says that something does not exist.
pub fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The state of `path` (a symlink is reported as one, not followed), or
/// `None` when nothing is there.
pub fn state(path: &Path) -> Result<Option<FileState>> {
    if path == Path::new("/") {
        return Ok(Some(FileState::of(&rustix::fs::stat("/")?)));
    }
    let (dir, name) = match Dir::of(path) {
        Ok(found) => found,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    dir.state(&name)
}

/// The state of `path`, which must exist and be a file or a directory (a
/// service's configuration, say).
pub fn existing(path: &Path) -> Result<FileState> {
    let state = state(path)?.with_context(|| {
        format!(
            "{} does not exist: is the service installed?",
            path.display()
        )
    })?;
    match state.kind {
        Kind::File | Kind::Dir => Ok(state),
        Kind::Symlink => bail!(
            "{} is a symlink: hapair does not follow links in directories that other \
             accounts can write. Replace it with the file itself",
            path.display()
        ),
        Kind::Other => bail!("{} is not a regular file or directory", path.display()),
    }
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

/// Reads `path` as text, or `None` when it doesn't exist. A symlink or
/// anything but a regular file is refused.
pub fn read_optional(path: &Path) -> Result<Option<String>> {
    let (dir, name) = match Dir::of(path) {
        Ok(found) => found,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    dir.read(&name)
}

/// Writes `contents` to `path` atomically, with `mode`, owned by `owner`
/// (or by whoever runs the module). See [`Dir::write_atomic`].
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> Result<()> {
    let (dir, name) = Dir::of(path)?;
    dir.write_atomic(&name, contents, mode, owner)
}

/// Makes `path` a directory with `mode` and `owner`. Returns whether
/// anything changed. Parents are not created: a missing parent is a sign
/// of a wrong path, not something to paper over.
pub fn ensure_dir(path: &Path, mode: u32, owner: Option<Owner>) -> Result<bool> {
    let (dir, name) = Dir::of(path)?;
    dir.ensure_dir(&name, mode, owner)
}

/// Gives an existing `path` its `mode` and `owner`. Returns whether anything
/// changed.
pub fn ensure_mode_owner(path: &Path, mode: u32, owner: Option<Owner>) -> Result<bool> {
    let (dir, name) = Dir::of(path)?;
    dir.ensure_mode_owner(&name, mode, owner)
}

/// Whether `path` has `mode` and (if given) `owner`.
pub fn has_mode_owner(current: &FileState, mode: u32, owner: Option<Owner>) -> bool {
    current.mode == mode && owner.is_none_or(|o| o == current.owner)
}

/// `path` as an option must be given: absolute, without `.` or `..`, and
/// without control characters. A trailing slash is dropped, so that
/// `/var/lib/postgresql/15/main/` is the directory, not a place inside it.
/// `what` names the option in the message.
pub fn clean_path(what: &str, path: &Path) -> Result<PathBuf> {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        bail!(
            "{what}: {:?} is not an absolute path",
            crate::protocol::excerpt(&text)
        );
    }
    if text.chars().any(char::is_control) {
        bail!("{what}: the path holds a control character");
    }
    let mut clean = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => clean.push(name),
            _ => bail!(
                "{what}: {:?} has a '.' or '..' in it: give the plain path",
                crate::protocol::excerpt(&text)
            ),
        }
    }
    if text.split('/').any(|part| part == "." || part == "..") {
        bail!(
            "{what}: {:?} has a '.' or '..' in it: give the plain path",
            crate::protocol::excerpt(&text)
        );
    }
    if clean == Path::new("/") {
        bail!("{what}: / is not a directory hapair can replace");
    }
    Ok(clean)
}

/// The lines of a configuration file as its editors see them: split at
/// `\n` only, each kept byte for byte (a `\r` of a CRLF file stays part of
/// its line), so that an edit changes no line it doesn't own.
pub fn config_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_terminator('\n')
}

/// Lines back into a file's text, each ending with `\n`.
pub fn join_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// A line as a marker or setting is compared: without a CRLF's `\r`.
pub fn line_content(line: &str) -> &str {
    line.strip_suffix('\r').unwrap_or(line)
}

/// `text` without the lines that set one of `keys` (the first word of the
/// line, before blanks or `=`, compared without case as Redis and
/// PostgreSQL read their settings); every other line kept as it is.
pub fn without_settings(text: &str, keys: &[&str]) -> String {
    join_lines(config_lines(text).filter(|line| {
        let key = line_content(line)
            .trim_start()
            .split(|c: char| c.is_whitespace() || c == '=')
            .next()
            .unwrap_or("");
        !keys.iter().any(|k| k.eq_ignore_ascii_case(key))
    }))
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
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

    /// Says what the planned change of `path` does, in the module's words
    /// ("let the role in from 10.0.0.2/32") rather than "write PATH".
    pub fn describe(&mut self, path: &Path, action: impl Into<String>) {
        if let Some(change) = self.changes.iter_mut().find(|c| c.path == path) {
            change.action = action.into();
        }
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
        self.try_file(path, |text| Ok(edit(text)), mode, owner)
    }

    /// Like [`FilePlan::file`], for an edit that can refuse the current text.
    pub fn try_file(
        &mut self,
        path: &Path,
        edit: impl FnOnce(&str) -> Result<String>,
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<()> {
        let current = read_optional(path)?;
        let text = edit(current.as_deref().unwrap_or(""))
            .with_context(|| format!("{}", path.display()))?;
        let state_ok = state(path)?.is_some_and(|s| has_mode_owner(&s, mode, owner));
        let written = current.as_deref() == Some(text.as_str()) && state_ok;
        let unsettled = written && crate::unsettled::is_unsettled(path)?;
        if written && !unsettled {
            return Ok(());
        }
        self.changes.push(FileChange {
            path: path.to_path_buf(),
            action: match unsettled {
                true => format!(
                    "write {} again: a run that wrote it stopped before its service took it",
                    path.display()
                ),
                false => format!("write {}", path.display()),
            },
            // Whatever a config file holds, a diff never shows a secret.
            diff: Diff {
                before: crate::secret::mask_secret_lines(&current.unwrap_or_default()),
                after: crate::secret::mask_secret_lines(&text),
                before_header: path.display().to_string(),
                after_header: path.display().to_string(),
            },
            text,
            mode,
            owner,
        });
        Ok(())
    }

    /// Writes the planned files, each recorded first as unsettled until the
    /// module ends well (see [`crate::unsettled`]).
    pub fn apply(&self) -> Result<()> {
        let paths: Vec<&Path> = self.changes.iter().map(|c| c.path.as_path()).collect();
        crate::unsettled::record(&paths)?;
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
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

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
    fn settings_are_removed_by_key_and_nothing_else() {
        let text = "bind 1.2.3.4\nreplicaof 10.0.0.1 6379\nREPLICA-read-only yes\n# replicaof x\n";
        assert_eq!(
            without_settings(text, &["replicaof", "replica-read-only"]),
            "bind 1.2.3.4\n# replicaof x\n"
        );
        let pg = "listen_addresses = 'x'\nprimary_conninfo='host=a'\nprimary_slot_name = 's'\n";
        assert_eq!(
            without_settings(pg, &["primary_conninfo", "primary_slot_name"]),
            "listen_addresses = 'x'\n"
        );
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

    /// A directory that another account can write, as ~hapair/.ssh is.
    fn hostile(name: &str) -> PathBuf {
        let dir = scratch(name);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }

    #[test]
    fn a_symlink_is_never_read_through() {
        let dir = hostile("read-link");
        let secret = dir.join("root-only");
        fs::write(&secret, "root's secret\n").unwrap();
        symlink(&secret, dir.join("authorized_keys")).unwrap();
        let err = read_optional(&dir.join("authorized_keys")).unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        // A plan that would keep the current text refuses too.
        let mut plan = FilePlan::default();
        let err = plan
            .file(
                &dir.join("authorized_keys"),
                |t| format!("{t}x\n"),
                0o600,
                None,
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_write_replaces_a_symlink_and_never_writes_through_it() {
        let dir = hostile("write-link");
        let target = dir.join("target");
        fs::write(&target, "untouched").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o4755)).unwrap();
        let link = dir.join("pg_hba.conf");
        symlink(&target, &link).unwrap();
        write_atomic(&link, b"new\n", 0o640, None).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o4755);
        let written = fs::symlink_metadata(&link).unwrap();
        assert!(written.is_file());
        assert_eq!(written.mode() & 0o7777, 0o640);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn modes_and_owners_are_never_set_through_a_symlink() {
        let dir = hostile("chmod-link");
        let target = dir.join("setuid-program");
        fs::write(&target, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o4755)).unwrap();
        symlink(&target, dir.join("id_ed25519")).unwrap();
        assert!(ensure_mode_owner(&dir.join("id_ed25519"), 0o600, None).is_err());
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o4755);
        // ensure_dir on a link to a directory: refused, the target untouched.
        let real = dir.join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        symlink(&real, dir.join(".ssh")).unwrap();
        let err = ensure_dir(&dir.join(".ssh"), 0o700, None).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o7777, 0o755);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlinked_directory_in_a_writable_directory_is_not_followed() {
        let dir = hostile("dir-link");
        let elsewhere = scratch("dir-link-target");
        symlink(&elsewhere, dir.join(".ssh")).unwrap();
        let err = write_atomic(&dir.join(".ssh/authorized_keys"), b"k\n", 0o600, None).unwrap_err();
        assert!(format!("{err:#}").contains("does not follow it"), "{err:#}");
        assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
        fs::remove_dir_all(dir).unwrap();
        fs::remove_dir_all(elsewhere).unwrap();
    }

    #[test]
    fn a_symlink_only_root_could_make_is_followed() {
        // /proc/self -> <pid>, in root's /proc: a link made by the system.
        let dir = Dir::open(Path::new("/proc/self")).unwrap();
        assert!(dir.state(OsStr::new("status")).unwrap().is_some());
        // A relative link with '..', in a directory only root can write.
        let root_dir = std::env::temp_dir().join(format!("hapair-rootlink-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root_dir);
        fs::create_dir_all(root_dir.join("real/inner")).unwrap();
        fs::set_permissions(&root_dir, fs::Permissions::from_mode(0o755)).unwrap();
        symlink("real/inner/..", root_dir.join("link")).unwrap();
        let dir = Dir::open(&root_dir.join("link")).unwrap();
        assert_eq!(dir.path(), root_dir.join("real"));
        assert!(dir.state(OsStr::new("inner")).unwrap().unwrap().is_dir());
        fs::remove_dir_all(root_dir).unwrap();
    }

    #[test]
    fn fifos_and_huge_files_are_refused() {
        let dir = hostile("fifo");
        let fifo = dir.join("known_hosts");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let err = read_optional(&fifo).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn option_paths_are_cleaned_or_refused() {
        assert_eq!(
            clean_path("data_dir", Path::new("/var/lib/postgresql/15/main/")).unwrap(),
            PathBuf::from("/var/lib/postgresql/15/main")
        );
        for bad in ["relative/main", "/a/../b", "/a/./b", "/", "/a\nb"] {
            assert!(clean_path("data_dir", Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_points_are_told_apart_from_directories() {
        let root = Dir::open(Path::new("/")).unwrap();
        assert!(root.is_mount_point(OsStr::new("proc")).unwrap());
        assert!(!root.is_mount_point(OsStr::new("etc")).unwrap());
    }

    #[test]
    fn config_modes_are_bounded() {
        let found = FileState {
            mode: 0o4777,
            owner: Owner { uid: 0, gid: 0 },
            kind: Kind::File,
        };
        assert_eq!(found.config_mode(), 0o664);
    }

    #[test]
    fn remove_all_does_not_follow_links_inside() {
        let dir = hostile("remove");
        let outside = scratch("remove-outside");
        fs::write(outside.join("keep"), "x").unwrap();
        let tree = dir.join("main.hapair-new");
        fs::create_dir(&tree).unwrap();
        symlink(&outside, tree.join("link")).unwrap();
        fs::write(tree.join("file"), "x").unwrap();
        Dir::open(&dir)
            .unwrap()
            .remove_all(OsStr::new("main.hapair-new"))
            .unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
        fs::remove_dir_all(dir).unwrap();
        fs::remove_dir_all(outside).unwrap();
    }
}
