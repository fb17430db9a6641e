//! `cluster_failover`: the seed's `cluster_failover`, on the secondary,
//! which becomes the primary for all four services.
//!
//! - `planned` (a switchover): the primary was fenced first
//!   (`cluster_fence` gave where its writes ended). Nothing is promoted
//!   until this host has every write: PostgreSQL replayed past the
//!   primary's shutdown checkpoint, Redis at the primary's final offset,
//!   MirrorMaker's committed positions at the primary's end offsets, and a
//!   last file sync done. Then nothing is lost.
//! - `unplanned` (the primary is gone): promoted with what this host has.
//!   The result gives the window that may be lost: the last WAL replayed
//!   and its time, Redis's offset and how long its link has been down, and
//!   the bus's lag at the monitor's last sample. Refused while PostgreSQL
//!   still streams from the primary: it is not gone.
//!
//! Promotion is what breaking the pair does on a secondary (MirrorMaker
//! and the file timer removed, `REPLICAOF NO ONE`, `pg_promote`), then a
//! checkpoint (pg_rewind reads from this host once the old primary
//! rejoins), and the instance config says `primary`, protected. A host
//! that is already the primary changes nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::detach::{Detach, Follower};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster, Lsn};
use hapair_core::protocol::Seconds;
use hapair_core::redis::{self, Server};
use hapair_core::services::Unit;
use hapair_core::{kafka, monitor, protocol, rsync, wait, Action, Context, Outcome, Plan};
use hapair_core::{Secret, Spec};
use serde::Deserialize;
use serde_json::{json, Value};

const SPEC: Spec = Spec {
    name: "cluster_failover",
    doc: include_str!("../cluster_failover.yml"),
    shorthand: None,
};

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
enum Mode {
    Planned,
    Unplanned,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    mode: Mode,
    /// The primary's address on the pair's network (planned: its Kafka's
    /// end offsets are read there).
    primary_address: Option<String>,
    /// Planned: where the primary's WAL ended (cluster_fence's final_lsn).
    final_lsn: Option<String>,
    /// Planned: Redis's offset when the primary's writes stopped
    /// (cluster_fence's redis_offset).
    final_redis_offset: Option<u64>,
    redis_password: Secret,
    /// The pair's Kafka password: the primary's end offsets are read with
    /// it (planned, when MirrorMaker runs here).
    kafka_password: Option<Secret>,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    #[serde(default = "kafka::default_pair_port")]
    kafka_pair_port: u16,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    #[serde(default = "kafka::default_run_as")]
    kafka_run_as: String,
    /// How long a planned failover waits for this host to have every write.
    #[serde(default = "default_catch_up_timeout")]
    catch_up_timeout: Seconds,
    /// The local monitor's port: its last sample of the bus's lag goes
    /// into an unplanned failover's report.
    #[serde(default = "default_monitor_port")]
    monitor_port: u16,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_data_dir")]
    postgresql_data_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    #[serde(default = "redis::default_config")]
    redis_config: PathBuf,
    #[serde(default = "redis::default_port")]
    redis_port: u16,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_catch_up_timeout() -> Seconds {
    Seconds::new(300)
}
fn default_monitor_port() -> u16 {
    8080
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_failover)
}

enum Change {
    CatchUp,
    Detach(Detach),
    Checkpoint,
    Record,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::CatchUp => "wait until this host has every write of the fenced primary \
                                (PostgreSQL, Redis, Kafka, a last file sync)"
                .into(),
            Change::Detach(detach) => detach.describe(),
            Change::Checkpoint => "checkpoint, for pg_rewind when the old primary rejoins".into(),
            Change::Record => "record primary mode, protected, in the instance config".into(),
        }
    }
}

/// Where the fenced primary's writes ended.
struct Final {
    lsn: Lsn,
    redis_offset: Option<u64>,
    kafka: Option<(String, kafka::Login)>,
}

fn cluster_failover(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    )
    .with_dirs(
        files::clean_path("postgresql_data_dir", &args.postgresql_data_dir)?,
        postgres::default_bin_dir(),
    );
    let redis = Server::local(args.redis_port, Some(args.redis_password.clone()));
    let follower = Follower {
        cluster: &cluster,
        redis: &redis,
        redis_config: &args.redis_config,
    };
    let config = InstanceConfig::load(&args.instance_config)?;
    let final_ = match args.mode {
        Mode::Planned => Some(planned_final(&args)?),
        Mode::Unplanned => None,
    };

    let was = config.replication_mode();
    if was == ReplicationMode::Fenced {
        bail!(
            "this host is fenced (cluster.replication_mode): it was the primary, and its writes \
             were stopped for a failover to the other host. Make it the other host's secondary \
             with cluster_rejoin (playbooks/rejoin.yml), never the primary again as it is"
        );
    }
    let mut files = FilePlan::default();
    let mut detach = follower.plan(&mut files)?;
    // Once this host has every write, PostgreSQL and Redis take writes
    // first: the application's outage ends there. MirrorMaker and the file
    // timer have nothing left to bring from a fenced or lost primary.
    detach.sort_by_key(|action| !matches!(action, Detach::Promote | Detach::StopReplica));
    let promoting = detach.contains(&Detach::Promote);
    let mut plan = Plan::new(files);
    if final_.is_some() && !detach.is_empty() {
        plan.push(Change::CatchUp);
    }
    for action in detach {
        plan.push(Change::Detach(action));
    }
    if promoting {
        plan.push(Change::Checkpoint);
    }
    if was != ReplicationMode::Primary || !config.is_protected() {
        plan.push(Change::Record);
    }
    if plan.is_empty() {
        return plan.run(ctx, "already the primary", |_, _| Ok(Vec::new()));
    }
    if args.mode == Mode::Unplanned {
        if let Some((status, sender, _)) = cluster.wal_receiver()? {
            if status == "streaming" {
                bail!(
                    "PostgreSQL still streams from the primary at {sender}: it is not gone. A \
                     failover now would leave two primaries. Stop its writes first and fail over \
                     as planned (playbooks/switchover.yml), which loses nothing"
                );
            }
        }
    }
    // What an unplanned failover may lose, read before anything changes.
    let window = match args.mode {
        Mode::Unplanned => Some(loss_window(&args, &cluster, &follower)?),
        Mode::Planned => None,
    };

    let mut caught_up = None;
    let mut writable_after = None;
    let started = Instant::now();
    let outcome = plan.run(ctx, "already the primary", |plan, _| {
        let mut notes = Vec::new();
        for change in &plan.actions {
            // PostgreSQL and Redis come first: past them, this host takes
            // the application's writes.
            let writable = !matches!(
                change,
                Change::CatchUp | Change::Detach(Detach::Promote | Detach::StopReplica)
            );
            if writable && writable_after.is_none() {
                writable_after = Some(started.elapsed().as_secs_f64());
            }
            match change {
                Change::CatchUp => {
                    let final_ = final_.as_ref().context("a planned failover's positions")?;
                    let seconds = catch_up(&args, &cluster, &follower, final_)?;
                    notes.push(format!("every write was here after {seconds:.1} s"));
                    caught_up = Some(seconds);
                }
                Change::Detach(detach) => follower.apply(detach)?,
                Change::Checkpoint | Change::Record => {}
            }
        }
        notes.extend(follower.apply_files(&plan.files)?);
        for change in &plan.actions {
            match change {
                Change::Checkpoint => {
                    cluster.query("CHECKPOINT")?;
                }
                Change::Record => InstanceConfig::update(&args.instance_config, |config| {
                    config.set_replication_mode(ReplicationMode::Primary)?;
                    config.set(instance::PROTECTED, Value::Bool(true))
                })?,
                _ => {}
            }
        }
        Ok(notes)
    })?;
    let mut outcome = outcome
        .with("was", was.as_str())
        .with("role", "primary")
        .with(
            "mode",
            if final_.is_some() {
                "planned"
            } else {
                "unplanned"
            },
        );
    if let Some(seconds) = caught_up {
        outcome = outcome.with("catch_up_seconds", seconds);
    }
    if let Some(seconds) = writable_after {
        outcome = outcome
            .with("writable_after_seconds", seconds)
            .with("seconds", started.elapsed().as_secs_f64());
    }
    if let Some(window) = window {
        outcome = outcome.with("loss_window", window);
    }
    Ok(outcome)
}

/// A planned failover's positions, from cluster_fence's result.
fn planned_final(args: &Args) -> Result<Final> {
    let lsn = args
        .final_lsn
        .as_deref()
        .context("a planned failover needs final_lsn: cluster_fence's final_lsn on the primary")?;
    let primary = args
        .primary_address
        .as_deref()
        .context("a planned failover needs primary_address")?;
    let primary = instance::parse_ipv4_str("primary_address", primary)?;
    let kafka = match &args.kafka_password {
        Some(password) => Some((
            format!("{primary}:{}", args.kafka_pair_port),
            kafka::Login::new(&args.kafka_user, password)?,
        )),
        None => None,
    };
    Ok(Final {
        lsn: Lsn::parse(lsn).context("final_lsn")?,
        redis_offset: args.final_redis_offset,
        kafka,
    })
}

/// Waits until this host has every write the fenced primary took, then a
/// last file sync. Returns how long it took; an error, with nothing
/// promoted, when the timeout passes first.
fn catch_up(args: &Args, cluster: &Cluster, follower: &Follower, final_: &Final) -> Result<f64> {
    let started = Instant::now();
    let timeout = args.catch_up_timeout.duration();
    let mut waiting = String::new();
    let bus = FencedBus::read(args, final_)?;
    let mut check = || -> Result<bool> {
        let replayed = Lsn::parse(&cluster.query("SELECT pg_last_wal_replay_lsn()")?)?;
        // The shutdown checkpoint's record starts at final_lsn: replayed
        // past it, the standby has it all.
        if replayed <= final_.lsn {
            waiting = format!(
                "PostgreSQL replayed {replayed}, the primary ended at {}",
                final_.lsn
            );
            return Ok(false);
        }
        if let Some(end) = final_.redis_offset {
            let info = follower.redis.info("replication")?;
            let here: u64 = info
                .get("slave_repl_offset")
                .or_else(|| info.get("master_repl_offset"))
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            if here < end {
                waiting = format!("Redis is at offset {here}, the primary ended at {end}");
                return Ok(false);
            }
        }
        if let Some(bus) = &bus {
            let behind = bus.behind()?;
            if behind > 0 {
                waiting =
                    format!("MirrorMaker has {behind} records of the primary still to mirror");
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut failed = None;
    let done = wait::until(timeout, Duration::from_millis(500), || match check() {
        Ok(done) => done,
        Err(e) => {
            failed = Some(e);
            true
        }
    });
    if let Some(e) = failed {
        return Err(e.context("checking that this host has every write; nothing was promoted"));
    }
    if !done {
        bail!(
            "this host did not have every write of the primary within {} s ({waiting}); nothing \
             was promoted, and the primary stays fenced. Run again to wait longer, or, if the \
             primary is lost, fail over unplanned",
            args.catch_up_timeout.get()
        );
    }
    // The pair's files, when it has any: a last pull from the fenced primary.
    let sync = Unit::new(format!("{}.service", rsync::SYNC_UNIT));
    if files::state(&sync.file())?.is_some() {
        sync.start()
            .context("the last file sync from the primary failed; nothing was promoted")?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The fenced primary's bus, as MirrorMaker here must have it: its end
/// offsets, final since the fence, for the topics MirrorMaker mirrors.
struct FencedBus {
    tools: kafka::Tools,
    local: String,
    end: kafka::PartitionOffsets,
}

impl FencedBus {
    /// `None` when nothing mirrors the bus here.
    fn read(args: &Args, final_: &Final) -> Result<Option<FencedBus>> {
        let config_path = PathBuf::from(kafka::MIRRORMAKER_CONFIG);
        let Some(config) = files::read_optional(&config_path)? else {
            return Ok(None);
        };
        let (bootstrap, login) = final_.kafka.as_ref().context(
            "MirrorMaker mirrors the bus here: a planned failover needs kafka_password to read \
             the primary's end offsets",
        )?;
        let key = format!(
            "{}->{}.topics",
            kafka::MIRRORMAKER_SOURCE,
            kafka::MIRRORMAKER_TARGET
        );
        let pattern = kafka::property(&config, &key)
            .map(|p| kafka::property_unescaped(&p))
            .context("MirrorMaker's configuration names no topics")?;
        let tools = kafka::Tools::new(&args.kafka_home, &args.kafka_run_as)?;
        let mirrored: Vec<String> = tools
            .topics_matching(bootstrap, Some(login), &pattern)?
            .into_iter()
            // Heartbeats are MirrorMaker's, not the application's: a
            // switchover waits for none of them.
            .filter(|topic| !kafka::excluded_from_mirroring(topic) && !kafka::is_heartbeats(topic))
            .collect();
        let end = kafka::partition_end_offsets(bootstrap, Some(login))?
            .into_iter()
            .filter(|((topic, _), _)| mirrored.contains(topic))
            .collect();
        Ok(Some(FencedBus {
            tools,
            local: format!("127.0.0.1:{}", args.kafka_port),
            end,
        }))
    }

    /// Records MirrorMaker has not committed here yet.
    fn behind(&self) -> Result<u64> {
        let mirrored = self
            .tools
            .mirrored_offsets(&self.local, kafka::MIRRORMAKER_SOURCE)?;
        Ok(kafka::not_yet_mirrored(&self.end, &mirrored)
            .values()
            .map(|(_, behind)| behind)
            .sum())
    }
}

/// What an unplanned failover may lose: this host's last positions, read
/// before the promotion.
fn loss_window(args: &Args, cluster: &Cluster, follower: &Follower) -> Result<Value> {
    let row = cluster.query(
        "SELECT coalesce(pg_last_wal_receive_lsn()::text, '') || '|' || \
         coalesce(pg_last_wal_replay_lsn()::text, '') || '|' || \
         coalesce(pg_last_xact_replay_timestamp()::text, '')",
    )?;
    let fields: Vec<&str> = row.split('|').collect();
    let field = |i: usize| {
        fields
            .get(i)
            .filter(|f| !f.is_empty())
            .map(|f| f.to_string())
    };
    let info = follower.redis.info("replication")?;
    let number = |key: &str| info.get(key).and_then(|v| v.parse::<i64>().ok());
    let monitor = SocketAddr::from((Ipv4Addr::LOCALHOST, args.monitor_port));
    // The monitor's last sample of the bus while the primary answered.
    let bus = match monitor::fetch_report(monitor, Duration::from_secs(5)) {
        Ok(report) if report["event_bus"]["status"] == "ok" => report["event_bus"].clone(),
        Ok(report) if report["event_bus"]["last_ok"].is_object() => {
            report["event_bus"]["last_ok"].clone()
        }
        Ok(report) => report["event_bus"].clone(),
        Err(e) => {
            json!({"status": "unknown", "reason": format!("the monitor did not answer: {e:#}")})
        }
    };
    Ok(json!({
        "postgresql": {
            "received_lsn": field(0),
            "replayed_lsn": field(1),
            "last_replayed_transaction_at": field(2),
        },
        "kv_store": {
            "offset": number("slave_repl_offset"),
            "link_down_seconds": number("master_link_down_since_seconds"),
            "last_io_seconds_ago": number("master_last_io_seconds_ago"),
        },
        "event_bus_at_last_sample": bus,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    hapair_core::doc_test!(
        Args,
        json!({"mode": "unplanned", "redis_password": "a long test password"})
    );
}
