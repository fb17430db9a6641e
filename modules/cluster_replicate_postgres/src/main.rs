//! `cluster_replicate_postgres`: seed step 8, on the secondary.
//!
//! Makes this host's PostgreSQL a streaming standby of the primary, without
//! ever putting its current data at risk. One run at a time: a lock, and
//! what a killed run left running (its pg_basebackup, holding the slot) is
//! ended first. Then:
//! 1. Already streaming from this primary, through this host's slot, with
//!    the primary's system identifier: nothing to do, nothing touched.
//! 2. A protected instance is refused.
//! 3. The primary is checked before anything changes here: reachable, a
//!    replication login, `wal_level`, this host's slot.
//! 4. pg_basebackup copies into a new directory beside the data directory,
//!    and each tablespace beside its own directory. The copy is verified
//!    (the primary's system identifier) before it is used.
//! 5. Protection is checked again, PostgreSQL stops, the copy is swapped in,
//!    and PostgreSQL starts as a standby. Only once `pg_stat_wal_receiver`
//!    shows streaming is the old data removed (or kept, with
//!    `keep_old_data`).
//!
//! A failure at any point leaves the old data in place and PostgreSQL
//! running on it; the message says what failed. What a killed run left is
//! recovered when that can be decided (the old data put back, or removed
//! once the copy streams), and every failed copy kept for inspection is
//! named in each later run's result until the operator removes it.

use std::ffi::{OsStr, OsString};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::command::Command;
use hapair_core::files::{self, Dir, FilePlan, Owner};
use hapair_core::instance::{self, InstanceConfig, Key};
use hapair_core::lock::RunLock;
use hapair_core::postgres::{self, Cluster, RoleName, Upstream};
use hapair_core::protocol::Seconds;
use hapair_core::{net, protocol, wait, Context, Outcome, Secret, Spec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const SPEC: Spec = Spec {
    name: "cluster_replicate_postgres",
    doc: include_str!("../cluster_replicate_postgres.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    primary_address: String,
    replication_password: Secret,
    #[serde(default = "postgres::default_replication_user")]
    replication_user: RoleName,
    /// This host's address on the pair's network (names its slot); found
    /// from the route to the primary when not given.
    #[serde(default)]
    address: Option<String>,
    #[serde(default = "postgres::default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_bin_dir")]
    postgresql_bin_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    /// Keep the replaced data directory (as DATA_DIR.hapair-old) instead of
    /// removing it once the copy streams.
    #[serde(default, deserialize_with = "protocol::ansible_bool")]
    keep_old_data: bool,
    /// Limit the copy's bandwidth, e.g. `100M` (pg_basebackup's --max-rate).
    #[serde(default)]
    max_rate: Option<String>,
    /// Seconds to wait for streaming after the swap.
    #[serde(default = "default_stream_timeout")]
    stream_timeout: Seconds,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_stream_timeout() -> Seconds {
    Seconds::new(120)
}

/// The standby settings, beside cluster_enter_primary_mode's drop-in.
const STANDBY_DROPIN: &str = "hapair-standby.conf";
/// Suffixes of what a copy sets beside a directory it replaces.
const NEW: &str = "hapair-new";
const OLD: &str = "hapair-old";
const FAILED: &str = "hapair-failed";
/// The most tablespaces a copy maps (each costs one start of the copy).
const MAX_TABLESPACES: usize = 64;

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_replicate_postgres)
}

/// A directory the copy replaces (the data directory, or a tablespace's),
/// opened through its parent, with the names it sets beside it.
struct Replaced {
    parent: Dir,
    name: OsString,
    path: PathBuf,
}

impl Replaced {
    fn open(path: &Path) -> Result<Replaced> {
        let (parent, name) = Dir::of(path)?;
        Ok(Replaced {
            parent,
            name,
            path: path.to_path_buf(),
        })
    }

    /// `main.hapair-new` and the like.
    fn aside(&self, suffix: &str) -> OsString {
        let mut name = self.name.clone();
        name.push(format!(".{suffix}"));
        name
    }

    fn aside_path(&self, suffix: &str) -> PathBuf {
        files::with_suffix(&self.path, suffix)
    }

    fn exists(&self, name: &OsStr) -> Result<bool> {
        Ok(self.parent.state(name)?.is_some())
    }

    /// Failed copies kept for inspection: `main.hapair-failed-TIME`.
    fn failed_copies(&self) -> Result<Vec<PathBuf>> {
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
    fn swap_in(&self) -> Result<()> {
        if self.exists(&self.name)? {
            self.parent.rename(&self.name, &self.aside(OLD))?;
        }
        self.parent.rename(&self.aside(NEW), &self.name)
    }

    /// Puts `.hapair-old` back, keeping what was live as a failed copy.
    /// Returns where the failed copy is, if there was one. With nothing set
    /// aside, what is live is the old data, and stays.
    fn put_back(&self) -> Result<Option<PathBuf>> {
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
struct CopyRecord {
    tablespaces: Vec<PathBuf>,
}

impl CopyRecord {
    fn path(instance_config: &Path) -> PathBuf {
        files::parent_of(instance_config).join("replicate-postgres.json")
    }

    fn load(instance_config: &Path) -> Result<CopyRecord> {
        let path = CopyRecord::path(instance_config);
        match files::read_optional(&path)? {
            Some(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a copy record", path.display())),
            None => Ok(CopyRecord::default()),
        }
    }

    fn save(&self, instance_config: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        files::write_atomic(
            &CopyRecord::path(instance_config),
            text.as_bytes(),
            0o600,
            None,
        )
    }

    fn remove(instance_config: &Path) -> Result<()> {
        let (dir, name) = Dir::of(&CopyRecord::path(instance_config))?;
        dir.remove_all(&name)
    }

    fn directories(&self, data_dir: &Path) -> Result<Vec<Replaced>> {
        std::iter::once(data_dir)
            .chain(self.tablespaces.iter().map(PathBuf::as_path))
            .map(Replaced::open)
            .collect()
    }
}

/// Everything the step works with, checked once.
struct Step<'a> {
    args: &'a Args,
    primary: Ipv4Addr,
    slot: String,
    data: Replaced,
    cluster: Cluster,
    upstream: Upstream,
    bin_dir: PathBuf,
    postgres_owner: Owner,
    standby_dropin: PathBuf,
}

fn cluster_replicate_postgres(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let address = match &args.address {
        Some(a) => instance::parse_ipv4_str("address", a)?,
        None => net::source_address_for(primary)?,
    };
    // PostgreSQL listens on it: an address of another host would keep it
    // from starting.
    if !net::host_ipv4_addresses()?.contains(&address) {
        bail!("address {address} is not one of this host's addresses: pass the address the primary reaches it at");
    }
    if let Some(rate) = &args.max_rate {
        check_rate(rate)?;
    }
    let data_dir = files::clean_path("data_dir", &args.data_dir)?;
    let config_dir = files::clean_path("postgresql_config_dir", &args.postgresql_config_dir)?;
    let bin_dir = files::clean_path("postgresql_bin_dir", &args.postgresql_bin_dir)?;
    let data = Replaced::open(&data_dir)?;
    let postgres_owner = match data.parent.state(&data.name)? {
        Some(state) if state.is_dir() => state.owner,
        Some(_) => bail!("{} is not a directory", data_dir.display()),
        // A run killed between its two renames left only the old data.
        None if data.exists(&data.aside(OLD))? => {
            data.parent
                .state(&data.aside(OLD))?
                .context("the old data")?
                .owner
        }
        None => bail!(
            "{} does not exist: is PostgreSQL installed?",
            data_dir.display()
        ),
    };
    let step = Step {
        slot: postgres::slot_name_for(address),
        cluster: Cluster::new(&config_dir, args.postgresql_port, &args.postgresql_unit),
        upstream: Upstream {
            host: primary,
            port: args.postgresql_port,
            user: args.replication_user.clone(),
            password: args.replication_password.clone(),
        },
        standby_dropin: config_dir.join("conf.d").join(STANDBY_DROPIN),
        args: &args,
        primary,
        data,
        bin_dir,
        postgres_owner,
    };

    // The standby's files: a passfile for primary_conninfo (no password in
    // the configuration) and the standby settings.
    let passfile = files::parent_of(&data_dir).join("hapair.pgpass");
    let mut files = FilePlan::default();
    files.secret_file(
        &passfile,
        |_| passfile_line(&step.upstream),
        0o600,
        Some(postgres_owner),
    )?;
    let settings = standby_settings(&step.upstream, &step.slot, &passfile, address)?;
    files.file(
        &step.standby_dropin,
        |_| settings,
        0o644,
        Some(postgres_owner),
    )?;

    // One run at a time, from here on: even the recovery below must not
    // race a run that is swapping. Check mode changes nothing, and takes
    // no lock.
    let lock = match ctx.check_mode {
        true => None,
        false => Some(RunLock::take(
            &lock_name(&data_dir),
            "cluster_replicate_postgres",
        )?),
    };
    if let Some(group) = lock.as_ref().and_then(|l| l.ended_orphan) {
        ctx.warn(format!(
            "a killed earlier run had left its copy running (process group {group}); it was ended"
        ));
    }

    // 0. A run killed between its two renames left the data set aside: it
    // is the last good copy, and goes back first.
    let recovered = !step.data.exists(&step.data.name)?;
    if recovered {
        if ctx.check_mode {
            bail!(
                "{} is missing and the old data is at {}: a run was killed mid-swap. Run \
                 without check mode to put it back",
                data_dir.display(),
                step.data.aside_path(OLD).display()
            );
        }
        step.data
            .parent
            .rename(&step.data.aside(OLD), &step.data.name)?;
        ctx.warn(format!(
            "a killed run had left the data at {}; it is back at {}",
            step.data.aside_path(OLD).display(),
            data_dir.display()
        ));
        // It streamed before, most likely: give it the time to again.
        step.cluster.unit.start()?;
        let settle = step
            .args
            .stream_timeout
            .duration()
            .min(Duration::from_secs(30));
        wait::until(settle, Duration::from_millis(500), || {
            streams(&step).unwrap_or(false)
        });
    }
    name_failed_copies(&step, ctx)?;

    // 1. Already streaming from this primary?
    let primary_id = step.upstream.system_identifier();
    let local_id = if step.cluster.unit.is_active()? {
        step.cluster.system_identifier().ok()
    } else {
        None
    };
    if let (Some(local_id), Ok(primary_id)) = (&local_id, &primary_id) {
        if local_id == primary_id && streams(&step)? {
            return already_streaming(&step, ctx, files, recovered);
        }
    }

    // 2. Never replace the data of a protected instance.
    refuse_if_protected(&args.instance_config)?;

    // 3. The primary first: nothing here changes unless it is ready.
    if !net::probe(primary, args.postgresql_port, Duration::from_secs(5)).open {
        bail!(
            "the primary's PostgreSQL at {primary}:{} does not answer; nothing was changed here",
            args.postgresql_port
        );
    }
    let primary_id = primary_id.context(
        "the primary refused the replication login: run cluster_enter_primary_mode and \
         cluster_add_secondary on the primary (seed steps 4 and 7), with the same password",
    )?;
    let wal_level = step.upstream.command("SHOW wal_level")?;
    if wal_level != "replica" && wal_level != "logical" {
        bail!("the primary's wal_level is {wal_level}: run cluster_enter_primary_mode on it (seed step 4)");
    }
    if !step.upstream.has_slot(&step.slot)? {
        bail!(
            "the primary has no replication slot {} for this host: run cluster_add_secondary on \
             it (seed step 7)",
            step.slot
        );
    }
    refuse_mount_point(&step.data)?;

    if ctx.check_mode {
        return Ok(Outcome::changed(format!(
            "would copy the primary {primary} (system {}) into a new data directory, then replace \
             this host's data (system {}) with it",
            primary_id,
            local_id.as_deref().unwrap_or("not running")
        ))
        .with("slot_name", &step.slot));
    }

    // A run killed after its swap: the copy is live, the old data beside it.
    if step.data.exists(&step.data.aside(OLD))? {
        return finish_interrupted(&step, ctx, files, &primary_id);
    }

    // 5. Copy beside the live data, and verify the copy.
    let started = Instant::now();
    let record = copy(&step, lock.as_ref(), ctx.interactive)?;
    let copied = Replaced::open(&step.data.aside_path(NEW))?;
    let copied_id = control_system_identifier(&step.bin_dir, &copied.path)?;
    if copied_id != primary_id {
        remove_copies(&step, &record)?;
        bail!(
            "the copy has system identifier {copied_id}, not the primary's {primary_id}; it was \
             removed and {} was not touched",
            data_dir.display()
        );
    }
    files::write_atomic(
        &copied.path.join("standby.signal"),
        b"",
        0o600,
        Some(postgres_owner),
    )?;
    repoint_tablespaces(&copied.path, &record, postgres_owner)?;
    let copy_seconds = started.elapsed().as_secs_f64();

    // 6. Protection again: the copy may have taken hours.
    if let Err(e) = refuse_if_protected(&args.instance_config) {
        remove_copies(&step, &record)?;
        return Err(
            e.context("protection was turned back on during the copy; the copy was removed")
        );
    }
    files.apply()?;
    record.save(&args.instance_config)?;
    swap(&step, &record)?;
    if let Err(e) = start_streaming(&step) {
        let kept = roll_back(&step, &record)?;
        return Err(e.context(format!(
            "the copy did not stream; the previous data is back in place and PostgreSQL runs on \
             it: nothing was lost. The failed copy is kept for inspection at {}",
            show(&kept)
        )));
    }
    let old = finish(&step, ctx, &record)?;
    Ok(Outcome::changed(format!(
        "this host now streams from {primary} through slot {} (copied in {copy_seconds:.1} s)",
        step.slot
    ))
    .with("slot_name", &step.slot)
    .with("system_identifier", &primary_id)
    .with("copy_seconds", copy_seconds)
    .with("tablespaces", &record.tablespaces)
    .with("old_data_dir", old))
}

fn refuse_if_protected(instance_config: &Path) -> Result<()> {
    if InstanceConfig::load(instance_config)?.is_protected() {
        bail!(
            "this host is a protected instance: its PostgreSQL data won't be replaced. {}",
            instance::UNPROTECT_HINT
        );
    }
    Ok(())
}

/// The copy is made beside the data directory and swapped in by rename,
/// which can't cross filesystems: a data directory that is a mount point
/// is refused before anything stops.
fn refuse_mount_point(data: &Replaced) -> Result<()> {
    if data.parent.is_mount_point(&data.name)? {
        bail!(
            "{} is a mount point: hapair copies beside it and swaps the copy in by renaming, \
             which can't cross filesystems. Mount the filesystem one level up (e.g. at {}) with \
             the data directory inside it, or give a data_dir inside the mount; nothing was \
             changed",
            data.path.display(),
            data.parent.path().display()
        );
    }
    Ok(())
}

/// The lock's name: one copy at a time per data directory.
fn lock_name(data_dir: &Path) -> String {
    format!(
        "replicate-postgres{}",
        data_dir.to_string_lossy().replace('/', "_")
    )
}

/// Whether PostgreSQL streams from this primary through this host's slot.
fn streams(step: &Step) -> Result<bool> {
    Ok(step
        .cluster
        .wal_receiver()?
        .is_some_and(|(status, sender, slot)| {
            status == "streaming" && sender == step.primary.to_string() && slot == step.slot
        }))
}

/// Streaming already: only the passfile (read at each connection) or the
/// standby settings (applied by a reload) may need a refresh, and what a
/// killed run left beside the data is no longer the last good copy.
fn already_streaming(
    step: &Step,
    ctx: &mut Context,
    files: FilePlan,
    recovered: bool,
) -> Result<Outcome> {
    let config = InstanceConfig::load(&step.args.instance_config)?;
    let mode_ok = config.value(&Key::parse(instance::REPLICATION_MODE)?)
        == Some(Value::String("secondary".into()));
    // What an interrupted run left beside the live data: a copy being
    // made (never needed now), and the old data (kept with keep_old_data).
    let record = CopyRecord::load(&step.args.instance_config)?;
    let dirs = record.directories(&step.data.path)?;
    let mut removes: Vec<(&Replaced, OsString)> = Vec::new();
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in &dirs {
        if dir.exists(&dir.aside(NEW))? {
            removes.push((dir, dir.aside(NEW)));
        }
        if dir.exists(&dir.aside(OLD))? {
            match step.args.keep_old_data {
                true => kept.push(dir.aside_path(OLD)),
                false => removes.push((dir, dir.aside(OLD))),
            }
        }
    }
    let removed: Vec<PathBuf> = removes
        .iter()
        .map(|(dir, name)| dir.parent.path().join(name))
        .collect();
    let changed = recovered || !files.changes.is_empty() || !mode_ok || !removes.is_empty();
    if changed && !ctx.check_mode {
        files.apply()?;
        if files.changes(&step.standby_dropin) && !step.cluster.reload()?.is_empty() {
            // listen_addresses, say: a standby restarts in a moment, and
            // resumes streaming from its slot.
            step.cluster.unit.restart()?;
            step.cluster
                .unit
                .wait_for_port(Ipv4Addr::LOCALHOST, step.args.postgresql_port)?;
        }
        if !mode_ok {
            set_mode_secondary(&step.args.instance_config)?;
        }
        for (dir, name) in &removes {
            dir.parent.remove_all(name)?;
        }
        // The record names the tablespaces' old data while any is kept.
        if kept.is_empty() {
            CopyRecord::remove(&step.args.instance_config)?;
        }
    }
    for path in &kept {
        ctx.warn(format!(
            "the replaced data is kept at {} (keep_old_data)",
            path.display()
        ));
    }
    let mut msg = format!(
        "already streaming from {} through slot {}",
        step.primary, step.slot
    );
    if !removed.is_empty() {
        let would = if ctx.check_mode {
            "would remove"
        } else {
            "removed"
        };
        msg.push_str(&format!(
            "; {would} what an interrupted run left, no longer needed: {}",
            show(&removed)
        ));
    }
    Ok(Outcome::new(changed, msg).with("slot_name", &step.slot))
}

/// A run was killed after its swap: the data directory holds its copy and
/// the old data is beside it. If the copy is the primary's, let it stream
/// and finish; if not, nothing can be decided safely.
fn finish_interrupted(
    step: &Step,
    ctx: &mut Context,
    files: FilePlan,
    primary_id: &str,
) -> Result<Outcome> {
    let record = CopyRecord::load(&step.args.instance_config)?;
    let live_id = control_system_identifier(&step.bin_dir, &step.data.path)?;
    if live_id != primary_id {
        bail!(
            "{} holds system {live_id}, not the primary's {primary_id}, and {} is beside it: \
             an earlier run stopped half-way and hapair can't tell which is the good data. \
             Nothing was changed. Check both, keep the one you need at {}, move the other \
             away, then run again",
            step.data.path.display(),
            step.data.aside_path(OLD).display(),
            step.data.path.display()
        );
    }
    ctx.warn(format!(
        "an earlier run was interrupted after swapping its copy in; the old data is at {}",
        step.data.aside_path(OLD).display()
    ));
    files.apply()?;
    let _ = step.cluster.unit.stop();
    if let Err(e) = start_streaming(step) {
        let kept = roll_back(step, &record)?;
        return Err(e.context(format!(
            "the interrupted run's copy did not stream; the previous data is back in place and \
             PostgreSQL runs on it: nothing was lost. The failed copy is kept at {}",
            show(&kept)
        )));
    }
    let old = finish(step, ctx, &record)?;
    Ok(Outcome::changed(format!(
        "finished an interrupted run: this host now streams from {} through slot {}",
        step.primary, step.slot
    ))
    .with("slot_name", &step.slot)
    .with("system_identifier", primary_id)
    .with("old_data_dir", old))
}

/// Streaming: the old data goes (or stays, with keep_old_data), and this
/// host records its role. Returns where the old data is kept, if it is.
fn finish(step: &Step, ctx: &mut Context, record: &CopyRecord) -> Result<Option<PathBuf>> {
    let mut kept = None;
    for dir in record.directories(&step.data.path)? {
        if step.args.keep_old_data {
            if dir.exists(&dir.aside(OLD))? {
                ctx.warn(format!(
                    "the replaced data is kept at {}",
                    dir.aside_path(OLD).display()
                ));
                kept.get_or_insert(dir.aside_path(OLD));
            }
        } else {
            dir.parent.remove_all(&dir.aside(OLD))?;
        }
    }
    if !step.args.keep_old_data {
        CopyRecord::remove(&step.args.instance_config)?;
    }
    set_mode_secondary(&step.args.instance_config)?;
    Ok(kept)
}

/// Names every failed copy kept for inspection, in every run, until the
/// operator removes it: a data directory left behind silently fills a disk.
fn name_failed_copies(step: &Step, ctx: &mut Context) -> Result<()> {
    for failed in step.data.failed_copies()? {
        ctx.warn(format!(
            "{} is a failed copy kept for inspection (the live data is {}); remove it when done: \
             rm -rf {}",
            failed.display(),
            step.data.path.display(),
            hapair_core::command::shell_quote(&failed.to_string_lossy())
        ));
    }
    Ok(())
}

/// Copies the primary beside the live data with pg_basebackup. A tablespace
/// whose directory here is not empty is copied beside it too: pg_basebackup
/// names it, and the copy starts again with it mapped.
fn copy(step: &Step, lock: Option<&RunLock>, interactive: bool) -> Result<CopyRecord> {
    let new = step.data.aside_path(NEW);
    let mut record = CopyRecord::default();
    loop {
        // Never the last good data: the live directory is untouched.
        remove_copies(step, &record)?;
        // Made here: postgres may not write beside a tablespace directory.
        for dir in record.directories(&step.data.path)? {
            dir.parent
                .ensure_dir(&dir.aside(NEW), 0o700, Some(step.postgres_owner))?;
        }
        let mut command = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(step.bin_dir.join("pg_basebackup"))
            .args(["-d", &step.upstream.conninfo(&[]), "-D"])
            .arg(&new)
            .args(["-X", "stream", "-S", &step.slot, "-c", "fast", "-w"])
            .secret_env("PGPASSWORD", &step.upstream.password)
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
        if let Some(rate) = &step.args.max_rate {
            command = command.args(["--max-rate", rate]);
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
                remove_copies(step, &record)?;
                return Err(error.context(format!(
                    "the copy from the primary failed; {} was not touched and PostgreSQL still \
                     runs on it: nothing was lost",
                    step.data.path.display()
                )));
            }
        }
    }
}

/// The directory pg_basebackup refuses to write into: `directory "/x"
/// exists but is not empty`.
fn nonempty_directory(message: &str) -> Option<PathBuf> {
    let (before, _) = message.split_once("\" exists but is not empty")?;
    let (_, dir) = before.rsplit_once("directory \"")?;
    Some(PathBuf::from(dir))
}

/// A path for `--tablespace-mapping`, where `=` must be escaped.
fn escape_mapping(path: &Path) -> String {
    path.to_string_lossy().replace('=', "\\=")
}

/// Removes the copy being made (the data directory's and each
/// tablespace's `.hapair-new`): never the last good data.
fn remove_copies(step: &Step, record: &CopyRecord) -> Result<()> {
    for dir in record.directories(&step.data.path)? {
        dir.parent.remove_all(&dir.aside(NEW))?;
    }
    Ok(())
}

/// The copy's tablespace links point where pg_basebackup wrote (the
/// `.hapair-new` directories); after the swap the data is at the live
/// paths. A link is replaced only when it points to one of ours, compared
/// with what we asked for: nothing in the copy chooses a path.
fn repoint_tablespaces(copy: &Path, record: &CopyRecord, owner: Owner) -> Result<()> {
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

/// Stops PostgreSQL and swaps every copy in. Any failure puts back what
/// was moved and starts PostgreSQL again on the old data.
fn swap(step: &Step, record: &CopyRecord) -> Result<()> {
    step.cluster.unit.stop()?;
    let dirs = record.directories(&step.data.path)?;
    for (done, dir) in dirs.iter().enumerate() {
        if let Err(e) = dir.swap_in() {
            for undone in dirs[..=done].iter().rev() {
                if undone.exists(&undone.aside(OLD))? && undone.exists(&undone.name)? {
                    let _ = undone.parent.rename(&undone.name, &undone.aside(NEW));
                }
                let _ = undone.put_back();
            }
            step.cluster.unit.start().context(
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

fn check_rate(rate: &str) -> Result<()> {
    let digits = rate.trim_end_matches(['k', 'M']);
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "max_rate takes a rate such as 100M or 500k (pg_basebackup's --max-rate), not {:?}",
            protocol::excerpt(rate)
        );
    }
    Ok(())
}

/// The system identifier recorded in a data directory's control file, read
/// by pg_controldata as postgres (the directory is postgres's).
fn control_system_identifier(bin_dir: &Path, data_dir: &Path) -> Result<String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin_dir.join("pg_controldata"))
        .arg(data_dir)
        .env("LC_ALL", "C")
        .run()?;
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .map(|id| id.trim().to_string())
        .context("pg_controldata shows no system identifier")
}

fn start_streaming(step: &Step) -> Result<()> {
    step.cluster.unit.start()?;
    let timeout = step.args.stream_timeout.duration();
    if !wait::until(timeout, Duration::from_millis(500), || {
        streams(step).unwrap_or(false)
    }) {
        bail!(
            "PostgreSQL did not stream from {} within {timeout:?}",
            step.primary
        );
    }
    Ok(())
}

/// Puts the old data back after a failed swap (the data directory and each
/// tablespace), and returns where the failed copies now are.
fn roll_back(step: &Step, record: &CopyRecord) -> Result<Vec<PathBuf>> {
    let _ = step.cluster.unit.stop();
    let mut kept = Vec::new();
    for dir in record.directories(&step.data.path)? {
        kept.extend(dir.put_back().context("rolling back")?);
    }
    let (dropin_dir, dropin) = Dir::of(&step.standby_dropin)?;
    dropin_dir.remove_all(&dropin)?;
    CopyRecord::remove(&step.args.instance_config)?;
    step.cluster
        .unit
        .start()
        .context("rolling back: the old data directory is back, but PostgreSQL did not start")?;
    Ok(kept)
}

fn show(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(none)".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn set_mode_secondary(instance_config: &Path) -> Result<()> {
    InstanceConfig::update(instance_config, |config| {
        config.set(
            instance::REPLICATION_MODE,
            Value::String("secondary".into()),
        )
    })
}

/// One `.pgpass` line for the primary; `:` and `\` escaped in every field.
fn passfile_line(upstream: &Upstream) -> String {
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
fn standby_settings(
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
         hot_standby = 'on'\n",
        postgres::conf_quote(&conninfo)?,
        postgres::conf_quote(slot)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(
        Args,
        json!({"primary_address": "10.0.0.1", "replication_password": "a long test password"})
    );

    #[test]
    fn the_passfile_escapes_and_the_settings_name_the_slot() {
        let upstream = Upstream {
            host: Ipv4Addr::new(10, 0, 0, 1),
            port: 5432,
            user: postgres::default_replication_user(),
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
    fn pg_basebackup_names_the_tablespace_it_refuses() {
        let said = "`runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_basebackup ...` exited \
                    with 1: pg_basebackup: error: directory \"/srv/ts one\" exists but is not \
                    empty / pg_basebackup: removing contents of data directory";
        assert_eq!(nonempty_directory(said), Some(PathBuf::from("/srv/ts one")));
        assert_eq!(nonempty_directory("could not connect"), None);
        assert_eq!(escape_mapping(Path::new("/a=b")), "/a\\=b");
    }

    #[test]
    fn durations_and_rates_are_bounded() {
        let huge = json!({"primary_address": "10.0.0.1", "replication_password": "a long test password",
                          "stream_timeout": u64::MAX});
        assert!(serde_json::from_value::<Args>(huge).is_err());
        for bad in ["", "fast", "-1", "100G", "1;x"] {
            assert!(check_rate(bad).is_err(), "{bad}");
        }
        for good in ["100M", "512k", "32768"] {
            assert!(check_rate(good).is_ok(), "{good}");
        }
    }
}
