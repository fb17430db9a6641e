//! `cluster_fence`: the first half of a planned failover, on the primary
//! (and the first step of a rejoin, on an old primary that came back).
//!
//! Stops every write here and keeps it stopped until `cluster_rejoin`:
//! 1. the fence's record is written, and a systemd drop-in on PostgreSQL's
//!    and Redis's units keeps them from starting while it exists;
//! 2. Kafka takes no record any more (`message.max.bytes=0` as the
//!    brokers' default) but keeps serving reads, for the other host's
//!    MirrorMaker to take the last of them;
//! 3. Redis's writes are paused, its replica given the time to take the
//!    last of them, then Redis stops;
//! 4. PostgreSQL shuts down cleanly: its walsender sends the standby every
//!    record up to the shutdown checkpoint first;
//! 5. the record gets where the writes ended (the shutdown checkpoint,
//!    Redis's offset), and the instance config says `fenced`.
//!
//! The result gives those positions: `cluster_failover` on the other host
//! promotes only once it has replayed up to them. A second run changes
//! nothing and gives the same positions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use hapair_core::fence::{self, Record};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster};
use hapair_core::protocol::Seconds;
use hapair_core::redis::{self, Server};
use hapair_core::services::{self, Unit};
use hapair_core::{kafka, protocol, wait, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_fence",
    doc: include_str!("../cluster_fence.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    /// The pair's Redis password: its writes are paused.
    redis_password: Secret,
    /// How long Redis's replica may take to receive the last writes.
    #[serde(default = "default_replica_timeout")]
    replica_timeout: Seconds,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_data_dir")]
    postgresql_data_dir: PathBuf,
    #[serde(default = "postgres::default_bin_dir")]
    postgresql_bin_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    #[serde(default = "redis::default_port")]
    redis_port: u16,
    #[serde(default = "redis::default_unit")]
    redis_unit: String,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_unit")]
    kafka_unit: String,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    #[serde(default = "kafka::default_run_as")]
    kafka_run_as: String,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_replica_timeout() -> Seconds {
    Seconds::new(60)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_fence)
}

#[derive(Debug, PartialEq)]
enum Change {
    Begin,
    FenceKafka,
    StopRedis,
    StopPostgres,
    Record,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::Begin => "record the fence, so that PostgreSQL and Redis don't start".into(),
            Change::FenceKafka => format!(
                "make Kafka refuse every record ({}={}); it keeps serving reads",
                fence::KAFKA_SETTING,
                fence::KAFKA_FENCED
            ),
            Change::StopRedis => {
                "pause Redis's writes, let its replica take the last, stop Redis".into()
            }
            Change::StopPostgres => {
                "shut PostgreSQL down cleanly (its standby receives every record first)".into()
            }
            Change::Record => "record where the writes ended, and fenced mode".into(),
        }
    }
}

fn cluster_fence(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    )
    .with_dirs(
        files::clean_path("postgresql_data_dir", &args.postgresql_data_dir)?,
        files::clean_path("postgresql_bin_dir", &args.postgresql_bin_dir)?,
    );
    let redis_unit = Unit::new(&args.redis_unit);
    let redis = Server::local(args.redis_port, Some(args.redis_password.clone()));
    let tools = kafka::Tools::new(&args.kafka_home, &args.kafka_run_as)?;
    let kafka_local = format!("127.0.0.1:{}", args.kafka_port);
    let record_path = fence::record_path(&args.instance_config);
    let record = Record::load(&record_path)?;
    let mode = InstanceConfig::load(&args.instance_config)?.replication_mode();
    if !matches!(mode, ReplicationMode::Primary | ReplicationMode::Fenced) {
        bail!(
            "this host is {mode} (cluster.replication_mode), not the primary: only a primary is \
             fenced before a failover"
        );
    }

    let mut files = FilePlan::default();
    let dropin = fence::dropin_text(&record_path)?;
    for unit in [&args.postgresql_unit, &args.redis_unit] {
        files.file(&fence::dropin_path(unit), |_| dropin.clone(), 0o644, None)?;
    }
    let mut plan = Plan::new(files);
    if record.is_none() {
        plan.push(Change::Begin);
    }
    let kafka_runs = Unit::new(&args.kafka_unit).is_active()?;
    if kafka_runs
        && tools
            .broker_default(&kafka_local, fence::KAFKA_SETTING)?
            .as_deref()
            != Some(fence::KAFKA_FENCED)
    {
        plan.push(Change::FenceKafka);
    }
    if redis_unit.is_active()? {
        plan.push(Change::StopRedis);
    }
    if cluster.unit.is_active()? {
        plan.push(Change::StopPostgres);
    }
    let ended = record.as_ref().is_some_and(|r| r.final_lsn.is_some());
    if !ended || mode != ReplicationMode::Fenced || !plan.actions.is_empty() {
        plan.push(Change::Record);
    }
    if !kafka_runs {
        ctx.warn(format!(
            "Kafka ({}) is not running: it is not fenced",
            args.kafka_unit
        ));
    }

    let mut done = record.clone().unwrap_or_default();
    let outcome = plan.run(
        ctx,
        "already fenced: no service here takes writes",
        |plan, ctx| {
            apply(
                plan,
                ctx,
                &args,
                &cluster,
                &redis,
                &redis_unit,
                &tools,
                &mut done,
            )
        },
    )?;
    let done = match ctx.check_mode {
        true => record.unwrap_or_default(),
        false => done,
    };
    Ok(outcome
        .with("final_lsn", &done.final_lsn)
        .with("redis_offset", done.redis_offset)
        .with("fenced_at", done.fenced_at)
        .with("role", "fenced"))
}

#[allow(clippy::too_many_arguments)]
fn apply(
    plan: &Plan<Change>,
    ctx: &mut Context,
    args: &Args,
    cluster: &Cluster,
    redis: &Server,
    redis_unit: &Unit,
    tools: &kafka::Tools,
    record: &mut Record,
) -> Result<Vec<String>> {
    let record_path = fence::record_path(&args.instance_config);
    let mut notes = Vec::new();
    for change in &plan.actions {
        match change {
            Change::Begin => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                *record = Record {
                    fenced_at: now,
                    ..Record::default()
                };
                instance::ensure_config_dir(&args.instance_config)?;
                record.save(&record_path)?;
                for change in &plan.files.changes {
                    files::ensure_dir(&files::parent_of(&change.path), 0o755, None)?;
                }
                plan.files.apply()?;
                services::daemon_reload()?;
            }
            Change::FenceKafka => tools.set_broker_default(
                &format!("127.0.0.1:{}", args.kafka_port),
                fence::KAFKA_SETTING,
                Some(fence::KAFKA_FENCED),
            )?,
            Change::StopRedis => {
                let (offset, caught_up) = pause_redis(redis, args.replica_timeout.duration())?;
                if !caught_up {
                    ctx.warn(format!(
                        "Redis's replica had not taken every write up to offset {offset} within \
                         {} s; the failover checks it again",
                        args.replica_timeout.get()
                    ));
                }
                record.redis_offset = Some(offset);
                redis_unit.stop()?;
            }
            Change::StopPostgres => cluster.unit.stop()?,
            Change::Record => {
                // Where PostgreSQL's WAL ends: read from its control file,
                // so a second run gives it too.
                record.final_lsn = Some(cluster.shutdown_checkpoint()?.to_string());
                record.save(&record_path)?;
                InstanceConfig::update(&args.instance_config, |config| {
                    config.set_replication_mode(ReplicationMode::Fenced)
                })?;
                notes.push(format!(
                    "writes ended at WAL {} and Redis offset {}",
                    record.final_lsn.as_deref().unwrap_or("?"),
                    record
                        .redis_offset
                        .map_or("unknown".to_string(), |o| o.to_string())
                ));
            }
        }
    }
    if !plan.actions.contains(&Change::Begin) && !plan.files.changes.is_empty() {
        plan.files.apply()?;
        services::daemon_reload()?;
    }
    Ok(notes)
}

/// Pauses Redis's writes (clients wait; none is acknowledged again here),
/// and waits until every connected replica has the last of them. Returns
/// the offset the writes ended at, and whether the replicas reached it.
fn pause_redis(redis: &Server, timeout: Duration) -> Result<(u64, bool)> {
    // Longer than any failover: Redis stops before the pause ends.
    redis.command(&["CLIENT", "PAUSE", "3600000", "WRITE"])?;
    let offset = |info: &redis::Info| -> u64 {
        info.get("master_repl_offset")
            .and_then(|o| o.parse().ok())
            .unwrap_or(0)
    };
    let end = offset(&redis.info("replication")?);
    let caught_up = wait::until(timeout, Duration::from_millis(200), || {
        redis
            .info("replication")
            .map(|info| replicas_at(&info, end))
            .unwrap_or(false)
    });
    Ok((end, caught_up))
}

/// Whether every replica Redis lists (`slaveN:ip=...,offset=N,...`) has
/// reached `end`.
fn replicas_at(info: &redis::Info, end: u64) -> bool {
    info.iter()
        .filter(|(key, _)| key.starts_with("slave") && key[5..].parse::<u32>().is_ok())
        .all(|(_, value)| {
            value
                .split(',')
                .find_map(|field| field.strip_prefix("offset="))
                .and_then(|o| o.parse::<u64>().ok())
                .is_some_and(|o| o >= end)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"redis_password": "a long test password"}));

    #[test]
    fn replicas_count_only_when_each_reached_the_end() {
        let info = redis::parse_info(
            "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
             slave0:ip=10.0.0.2,port=6379,state=online,offset=120,lag=0\r\nmaster_repl_offset:120\r\n",
        );
        assert!(replicas_at(&info, 120));
        assert!(!replicas_at(&info, 121));
        let none = redis::parse_info("role:master\r\nconnected_slaves:0\r\n");
        assert!(replicas_at(&none, 500));
    }
}
