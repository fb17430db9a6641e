//! The standby copy: how a secondary's PostgreSQL becomes a streaming
//! standby of the primary without ever putting its current data at risk.
//!
//! pg_basebackup copies into a new directory beside the data directory
//! (`DATA.hapair-new`), and each tablespace beside its own; the copy is
//! swapped in by rename, the live data set aside as `.hapair-old` until the
//! copy streams, and a copy that failed is kept as `.hapair-failed-TIME`.
//! Which tablespaces a copy swapped is recorded in root's own directory,
//! never read from one postgres can write.

use std::ffi::{OsStr, OsString};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{conf_quote, Cluster, Upstream};
use crate::command::Command;
use crate::files::{self, Dir, Owner};
use crate::lock::RunLock;
use crate::protocol;
use crate::wait;

/// The standby settings, beside cluster_enter_primary_mode's drop-in.
pub const STANDBY_DROPIN: &str = "hapair-standby.conf";
/// Suffixes of what a copy sets beside a directory it replaces.
pub const NEW: &str = "hapair-new";
pub const OLD: &str = "hapair-old";
pub const FAILED: &str = "hapair-failed";
/// The most tablespaces a copy maps (each costs one start of the copy).
pub const MAX_TABLESPACES: usize = 64;

/// A directory the copy replaces (the data directory, or a tablespace's),
/// opened through its parent, with the names it sets beside it.
pub struct Replaced {
    pub parent: Dir,
    pub name: OsString,
    pub path: PathBuf,
}

impl Replaced {
    pub fn open(path: &Path) -> Result<Replaced> {
        let (parent, name) = Dir::of(path)?;
        Ok(Replaced {
            parent,
            name,
            path: path.to_path_buf(),
        })
    }

    /// `main.hapair-new` and the like.
    pub fn aside(&self, suffix: &str) -> OsString {
        let mut name = self.name.clone();
        name.push(format!(".{suffix}"));
        name
    }

    pub fn aside_path(&self, suffix: &str) -> PathBuf {
        files::with_suffix(&self.path, suffix)
    }

    pub fn exists(&self, name: &OsStr) -> Result<bool> {
        Ok(self.parent.state(name)?.is_some())
    }

    /// Failed copies kept for inspection: `main.hapair-failed-TIME`.
    pub fn failed_copies(&self) -> Result<Vec<PathBuf>> {
        let prefix = self.aside(FAILED).to_string_lossy().into_owned();
        let mut found: Vec<PathBuf> = self
            .parent
            .names()?
            .into_iter()
            .filter(|n| n.to_string_lossy().starts_with(&prefix))
            .map(|n| self.parent.path().join(n))
            .collect();
        found.sort();
        Ok(found)
    }

    /// Moves the live directory aside as `.hapair-old` and the copy in.
    pub fn swap_in(&self) -> Result<()> {
        if self.exists(&self.name)? {
            self.parent.rename(&self.name, &self.aside(OLD))?;
        }
        self.parent.rename(&self.aside(NEW), &self.name)
    }

    /// Puts `.hapair-old` back, keeping what was live as a failed copy.
    /// Returns where the failed copy is, if there was one. With nothing set
    /// aside, what is live is the old data, and stays.
    pub fn put_back(&self) -> Result<Option<PathBuf>> {
        if !self.exists(&self.aside(OLD))? {
            return Ok(None);
        }
        let mut kept = None;
        if self.exists(&self.name)? {
            let failed = self.aside(&format!("{FAILED}-{}", files::unix_time()));
            self.parent.rename(&self.name, &failed)?;
            kept = Some(self.parent.path().join(failed));
        }
        self.parent.rename(&self.aside(OLD), &self.name)?;
        Ok(kept)
    }
}

/// What the copy does beside the live data, recorded in root's own
/// directory before the swap, so that a run killed after it knows which
/// tablespaces it swapped (never read from a directory postgres can write).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CopyRecord {
    pub tablespaces: Vec<PathBuf>,
}

impl CopyRecord {
    pub fn path(record_dir: &Path) -> PathBuf {
        record_dir.join("replicate-postgres.json")
    }

    pub fn load(record_dir: &Path) -> Result<CopyRecord> {
        let path = CopyRecord::path(record_dir);
        match files::read_optional(&path)? {
            Some(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a copy record", path.display())),
            None => Ok(CopyRecord::default()),
        }
    }

    pub fn save(&self, record_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        files::write_atomic(&CopyRecord::path(record_dir), text.as_bytes(), 0o600, None)
    }

    pub fn remove(record_dir: &Path) -> Result<()> {
        let (dir, name) = Dir::of(&CopyRecord::path(record_dir))?;
        dir.remove_all(&name)
    }

    pub fn directories(&self, data_dir: &Path) -> Result<Vec<Replaced>> {
        std::iter::once(data_dir)
            .chain(self.tablespaces.iter().map(PathBuf::as_path))
            .map(Replaced::open)
            .collect()
    }
}

/// A secondary's PostgreSQL becoming (or being) a standby of the primary:
/// everything the copy works with, checked once.
pub struct Standby {
    pub primary: Ipv4Addr,
    /// This host's replication slot on the primary.
    pub slot: String,
    pub data: Replaced,
    pub cluster: Cluster,
    pub upstream: Upstream,
    /// postgres: the owner of the data and of the copy.
    pub owner: Owner,
    /// The standby settings' drop-in.
    pub dropin: PathBuf,
    /// Root's directory, where the copy record is kept.
    pub record_dir: PathBuf,
    /// pg_basebackup's --max-rate.
    pub max_rate: Option<String>,
    /// pg_basebackup's --compress, on the primary's side ([`check_compress`]).
    pub compress: Option<String>,
    /// How long to wait for streaming once started.
    pub stream_timeout: Duration,
}

impl Standby {
    /// This host (at `address` on the pair's network) as a standby of
    /// `upstream`, through its slot there: its data, owned by `owner`, and
    /// the copy record beside `instance_config`.
    pub fn new(
        cluster: Cluster,
        upstream: Upstream,
        address: Ipv4Addr,
        data: Replaced,
        owner: Owner,
        instance_config: &Path,
        stream_timeout: Duration,
    ) -> Standby {
        Standby {
            slot: super::slot_name_for(address),
            dropin: cluster.standby_dropin(),
            primary: upstream.host,
            record_dir: files::parent_of(instance_config),
            max_rate: None,
            compress: None,
            cluster,
            upstream,
            data,
            owner,
            stream_timeout,
        }
    }

    /// The passfile `primary_conninfo` names, beside the data directory: no
    /// password in the configuration.
    pub fn passfile(&self) -> PathBuf {
        files::parent_of(&self.data.path).join("hapair.pgpass")
    }

    /// Plans the standby's passfile and settings (listening on `address`).
    pub fn plan_files(&self, files: &mut files::FilePlan, address: Ipv4Addr) -> Result<()> {
        let passfile = self.passfile();
        files.secret_file(
            &passfile,
            |_| passfile_line(&self.upstream),
            0o600,
            Some(self.owner),
        )?;
        let settings = standby_settings(&self.upstream, &self.slot, &passfile, address)?;
        files.file(&self.dropin, |_| settings, 0o644, Some(self.owner))
    }

    /// Whether this host streams from the primary through its slot.
    pub fn streams(&self) -> Result<bool> {
        Ok(self
            .cluster
            .wal_receiver()?
            .is_some_and(|(status, sender, slot)| {
                status == "streaming" && sender == self.primary.to_string() && slot == self.slot
            }))
    }

    /// Copies the primary beside the live data with pg_basebackup. A tablespace
    /// whose directory here is not empty is copied beside it too: pg_basebackup
    /// names it, and the copy starts again with it mapped.
    pub fn copy(&self, lock: Option<&RunLock>, interactive: bool) -> Result<CopyRecord> {
        let new = self.data.aside_path(NEW);
        let mut record = CopyRecord::default();
        loop {
            // Never the last good data: the live directory is untouched.
            self.remove_copies(&record)?;
            // Made here: postgres may not write beside a tablespace directory.
            for dir in record.directories(&self.data.path)? {
                dir.parent
                    .ensure_dir(&dir.aside(NEW), 0o700, Some(self.owner))?;
            }
            let mut command = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.cluster.bin_dir.join("pg_basebackup"))
                .args(["-d", &self.upstream.conninfo(&[]), "-D"])
                .arg(&new)
                .args(["-X", "stream", "-S", &self.slot, "-c", "fast", "-w"])
                .secret_env("PGPASSWORD", &self.upstream.password)
                .show_stderr(interactive);
            for live in &record.tablespaces {
                let mapped = files::with_suffix(live, NEW);
                command = command.arg(format!(
                    "--tablespace-mapping={}={}",
                    escape_mapping(live),
                    escape_mapping(&mapped)
                ));
            }
            if interactive {
                command = command.arg("--progress");
            }
            if let Some(rate) = &self.max_rate {
                command = command.args(["--max-rate", rate]);
            }
            if let Some(compress) = &self.compress {
                command = command.arg(format!("--compress={compress}"));
            }
            let result = command.run_in_own_group(|group| {
                if let Some(lock) = lock {
                    let _ = lock.record_group(group);
                }
            });
            let error = match result {
                Ok(_) => return Ok(record),
                Err(error) => error,
            };
            let busy = nonempty_directory(&format!("{error:#}"))
                .filter(|dir| *dir != new && !record.tablespaces.contains(dir));
            match busy {
                Some(dir) if record.tablespaces.len() < MAX_TABLESPACES => {
                    files::clean_path("a tablespace directory", &dir)?;
                    record.tablespaces.push(dir);
                }
                _ => {
                    self.remove_copies(&record)?;
                    return Err(error.context(format!(
                        "the copy from the primary failed; {} was not touched and PostgreSQL still \
                         runs on it: nothing was lost",
                        self.data.path.display()
                    )));
                }
            }
        }
    }

    /// Removes the copy being made (the data directory's and each
    /// tablespace's `.hapair-new`): never the last good data.
    pub fn remove_copies(&self, record: &CopyRecord) -> Result<()> {
        for dir in record.directories(&self.data.path)? {
            dir.parent.remove_all(&dir.aside(NEW))?;
        }
        Ok(())
    }

    /// Stops PostgreSQL and swaps every copy in. Any failure puts back what
    /// was moved and starts PostgreSQL again on the old data.
    pub fn swap(&self, record: &CopyRecord) -> Result<()> {
        self.cluster.unit.stop()?;
        let dirs = record.directories(&self.data.path)?;
        for (done, dir) in dirs.iter().enumerate() {
            if let Err(e) = dir.swap_in() {
                for undone in dirs[..=done].iter().rev() {
                    if undone.exists(&undone.aside(OLD))? && undone.exists(&undone.name)? {
                        let _ = undone.parent.rename(&undone.name, &undone.aside(NEW));
                    }
                    let _ = undone.put_back();
                }
                self.cluster.unit.start().context(
                    "the swap failed and the old data is back, but PostgreSQL did not start",
                )?;
                return Err(e.context(format!(
                    "the copy could not be swapped in; the old data is back and PostgreSQL runs on \
                     it. The copy is at {}",
                    dir.aside_path(NEW).display()
                )));
            }
        }
        Ok(())
    }

    /// Starts PostgreSQL on the copy and waits until it streams.
    pub fn start_streaming(&self) -> Result<()> {
        self.cluster.unit.start()?;
        let timeout = self.stream_timeout;
        if !wait::until(timeout, Duration::from_millis(500), || {
            self.streams().unwrap_or(false)
        }) {
            bail!(
                "PostgreSQL did not stream from {} within {timeout:?}",
                self.primary
            );
        }
        Ok(())
    }

    /// Puts the old data back after a failed swap (the data directory and each
    /// tablespace), and returns where the failed copies now are.
    pub fn roll_back(&self, record: &CopyRecord) -> Result<Vec<PathBuf>> {
        let _ = self.cluster.unit.stop();
        let mut kept = Vec::new();
        for dir in record.directories(&self.data.path)? {
            kept.extend(dir.put_back().context("rolling back")?);
        }
        let (dropin_dir, dropin) = Dir::of(&self.dropin)?;
        dropin_dir.remove_all(&dropin)?;
        CopyRecord::remove(&self.record_dir)?;
        self.cluster.unit.start().context(
            "rolling back: the old data directory is back, but PostgreSQL did not start",
        )?;
        Ok(kept)
    }
}

/// The directory pg_basebackup refuses to write into: `directory "/x"
/// exists but is not empty`.
pub fn nonempty_directory(message: &str) -> Option<PathBuf> {
    let (before, _) = message.split_once("\" exists but is not empty")?;
    let (_, dir) = before.rsplit_once("directory \"")?;
    Some(PathBuf::from(dir))
}

/// A path for `--tablespace-mapping`, where `=` must be escaped.
pub fn escape_mapping(path: &Path) -> String {
    path.to_string_lossy().replace('=', "\\=")
}

/// The copy's tablespace links point where pg_basebackup wrote (the
/// `.hapair-new` directories); after the swap the data is at the live
/// paths. A link is replaced only when it points to one of ours, compared
/// with what we asked for: nothing in the copy chooses a path.
pub fn repoint_tablespaces(copy: &Path, record: &CopyRecord, owner: Owner) -> Result<()> {
    if record.tablespaces.is_empty() {
        return Ok(());
    }
    let links = Dir::open(&copy.join("pg_tblspc"))?;
    for name in links.names()? {
        let target = links.read_link(&name)?;
        if let Some(live) = record
            .tablespaces
            .iter()
            .find(|live| files::with_suffix(live, NEW) == target)
        {
            links.replace_link(&name, live, owner)?;
        }
    }
    Ok(())
}

pub fn check_rate(rate: &str) -> Result<()> {
    let digits = rate.trim_end_matches(['k', 'M']);
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "max_rate takes a rate such as 100M or 500k (pg_basebackup's --max-rate), not {:?}",
            protocol::excerpt(rate)
        );
    }
    Ok(())
}

/// The compressions step 8 may ask the primary for: PostgreSQL 15
/// compresses on the server, and pg_basebackup unpacks on the fly into the
/// plain copy. Worth it on a slow link; on a fast one it costs the
/// primary's CPU for nothing.
const SERVER_COMPRESSIONS: &[&str] = &["server-gzip", "server-lz4", "server-zstd"];

/// `compress` as `--compress` takes it: a server-side method, and an
/// optional level (`server-zstd:3`).
pub fn check_compress(compress: &str) -> Result<()> {
    let (method, level) = compress.split_once(':').unwrap_or((compress, "1"));
    let level_ok =
        !level.is_empty() && level.len() <= 2 && level.bytes().all(|b| b.is_ascii_digit());
    if !SERVER_COMPRESSIONS.contains(&method) || !level_ok {
        bail!(
            "compress takes one of {} with an optional level (server-zstd:3), not {:?}",
            SERVER_COMPRESSIONS.join(", "),
            protocol::excerpt(compress)
        );
    }
    Ok(())
}

/// One `.pgpass` line for the primary; `:` and `\` escaped in every field.
pub fn passfile_line(upstream: &Upstream) -> String {
    let field = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
    format!(
        "{}:{}:*:{}:{}\n",
        upstream.host,
        upstream.port,
        field(upstream.user.as_str()),
        field(upstream.password.expose())
    )
}

/// The standby settings: each value quoted for libpq inside the
/// connection string, and the whole for postgresql.conf. The standby
/// listens on the pair's address too: after a failover it serves clients.
pub fn standby_settings(
    upstream: &Upstream,
    slot: &str,
    passfile: &Path,
    address: Ipv4Addr,
) -> Result<String> {
    let passfile = passfile
        .to_str()
        .context("the passfile's path is not UTF-8")?;
    let conninfo = upstream.conninfo(&[("passfile", passfile), ("application_name", slot)]);
    Ok(format!(
        "# Written by hapair's cluster_replicate_postgres: changes here are overwritten.\n\
         listen_addresses = 'localhost,{address}'\n\
         primary_conninfo = {}\n\
         primary_slot_name = {}\n\
         hot_standby = 'on'\n\
         # pg_rewind needs it once this host is the primary and the other\n\
         # host rejoins after a failover.\n\
         wal_log_hints = 'on'\n",
        conf_quote(&conninfo)?,
        conf_quote(slot)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn the_passfile_escapes_and_the_settings_name_the_slot() {
        let upstream = Upstream {
            host: Ipv4Addr::new(10, 0, 0, 1),
            port: 5432,
            user: super::super::default_replication_user(),
            password: Secret::new("a:b\\c"),
        };
        assert_eq!(
            passfile_line(&upstream),
            "10.0.0.1:5432:*:hapair_replication:a\\:b\\\\c\n"
        );
        let settings = standby_settings(
            &upstream,
            "hapair_10_0_0_2",
            Path::new("/it's /p"),
            Ipv4Addr::new(10, 0, 0, 2),
        )
        .unwrap();
        assert!(settings.contains("listen_addresses = 'localhost,10.0.0.2'\n"));
        assert!(settings.contains("primary_slot_name = 'hapair_10_0_0_2'"));
        assert!(
            settings.contains("passfile=''/it\\\\''s /p''"),
            "the path is quoted for libpq, then for the file: {settings}"
        );
        assert!(settings.contains("sslmode=''require'' channel_binding=''require''"));
        assert!(standby_settings(
            &upstream,
            "s",
            Path::new("/a\nrestore_command=x"),
            Ipv4Addr::LOCALHOST
        )
        .is_err());
        assert!(!settings.contains("a:b"));
    }

    #[test]
    fn putting_back_never_moves_live_data_that_was_never_set_aside() {
        let dir = std::env::temp_dir().join(format!("hapair-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("main")).unwrap();
        std::fs::write(dir.join("main/PG_VERSION"), "15\n").unwrap();
        let data = Replaced::open(&dir.join("main")).unwrap();
        // A swap whose first rename failed: nothing is at .hapair-old.
        assert_eq!(data.put_back().unwrap(), None);
        assert!(dir.join("main/PG_VERSION").exists());
        assert!(data.failed_copies().unwrap().is_empty());
        // A swap that went through: the old data comes back, the copy is kept.
        std::fs::create_dir(dir.join("main.hapair-new")).unwrap();
        data.swap_in().unwrap();
        let kept = data.put_back().unwrap().unwrap();
        assert!(dir.join("main/PG_VERSION").exists());
        assert_eq!(data.failed_copies().unwrap(), vec![kept]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn compress_takes_a_server_method_and_a_level() {
        for good in [
            "server-zstd",
            "server-lz4",
            "server-gzip:9",
            "server-zstd:19",
        ] {
            assert!(check_compress(good).is_ok(), "{good}");
        }
        for bad in [
            "zstd",
            "client-zstd",
            "server-zstd:",
            "server-zstd:x",
            "server-zstd:1;rm",
            "none",
            "",
        ] {
            assert!(check_compress(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pg_basebackup_names_the_tablespace_it_refuses() {
        let said = "`runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_basebackup ...` exited \
                    with 1: pg_basebackup: error: directory \"/srv/ts one\" exists but is not \
                    empty / pg_basebackup: removing contents of data directory";
        assert_eq!(nonempty_directory(said), Some(PathBuf::from("/srv/ts one")));
        assert_eq!(nonempty_directory("could not connect"), None);
        assert_eq!(escape_mapping(Path::new("/a=b")), "/a\\=b");
    }

    #[test]
    fn rates_are_bounded() {
        for bad in ["", "fast", "-1", "100G", "1;x"] {
            assert!(check_rate(bad).is_err(), "{bad}");
        }
        for good in ["100M", "512k", "32768"] {
            assert!(check_rate(good).is_ok(), "{good}");
        }
    }
}
