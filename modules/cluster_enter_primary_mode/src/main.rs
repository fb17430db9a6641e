//! `cluster_enter_primary_mode`: seed step 4, the seed's
//! `cluster_enter_master_mode`.
//!
//! Makes this host ready to be replicated from:
//! - PostgreSQL: streaming replication settings in hapair's conf.d drop-in
//!   (with a bounded `max_slot_wal_keep_size`, so a dead secondary can't fill
//!   this host's disk; `wal_log_hints`, so that after a failover pg_rewind
//!   can rejoin this host), listening on the pair's address, and a replication
//!   role whose password is set as a SCRAM verifier;
//! - Redis: listening on the pair's address, with a password;
//! - Kafka: a listener on the pair's address that requires the pair's
//!   SCRAM login, and no plaintext listener open beyond loopback;
//! - the instance config: `cluster.replication_mode = primary`.
//!
//! A service is restarted only when its configuration changed, and
//! PostgreSQL only when a changed setting needs it (a reload does the rest).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster};
use hapair_core::services::Unit;
use hapair_core::{kafka, net, protocol, redis, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_enter_primary_mode",
    doc: include_str!("../cluster_enter_primary_mode.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    /// This host's address on the pair's network.
    address: String,
    replication_password: Secret,
    #[serde(default = "postgres::default_replication_user")]
    replication_user: postgres::RoleName,
    redis_password: Secret,
    #[serde(default = "default_max_wal_senders")]
    max_wal_senders: u32,
    #[serde(default = "default_max_replication_slots")]
    max_replication_slots: u32,
    #[serde(default = "default_max_slot_wal_keep_size")]
    max_slot_wal_keep_size: String,
    /// WAL kept past each checkpoint, for pg_rewind: after an unplanned
    /// failover the old primary rewinds from the last checkpoint before the
    /// hosts parted, which its next checkpoints would otherwise recycle.
    #[serde(default = "default_wal_keep_size")]
    wal_keep_size: String,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    #[serde(default = "redis::default_config")]
    redis_config: PathBuf,
    #[serde(default = "redis::default_unit")]
    redis_unit: String,
    #[serde(default = "kafka::default_config")]
    kafka_config: PathBuf,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_unit")]
    kafka_unit: String,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    /// The account Kafka and its tools run as.
    #[serde(default = "kafka::default_run_as")]
    kafka_run_as: String,
    /// The pair listener's port, on `address`.
    #[serde(default = "kafka::default_pair_port")]
    kafka_pair_port: u16,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    kafka_password: Secret,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_max_wal_senders() -> u32 {
    10
}
fn default_max_replication_slots() -> u32 {
    10
}
fn default_wal_keep_size() -> String {
    "1GB".into()
}
fn default_max_slot_wal_keep_size() -> String {
    "10GB".into()
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_enter_primary_mode)
}

fn cluster_enter_primary_mode(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let address = instance::parse_ipv4_str("address", &args.address)?;
    net::ensure_own_address(address)
        .context("pass the address its peer reaches it at as address")?;
    for (name, size) in [
        ("max_slot_wal_keep_size", &args.max_slot_wal_keep_size),
        ("wal_keep_size", &args.wal_keep_size),
    ] {
        if size.is_empty() || !size.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("{name} takes a size such as 10GB, not {size:?}");
        }
    }
    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    );

    // Plan: the files, the role, the mode.
    let mut files = FilePlan::default();
    let pg_owner = files::existing(&args.postgresql_config_dir)?.owner;
    files.file(
        &cluster.dropin(),
        |_| postgres_dropin(&args, address),
        0o644,
        Some(pg_owner),
    )?;
    let redis_config = redis::plan_files(
        &mut files,
        SPEC.name,
        &args.redis_config,
        address,
        &args.redis_password,
        None,
    )?;
    let kafka = pair_kafka(&args, address)?;
    kafka.plan(&mut files)?;
    if !cluster.tls_enabled()? {
        bail!(
            "PostgreSQL on this host has ssl = off: the secondary's replication connection \
             requires TLS with channel binding, so a machine in the middle can't learn the \
             password. Set ssl = on with a certificate (Debian's default uses the snakeoil \
             certificate of the ssl-cert package), then run again"
        );
    }
    let role = cluster.role_password(&args.replication_user)?;
    let observed = Observed {
        role: match &role {
            None => RoleState::Missing,
            Some(Some(stored))
                if postgres::verifier_matches(stored, &args.replication_password) =>
            {
                RoleState::Current
            }
            Some(_) => RoleState::OtherPassword,
        },
        can_rewind: role.is_some() && cluster.role_can_rewind(&args.replication_user)?,
        kafka_login_works: kafka.login_works(&files)?,
        mode: InstanceConfig::load(&args.instance_config)?.replication_mode(),
    };
    let plan = plan(files, &observed);

    let mut restarted = Vec::new();
    let mut reloaded = Vec::new();
    let outcome = plan.run(
        ctx,
        format!("already in primary mode on {address}"),
        |plan, _| {
            let files = &plan.files;
            files.apply()?;
            if files.changes(&cluster.dropin()) {
                let pending = cluster.reload()?;
                if pending.is_empty() {
                    reloaded.push(cluster.unit.to_string());
                } else {
                    cluster.unit.restart()?;
                    cluster
                        .unit
                        .wait_for_port(Ipv4Addr::LOCALHOST, args.postgresql_port)?;
                    restarted.push(format!("{} ({})", cluster.unit, pending.join(", ")));
                }
            }
            if redis::needs_restart(files, &redis_config) {
                let unit = Unit::new(&args.redis_unit);
                unit.restart()?;
                restarted.push(unit.to_string());
            }
            for change in &plan.actions {
                match change {
                    Change::Role { exists } => cluster.ensure_replication_role(
                        &args.replication_user,
                        &args.replication_password,
                        *exists,
                    )?,
                    Change::RewindGrants => cluster.grant_rewind(&args.replication_user)?,
                    // Restarts Kafka first when its configuration changed.
                    Change::KafkaLogin => {}
                    Change::Mode => InstanceConfig::update(&args.instance_config, |config| {
                        config.set_replication_mode(ReplicationMode::Primary)
                    })?,
                }
            }
            let login_works = !plan.actions.contains(&Change::KafkaLogin);
            if kafka.apply(files, login_works)? {
                restarted.push(kafka.unit.to_string());
            }
            Ok(vec![match restarted.is_empty() {
                true => "no restart".to_string(),
                false => format!("restarted {}", restarted.join(", ")),
            }])
        },
    )?;
    Ok(outcome
        .with("address", address.to_string())
        .with("restarted", &restarted)
        .with("reloaded", &reloaded))
}

/// The replication role as found.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RoleState {
    Missing,
    OtherPassword,
    Current,
}

/// What step 4 finds, besides the files.
struct Observed {
    role: RoleState,
    /// Whether the role may run what pg_rewind asks of its source.
    can_rewind: bool,
    kafka_login_works: bool,
    mode: ReplicationMode,
}

/// Step 4's changes besides its files.
#[derive(Debug, PartialEq)]
enum Change {
    /// Create the replication role, or set its password (`exists`).
    Role { exists: bool },
    /// Let the role run pg_rewind's functions: once this host's standby is
    /// the primary, the old primary rewinds from it with this role.
    RewindGrants,
    /// Set the pair's Kafka login (and prove it).
    KafkaLogin,
    /// Record `cluster.replication_mode = primary`.
    Mode,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::Role { exists: true } => "update the replication role".into(),
            Change::Role { exists: false } => "create the replication role".into(),
            Change::RewindGrants => "let the replication role serve pg_rewind".into(),
            Change::KafkaLogin => "set the pair's Kafka login".into(),
            Change::Mode => "set cluster.replication_mode = primary".into(),
        }
    }
}

/// Step 4's decisions, from what it found.
fn plan(files: FilePlan, observed: &Observed) -> Plan<Change> {
    let mut plan = Plan::new(files);
    match observed.role {
        RoleState::Current => {}
        RoleState::Missing => plan.push(Change::Role { exists: false }),
        RoleState::OtherPassword => plan.push(Change::Role { exists: true }),
    }
    if !observed.can_rewind {
        plan.push(Change::RewindGrants);
    }
    if !observed.kafka_login_works {
        plan.push(Change::KafkaLogin);
    }
    if observed.mode != ReplicationMode::Primary {
        plan.push(Change::Mode);
    }
    plan
}

fn postgres_dropin(args: &Args, address: Ipv4Addr) -> String {
    format!(
        "# Written by hapair's cluster_enter_primary_mode: changes here are overwritten.\n\
         listen_addresses = 'localhost,{address}'\n\
         wal_level = 'replica'\n\
         max_wal_senders = {}\n\
         max_replication_slots = {}\n\
         # A dead secondary's slot may hold back at most this much WAL.\n\
         max_slot_wal_keep_size = '{}'\n\
         # pg_rewind reads back to the last checkpoint before the hosts parted.\n\
         wal_keep_size = '{}'\n\
         hot_standby = 'on'\n\
         # pg_rewind needs it to rejoin this host as a standby after a\n\
         # failover, rather than copy the whole data directory.\n\
         wal_log_hints = 'on'\n",
        args.max_wal_senders,
        args.max_replication_slots,
        args.max_slot_wal_keep_size,
        args.wal_keep_size
    )
}

fn pair_kafka(args: &Args, address: Ipv4Addr) -> Result<kafka::PairKafka> {
    hapair_core::account::check_name(&args.kafka_run_as)?;
    Ok(kafka::PairKafka {
        config: args.kafka_config.clone(),
        unit: Unit::new(&args.kafka_unit),
        port: args.kafka_port,
        address,
        pair_port: args.kafka_pair_port,
        login: kafka::Login::new(&args.kafka_user, &args.kafka_password)?,
        tools: kafka::Tools {
            home: files::clean_path("kafka_home", &args.kafka_home)?,
            run_as: args.kafka_run_as.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(
        Args,
        json!({"address": "10.0.0.1", "replication_password": "a long test password", "redis_password": "another test password", "kafka_password": "a third test password"})
    );

    #[test]
    fn only_what_differs_is_planned_in_order() {
        let observed = |role, kafka_login_works, mode| Observed {
            role,
            can_rewind: role != RoleState::Missing,
            kafka_login_works,
            mode,
        };
        let done = observed(RoleState::Current, true, ReplicationMode::Primary);
        assert!(plan(FilePlan::default(), &done).is_empty());
        let fresh = observed(RoleState::Missing, false, ReplicationMode::Standalone);
        assert_eq!(
            plan(FilePlan::default(), &fresh).actions,
            vec![
                Change::Role { exists: false },
                Change::RewindGrants,
                Change::KafkaLogin,
                Change::Mode
            ]
        );
        // A new password updates the role; a secondary turned primary is
        // recorded as such.
        let changed = observed(RoleState::OtherPassword, true, ReplicationMode::Secondary);
        assert_eq!(
            plan(FilePlan::default(), &changed).describe(),
            vec![
                "update the replication role",
                "set cluster.replication_mode = primary"
            ]
        );
    }
}
