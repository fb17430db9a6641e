//! `cluster_add_secondary`: seed step 7, the seed's `cluster_add_slaves`.
//!
//! On the primary: checks over SSH, with the pair's key, that the secondary
//! is reachable and no longer protected (seed step 5 done); refuses
//! otherwise. Then it creates the secondary's physical replication slot,
//! lets the replication role in from the secondary's address only (its /32,
//! scram-sha-256), and records the secondary in `cluster.hosts`.
//!
//! The secondary's own `cluster.replication_mode` is set by the secondary,
//! when it starts streaming (`cluster_replicate_postgres`): the cluster
//! account is unprivileged, and a key that could write the secondary's
//! instance config could also lift its protection.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::account::{self, Account};
use hapair_core::files::FilePlan;
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::postgres::{self, Cluster};
use hapair_core::{protocol, Action, Context, Outcome, Plan, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_add_secondary",
    doc: include_str!("../cluster_add_secondary.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    secondary_address: String,
    #[serde(default = "account::default_name")]
    account: String,
    #[serde(default = "postgres::default_replication_user")]
    replication_user: postgres::RoleName,
    /// The secondary's instance config, read over SSH.
    #[serde(default = "instance::default_path")]
    secondary_instance_config: PathBuf,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    #[serde(default = "default_ssh_timeout")]
    ssh_timeout: protocol::Seconds,
}

fn default_ssh_timeout() -> protocol::Seconds {
    protocol::Seconds::new(10)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_add_secondary)
}

fn cluster_add_secondary(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let secondary = instance::parse_ipv4_str("secondary_address", &args.secondary_address)?;
    let config = InstanceConfig::load(&args.instance_config)?;
    if config.replication_mode() != ReplicationMode::Primary {
        bail!(
            "this host is not in primary mode: run cluster_enter_primary_mode first (seed step 4)"
        );
    }
    let account = Account::lookup(&args.account)?.with_context(|| {
        format!(
            "the cluster account {} does not exist: run cluster_generate_keys first",
            args.account
        )
    })?;

    // The source of truth about the secondary's protection is the secondary.
    let protected = InstanceConfig::from_peer(
        &account,
        secondary,
        &args.secondary_instance_config,
        args.ssh_timeout.duration(),
    )?
    .is_protected();
    if protected {
        bail!(
            "the secondary {secondary} is a protected instance, so its data can't be replaced. \
             On the secondary, {}",
            instance::UNPROTECT_HINT
        );
    }

    let cluster = Cluster::new(
        &args.postgresql_config_dir,
        args.postgresql_port,
        &args.postgresql_unit,
    );
    let slot = postgres::slot_name_for(secondary);
    let mut files = FilePlan::default();
    let hba = cluster.hba_file();
    let hba_state = hapair_core::files::existing(&hba)?;
    files.try_file(
        &hba,
        |text| postgres::hba_with_replication_rule(text, &args.replication_user, secondary),
        hba_state.config_mode(),
        Some(hba_state.owner),
    )?;
    files.describe(
        &hba,
        format!(
            "let {} replicate from {secondary}/32 in pg_hba.conf",
            args.replication_user
        ),
    );
    let observed = Observed {
        has_slot: cluster.has_slot(&slot)?,
        host_recorded: config.hosts()?.contains(&secondary),
    };

    let plan = plan(&observed, secondary, files);
    let unchanged = format!("{secondary} is already added: slot {slot}, pg_hba rule");
    let outcome = plan.run(ctx, unchanged, |plan, _| {
        // The slot first, then the rule that lets the secondary use it,
        // and only then the record that it is added.
        for change in &plan.actions {
            if let Change::CreateSlot(slot) = change {
                cluster.ensure_slot(slot)?;
            }
        }
        if !plan.files.changes.is_empty() {
            plan.files.apply()?;
            cluster.reload()?;
        }
        for change in &plan.actions {
            if let Change::RecordHost(address) = change {
                InstanceConfig::update(&args.instance_config, |config| {
                    config.add_hosts(&[*address]).map(|_| ())
                })?;
            }
        }
        Ok(Vec::new())
    })?;
    Ok(outcome
        .with("secondary_address", secondary.to_string())
        .with("slot_name", &slot))
}

/// What step 7 finds on the primary, besides the files.
struct Observed {
    has_slot: bool,
    host_recorded: bool,
}

/// Step 7's changes besides pg_hba.conf.
#[derive(Debug, PartialEq)]
enum Change {
    CreateSlot(String),
    RecordHost(Ipv4Addr),
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::CreateSlot(slot) => format!("create the replication slot {slot}"),
            Change::RecordHost(address) => format!("record {address} in cluster.hosts"),
        }
    }
}

/// Step 7's decisions: the slot when missing, the pg_hba rule when it
/// differs (`files`), the secondary in `cluster.hosts` when missing.
fn plan(observed: &Observed, secondary: Ipv4Addr, files: FilePlan) -> Plan<Change> {
    let mut plan = Plan::new(files);
    if !observed.has_slot {
        plan.push(Change::CreateSlot(postgres::slot_name_for(secondary)));
    }
    if !observed.host_recorded {
        plan.push(Change::RecordHost(secondary));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"secondary_address": "10.0.0.2"}));

    #[test]
    fn only_what_is_missing_is_planned() {
        let secondary = Ipv4Addr::new(10, 0, 0, 2);
        let observed = |has_slot, host_recorded| Observed {
            has_slot,
            host_recorded,
        };
        let done = plan(&observed(true, true), secondary, FilePlan::default());
        assert!(done.is_empty());
        let fresh = plan(&observed(false, false), secondary, FilePlan::default());
        assert_eq!(
            fresh.actions,
            vec![
                Change::CreateSlot("hapair_10_0_0_2".into()),
                Change::RecordHost(secondary)
            ]
        );
        assert_eq!(
            fresh.describe(),
            vec![
                "create the replication slot hapair_10_0_0_2",
                "record 10.0.0.2 in cluster.hosts"
            ]
        );
        let slot_only = plan(&observed(false, true), secondary, FilePlan::default());
        assert_eq!(slot_only.actions.len(), 1);
    }
}
