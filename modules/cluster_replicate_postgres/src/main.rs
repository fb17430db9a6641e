//! `cluster_replicate_postgres`: seed step 8, on the secondary.
//!
//! Makes this host's PostgreSQL a streaming standby of the primary, without
//! ever putting its current data at risk:
//! 1. Already streaming from this primary, through this host's slot, with
//!    the primary's system identifier: nothing to do, nothing touched.
//! 2. A protected instance is refused.
//! 3. The primary is checked before anything changes here: reachable, a
//!    replication login, `wal_level`, this host's slot.
//! 4. pg_basebackup copies into a new directory beside the data directory.
//!    The copy is verified (the primary's system identifier) before it is
//!    used.
//! 5. PostgreSQL stops, the copy is swapped in, and PostgreSQL starts as a
//!    standby. Only once `pg_stat_wal_receiver` shows streaming is the old
//!    data directory removed (or kept, with `keep_old_data`).
//!
//! A failure at any point leaves the old data directory in place and
//! PostgreSQL running on it; the message says what failed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::command::Command;
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, Key};
use hapair_core::postgres::{self, Cluster, Upstream};
use hapair_core::{net, protocol, Context, Outcome, Secret, Spec};
use serde::Deserialize;
use serde_json::Value;

const SPEC: Spec = Spec {
    name: "cluster_replicate_postgres",
    doc: include_str!("../cluster_replicate_postgres.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct Args {
    primary_address: String,
    replication_password: Secret,
    #[serde(default = "postgres::default_replication_user")]
    replication_user: postgres::RoleName,
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
    stream_timeout: u64,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_stream_timeout() -> u64 {
    120
}

/// The standby settings, beside cluster_enter_primary_mode's drop-in.
const STANDBY_DROPIN: &str = "hapair-standby.conf";

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_replicate_postgres)
}

fn cluster_replicate_postgres(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let address = match &args.address {
        Some(a) => instance::parse_ipv4_str("address", a)?,
        None => net::source_address_for(primary)?,
    };
    let slot = postgres::slot_name_for(address);
    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    );
    let upstream = Upstream {
        host: primary,
        port: args.postgresql_port,
        user: args.replication_user.clone(),
        password: args.replication_password.clone(),
    };
    let postgres_owner = files::state(&args.data_dir)?
        .with_context(|| {
            format!(
                "{} does not exist: is PostgreSQL installed?",
                args.data_dir.display()
            )
        })?
        .owner;

    // The standby's files: a passfile for primary_conninfo (no password in
    // the configuration) and the standby settings.
    let passfile = args
        .data_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join("hapair.pgpass");
    let mut files = FilePlan::default();
    files.secret_file(
        &passfile,
        |_| passfile_line(&upstream),
        0o600,
        Some(postgres_owner),
    )?;
    let standby_dropin = args
        .postgresql_config_dir
        .join("conf.d")
        .join(STANDBY_DROPIN);
    let settings = standby_settings(&upstream, &slot, &passfile)?;
    files.file(&standby_dropin, |_| settings, 0o644, Some(postgres_owner))?;

    // 1. Already streaming from this primary?
    let primary_id = upstream.system_identifier();
    let local_id = if cluster.unit.is_active()? {
        cluster.system_identifier().ok()
    } else {
        None
    };
    if let (Some(local_id), Ok(primary_id)) = (&local_id, &primary_id) {
        if let Some((status, sender, receiver_slot)) = cluster.wal_receiver()? {
            if status == "streaming"
                && sender == primary.to_string()
                && receiver_slot == slot
                && local_id == primary_id
            {
                return already_streaming(
                    &args,
                    ctx,
                    &cluster,
                    files,
                    &standby_dropin,
                    primary,
                    &slot,
                );
            }
        }
    }

    // 2. Never replace the data of a protected instance.
    let config = InstanceConfig::load(&args.instance_config)?;
    if config.is_protected() {
        bail!(
            "this host is a protected instance: its PostgreSQL data won't be replaced. {}",
            instance::UNPROTECT_HINT
        );
    }

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
    let wal_level = upstream.command("SHOW wal_level")?;
    if wal_level != "replica" && wal_level != "logical" {
        bail!("the primary's wal_level is {wal_level}: run cluster_enter_primary_mode on it (seed step 4)");
    }
    if !upstream.has_slot(&slot)? {
        bail!("the primary has no replication slot {slot} for this host: run cluster_add_secondary on it (seed step 7)");
    }

    if ctx.check_mode {
        return Ok(Outcome::changed(format!(
            "would copy the primary {primary} (system {}) into a new data directory, then replace \
             this host's data (system {}) with it",
            primary_id,
            local_id.as_deref().unwrap_or("not running")
        ))
        .with("slot_name", &slot));
    }

    // 4. Copy beside the live data, and verify the copy.
    let started = Instant::now();
    let new_dir = files::with_suffix(&args.data_dir, "hapair-new");
    remove_dir(&new_dir)?; // a failed earlier attempt; never the live data
    files::ensure_dir(&new_dir, 0o700, Some(postgres_owner))?;
    if let Err(e) = copy(&args, &upstream, &slot, &new_dir, ctx.interactive) {
        remove_dir(&new_dir)?;
        return Err(e.context(format!(
            "the copy from the primary failed; {} was not touched and PostgreSQL still runs on it: \
             nothing was lost",
            args.data_dir.display()
        )));
    }
    let copied_id = control_system_identifier(&args.postgresql_bin_dir, &new_dir)?;
    if copied_id != primary_id {
        remove_dir(&new_dir)?;
        bail!(
            "the copy has system identifier {copied_id}, not the primary's {}; it was removed and \
             {} was not touched",
            primary_id,
            args.data_dir.display()
        );
    }
    files::write_atomic(
        &new_dir.join("standby.signal"),
        b"",
        0o600,
        Some(postgres_owner),
    )?;
    let copy_seconds = started.elapsed().as_secs_f64();

    // 5. Swap, start as a standby, and keep the old data until it streams.
    files.apply()?;
    let old_dir = files::with_suffix(&args.data_dir, "hapair-old");
    remove_dir(&old_dir)?;
    cluster.unit.stop()?;
    std::fs::rename(&args.data_dir, &old_dir).context("can't move the old data directory aside")?;
    std::fs::rename(&new_dir, &args.data_dir).context("can't move the copy into place")?;
    if let Err(e) = start_streaming(
        &cluster,
        primary,
        &slot,
        Duration::from_secs(args.stream_timeout),
    ) {
        let kept = roll_back(&cluster, &args.data_dir, &old_dir, &standby_dropin)?;
        return Err(e.context(format!(
            "the copy did not stream; the previous data directory is back in place and PostgreSQL \
             runs on it: nothing was lost. The failed copy is kept at {} for inspection",
            kept.display()
        )));
    }
    if args.keep_old_data {
        ctx.warn(format!(
            "the replaced data directory is kept at {}",
            old_dir.display()
        ));
    } else {
        remove_dir(&old_dir)?;
    }
    set_mode_secondary(&args.instance_config)?;

    Ok(Outcome::changed(format!(
        "this host now streams from {primary} through slot {slot} (copied in {copy_seconds:.1} s)"
    ))
    .with("slot_name", &slot)
    .with("system_identifier", &primary_id)
    .with("copy_seconds", copy_seconds)
    .with(
        "old_data_dir",
        args.keep_old_data.then(|| old_dir.display().to_string()),
    ))
}

/// Streaming already: only the passfile (read at each connection) or the
/// standby settings (applied by a reload) may need a refresh.
fn already_streaming(
    args: &Args,
    ctx: &mut Context,
    cluster: &Cluster,
    files: FilePlan,
    standby_dropin: &Path,
    primary: Ipv4Addr,
    slot: &str,
) -> Result<Outcome> {
    let config = InstanceConfig::load(&args.instance_config)?;
    let mode_ok = config.value(&Key::parse(instance::REPLICATION_MODE)?)
        == Some(Value::String("secondary".into()));
    let changed = !files.changes.is_empty() || !mode_ok;
    if changed && !ctx.check_mode {
        files.apply()?;
        if files.changes(standby_dropin) {
            cluster.reload()?;
        }
        if !mode_ok {
            set_mode_secondary(&args.instance_config)?;
        }
    }
    Ok(Outcome::new(
        changed,
        format!("already streaming from {primary} through slot {slot}"),
    )
    .with("slot_name", slot))
}

fn copy(
    args: &Args,
    upstream: &Upstream,
    slot: &str,
    new_dir: &Path,
    interactive: bool,
) -> Result<()> {
    let mut command = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(args.postgresql_bin_dir.join("pg_basebackup"))
        .args(["-d", &upstream.conninfo(&[]), "-D"])
        .arg(new_dir)
        .args(["-X", "stream", "-S", slot, "-c", "fast", "-w"])
        .secret_env("PGPASSWORD", &upstream.password)
        .show_stderr(interactive);
    if interactive {
        command = command.arg("--progress");
    }
    if let Some(rate) = &args.max_rate {
        command = command.args(["--max-rate", rate]);
    }
    command.run()?;
    Ok(())
}

/// The system identifier recorded in a data directory's control file.
fn control_system_identifier(bin_dir: &Path, data_dir: &Path) -> Result<String> {
    let out = Command::new(bin_dir.join("pg_controldata").display().to_string())
        .arg(data_dir)
        .env("LC_ALL", "C")
        .run()?;
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .map(|id| id.trim().to_string())
        .context("pg_controldata shows no system identifier")
}

fn start_streaming(
    cluster: &Cluster,
    primary: Ipv4Addr,
    slot: &str,
    timeout: Duration,
) -> Result<()> {
    cluster.unit.start()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some((status, sender, receiver_slot))) = cluster.wal_receiver() {
            if status == "streaming" && sender == primary.to_string() && receiver_slot == slot {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not stream from {primary} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Puts the old data directory back after a failed swap, and returns where
/// the failed copy now is.
fn roll_back(
    cluster: &Cluster,
    data_dir: &Path,
    old_dir: &Path,
    standby_dropin: &Path,
) -> Result<PathBuf> {
    let _ = cluster.unit.stop();
    let failed = files::with_suffix(data_dir, &format!("hapair-failed-{}", files::unix_time()));
    std::fs::rename(data_dir, &failed).context("rolling back: can't move the failed copy aside")?;
    std::fs::rename(old_dir, data_dir)
        .context("rolling back: can't put the old data directory back")?;
    let _ = std::fs::remove_file(standby_dropin);
    cluster
        .unit
        .start()
        .context("rolling back: the old data directory is back, but PostgreSQL did not start")?;
    Ok(failed)
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
/// connection string, and the whole for postgresql.conf.
fn standby_settings(upstream: &Upstream, slot: &str, passfile: &Path) -> Result<String> {
    let passfile = passfile
        .to_str()
        .context("the passfile's path is not UTF-8")?;
    let conninfo = upstream.conninfo(&[("passfile", passfile), ("application_name", slot)]);
    Ok(format!(
        "# Written by hapair's cluster_replicate_postgres: changes here are overwritten.\n\
         primary_conninfo = {}\n\
         primary_slot_name = {}\n\
         hot_standby = 'on'\n",
        postgres::conf_quote(&conninfo)?,
        postgres::conf_quote(slot)?
    ))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("can't remove {}", dir.display()))
        }
        _ => Ok(()),
    }
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
        let settings =
            standby_settings(&upstream, "hapair_10_0_0_2", Path::new("/it's /p")).unwrap();
        assert!(settings.contains("primary_slot_name = 'hapair_10_0_0_2'"));
        assert!(
            settings.contains("passfile=''/it\\\\''s /p''"),
            "the path is quoted for libpq, then for the file: {settings}"
        );
        assert!(settings.contains("sslmode=''require'' channel_binding=''require''"));
        assert!(standby_settings(&upstream, "s", Path::new("/a\nrestore_command=x")).is_err());
        assert!(!settings.contains("a:b"));
        assert_eq!(
            files::with_suffix(Path::new("/d/main"), "hapair-new"),
            PathBuf::from("/d/main.hapair-new")
        );
    }
}
