//! `replication_status`: the seed's "Verification: Databases"
//! (`curl -L http://localhost/monitor/replication`), as a module and on the
//! command line: the pair's replication as this host sees it, one section
//! per service (see `core::status`). It changes nothing.
//!
//! On a secondary the event bus is measured too: MirrorMaker's unit, and
//! per topic the records on the primary not yet here. The primary is the
//! other host of `cluster.hosts`, or `primary_address`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use hapair_core::instance::{self, InstanceConfig, ReplicationMode};
use hapair_core::kafka::{self, Login, Tools};
use hapair_core::postgres::{self, Cluster};
use hapair_core::protocol::Seconds;
use hapair_core::redis::{self, Server};
use hapair_core::status::{self, Sources};
use hapair_core::{files, net, protocol, Context, Outcome, Secret, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "replication_status",
    doc: include_str!("../replication_status.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    redis_password: Secret,
    /// The pair's Kafka login's password: on a secondary, to read the
    /// primary's end offsets.
    #[serde(default)]
    kafka_password: Option<Secret>,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    /// The primary, on a secondary; default: the other host of cluster.hosts.
    #[serde(default)]
    primary_address: Option<String>,
    /// Seconds a section may take before it is reported as hung.
    #[serde(default = "default_timeout")]
    timeout: Seconds,
    #[serde(default = "postgres::default_config_dir")]
    postgresql_config_dir: PathBuf,
    #[serde(default = "postgres::default_port")]
    postgresql_port: u16,
    #[serde(default = "postgres::default_unit")]
    postgresql_unit: String,
    #[serde(default = "redis::default_port")]
    redis_port: u16,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_pair_port")]
    kafka_pair_port: u16,
    #[serde(default = "kafka::default_run_as")]
    kafka_run_as: String,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_timeout() -> Seconds {
    Seconds::new(10)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, replication_status)
}

fn replication_status(args: Args, _ctx: &mut Context) -> Result<Outcome> {
    hapair_core::account::check_name(&args.kafka_run_as)?;
    let config = InstanceConfig::load(&args.instance_config)?;
    let role = config.replication_mode();
    let kafka_primary = match (role, &args.kafka_password) {
        (ReplicationMode::Secondary, Some(password)) => {
            let primary = primary(&args, &config)?;
            Some((
                format!("{primary}:{}", args.kafka_pair_port),
                Login::new(&args.kafka_user, password)?,
            ))
        }
        _ => None,
    };
    let sources = Sources {
        postgres: Cluster::new(
            &args.postgresql_config_dir,
            args.postgresql_port,
            &args.postgresql_unit,
        ),
        redis: Server::local(args.redis_port, Some(args.redis_password.clone())),
        kafka: Tools {
            home: files::clean_path("kafka_home", &args.kafka_home)?,
            run_as: args.kafka_run_as.clone(),
        },
        kafka_local: format!("127.0.0.1:{}", args.kafka_port),
        kafka_primary,
        timeout: args.timeout.duration(),
    };
    let report = status::report(&sources);
    let healthy = status::healthy(&report);
    let summary: Vec<String> = status::SECTIONS
        .iter()
        .map(|section| {
            let value = &report[*section];
            match value["status"].as_str() {
                Some("unknown") => format!(
                    "{section} unknown ({})",
                    value["reason"].as_str().unwrap_or("")
                ),
                Some(state) => format!("{section} {state}"),
                None => format!("{section} ?"),
            }
        })
        .collect();
    let mut outcome = Outcome::unchanged(format!("{role}: {}", summary.join("; ")))
        .with("role", role.as_str())
        .with("healthy", healthy);
    for (section, value) in report {
        outcome = outcome.with(&section, value);
    }
    Ok(outcome)
}

/// The primary: as given, else the host of `cluster.hosts` that is not
/// this one.
fn primary(args: &Args, config: &InstanceConfig) -> Result<Ipv4Addr> {
    if let Some(address) = &args.primary_address {
        return instance::parse_ipv4_str("primary_address", address);
    }
    let own = net::host_ipv4_addresses()?;
    let others: Vec<Ipv4Addr> = config
        .hosts()?
        .into_iter()
        .filter(|h| !own.contains(h))
        .collect();
    match others.as_slice() {
        [primary] => Ok(*primary),
        _ => anyhow::bail!(
            "can't tell the primary from cluster.hosts ({others:?}): pass primary_address"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"redis_password": "a long test password"}));
}
