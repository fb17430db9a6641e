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

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::lock::RunLock;
use hapair_core::postgres::standby::{
    check_compress, check_rate, repoint_tablespaces, CopyRecord, Replaced, Standby, NEW, OLD,
};
use hapair_core::postgres::{self, Cluster, RoleName, Upstream};
use hapair_core::protocol::Seconds;
use hapair_core::{net, protocol, wait, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;

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
    /// Have the primary compress the copy, e.g. `server-zstd` (a slow
    /// link); none by default.
    #[serde(default)]
    compress: Option<String>,
    /// Seconds to wait for streaming after the swap.
    #[serde(default = "default_stream_timeout")]
    stream_timeout: Seconds,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_stream_timeout() -> Seconds {
    Seconds::new(120)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_replicate_postgres)
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
    if let Some(compress) = &args.compress {
        check_compress(compress)?;
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
    let mut standby = Standby::new(
        Cluster::new(&config_dir, args.postgresql_port, &args.postgresql_unit)
            .with_dirs(data_dir.clone(), bin_dir),
        Upstream {
            host: primary,
            port: args.postgresql_port,
            user: args.replication_user.clone(),
            password: args.replication_password.clone(),
        },
        address,
        data,
        postgres_owner,
        &args.instance_config,
        args.stream_timeout.duration(),
    );
    standby.max_rate = args.max_rate.clone();
    standby.compress = args.compress.clone();

    // The standby's files: a passfile for primary_conninfo (no password in
    // the configuration) and the standby settings.
    let mut files = FilePlan::default();
    standby.plan_files(&mut files, address)?;

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
    let recovered = !standby.data.exists(&standby.data.name)?;
    if recovered {
        if ctx.check_mode {
            bail!(
                "{} is missing and the old data is at {}: a run was killed mid-swap. Run \
                 without check mode to put it back",
                data_dir.display(),
                standby.data.aside_path(OLD).display()
            );
        }
        standby
            .data
            .parent
            .rename(&standby.data.aside(OLD), &standby.data.name)?;
        ctx.warn(format!(
            "a killed run had left the data at {}; it is back at {}",
            standby.data.aside_path(OLD).display(),
            data_dir.display()
        ));
        // It streamed before, most likely: give it the time to again.
        standby.cluster.unit.start()?;
        let settle = args.stream_timeout.duration().min(Duration::from_secs(30));
        wait::until(settle, Duration::from_millis(500), || {
            standby.streams().unwrap_or(false)
        });
    }
    name_failed_copies(&standby, ctx)?;

    // 1. Already streaming from this primary?
    let primary_id = standby.upstream.system_identifier();
    let local_id = if standby.cluster.unit.is_active()? {
        standby.cluster.system_identifier().ok()
    } else {
        None
    };
    if let (Some(local_id), Ok(primary_id)) = (&local_id, &primary_id) {
        if local_id == primary_id && standby.streams()? {
            return already_streaming(&standby, &args, ctx, files, recovered);
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
    let wal_level = standby.upstream.command("SHOW wal_level")?;
    if wal_level != "replica" && wal_level != "logical" {
        bail!("the primary's wal_level is {wal_level}: run cluster_enter_primary_mode on it (seed step 4)");
    }
    if !standby.upstream.has_slot(&standby.slot)? {
        bail!(
            "the primary has no replication slot {} for this host: run cluster_add_secondary on \
             it (seed step 7)",
            standby.slot
        );
    }
    refuse_mount_point(&standby.data)?;

    // A run killed after its swap: the copy is live, the old data beside
    // it. (Never in check mode: recovery stops it first.)
    if !ctx.check_mode && standby.data.exists(&standby.data.aside(OLD))? {
        return finish_interrupted(&standby, &args, ctx, files, &primary_id);
    }

    let mut plan = Plan::new(files);
    plan.push(Copy {
        primary,
        system: primary_id.clone(),
        replacing: local_id.unwrap_or_else(|| "not running".into()),
    });
    let mut copied = None;
    let outcome = plan.run(ctx, "nothing to copy", |plan, ctx| {
        let (record, seconds, old) = copy_and_swap(
            &standby,
            &args,
            ctx,
            &plan.files,
            &primary_id,
            lock.as_ref(),
        )?;
        let note = format!(
            "this host now streams from {primary} through slot {} (copied in {seconds:.1} s)",
            standby.slot
        );
        copied = Some((record, seconds, old));
        Ok(vec![note])
    })?;
    let mut outcome = outcome
        .with("slot_name", &standby.slot)
        .with("system_identifier", &primary_id);
    if let Some((record, seconds, old)) = copied {
        outcome = outcome
            .with("copy_seconds", seconds)
            .with("tablespaces", &record.tablespaces)
            .with("old_data_dir", old);
    }
    Ok(outcome)
}

/// Steps 5 and 6: copies beside the live data and verifies the copy, checks
/// protection again, swaps the copy in and starts streaming, rolling back
/// on any failure. Returns the record, the copy's duration, and where the
/// old data is kept (keep_old_data).
fn copy_and_swap(
    standby: &Standby,
    args: &Args,
    ctx: &mut Context,
    files: &FilePlan,
    primary_id: &str,
    lock: Option<&RunLock>,
) -> Result<(CopyRecord, f64, Option<PathBuf>)> {
    let started = Instant::now();
    let record = standby.copy(lock, ctx.interactive)?;
    let copied = Replaced::open(&standby.data.aside_path(NEW))?;
    let copied_id = standby.cluster.control_system_identifier(&copied.path)?;
    if copied_id != primary_id {
        standby.remove_copies(&record)?;
        bail!(
            "the copy has system identifier {copied_id}, not the primary's {primary_id}; it was \
             removed and {} was not touched",
            standby.data.path.display()
        );
    }
    files::write_atomic(
        &copied.path.join("standby.signal"),
        b"",
        0o600,
        Some(standby.owner),
    )?;
    repoint_tablespaces(&copied.path, &record, standby.owner)?;
    let copy_seconds = started.elapsed().as_secs_f64();

    // 6. Protection again: the copy may have taken hours.
    if let Err(e) = refuse_if_protected(&args.instance_config) {
        standby.remove_copies(&record)?;
        return Err(
            e.context("protection was turned back on during the copy; the copy was removed")
        );
    }
    files.apply()?;
    record.save(&standby.record_dir)?;
    standby.swap(&record)?;
    if let Err(e) = standby.start_streaming() {
        let kept = standby.roll_back(&record)?;
        return Err(e.context(format!(
            "the copy did not stream; the previous data is back in place and PostgreSQL runs on \
             it: nothing was lost. The failed copy is kept for inspection at {}",
            show(&kept)
        )));
    }
    let old = finish(standby, args, ctx, &record)?;
    Ok((record, copy_seconds, old))
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
/// Streaming already: only the passfile (read at each connection) or the
/// standby settings (applied by a reload) may need a refresh, and what a
/// killed run left beside the data is no longer the last good copy.
fn already_streaming(
    standby: &Standby,
    args: &Args,
    ctx: &mut Context,
    files: FilePlan,
    recovered: bool,
) -> Result<Outcome> {
    let mode = InstanceConfig::load(&args.instance_config)?.replication_mode();
    // What an interrupted run left beside the live data: a copy being
    // made (never needed now), and the old data (kept with keep_old_data).
    let record = CopyRecord::load(&standby.record_dir)?;
    let dirs = record.directories(&standby.data.path)?;
    let mut plan = Plan::new(files);
    if recovered {
        plan.push(Change::PutBack(standby.data.path.clone()));
    }
    if mode != ReplicationMode::Secondary {
        plan.push(Change::SetMode);
    }
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in &dirs {
        if dir.exists(&dir.aside(NEW))? {
            plan.push(Change::Remove(dir, dir.aside(NEW)));
        }
        if dir.exists(&dir.aside(OLD))? {
            match args.keep_old_data {
                true => kept.push(dir.aside_path(OLD)),
                false => plan.push(Change::Remove(dir, dir.aside(OLD))),
            }
        }
    }
    for path in &kept {
        ctx.warn(format!(
            "the replaced data is kept at {} (keep_old_data)",
            path.display()
        ));
    }
    let streaming = format!(
        "already streaming from {} through slot {}",
        standby.primary, standby.slot
    );
    let outcome = plan.run(ctx, streaming, |plan, _| {
        let files = &plan.files;
        files.apply()?;
        if files.changes(&standby.dropin) && !standby.cluster.reload()?.is_empty() {
            // listen_addresses, say: a standby restarts in a moment, and
            // resumes streaming from its slot.
            standby.cluster.unit.restart()?;
            standby
                .cluster
                .unit
                .wait_for_port(Ipv4Addr::LOCALHOST, args.postgresql_port)?;
        }
        for change in &plan.actions {
            match change {
                // Done before: it had to be, to look at the data.
                Change::PutBack(_) => {}
                Change::SetMode => set_mode_secondary(&args.instance_config)?,
                Change::Remove(dir, name) => dir.parent.remove_all(name)?,
            }
        }
        // The record names the tablespaces' old data while any is kept.
        if kept.is_empty() {
            CopyRecord::remove(&standby.record_dir)?;
        }
        Ok(Vec::new())
    })?;
    Ok(outcome.with("slot_name", &standby.slot))
}

/// The copy: the primary (its system identifier) copied, and this host's
/// data (its system identifier, or "not running") replaced with it.
struct Copy {
    primary: Ipv4Addr,
    system: String,
    replacing: String,
}

impl Action for Copy {
    fn describe(&self) -> String {
        format!(
            "copy the primary {} (system {}) into a new data directory, then replace this \
             host's data (system {}) with it",
            self.primary, self.system, self.replacing
        )
    }
}

/// What a run on a streaming standby may still change, besides its files.
enum Change<'a> {
    /// The data a killed run had set aside was put back (before the plan).
    PutBack(PathBuf),
    /// Record `cluster.replication_mode = secondary`.
    SetMode,
    /// Remove what an interrupted run left beside a directory.
    Remove(&'a Replaced, OsString),
}

impl Action for Change<'_> {
    fn describe(&self) -> String {
        match self {
            Change::PutBack(path) => format!(
                "put back the data a killed run had set aside, at {}",
                path.display()
            ),
            Change::SetMode => "set cluster.replication_mode = secondary".into(),
            Change::Remove(dir, name) => format!(
                "remove {}, which an interrupted run left and is no longer needed",
                dir.parent.path().join(name).display()
            ),
        }
    }
}

/// A run was killed after its swap: the data directory holds its copy and
/// the old data is beside it. If the copy is the primary's, let it stream
/// and finish; if not, nothing can be decided safely.
fn finish_interrupted(
    standby: &Standby,
    args: &Args,
    ctx: &mut Context,
    files: FilePlan,
    primary_id: &str,
) -> Result<Outcome> {
    let record = CopyRecord::load(&standby.record_dir)?;
    let live_id = standby
        .cluster
        .control_system_identifier(&standby.data.path)?;
    if live_id != primary_id {
        bail!(
            "{} holds system {live_id}, not the primary's {primary_id}, and {} is beside it: \
             an earlier run stopped half-way and hapair can't tell which is the good data. \
             Nothing was changed. Check both, keep the one you need at {}, move the other \
             away, then run again",
            standby.data.path.display(),
            standby.data.aside_path(OLD).display(),
            standby.data.path.display()
        );
    }
    ctx.warn(format!(
        "an earlier run was interrupted after swapping its copy in; the old data is at {}",
        standby.data.aside_path(OLD).display()
    ));
    files.apply()?;
    let _ = standby.cluster.unit.stop();
    if let Err(e) = standby.start_streaming() {
        let kept = standby.roll_back(&record)?;
        return Err(e.context(format!(
            "the interrupted run's copy did not stream; the previous data is back in place and \
             PostgreSQL runs on it: nothing was lost. The failed copy is kept at {}",
            show(&kept)
        )));
    }
    let old = finish(standby, args, ctx, &record)?;
    Ok(Outcome::changed(format!(
        "finished an interrupted run: this host now streams from {} through slot {}",
        standby.primary, standby.slot
    ))
    .with("slot_name", &standby.slot)
    .with("system_identifier", primary_id)
    .with("old_data_dir", old))
}

/// Streaming: the old data goes (or stays, with keep_old_data), and this
/// host records its role. Returns where the old data is kept, if it is.
fn finish(
    standby: &Standby,
    args: &Args,
    ctx: &mut Context,
    record: &CopyRecord,
) -> Result<Option<PathBuf>> {
    let mut kept = None;
    for dir in record.directories(&standby.data.path)? {
        if args.keep_old_data {
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
    if !args.keep_old_data {
        CopyRecord::remove(&standby.record_dir)?;
    }
    set_mode_secondary(&args.instance_config)?;
    Ok(kept)
}

/// Names every failed copy kept for inspection, in every run, until the
/// operator removes it: a data directory left behind silently fills a disk.
fn name_failed_copies(standby: &Standby, ctx: &mut Context) -> Result<()> {
    for failed in standby.data.failed_copies()? {
        ctx.warn(format!(
            "{} is a failed copy kept for inspection (the live data is {}); remove it when done: \
             rm -rf {}",
            failed.display(),
            standby.data.path.display(),
            hapair_core::command::shell_quote(&failed.to_string_lossy())
        ));
    }
    Ok(())
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
        config.set_replication_mode(ReplicationMode::Secondary)
    })
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
    fn durations_are_bounded() {
        let huge = json!({"primary_address": "10.0.0.1", "replication_password": "a long test password",
                          "stream_timeout": u64::MAX});
        assert!(serde_json::from_value::<Args>(huge).is_err());
    }
}
