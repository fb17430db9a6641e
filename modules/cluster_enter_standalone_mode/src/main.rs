//! `cluster_enter_standalone_mode`: the seed's `cluster_enter_standalone_mode`,
//! breaking the pair, on either host.
//!
//! Replication stops for all four services, and the data stays:
//! - files: the secondary's sync timer is removed;
//! - event bus: MirrorMaker's unit and configuration are removed;
//! - KV store: a replica stops replicating (`REPLICAOF NO ONE`), and
//!   hapair's include loses its `replicaof`: it keeps every key, writable;
//! - PostgreSQL: a standby is promoted (writable, on a timeline of its
//!   own) and loses its connection settings and passfile; a primary loses
//!   hapair's pg_hba rule (first, so the standby can't come back) and then
//!   hapair's replication slots, whose WAL it no longer keeps;
//! - the instance config says `standalone`, and protection is back on.
//!
//! Each part is done only when it is still there: a second run changes
//! nothing. The cluster's keys and `cluster.hosts` stay, as the seed's
//! failover keeps them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use hapair_core::detach::{Detach, Follower};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster};
use hapair_core::redis::{self, Server};
use hapair_core::{protocol, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;
use serde_json::Value;

const SPEC: Spec = Spec {
    name: "cluster_enter_standalone_mode",
    doc: include_str!("../cluster_enter_standalone_mode.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    /// The pair's Redis password: a replica is told to stop replicating.
    redis_password: Secret,
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

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_enter_standalone_mode)
}

enum Change {
    Detach(Detach),
    DropSlots(Vec<String>),
    Record,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::Detach(detach) => detach.describe(),
            Change::DropSlots(slots) => format!("drop the replication slots {}", slots.join(", ")),
            Change::Record => "record standalone mode, protected, in the instance config".into(),
        }
    }
}

fn cluster_enter_standalone_mode(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    )
    .with_dirs(
        args.postgresql_data_dir.clone(),
        postgres::default_bin_dir(),
    );
    let redis = Server::local(args.redis_port, Some(args.redis_password.clone()));
    let follower = Follower {
        cluster: &cluster,
        redis: &redis,
        redis_config: &args.redis_config,
    };
    let config = InstanceConfig::load(&args.instance_config)?;

    let mut files = FilePlan::default();
    let mut actions: Vec<Change> = follower
        .plan(&mut files)?
        .into_iter()
        .map(Change::Detach)
        .collect();
    // A primary: the other host's pg_hba rule goes first, so that its
    // standby can't come back, then the slots whose WAL it no longer keeps.
    let hba = cluster.hba_file();
    let hba_state = files::existing(&hba)?;
    files.try_file(
        &hba,
        postgres::hba_without_replication_rule,
        hba_state.config_mode(),
        Some(hba_state.owner),
    )?;
    files.describe(&hba, "remove hapair's replication rule from pg_hba.conf");
    let slots = cluster.hapair_slots()?;
    if !slots.is_empty() {
        actions.push(Change::DropSlots(slots));
    }
    if config.replication_mode() != ReplicationMode::Standalone || !config.is_protected() {
        actions.push(Change::Record);
    }

    let mut plan = Plan::new(files);
    for action in actions {
        plan.push(action);
    }
    let was = config.replication_mode();
    let outcome = plan.run(ctx, "already standalone: nothing replicates", |plan, _| {
        apply(plan, &args, &follower)
    })?;
    Ok(outcome.with("was", was.as_str()).with("role", "standalone"))
}

fn apply(plan: &Plan<Change>, args: &Args, follower: &Follower) -> Result<Vec<String>> {
    for change in &plan.actions {
        if let Change::Detach(detach) = change {
            follower.apply(detach)?;
        }
    }
    let notes = follower.apply_files(&plan.files)?;
    for change in &plan.actions {
        match change {
            Change::DropSlots(slots) => {
                for slot in slots {
                    follower.cluster.drop_slot(slot)?;
                }
            }
            Change::Record => InstanceConfig::update(&args.instance_config, |config| {
                config.set_replication_mode(ReplicationMode::Standalone)?;
                config.set(instance::PROTECTED, Value::Bool(true))
            })?,
            Change::Detach(_) => {}
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"redis_password": "a long test password"}));
}
