//! The pair's replication, as this host sees it: the report of the seed's
//! `/monitor/replication`, one section per service. A section that can't
//! be measured, or has no replication set up, says `"unknown"` with the
//! reason (the seed: "unknown indicates that something has gone wrong").
//! Each section is measured in a thread of its own with a deadline, so a
//! backend that hangs is reported as timed out, and never stalls the rest.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

use crate::instance::{InstanceConfig, ReplicationMode};
use crate::kafka::{Login, Tools};
use crate::postgres::Cluster;
use crate::redis::Server;

/// Where each service is, and how long a section may take.
#[derive(Debug, Clone)]
pub struct Sources {
    pub postgres: Cluster,
    pub redis: Server,
    /// This host's Kafka tools and loopback bootstrap; MirrorMaker's unit.
    pub kafka: Tools,
    pub kafka_local: String,
    /// The other host's pair listener and the pair's login.
    pub kafka_peer: Option<(String, Login)>,
    /// The instance config, read at each measure of the event bus: its
    /// role says which way the records flow.
    pub instance_config: std::path::PathBuf,
    /// The other host's monitor: a primary reads there what only the
    /// secondary knows (its last file sync, whether MirrorMaker runs).
    pub peer_monitor: Option<std::net::SocketAddr>,
    pub timeout: Duration,
}

/// The sections of the report, in order.
pub const SECTIONS: [&str; 4] = ["postgres", "kvstore", "event_bus", "files"];

/// `"unknown"`, and why.
pub fn unknown(reason: impl Into<String>) -> Value {
    json!({"status": "unknown", "reason": reason.into()})
}

/// The whole report: each section measured at once, each within the
/// timeout.
pub fn report(sources: &Sources) -> Map<String, Value> {
    let (sender, receiver) = mpsc::channel();
    for section in SECTIONS {
        let sources = sources.clone();
        let sender = sender.clone();
        std::thread::spawn(move || {
            let _ = sender.send((section, measure(section, &sources)));
        });
    }
    drop(sender);
    let mut report = Map::new();
    let longest = SECTIONS
        .map(|s| deadline(s, sources.timeout))
        .into_iter()
        .max();
    let deadline_at = std::time::Instant::now() + longest.unwrap_or(sources.timeout);
    while report.len() < SECTIONS.len() {
        let left = deadline_at.saturating_duration_since(std::time::Instant::now());
        match receiver.recv_timeout(left) {
            Ok((section, value)) => {
                report.insert(section.to_string(), value);
            }
            Err(_) => break,
        }
    }
    for section in SECTIONS {
        report
            .entry(section)
            .or_insert_with(|| hung(deadline(section, sources.timeout)));
    }
    report
}

/// `section` with the role the service answered with: unknown
/// replication, but a service that is up.
fn with_role(mut section: Value, role: &str) -> Value {
    section["role"] = role.into();
    section
}

/// One section, measured now (as long as its service takes).
pub fn measure(section: &str, sources: &Sources) -> Value {
    let measured = match section {
        "postgres" => postgres(&sources.postgres),
        "kvstore" => kvstore(&sources.redis),
        "event_bus" => event_bus(sources),
        _ => files(sources),
    };
    measured.unwrap_or_else(|e| unknown(format!("{e:#}")))
}

/// A section the monitor has not measured yet (it has just started):
/// `pending`, so that the other host waits rather than relays it.
pub fn not_yet_measured() -> Value {
    let mut value = unknown("not measured yet: the monitor has just started");
    value["pending"] = true.into();
    value
}

/// How long a section's measure may take. The event bus's runs two of
/// Kafka's Java tools and reads MirrorMaker's offsets topic to its end: it
/// gets at least 30 s, so a busy host is not taken for a hung one.
pub fn deadline(section: &str, timeout: Duration) -> Duration {
    match section {
        "event_bus" => timeout.max(Duration::from_secs(30)),
        _ => timeout,
    }
}

/// A section whose service did not answer in time.
pub fn hung(timeout: Duration) -> Value {
    unknown(format!(
        "no answer within {} s: the service hangs",
        timeout.as_secs_f64()
    ))
}

/// The figure a person watches for a section, as plotted on the status
/// page: how far behind this host's side of the replication is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    pub value: f64,
    pub unit: &'static str,
}

/// A measured section's lag: PostgreSQL's bytes (the standby furthest
/// behind, or this standby's unreplayed WAL), Redis's offset bytes (the
/// replica furthest behind; on a replica, seconds since its primary last
/// spoke), the event bus's records not yet mirrored, the files' seconds
/// since the last sync.
pub fn lag(section: &str, value: &Value) -> Option<Lag> {
    let number = |v: &Value| v.as_f64();
    let most = |list: &Value, key: &str| {
        list.as_array()?
            .iter()
            .filter_map(|item| number(&item[key]))
            .reduce(f64::max)
    };
    let bytes = |value| Lag {
        value,
        unit: "bytes",
    };
    if value["status"] == "unknown" {
        return None;
    }
    match (section, value["role"].as_str()) {
        ("postgres", Some("primary")) => most(&value["standbys"], "lag_bytes").map(bytes),
        ("postgres", _) => number(&value["receiver"]["lag_bytes"]).map(bytes),
        ("kvstore", Some("primary")) => most(&value["replicas"], "lag_bytes").map(bytes),
        ("kvstore", _) => number(&value["last_io_seconds_ago"]).map(|value| Lag {
            value,
            unit: "seconds",
        }),
        ("event_bus", _) => {
            let topics = value["topics"].as_object()?;
            let behind = topics.values().filter_map(|t| number(&t["behind"])).sum();
            Some(Lag {
                value: behind,
                unit: "records",
            })
        }
        _ => number(&value["age_seconds"]).map(|value| Lag {
            value,
            unit: "seconds",
        }),
    }
}

/// Whether every section was measured and is `ok`: not unknown, no
/// standby missing, no link down, no failed sync.
pub fn healthy(report: &Map<String, Value>) -> bool {
    SECTIONS
        .iter()
        .all(|s| report.get(*s).is_some_and(|v| v["status"] == "ok"))
}

fn query_json(cluster: &Cluster, sql: &str) -> Result<Value> {
    let text = cluster.query(sql)?;
    serde_json::from_str(&text).with_context(|| format!("PostgreSQL answered {text:?}"))
}

/// On a primary, each standby (`pg_stat_replication`) and each slot's
/// retained WAL; on a standby, its WAL receiver and replay.
fn postgres(cluster: &Cluster) -> Result<Value> {
    let standby = cluster.in_recovery()?;
    if !standby {
        let standbys = query_json(
            cluster,
            "SELECT coalesce(json_agg(r ORDER BY r.name), '[]') FROM (SELECT \
               application_name AS name, host(client_addr) AS client_addr, state, \
               sent_lsn::text AS sent_lsn, write_lsn::text AS write_lsn, \
               flush_lsn::text AS flush_lsn, replay_lsn::text AS replay_lsn, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag_bytes, \
               coalesce(extract(epoch FROM replay_lag), 0)::float8 AS replay_lag_seconds \
             FROM pg_stat_replication) r",
        )?;
        let slots = query_json(
            cluster,
            "SELECT coalesce(json_agg(r ORDER BY r.name), '[]') FROM (SELECT \
               slot_name AS name, active, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes \
             FROM pg_replication_slots) r",
        )?;
        let count = standbys.as_array().map_or(0, Vec::len);
        if count == 0 && slots.as_array().is_none_or(Vec::is_empty) {
            return Ok(with_role(
                unknown("no standby and no replication slot: replication is not set up"),
                "primary",
            ));
        }
        let status = if count == 0 {
            "no standby connected"
        } else {
            "ok"
        };
        return Ok(
            json!({"status": status, "role": "primary", "standbys": standbys, "slots": slots}),
        );
    }
    let receiver = query_json(
        cluster,
        "SELECT coalesce((SELECT row_to_json(r) FROM (SELECT status, sender_host, \
           flushed_lsn::text AS received_lsn, pg_last_wal_replay_lsn()::text AS replay_lsn, \
           pg_wal_lsn_diff(flushed_lsn, pg_last_wal_replay_lsn())::bigint AS lag_bytes, \
           extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 \
             AS replay_delay_seconds, \
           extract(epoch FROM now() - last_msg_receipt_time)::float8 AS last_message_seconds \
         FROM pg_stat_wal_receiver) r), 'null')",
    )?;
    if receiver.is_null() {
        return Ok(with_role(
            unknown("a standby with no WAL receiver: it does not stream from the primary"),
            "standby",
        ));
    }
    Ok(json!({"status": "ok", "role": "standby", "receiver": receiver}))
}

/// Redis's `INFO replication`: a primary's replicas with their offset lag,
/// or a replica's link to its primary.
fn kvstore(server: &Server) -> Result<Value> {
    let info = server.info("replication")?;
    let number = |key: &str| info.get(key).and_then(|v| v.parse::<i64>().ok());
    match info.get("role").map(String::as_str) {
        Some("master") => {
            let offset = number("master_repl_offset").unwrap_or(0);
            let replicas: Vec<Value> = (0..number("connected_slaves").unwrap_or(0))
                .filter_map(|i| info.get(&format!("slave{i}")))
                .map(|line| {
                    let field = |name: &str| {
                        line.split(',')
                            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                            .unwrap_or("")
                            .to_string()
                    };
                    let at: i64 = field("offset").parse().unwrap_or(0);
                    json!({"address": field("ip"), "port": field("port"), "state": field("state"),
                           "offset": at, "lag_bytes": (offset - at).max(0)})
                })
                .collect();
            if replicas.is_empty() {
                return Ok(with_role(
                    unknown("no replica is connected to this Redis"),
                    "primary",
                ));
            }
            Ok(json!({"status": "ok", "role": "primary", "offset": offset, "replicas": replicas}))
        }
        Some("slave") => {
            let link = info.get("master_link_status").cloned().unwrap_or_default();
            let value = json!({"status": if link == "up" { "ok" } else { "link down" },
                "role": "replica",
                "primary": info.get("master_host"),
                "link": link,
                "sync_in_progress": info.get("master_sync_in_progress").map(|v| v == "1"),
                "offset": number("slave_repl_offset"),
                "last_io_seconds_ago": number("master_last_io_seconds_ago")});
            Ok(value)
        }
        other => Ok(unknown(format!("Redis answers with role {other:?}"))),
    }
}

/// The event bus: per topic, the records on the primary's Kafka not yet
/// mirrored to the secondary's.
///
/// On the secondary the figure is exact: each partition's end offset on
/// the primary past the source offset MirrorMaker has committed (its
/// offsets topic, here). The primary shows the secondary's section; when
/// the secondary's monitor can't say, it compares both clusters' end
/// offsets itself, which is approximate (mirrored records keep their order,
/// not their offsets: a topic's retention or compaction shifts them).
fn event_bus(sources: &Sources) -> Result<Value> {
    let role = InstanceConfig::load(&sources.instance_config)?.replication_mode();
    let Some((peer, login)) = &sources.kafka_peer else {
        return Ok(unknown(
            "the other host's end offsets need the pair's Kafka login (kafka_password)",
        ));
    };
    let kafka = &sources.kafka;
    let mut topics = Map::new();
    let shown = |topic: &str| {
        !(topic.starts_with("__") || topic.starts_with("mm2-") || topic.ends_with(".internal"))
    };
    match role {
        ReplicationMode::Standalone => Ok(unknown("this host is standalone: it mirrors nothing")),
        ReplicationMode::Fenced => Ok(unknown(
            "this host is fenced after a failover: it mirrors nothing until cluster_rejoin",
        )),
        ReplicationMode::Secondary => {
            let unit = crate::services::Unit::new(crate::kafka::MIRRORMAKER_UNIT);
            if !unit.is_active()? {
                return Ok(unknown(format!("MirrorMaker ({unit}) is not running")));
            }
            let source = crate::kafka::partition_end_offsets(peer, Some(login))?;
            let mirrored =
                kafka.mirrored_offsets(&sources.kafka_local, crate::kafka::MIRRORMAKER_SOURCE)?;
            for (topic, (records, behind)) in crate::kafka::not_yet_mirrored(&source, &mirrored) {
                if shown(&topic) {
                    topics.insert(topic, json!({"primary_end": records, "behind": behind}));
                }
            }
            Ok(
                json!({"status": "ok", "role": role.as_str(), "mirrormaker": "running",
                      "exact": true, "topics": topics}),
            )
        }
        ReplicationMode::Primary => {
            let mirrormaker = match peer_section(sources, "event_bus") {
                Ok(seen) if seen["status"] == "ok" => {
                    let mut seen = seen;
                    seen["role"] = role.as_str().into();
                    seen["measured_by"] = json!(sources.peer_monitor.map(|a| a.to_string()));
                    return Ok(seen);
                }
                Ok(seen) if seen["pending"] == true => {
                    "not known yet: the secondary's monitor has just started".to_string()
                }
                Ok(seen) => {
                    return Ok(unknown(format!(
                        "on the secondary: {}",
                        seen["reason"].as_str().unwrap_or("unknown")
                    )));
                }
                Err(e) => format!("not known: {e:#}"),
            };
            let source = crate::kafka::all_end_offsets(&sources.kafka_local, None)?;
            let target = crate::kafka::all_end_offsets(peer, Some(login))?;
            for (topic, end) in source.into_iter().filter(|(t, _)| shown(t)) {
                let there = target.get(&topic).copied().unwrap_or(0);
                topics.insert(
                    topic,
                    json!({"primary_end": end, "secondary_end": there,
                           "behind": end.saturating_sub(there)}),
                );
            }
            Ok(
                json!({"status": "ok", "role": role.as_str(), "mirrormaker": mirrormaker,
                      "exact": false, "topics": topics}),
            )
        }
    }
}

/// The last file sync's record (`cluster_replicate_files`), on the
/// secondary; a primary shows the secondary's.
fn files(sources: &Sources) -> Result<Value> {
    if let Some(address) = sources.peer_monitor {
        if InstanceConfig::load(&sources.instance_config)?.replication_mode()
            == ReplicationMode::Primary
        {
            let seen = peer_section(sources, "files").unwrap_or_else(|e| unknown(format!("{e:#}")));
            return Ok(match seen {
                Value::Object(mut seen) => {
                    seen.insert("measured_by".into(), json!(address.to_string()));
                    Value::Object(seen)
                }
                other => other,
            });
        }
    }
    let record = Path::new(crate::rsync::SYNC_RECORD);
    let Some(text) = crate::files::read_optional(record)? else {
        return Ok(unknown(
            "no file sync recorded on this host since it started (the secondary's timer runs it)",
        ));
    };
    let recorded: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a sync record", record.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let time = recorded["time"].as_u64().unwrap_or(0);
    let ok = recorded["ok"] == true;
    Ok(json!({"status": if ok { "ok" } else { "failed" },
              "last_sync": time, "age_seconds": now.saturating_sub(time),
              "msg": recorded["msg"]}))
}

/// One section of the other host's report, from its monitor.
fn peer_section(sources: &Sources, section: &str) -> Result<Value> {
    let address = sources
        .peer_monitor
        .context("the other host's monitor is not known (monitor_port)")?;
    let report = crate::monitor::fetch_report(address, sources.timeout)
        .with_context(|| format!("the other host's monitor at {address} does not answer"))?;
    Ok(report[section].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_healthy_only_when_every_section_is_ok() {
        let mut report = Map::new();
        for section in SECTIONS {
            report.insert(section.into(), json!({"status": "ok"}));
        }
        assert!(healthy(&report));
        report.insert("files".into(), unknown("never synced"));
        assert!(!healthy(&report));
        report.remove("files");
        assert!(!healthy(&report));
        report.insert("files".into(), json!({"status": "ok"}));
        report.insert("kvstore".into(), json!({"status": "link down"}));
        assert!(!healthy(&report));
    }

    #[test]
    fn the_plotted_lag_is_the_furthest_behind() {
        let primary = json!({"status": "ok", "role": "primary",
            "standbys": [{"lag_bytes": 10}, {"lag_bytes": 4096}]});
        assert_eq!(lag("postgres", &primary).unwrap().value, 4096.0);
        let bus = json!({"status": "ok", "topics": {"a": {"behind": 3}, "b": {"behind": 4}}});
        assert_eq!(lag("event_bus", &bus).unwrap().value, 7.0);
        assert_eq!(lag("files", &unknown("never synced")), None);
        let replica = json!({"status": "ok", "role": "replica", "last_io_seconds_ago": 1});
        assert_eq!(lag("kvstore", &replica).unwrap().unit, "seconds");
    }
}
