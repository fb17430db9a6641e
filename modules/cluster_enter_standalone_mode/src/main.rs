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

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster};
use hapair_core::redis::{self, Server};
use hapair_core::services::{self, Unit};
use hapair_core::{kafka, protocol, rsync, Action, Context, Outcome, Plan, Secret, Spec};
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

/// A standby's settings in its drop-in, and a replica's in Redis's
/// include: what makes each follow the other host.
const STANDBY_SETTINGS: [&str; 2] = ["primary_conninfo", "primary_slot_name"];
const REPLICA_SETTINGS: [&str; 2] = ["replicaof", "replica-read-only"];

enum Change {
    RemoveTimer,
    RemoveMirrorMaker,
    StopReplica,
    Promote,
    RemovePassfile(PathBuf),
    DropSlots(Vec<String>),
    Record,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::RemoveTimer => format!("stop and remove {}.timer", rsync::SYNC_UNIT),
            Change::RemoveMirrorMaker => format!("stop and remove {}", kafka::MIRRORMAKER_UNIT),
            Change::StopReplica => "make Redis stop replicating (REPLICAOF NO ONE)".into(),
            Change::Promote => "promote PostgreSQL (pg_promote): it takes writes".into(),
            Change::RemovePassfile(path) => format!("remove {}", path.display()),
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
    );
    let redis = Server::local(args.redis_port, Some(args.redis_password.clone()));
    let config = InstanceConfig::load(&args.instance_config)?;

    let mut files = FilePlan::default();
    let mut actions = Vec::new();
    // Files and the bus first: nothing is mirrored into a host that is
    // about to take writes of its own.
    let timer = Unit::new(format!("{}.timer", rsync::SYNC_UNIT));
    if files::state(&timer.file())?.is_some() {
        actions.push(Change::RemoveTimer);
    }
    if files::state(&Unit::new(kafka::MIRRORMAKER_UNIT).file())?.is_some() {
        actions.push(Change::RemoveMirrorMaker);
    }
    let redis_role = redis.info("replication")?.get("role").cloned();
    if redis_role.as_deref() == Some("slave") {
        actions.push(Change::StopReplica);
    }
    edit_existing(
        &mut files,
        &redis::dropin_path(&args.redis_config),
        &REPLICA_SETTINGS,
    )?;
    if cluster.in_recovery()? {
        actions.push(Change::Promote);
    }
    edit_existing(&mut files, &cluster.standby_dropin(), &STANDBY_SETTINGS)?;
    let passfile = files::parent_of(&args.postgresql_data_dir).join("hapair.pgpass");
    if files::state(&passfile)?.is_some() {
        actions.push(Change::RemovePassfile(passfile));
    }
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
        apply(plan, &args, &cluster, &redis)
    })?;
    Ok(outcome.with("was", was.as_str()).with("role", "standalone"))
}

/// Plans `path` without the lines setting `keys`, when the file is there,
/// with its own mode and owner.
fn edit_existing(files: &mut FilePlan, path: &Path, keys: &[&str]) -> Result<()> {
    let Some(state) = files::state(path)? else {
        return Ok(());
    };
    files.file(
        path,
        |text| files::without_settings(text, keys),
        state.config_mode(),
        Some(state.owner),
    )
}

fn apply(
    plan: &Plan<Change>,
    args: &Args,
    cluster: &Cluster,
    redis: &Server,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for change in &plan.actions {
        match change {
            Change::RemoveTimer => services::remove_unit(
                &Unit::new(format!("{}.timer", rsync::SYNC_UNIT)),
                &[
                    Unit::new(format!("{}.service", rsync::SYNC_UNIT)).file(),
                    PathBuf::from(rsync::SYNC_ARGS),
                ],
            )?,
            Change::RemoveMirrorMaker => services::remove_unit(
                &Unit::new(kafka::MIRRORMAKER_UNIT),
                &[PathBuf::from(kafka::MIRRORMAKER_CONFIG)],
            )?,
            Change::StopReplica => {
                redis.command(&["REPLICAOF", "NO", "ONE"])?;
            }
            Change::Promote => {
                // Waits for the promotion to end: PostgreSQL answers t.
                let promoted = cluster.query("SELECT pg_promote(true, 60)")?;
                if promoted != "t" {
                    bail!("PostgreSQL was not promoted within 60 s (pg_promote said {promoted:?}); see its log");
                }
            }
            // Removed before the new pg_hba.conf is read: the standby
            // settings are gone from the drop-in with the same reload.
            Change::RemovePassfile(path) => {
                let (dir, name) = files::Dir::of(path)?;
                dir.remove_all(&name)?;
            }
            Change::DropSlots(_) | Change::Record => {}
        }
    }
    // The files: Redis's include and PostgreSQL's drop-in without the
    // settings that followed the other host, pg_hba.conf without the
    // other host's rule; PostgreSQL reads them again.
    plan.files.apply()?;
    if !plan.files.changes.is_empty() {
        let restart = cluster.reload()?;
        if !restart.is_empty() {
            notes.push(format!(
                "PostgreSQL applies {} at its next restart",
                restart.join(", ")
            ));
        }
    }
    for change in &plan.actions {
        match change {
            Change::DropSlots(slots) => {
                for slot in slots {
                    cluster.drop_slot(slot)?;
                }
            }
            Change::Record => InstanceConfig::update(&args.instance_config, |config| {
                config.set_replication_mode(ReplicationMode::Standalone)?;
                config.set(instance::PROTECTED, Value::Bool(true))
            })?,
            _ => {}
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
