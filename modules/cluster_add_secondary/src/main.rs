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

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::account::{self, Account};
use hapair_core::files::FilePlan;
use hapair_core::instance::{self, InstanceConfig, Key};
use hapair_core::postgres::{self, Cluster};
use hapair_core::{protocol, ssh, Context, Outcome, Spec};
use serde::Deserialize;
use serde_json::Value;

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
    if config.value(&Key::parse(instance::REPLICATION_MODE)?)
        != Some(Value::String("primary".into()))
    {
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
    let remote_config = args
        .secondary_instance_config
        .to_str()
        .context("secondary_instance_config is not UTF-8")?;
    let read = ssh::run_on_peer(
        &account,
        secondary,
        &["cat", "--", remote_config],
        args.ssh_timeout.duration(),
    )?;
    let remote_text = match (read.code, read.stderr.contains("No such file")) {
        (Some(0), _) => read.stdout,
        (_, true) => String::new(), // no config yet: protected by default
        _ => bail!(
            "can't read the secondary's instance config over SSH as {} ({}): run \
             replication_helper on both hosts first (seed step 3)",
            args.account,
            read.stderr.trim()
        ),
    };
    let protected = InstanceConfig::parse(&args.secondary_instance_config, &remote_text)
        .context("the secondary's instance config can't be read; fix it on the secondary")?
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
    let has_slot = cluster.has_slot(&slot)?;
    let mut files = FilePlan::default();
    let hba = cluster.hba_file();
    let hba_state = hapair_core::files::existing(&hba)?;
    files.try_file(
        &hba,
        |text| postgres::hba_with_replication_rule(text, &args.replication_user, secondary),
        hba_state.config_mode(),
        Some(hba_state.owner),
    )?;
    let record = config.clone().add_hosts(&[secondary])?;

    let mut actions: Vec<String> = Vec::new();
    if !has_slot {
        actions.push(format!("create the replication slot {slot}"));
    }
    if !files.changes.is_empty() {
        actions.push(format!(
            "let {} replicate from {secondary}/32 in pg_hba.conf",
            args.replication_user
        ));
    }
    if record {
        actions.push(format!("record {secondary} in cluster.hosts"));
    }
    let changed = !actions.is_empty();
    if changed && !ctx.check_mode {
        if !has_slot {
            cluster.ensure_slot(&slot)?;
        }
        if !files.changes.is_empty() {
            files.apply()?;
            cluster.reload()?;
        }
        if record {
            InstanceConfig::update(&args.instance_config, |config| {
                config.add_hosts(&[secondary]).map(|_| ())
            })?;
        }
    }
    let msg = match (changed, ctx.check_mode) {
        (false, _) => format!("{secondary} is already added: slot {slot}, pg_hba rule"),
        (true, true) => format!("would {}", actions.join(", ")),
        (true, false) => actions.join(", "),
    };
    let mut outcome = Outcome::new(changed, msg)
        .with("secondary_address", secondary.to_string())
        .with("slot_name", &slot)
        .with("actions", &actions);
    for change in files.changes {
        outcome = outcome.with_diff(change.diff);
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"secondary_address": "10.0.0.2"}));
}
