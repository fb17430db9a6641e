//! `replication_port_check`: the seed's "Verification: Ports".
//!
//! With no options it reads `cluster.hosts` from the instance config and
//! checks every port the pair needs on every host: SSH, PostgreSQL, Redis,
//! Kafka and the monitor. It reports each one (open or closed, and how long
//! the connection took), and fails naming every required port that is
//! closed. On a terminal it prints a table.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::net::{self, PortProbe};
use hapair_core::{protocol, Context, Outcome, Spec};
use serde::{Deserialize, Serialize};

const SPEC: Spec = Spec {
    name: "replication_port_check",
    doc: include_str!("../replication_port_check.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct Args {
    /// The hosts to check; `cluster.hosts` when not given.
    #[serde(default)]
    hosts: Option<Vec<String>>,
    #[serde(default = "default_ports")]
    ports: Vec<Port>,
    /// Seconds to wait for each connection.
    #[serde(default = "default_timeout")]
    timeout: f64,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

/// A port the pair needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Port {
    service: String,
    port: u16,
    /// A closed required port fails the check; a closed optional one warns.
    #[serde(default = "required_by_default")]
    required: bool,
}

fn required_by_default() -> bool {
    true
}

fn default_ports() -> Vec<Port> {
    let port = |service: &str, port, required| Port {
        service: service.into(),
        port,
        required,
    };
    vec![
        port("ssh", 22, true),
        port("postgresql", 5432, true),
        port("redis", 6379, true),
        // Kafka's pair listener (SASL SCRAM); 9092 stays on loopback.
        port("kafka", 9094, true),
        port("monitor", 8080, true),
    ]
}
fn default_timeout() -> f64 {
    3.0
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Check {
    host: String,
    port: u16,
    service: String,
    required: bool,
    #[serde(flatten)]
    probe: PortProbe,
}

fn main() -> ExitCode {
    protocol::run(&SPEC, replication_port_check)
}

fn replication_port_check(args: Args, _ctx: &mut Context) -> Result<Outcome> {
    if !(args.timeout > 0.0 && args.timeout <= 60.0) {
        bail!(
            "timeout must be more than 0 and at most 60 seconds, not {}",
            args.timeout
        );
    }
    let hosts = hosts(&args)?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let report = check_all(&hosts, &args.ports, timeout)?;

    let closed = |required: bool| -> Vec<String> {
        report
            .iter()
            .filter(|c| !c.probe.open && c.required == required)
            .map(describe)
            .collect()
    };
    let (failing, optional) = (closed(true), closed(false));
    let table = table(&report);
    let outcome = if failing.is_empty() {
        let open = report.iter().filter(|c| c.probe.open).count();
        let optional = if optional.is_empty() {
            String::new()
        } else {
            format!("; optional ports closed: {}", optional.join("; "))
        };
        Outcome::unchanged(format!(
            "{open} of {} ports open on {} host(s); every required port answers{optional}",
            report.len(),
            hosts.len()
        ))
    } else {
        Outcome::failed(format!(
            "{} required port(s) closed: {}. Start the service, or open the port between \
             the hosts (see the seed's HA Requirements)",
            failing.len(),
            failing.join("; ")
        ))
    };
    Ok(outcome
        .with(
            "hosts",
            hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        )
        .with("report", &report)
        .with("closed", &failing)
        .with_report(table))
}

/// The hosts to check: as given, else `cluster.hosts`.
fn hosts(args: &Args) -> Result<Vec<Ipv4Addr>> {
    let hosts = match &args.hosts {
        Some(hosts) => hosts
            .iter()
            .map(|host| instance::parse_ipv4_str("hosts", host))
            .collect::<Result<Vec<_>>>()?,
        None => InstanceConfig::load(&args.instance_config)?.hosts()?,
    };
    if hosts.is_empty() {
        bail!(
            "no hosts to check: cluster.hosts in {} is empty. Run replication_helper \
             (seed step 3) first, or pass hosts",
            args.instance_config.display()
        );
    }
    Ok(hosts)
}

/// The most host-port pairs one run checks: a pair has ten.
const MAX_CHECKS: usize = 4096;
/// The most probes under way at once.
const MAX_PARALLEL: usize = 32;

/// Probes every port of every host, up to [`MAX_PARALLEL`] at once: a
/// closed port costs the timeout, and for a pair they don't add up.
fn check_all(hosts: &[Ipv4Addr], ports: &[Port], timeout: Duration) -> Result<Vec<Check>> {
    let pairs: Vec<(&Ipv4Addr, &Port)> = hosts
        .iter()
        .flat_map(|host| ports.iter().map(move |port| (host, port)))
        .collect();
    if pairs.len() > MAX_CHECKS {
        bail!(
            "{} hosts and {} ports make {} checks; at most {MAX_CHECKS} are made in one run",
            hosts.len(),
            ports.len(),
            pairs.len()
        );
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<std::sync::Mutex<Option<Check>>> =
        pairs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..pairs.len().min(MAX_PARALLEL) {
            scope.spawn(|| loop {
                let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((host, port)) = pairs.get(at) else {
                    break;
                };
                let check = Check {
                    host: host.to_string(),
                    port: port.port,
                    service: port.service.clone(),
                    required: port.required,
                    probe: net::probe(**host, port.port, timeout),
                };
                *done[at].lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
            });
        }
    });
    Ok(done
        .into_iter()
        .filter_map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect())
}

fn describe(check: &Check) -> String {
    format!(
        "{}:{} ({}: {})",
        check.host,
        check.port,
        check.service,
        check.probe.error.as_deref().unwrap_or("closed")
    )
}

/// The report as a table for a person.
fn table(report: &[Check]) -> String {
    let mut text = format!(
        "{:<16} {:>5}  {:<11} {:<7} {:>10}\n",
        "host", "port", "service", "state", "latency"
    );
    for check in report {
        let state = match (check.probe.open, check.required) {
            (true, _) => "open",
            (false, true) => "CLOSED",
            (false, false) => "closed",
        };
        text.push_str(&format!(
            "{:<16} {:>5}  {:<11} {:<7} {:>8.1}ms\n",
            check.host, check.port, check.service, state, check.probe.latency_ms
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The playbook's `hapair_required_ports` (inventory/group_vars) are
    /// this module's defaults: the operator's file and the module agree.
    #[test]
    fn group_vars_require_what_the_module_requires() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../inventory/group_vars/all.yml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let value = |line: &str, key: &str| -> String {
            let rest = &line[line.find(&format!("{key}: ")).unwrap() + key.len() + 2..];
            match rest.strip_prefix('"') {
                Some(quoted) => quoted.split('"').next().unwrap().to_string(),
                None => rest.split([',', '}']).next().unwrap().trim().to_string(),
            }
        };
        let variable = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap()
                .trim()
                .to_string()
        };
        let (pair_port, monitor_port) = (
            variable("hapair_kafka_pair_port"),
            variable("hapair_monitor_port"),
        );
        let listed: Vec<(String, String, String)> = text
            .lines()
            .skip_while(|l| !l.starts_with("hapair_required_ports:"))
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("- {"))
            .map(|l| {
                let port = value(l, "port")
                    .replace("{{ hapair_kafka_pair_port }}", &pair_port)
                    .replace("{{ hapair_monitor_port }}", &monitor_port);
                (value(l, "service"), port, value(l, "required"))
            })
            .collect();
        let defaults: Vec<(String, String, String)> = default_ports()
            .iter()
            .map(|p| {
                (
                    p.service.clone(),
                    p.port.to_string(),
                    p.required.to_string(),
                )
            })
            .collect();
        assert_eq!(listed, defaults);
    }

    #[test]
    fn many_checks_are_bounded_in_number_and_concurrency() {
        let ports: Vec<Port> = (1..=100)
            .map(|p| Port {
                service: "x".into(),
                port: p,
                required: false,
            })
            .collect();
        let many: Vec<Ipv4Addr> = (0..1000)
            .map(|i| Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250) as u8 + 1))
            .collect();
        let err = check_all(&many, &ports, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("at most 4096"), "{err}");
        // 400 closed loopback ports, 32 at a time: every one reported.
        let report = check_all(&many[..4], &ports, Duration::from_millis(200)).unwrap();
        assert_eq!(report.len(), 400);
        assert_eq!(report[399].port, 100);
    }
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({}));

    #[test]
    fn checks_every_port_of_every_host_and_marks_closed_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let ports = vec![
            Port {
                service: "up".into(),
                port: open,
                required: true,
            },
            Port {
                service: "down".into(),
                port: closed,
                required: true,
            },
        ];
        let report = check_all(&[Ipv4Addr::LOCALHOST], &ports, Duration::from_secs(2)).unwrap();
        assert_eq!(report.len(), 2);
        assert!(report[0].probe.open);
        assert!(!report[1].probe.open);
        assert_eq!(
            describe(&report[1]),
            format!("127.0.0.1:{closed} (down: connection refused)")
        );
        let text = table(&report);
        assert!(text.contains("open") && text.contains("CLOSED"), "{text}");
    }
}
