//! `replication_status`: the seed's "Verification: Databases"
//! (`curl -L http://localhost/monitor/replication`), as a module and on the
//! command line: the pair's replication as this host sees it, one section
//! per service (see `core::status`). It changes nothing.
//!
//! On a secondary the event bus is measured too: MirrorMaker's unit, and
//! per topic the records on the primary not yet here. The primary is the
//! other host of `cluster.hosts`, or `primary_address`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use hapair_core::files::FilePlan;
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::kafka::{self, Login, Tools};
use hapair_core::monitor::{self, Monitor};
use hapair_core::postgres::{self, Cluster};
use hapair_core::protocol::Seconds;
use hapair_core::redis::{self, Server};
use hapair_core::services::{self, InstalledSelf, Presence, Unit};
use hapair_core::status::{self, Sources};
use hapair_core::{files, net, protocol, Action, Context, Outcome, Plan, Secret, Spec};
use serde::{Deserialize, Serialize};

const SPEC: Spec = Spec {
    name: "replication_status",
    doc: include_str!("../replication_status.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct Args {
    redis_password: Secret,
    /// The pair's Kafka login's password: to read the other host's end
    /// offsets.
    #[serde(default)]
    kafka_password: Option<Secret>,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    /// The other host of the pair; default: the other host of cluster.hosts.
    #[serde(default)]
    peer_address: Option<String>,
    /// Seconds a section may take before it is reported as hung.
    #[serde(default = "default_timeout")]
    timeout: Seconds,
    /// `present`: install and start the hapair-monitor daemon; `absent`:
    /// remove it; unset: leave it as it is.
    #[serde(default)]
    monitor: Option<Presence>,
    /// The pair address the monitor listens on, beside loopback.
    #[serde(default)]
    monitor_address: Option<String>,
    /// The monitor's port, on this host and on the other.
    #[serde(default = "default_monitor_port")]
    monitor_port: u16,
    /// Seconds between the monitor's measures of PostgreSQL, Redis, files.
    #[serde(default = "default_interval")]
    interval: Seconds,
    /// Seconds between the monitor's measures of the event bus.
    #[serde(default = "default_event_bus_interval")]
    event_bus_interval: Seconds,
    /// Run as the monitor daemon (what its unit does), never returning.
    #[serde(default, deserialize_with = "protocol::ansible_bool")]
    serve: bool,
    /// Measure every section and return the report (the seed's status).
    /// false: only install or remove the monitor, which then measures on
    /// its own (a re-run of the set-up needs no measure of its own).
    #[serde(
        default = "report_by_default",
        deserialize_with = "protocol::ansible_bool"
    )]
    report: bool,
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

fn report_by_default() -> bool {
    true
}
fn default_timeout() -> Seconds {
    Seconds::new(10)
}
fn default_monitor_port() -> u16 {
    8080
}
fn default_interval() -> Seconds {
    Seconds::new(5)
}
fn default_event_bus_interval() -> Seconds {
    Seconds::new(30)
}

/// The daemon's unit, its options (passwords among them, so root's alone)
/// and where the module installs itself for the unit to run.
const UNIT: &str = "hapair-monitor";
const MONITOR_ARGS: &str = "/etc/hapair/monitor.args.json";
const INSTALLED: InstalledSelf = InstalledSelf("/usr/local/libexec/hapair/replication_status");

fn main() -> ExitCode {
    protocol::run(&SPEC, replication_status)
}

fn replication_status(args: Args, ctx: &mut Context) -> Result<Outcome> {
    hapair_core::account::check_name(&args.kafka_run_as)?;
    let sources = sources(&args)?;
    if args.serve {
        match Monitor::serve(monitor::Options {
            listen: listen_addresses(&args)?,
            interval: args.interval.duration(),
            event_bus_interval: args.event_bus_interval.duration(),
            sources,
        })? {}
    }
    let plan = MonitorPlan::observe(&args)?;
    let report = args.report.then(|| status::report(&sources));
    let summary = match &report {
        Some(report) => status::SECTIONS
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
            .collect::<Vec<_>>()
            .join("; "),
        None => "the monitor is as asked (not measured here: report=false)".to_string(),
    };
    let role = InstanceConfig::load(&args.instance_config)?.replication_mode();
    let port = args.monitor_port;
    let mut outcome = plan
        .run(ctx, format!("{role}: {summary}"), |plan, _| {
            // /etc/hapair, on a host where nothing else of hapair ran yet.
            instance::ensure_config_dir(Path::new(MONITOR_ARGS))?;
            plan.files.apply()?;
            for change in &plan.actions {
                match change {
                    Change::InstallSelf => INSTALLED.install()?,
                    Change::Restart => {
                        services::daemon_reload()?;
                        let unit = Unit::new(UNIT);
                        unit.enable()?;
                        unit.restart()?;
                        unit.wait_for_port(Ipv4Addr::LOCALHOST, port)?;
                    }
                    Change::Remove => remove_monitor()?,
                }
            }
            Ok(Vec::new())
        })?
        .with("role", role.as_str());
    if let Some(report) = report {
        outcome = outcome.with("healthy", status::healthy(&report));
        for (section, value) in report {
            outcome = outcome.with(&section, value);
        }
    }
    Ok(outcome)
}

/// Where each service is, as the options say.
fn sources(args: &Args) -> Result<Sources> {
    let config = InstanceConfig::load(&args.instance_config)?;
    let peer = peer(args, &config)?;
    let kafka_peer = match (peer, &args.kafka_password) {
        (Some(peer), Some(password)) => Some((
            format!("{peer}:{}", args.kafka_pair_port),
            Login::new(&args.kafka_user, password)?,
        )),
        _ => None,
    };
    Ok(Sources {
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
        kafka_peer,
        instance_config: args.instance_config.clone(),
        peer_monitor: peer.map(|peer| SocketAddr::from((peer, args.monitor_port))),
        timeout: args.timeout.duration(),
    })
}

/// The other host: as given, else the host of `cluster.hosts` that is not
/// this one; none on a host that is not (yet) in a pair.
fn peer(args: &Args, config: &InstanceConfig) -> Result<Option<Ipv4Addr>> {
    if let Some(address) = &args.peer_address {
        return instance::parse_ipv4_str("peer_address", address).map(Some);
    }
    let own = net::host_ipv4_addresses()?;
    let others: Vec<Ipv4Addr> = config
        .hosts()?
        .into_iter()
        .filter(|h| !own.contains(h))
        .collect();
    match others.as_slice() {
        [] => Ok(None),
        [peer] => Ok(Some(*peer)),
        _ => anyhow::bail!(
            "can't tell the other host from cluster.hosts ({others:?}): pass peer_address"
        ),
    }
}

/// Loopback, and the pair address when given (it must be this host's).
fn listen_addresses(args: &Args) -> Result<Vec<SocketAddr>> {
    let mut listen = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, args.monitor_port))];
    if let Some(address) = &args.monitor_address {
        let address = instance::parse_ipv4_str("monitor_address", address)?;
        net::ensure_own_address(address).context("monitor_address")?;
        if !address.is_loopback() {
            listen.push(SocketAddr::from((address, args.monitor_port)));
        }
    }
    Ok(listen)
}

enum Change {
    InstallSelf,
    Restart,
    Remove,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::InstallSelf => format!("install this module as {}", INSTALLED.0),
            Change::Restart => format!("(re)start {UNIT}"),
            Change::Remove => format!("stop and remove {UNIT}"),
        }
    }
}

/// The monitor's unit, options and program as they should be, against
/// what is on this host.
struct MonitorPlan;

impl MonitorPlan {
    fn observe(args: &Args) -> Result<Plan<Change>> {
        let unit = Unit::new(UNIT);
        let mut plan = Plan::new(FilePlan::default());
        match args.monitor {
            Some(Presence::Absent) if files::state(&unit.file())?.is_some() => {
                plan.push(Change::Remove);
            }
            None | Some(Presence::Absent) => {}
            Some(Presence::Present) => {
                listen_addresses(args)?;
                let options = daemon_options(args)?;
                plan.files
                    .secret_file(Path::new(MONITOR_ARGS), |_| options, 0o600, None)?;
                plan.files
                    .file(&unit.file(), |_| unit_text(), 0o644, None)?;
                let stale = !INSTALLED.is_current()?;
                if stale {
                    plan.push(Change::InstallSelf);
                }
                if stale || !plan.files.changes.is_empty() || !unit.is_active()? {
                    plan.push(Change::Restart);
                }
            }
        }
        Ok(plan)
    }
}

/// The options the daemon runs with: these, serving, passwords included.
/// Options of a call that the daemon never sees.
const CALL_ONLY_OPTIONS: &[&str] = &["monitor", "report"];

fn daemon_options(args: &Args) -> Result<String> {
    let mut options = serde_json::to_value(args)?;
    // What this call does besides (install the monitor, report) is no
    // option of the daemon's: switching it must not rewrite its options,
    // nor restart it.
    if let Some(options) = options.as_object_mut() {
        for call_only in CALL_ONLY_OPTIONS {
            options.remove(*call_only);
        }
    }
    options["serve"] = true.into();
    options["redis_password"] = args.redis_password.expose().into();
    if let Some(password) = &args.kafka_password {
        options["kafka_password"] = password.expose().into();
    }
    Ok(serde_json::to_string_pretty(&options)? + "\n")
}

fn unit_text() -> String {
    format!(
        "# Written by hapair's replication_status: changes here are overwritten.\n\
         [Unit]\n\
         Description=hapair-monitor: the pair's replication over HTTP (/monitor/replication)\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={} --args-file {MONITOR_ARGS}\n\
         Restart=always\n\
         RestartSec=2\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        INSTALLED.0
    )
}

fn remove_monitor() -> Result<()> {
    services::remove_unit(&Unit::new(UNIT), &[PathBuf::from(MONITOR_ARGS)])
        .context("can't remove the monitor")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({"redis_password": "a long test password"}));
}
