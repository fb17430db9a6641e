//! `cluster_preflight`: the seed's prerequisites.
//!
//! Gathers what must match between the two hosts: the sizes of the data and
//! install partitions, the versions of PostgreSQL, Redis, Kafka and the
//! application. It also gathers the host's addresses, and the addresses its
//! instance config records. Given the peer's facts (`peer`), it compares the
//! two hosts and fails with a side-by-side table when they differ.
//!
//! It also fails when the instance config records addresses that are not
//! this host's. HA is IP-based: data disks moved to a new host don't make a
//! pair there. The seed's answer is to back up, restore, and set up HA anew.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::command::Command;
use hapair_core::instance::{self, InstanceConfig, Key, ReplicationMode};
use hapair_core::{net, postgres, protocol, ssh, Context, Outcome, Spec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const SPEC: Spec = Spec {
    name: "cluster_preflight",
    doc: include_str!("../cluster_preflight.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct Args {
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
    /// Where the data lives: its partition must be as large on both hosts.
    #[serde(default = "default_data_path")]
    data_path: PathBuf,
    /// Where the software is installed: likewise.
    #[serde(default = "default_install_path")]
    install_path: PathBuf,
    #[serde(default = "hapair_core::postgres::default_data_dir")]
    postgresql_data_dir: PathBuf,
    #[serde(default = "hapair_core::kafka::default_home")]
    kafka_home: PathBuf,
    /// The other host's `facts`, from its own run: compare with them.
    #[serde(default)]
    peer: Option<Facts>,
    /// How far partition sizes may differ, in percent of the larger.
    #[serde(default = "default_size_tolerance")]
    size_tolerance_percent: f64,
}

fn default_data_path() -> PathBuf {
    "/var/lib/postgresql".into()
}
fn default_install_path() -> PathBuf {
    "/opt".into()
}
fn default_size_tolerance() -> f64 {
    1.0
}

/// What this module learns about a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Facts {
    hostname: String,
    addresses: Vec<String>,
    data_path: String,
    data_partition_bytes: u64,
    install_path: String,
    install_partition_bytes: u64,
    postgresql_version: Option<String>,
    redis_version: Option<String>,
    kafka_version: Option<String>,
    app_version: Option<String>,
    recorded_override_ip: Option<String>,
    recorded_hosts: Vec<String>,
    ssh_host_key: Option<String>,
    /// `cluster.replication_mode`, to refuse a pair with two primaries.
    #[serde(default)]
    replication_mode: String,
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_preflight)
}

fn cluster_preflight(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let facts = gather(&args, ctx)?;
    check_recorded_addresses(&facts)?;
    let Some(peer) = &args.peer else {
        return Ok(Outcome::unchanged(format!(
            "{}: {} data, {} install partition; PostgreSQL {}, Redis {}, Kafka {}, app {}",
            facts.hostname,
            human_bytes(facts.data_partition_bytes),
            human_bytes(facts.install_partition_bytes),
            shown(&facts.postgresql_version),
            shown(&facts.redis_version),
            shown(&facts.kafka_version),
            shown(&facts.app_version),
        ))
        .with("facts", &facts));
    };
    let primary = ReplicationMode::Primary.as_str();
    if facts.replication_mode == primary && peer.replication_mode == primary {
        bail!(
            "{} and {} both say they are the primary (cluster.replication_mode): each may have \
             taken writes of its own, and setting the pair up now would re-seed one and lose \
             them. To go on: {}",
            facts.hostname,
            peer.hostname,
            instance::TWO_PRIMARIES_FIX
        );
    }
    let mismatches = compare(&facts, peer, args.size_tolerance_percent);
    if mismatches.is_empty() {
        return Ok(Outcome::unchanged(format!(
            "{} and {} match: partitions and versions",
            facts.hostname, peer.hostname
        ))
        .with("facts", &facts)
        .with("mismatches", &mismatches));
    }
    let table = table(&facts.hostname, &peer.hostname, &mismatches);
    Ok(Outcome::failed(format!(
        "{} and {} differ; the seed needs identical hosts (same partition sizes, same \
         versions). Make them match, then run again:\n{table}",
        facts.hostname, peer.hostname
    ))
    .with("facts", &facts)
    .with("mismatches", &mismatches)
    .with_report(table))
}

fn gather(args: &Args, ctx: &mut Context) -> Result<Facts> {
    let config = InstanceConfig::load(&args.instance_config)?;
    let recorded = |name: &str| config.value(&Key::parse(name).expect("a known key"));
    let recorded_hosts = config.hosts()?.iter().map(|h| h.to_string()).collect();
    let string = |value: Option<Value>| value.and_then(|v| v.as_str().map(String::from));
    let mut optional = |what: &str, result: Result<Option<String>>| match result {
        Ok(version) => version,
        Err(e) => {
            ctx.warn(format!("can't tell the {what} version: {e:#}"));
            None
        }
    };
    Ok(Facts {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        addresses: net::host_ipv4_addresses()?
            .iter()
            .map(|a| a.to_string())
            .collect(),
        data_path: args.data_path.display().to_string(),
        data_partition_bytes: partition_bytes(&args.data_path)?,
        install_path: args.install_path.display().to_string(),
        install_partition_bytes: partition_bytes(&args.install_path)?,
        postgresql_version: optional(
            "PostgreSQL",
            postgres::installed_version(&args.postgresql_data_dir),
        ),
        redis_version: optional("Redis", redis_version()),
        kafka_version: optional("Kafka", kafka_version(&args.kafka_home)),
        app_version: string(recorded(instance::APP_VERSION)),
        recorded_override_ip: string(recorded(instance::OVERRIDE_IP)),
        recorded_hosts,
        ssh_host_key: ssh::own_host_key().ok().map(|k| k.material()),
        replication_mode: config.replication_mode().as_str().to_string(),
    })
}

/// The seed's warning: the recorded addresses must be this host's.
fn check_recorded_addresses(facts: &Facts) -> Result<()> {
    let mut problems = Vec::new();
    if let Some(ip) = &facts.recorded_override_ip {
        if !facts.addresses.contains(ip) {
            problems.push(format!("cluster.override_ip is {ip}"));
        }
    }
    if !facts.recorded_hosts.is_empty()
        && !facts
            .recorded_hosts
            .iter()
            .any(|h| facts.addresses.contains(h))
    {
        problems.push(format!(
            "cluster.hosts is [{}]",
            facts.recorded_hosts.join(", ")
        ));
    }
    if !problems.is_empty() {
        bail!(
            "this host's instance config records addresses that are not this host's ({}), \
             but its addresses are [{}]. HA is IP-based: the data disks seem to have moved \
             here from another host, and a pair can't be resumed that way. Back up the data, \
             restore it on this host, and set up HA anew",
            problems.join("; "),
            facts.addresses.join(", ")
        );
    }
    Ok(())
}

/// The size of the filesystem holding `path`, in bytes.
fn partition_bytes(path: &Path) -> Result<u64> {
    let out = Command::new("df").args(["-P", "-B1"]).arg(path).run()?;
    parse_df_size(&out.stdout).with_context(|| {
        format!(
            "unexpected df output for {}: {}",
            path.display(),
            out.stdout
        )
    })
}

/// Parses `df -P -B1`: a header, then `fs size used avail capacity mount`.
fn parse_df_size(output: &str) -> Option<u64> {
    output
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn redis_version() -> Result<Option<String>> {
    let out = Command::new("redis-server").arg("--version").run()?;
    Ok(parse_version_after(&out.stdout, "v="))
}

/// Kafka's version, from the name of its client jar (as in the tarball).
fn kafka_version(kafka_home: &Path) -> Result<Option<String>> {
    let libs = kafka_home.join("libs");
    if !libs.is_dir() {
        return Ok(None);
    }
    let mut versions = std::fs::read_dir(&libs)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_kafka_jar(&e.file_name().to_string_lossy()));
    Ok(versions.next())
}

fn parse_kafka_jar(name: &str) -> Option<String> {
    name.strip_prefix("kafka-clients-")?
        .strip_suffix(".jar")
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .map(String::from)
}

/// The version number that follows `marker` in `text`.
fn parse_version_after(text: &str, marker: &str) -> Option<String> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

/// One item on which the two hosts differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Mismatch {
    item: &'static str,
    this: String,
    peer: String,
}

fn compare(this: &Facts, peer: &Facts, tolerance_percent: f64) -> Vec<Mismatch> {
    let mut mismatches = Vec::new();
    let mut size = |item, a: u64, b: u64| {
        let larger = a.max(b) as f64;
        if larger > 0.0 && (a.abs_diff(b) as f64) * 100.0 / larger > tolerance_percent {
            mismatches.push(Mismatch {
                item,
                this: format!("{} ({a} bytes)", human_bytes(a)),
                peer: format!("{} ({b} bytes)", human_bytes(b)),
            });
        }
    };
    size(
        "data partition size",
        this.data_partition_bytes,
        peer.data_partition_bytes,
    );
    size(
        "install partition size",
        this.install_partition_bytes,
        peer.install_partition_bytes,
    );
    for (item, a, b) in [
        (
            "PostgreSQL version",
            &this.postgresql_version,
            &peer.postgresql_version,
        ),
        ("Redis version", &this.redis_version, &peer.redis_version),
        ("Kafka version", &this.kafka_version, &peer.kafka_version),
        ("app version", &this.app_version, &peer.app_version),
    ] {
        if a != b {
            mismatches.push(Mismatch {
                item,
                this: shown(a),
                peer: shown(b),
            });
        }
    }
    mismatches
}

/// A side-by-side table: item, this host, the peer.
fn table(this: &str, peer: &str, mismatches: &[Mismatch]) -> String {
    let mut rows = vec![("item", this, peer)];
    rows.extend(
        mismatches
            .iter()
            .map(|m| (m.item, m.this.as_str(), m.peer.as_str())),
    );
    let width = |pick: fn(&(&str, &str, &str)) -> usize| rows.iter().map(pick).max().unwrap_or(0);
    let (w0, w1) = (width(|r| r.0.len()), width(|r| r.1.len()));
    rows.iter()
        .map(|(a, b, c)| format!("  {a:<w0$}  {b:<w1$}  {c}\n"))
        .collect()
}

fn shown(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "none".to_string())
}

fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts() -> Facts {
        Facts {
            hostname: "primary".into(),
            addresses: vec!["10.0.0.1".into()],
            data_path: "/data".into(),
            data_partition_bytes: 100 << 30,
            install_path: "/opt".into(),
            install_partition_bytes: 20 << 30,
            postgresql_version: Some("15.14".into()),
            redis_version: Some("7.0.15".into()),
            kafka_version: Some("4.1.1".into()),
            app_version: Some("2024.1".into()),
            recorded_override_ip: None,
            recorded_hosts: vec![],
            ssh_host_key: None,
            replication_mode: "primary".into(),
        }
    }

    hapair_core::doc_test!(Args, json!({}));

    #[test]
    fn identical_hosts_match_and_differences_are_listed_with_both_values() {
        let this = facts();
        assert!(compare(&this, &this.clone(), 1.0).is_empty());
        let mut peer = facts();
        peer.hostname = "secondary".into();
        peer.app_version = Some("2023.3".into());
        peer.data_partition_bytes = 50 << 30;
        let found = compare(&this, &peer, 1.0);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].item, "data partition size");
        assert_eq!(
            found[1],
            Mismatch {
                item: "app version",
                this: "2024.1".into(),
                peer: "2023.3".into()
            }
        );
        let text = table("primary", "secondary", &found);
        assert!(text.contains("  item                 primary"), "{text}");
        assert!(text.contains("2024.1") && text.contains("2023.3"), "{text}");
        assert!(
            text.contains("100.0 GiB") && text.contains("50.0 GiB"),
            "{text}"
        );
    }

    #[test]
    fn sizes_within_the_tolerance_match() {
        let this = facts();
        let mut peer = facts();
        peer.data_partition_bytes = this.data_partition_bytes - (this.data_partition_bytes / 200);
        assert!(compare(&this, &peer, 1.0).is_empty());
        assert_eq!(compare(&this, &peer, 0.0).len(), 1);
    }

    #[test]
    fn addresses_recorded_for_another_host_mean_moved_disks() {
        let mut moved = facts();
        moved.recorded_override_ip = Some("10.9.9.9".into());
        let err = check_recorded_addresses(&moved).unwrap_err().to_string();
        assert!(err.contains("cluster.override_ip is 10.9.9.9"), "{err}");
        assert!(err.contains("set up HA anew"), "{err}");
        let mut hosts = facts();
        hosts.recorded_hosts = vec!["10.9.9.8".into(), "10.9.9.9".into()];
        assert!(check_recorded_addresses(&hosts).is_err());
        hosts.recorded_hosts.push("10.0.0.1".into());
        assert!(check_recorded_addresses(&hosts).is_ok());
    }

    #[test]
    fn parses_tool_outputs() {
        assert_eq!(
            parse_df_size("Filesystem 1-blocks Used Available Capacity Mounted on\noverlay 269490393088 1 2 1% /\n"),
            Some(269490393088)
        );
        assert_eq!(parse_df_size("garbage"), None);
        assert_eq!(
            parse_version_after(
                "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n",
                "(PostgreSQL) "
            ),
            Some("15.14".into())
        );
        assert_eq!(
            parse_version_after("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc", "v="),
            Some("7.0.15".into())
        );
        assert_eq!(parse_version_after("nothing here", "v="), None);
        assert_eq!(
            parse_kafka_jar("kafka-clients-4.1.1.jar"),
            Some("4.1.1".into())
        );
        assert_eq!(parse_kafka_jar("kafka-clients-test.jar"), None);
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
