//! `cluster_rejoin`: the old primary, fenced after a failover, becomes the
//! new primary's secondary, rather than losing its data to a full copy.
//!
//! - PostgreSQL: pg_rewind from the new primary (a dry run first, which
//!   modifies nothing), then streaming on the new timeline through this
//!   host's slot there. The result names what the rewind threw away: the
//!   WAL this host wrote after the two parted. When the rewind can't be
//!   done (the WAL back to the fork is gone, say), the data is left as it
//!   was, set up to start only as a standby, and step 8
//!   (`cluster_replicate_postgres`) copies the new primary anew, keeping
//!   this data until the copy streams.
//! - Kafka: the fence comes off, and the copies MirrorMaker will mirror
//!   from the new primary (the topics it has that match `topics`, and
//!   MirrorMaker's own positions here) are deleted, to be rebuilt from the
//!   start rather than appended to twice. The records only this host had
//!   are counted in the result.
//! - Redis starts again; step 9 makes it a replica of the new primary.
//! - Files: the sync (ha_setup's files play) pulls from the new primary.
//! - The fence comes off (its record and drop-ins), and the instance config
//!   says `secondary` once PostgreSQL streams.
//!
//! Refused on a protected instance, and on a host that was not fenced
//! (`cluster_fence` stops its writes first). A host that already streams
//! from the new primary changes nothing.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::fence::{self, Record};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::rewind::{self, Rewind};
use hapair_core::postgres::standby::{Replaced, Standby};
use hapair_core::postgres::{self, Cluster, Lsn, RoleName, Upstream};
use hapair_core::protocol::Seconds;
use hapair_core::services::{self, Unit};
use hapair_core::{kafka, net, protocol, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;
use serde_json::{json, Value};

const SPEC: Spec = Spec {
    name: "cluster_rejoin",
    doc: include_str!("../cluster_rejoin.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    /// The new primary's address on the pair's network.
    primary_address: String,
    /// This host's address on the pair's network; by default the one it
    /// reaches the new primary from.
    address: Option<String>,
    replication_password: Secret,
    #[serde(default = "postgres::default_replication_user")]
    replication_user: RoleName,
    kafka_password: Secret,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    #[serde(default = "kafka::default_pair_port")]
    kafka_pair_port: u16,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_unit")]
    kafka_unit: String,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    #[serde(default = "kafka::default_run_as")]
    kafka_run_as: String,
    /// The topics MirrorMaker mirrors (step 10's `topics`, a Java regex).
    #[serde(default = "default_topics")]
    topics: String,
    #[serde(default = "default_stream_timeout")]
    stream_timeout: Seconds,
    /// false: never rewind; step 8 copies the new primary anew (keeping
    /// this data aside until the copy streams).
    #[serde(default = "default_rewind")]
    rewind: bool,
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
    #[serde(default = "hapair_core::redis::default_unit")]
    redis_unit: String,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_topics() -> String {
    ".*".into()
}
fn default_rewind() -> bool {
    true
}
fn default_stream_timeout() -> Seconds {
    Seconds::new(120)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_rejoin)
}

#[derive(Debug, PartialEq)]
enum Change {
    /// Take Kafka's fence off.
    UnfenceKafka,
    /// Delete this host's copies of what MirrorMaker will mirror.
    RebuildTopics(Vec<String>),
    /// pg_rewind, then start streaming.
    Rewind(Rewind),
    /// Take the fence's record and drop-ins away, start Redis.
    Unfence,
    /// Drop the slots this host kept as the primary: as a standby it would
    /// keep their WAL forever.
    DropStaleSlots,
    Record,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::UnfenceKafka => format!("let Kafka take records again ({})", fence::KAFKA_SETTING),
            Change::RebuildTopics(topics) => format!(
                "delete this host's copies of {}, for MirrorMaker to rebuild them from the new primary",
                topics.join(", ")
            ),
            Change::Rewind(Rewind::Rewound { diverged }) => format!(
                "rewind PostgreSQL to where the hosts parted ({diverged}) with pg_rewind, and stream \
                 from the new primary"
            ),
            Change::Rewind(Rewind::NotNeeded { .. }) => {
                "stream from the new primary (nothing to rewind)".into()
            }
            Change::Rewind(Rewind::Impossible(why)) => format!(
                "leave PostgreSQL's data as it is, to start only as a standby, for step 8 to copy \
                 the new primary anew (pg_rewind can't: {why})"
            ),
            Change::Unfence => "take the fence off (its record and drop-ins); start Redis".into(),
            Change::DropStaleSlots => {
                "drop the replication slots it kept as the primary (hapair_*)".into()
            }
            Change::Record => "record secondary mode in the instance config".into(),
        }
    }
}

fn cluster_rejoin(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let address = match &args.address {
        Some(a) => instance::parse_ipv4_str("address", a)?,
        None => net::source_address_for(primary)?,
    };
    net::ensure_own_address(address)
        .context("pass the address the new primary reaches this host at as address")?;
    let standby = standby(&args, primary, address)?;
    let cluster = &standby.cluster;
    let config = InstanceConfig::load(&args.instance_config)?;
    let mode = config.replication_mode();

    if mode == ReplicationMode::Secondary && cluster.unit.is_active()? && standby.streams()? {
        let plan: Plan<Change> = Plan::default();
        return Ok(plan
            .run(
                ctx,
                format!("already the secondary of {primary}, streaming"),
                |_, _| Ok(Vec::new()),
            )?
            .with("role", "secondary"));
    }
    if config.is_protected() {
        bail!(
            "this host is a protected instance: rejoining replaces what it wrote after the \
             failover with the new primary's data. {}",
            instance::UNPROTECT_HINT
        );
    }
    match mode {
        ReplicationMode::Fenced => {}
        ReplicationMode::Primary => bail!(
            "this host is still a primary, taking writes: stop them first with cluster_fence \
             (playbooks/rejoin.yml does), then run again"
        ),
        other => bail!(
            "this host is {other}, not an old primary fenced after a failover: set the pair up \
             with playbooks/ha_setup.yml instead"
        ),
    }
    if cluster.unit.is_active()? {
        bail!(
            "PostgreSQL runs here although the host is fenced: stop it (cluster_fence does), \
             then run again"
        );
    }
    if !standby.upstream.has_slot(&standby.slot)? {
        bail!(
            "the new primary {primary} has no replication slot {} for this host: run \
             cluster_add_secondary on it (seed step 7; ha_setup.yml does), then run again",
            standby.slot
        );
    }

    // PostgreSQL's files: the standby's passfile, settings and signal, as
    // step 8 writes them. Written even when the rewind can't be done: the
    // old data then starts only as a standby, never as a second primary.
    let mut files = FilePlan::default();
    standby.plan_files(&mut files, address)?;
    files.file(
        &cluster.data_dir.join("standby.signal"),
        |_| String::new(),
        0o600,
        Some(standby.owner),
    )?;

    let tools = kafka::Tools::new(&args.kafka_home, &args.kafka_run_as)?;
    let local = format!("127.0.0.1:{}", args.kafka_port);
    let login = kafka::Login::new(&args.kafka_user, &args.kafka_password)?;
    let source = format!("{primary}:{}", args.kafka_pair_port);

    let mut plan = Plan::new(files);
    let mut discarded_records = BTreeMap::new();
    if Unit::new(&args.kafka_unit).is_active()? {
        // Rebuilt while the fence still holds: no producer recreates a
        // topic with records of its own before MirrorMaker starts.
        let rebuilt = rebuilt_topics(&tools, &local, &source, &login, &args.topics)?;
        if !rebuilt.is_empty() {
            discarded_records = records_only_here(&local, &source, &login, &rebuilt)?;
            plan.push(Change::RebuildTopics(rebuilt));
        }
        if tools
            .broker_default(&local, fence::KAFKA_SETTING)?
            .is_some()
        {
            plan.push(Change::UnfenceKafka);
        }
    } else {
        bail!(
            "Kafka ({}) is not running: its copies can't be rebuilt. Start it, then run again",
            args.kafka_unit
        );
    }
    let target_end = cluster.shutdown_checkpoint()?;
    let rewind = match args.rewind {
        true => rewind::rewind(cluster, &standby.upstream, true)?,
        false => Rewind::Impossible("rewind is false: a full copy was asked for".into()),
    };
    let discarded = discarded_wal(&rewind, target_end);
    let rewinds = !matches!(rewind, Rewind::Impossible(_));
    plan.push(Change::Rewind(rewind));
    plan.push(Change::Unfence);
    if rewinds {
        plan.push(Change::DropStaleSlots);
        plan.push(Change::Record);
    }

    let redis_unit = Unit::new(&args.redis_unit);
    let outcome = plan.run(ctx, "nothing to do", |plan, _| {
        apply(plan, &args, &standby, &tools, &local, &redis_unit)
    })?;
    Ok(outcome
        .with("role", if rewinds { "secondary" } else { "fenced" })
        .with("rewound", rewinds)
        .with("needs_copy", !rewinds)
        .with("discarded_wal", discarded)
        .with("discarded_records", discarded_records))
}

fn standby(args: &Args, primary: Ipv4Addr, address: Ipv4Addr) -> Result<Standby> {
    let data_dir = files::clean_path("postgresql_data_dir", &args.postgresql_data_dir)?;
    let config_dir = files::clean_path("postgresql_config_dir", &args.postgresql_config_dir)?;
    let bin_dir = files::clean_path("postgresql_bin_dir", &args.postgresql_bin_dir)?;
    Ok(Standby::new(
        Cluster::new(&config_dir, args.postgresql_port, &args.postgresql_unit)
            .with_dirs(data_dir.clone(), bin_dir),
        Upstream {
            host: primary,
            port: args.postgresql_port,
            user: args.replication_user.clone(),
            password: args.replication_password.clone(),
        },
        address,
        Replaced::open(&data_dir)?,
        files::existing(&data_dir)?.owner,
        &args.instance_config,
        args.stream_timeout.duration(),
    ))
}

/// What the rewind throws away: the WAL this host wrote from where the
/// hosts parted to where its own ended (its shutdown checkpoint).
fn discarded_wal(rewind: &Rewind, target_end: Lsn) -> Value {
    match rewind {
        Rewind::Rewound { diverged } if *diverged < target_end => json!({
            "from": diverged.to_string(),
            "to": target_end.to_string(),
            "bytes": target_end.0 - diverged.0,
        }),
        Rewind::Impossible(_) => json!({
            "from": null,
            "to": target_end.to_string(),
            "bytes": null,
            "note": "not rewound: step 8 replaces the data, kept aside until the copy streams",
        }),
        _ => json!({"from": null, "to": null, "bytes": 0}),
    }
}

/// The topics here MirrorMaker will mirror from the new primary (those it
/// has that match `topics`, and its heartbeats), and MirrorMaker's own
/// positions for that source, from when this host was a secondary before.
fn rebuilt_topics(
    tools: &kafka::Tools,
    local: &str,
    source: &str,
    login: &kafka::Login,
    topics: &str,
) -> Result<Vec<String>> {
    let pattern = format!("heartbeats|{topics}");
    let mirrored: Vec<String> = tools
        .topics_matching(source, Some(login), &pattern)?
        .into_iter()
        .filter(|topic| !kafka::excluded_from_mirroring(topic))
        .collect();
    let own_positions = ["offsets", "configs", "status"]
        .map(|kind| format!("mm2-{kind}.{}.internal", kafka::MIRRORMAKER_SOURCE))
        .into_iter()
        .chain([format!(
            "{}.checkpoints.internal",
            kafka::MIRRORMAKER_SOURCE
        )])
        .collect::<Vec<_>>();
    Ok(tools
        .topics(local, None)?
        .into_iter()
        .filter(|topic| mirrored.contains(topic) || own_positions.contains(topic))
        .collect())
}

/// Per rebuilt topic, the records this host has beyond the new primary's
/// (what it took after the two parted, or never sent): lost with the copy.
fn records_only_here(
    local: &str,
    source: &str,
    login: &kafka::Login,
    topics: &[String],
) -> Result<BTreeMap<String, u64>> {
    let here = kafka::all_end_offsets(local, None)?;
    let there = kafka::all_end_offsets(source, Some(login))?;
    Ok(topics
        .iter()
        .filter(|t| !t.ends_with(".internal") && !t.starts_with("mm2-"))
        .filter_map(|topic| {
            let extra = here
                .get(topic)
                .copied()
                .unwrap_or(0)
                .saturating_sub(there.get(topic).copied().unwrap_or(0));
            (extra > 0).then(|| (topic.clone(), extra))
        })
        .collect())
}

fn apply(
    plan: &Plan<Change>,
    args: &Args,
    standby: &Standby,
    tools: &kafka::Tools,
    local: &str,
    redis_unit: &Unit,
) -> Result<Vec<String>> {
    let cluster = &standby.cluster;
    let mut notes = Vec::new();
    let mut rewinds = false;
    for change in &plan.actions {
        match change {
            Change::UnfenceKafka => tools.set_broker_default(local, fence::KAFKA_SETTING, None)?,
            Change::RebuildTopics(topics) => tools.delete_topics(local, topics)?,
            Change::Rewind(Rewind::Impossible(_)) => {
                plan.files.apply()?;
                notes.push("step 8 copies the new primary anew".into());
            }
            Change::Rewind(_) => {
                let started = std::time::Instant::now();
                if let Err(e) = rewind::rewind(cluster, &standby.upstream, false) {
                    // What is left can't run; the standby files keep it
                    // from starting as a primary, and step 8 copies anew.
                    plan.files.apply()?;
                    return Err(e.context(
                        "run ha_setup.yml's step 8 (cluster_replicate_postgres): it copies the \
                         new primary and keeps this directory aside until the copy streams",
                    ));
                }
                plan.files.apply()?;
                rewinds = true;
                notes.push(format!(
                    "rewound in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
            }
            Change::Unfence => {
                let record = fence::record_path(&args.instance_config);
                for unit in [&args.postgresql_unit, &args.redis_unit] {
                    let path = fence::dropin_path(unit);
                    if files::state(&path)?.is_some() {
                        let (dir, name) = files::Dir::of(&path)?;
                        dir.remove_all(&name)?;
                    }
                }
                if Record::load(&record)?.is_some() {
                    let (dir, name) = files::Dir::of(&record)?;
                    dir.remove_all(&name)?;
                }
                services::daemon_reload()?;
                redis_unit.start()?;
                if rewinds {
                    standby.start_streaming()?;
                    notes.push(format!(
                        "PostgreSQL streams from {} through slot {}",
                        standby.primary, standby.slot
                    ));
                }
            }
            Change::DropStaleSlots => {
                for slot in cluster.hapair_slots()? {
                    cluster.drop_slot(&slot)?;
                }
            }
            Change::Record => InstanceConfig::update(&args.instance_config, |config| {
                config.set_replication_mode(ReplicationMode::Secondary)
            })?,
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    hapair_core::doc_test!(
        Args,
        json!({"primary_address": "10.0.0.1", "replication_password": "a long test password",
               "kafka_password": "another test password"})
    );

    #[test]
    fn the_discarded_range_runs_from_the_fork_to_the_old_end() {
        let end = Lsn(0x5000100);
        let rewound = Rewind::Rewound {
            diverged: Lsn(0x5000000),
        };
        assert_eq!(
            discarded_wal(&rewound, end),
            json!({"from": "0/5000000", "to": "0/5000100", "bytes": 256})
        );
        let clean = Rewind::NotNeeded {
            diverged: Some(Lsn(0x5000200)),
        };
        assert_eq!(discarded_wal(&clean, end)["bytes"], 0);
    }
}
