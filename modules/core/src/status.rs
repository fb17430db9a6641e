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
    /// The primary's pair listener and the pair's login (on a secondary).
    pub kafka_primary: Option<(String, Login)>,
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
            let measured = match section {
                "postgres" => postgres(&sources.postgres),
                "kvstore" => kvstore(&sources.redis),
                "event_bus" => event_bus(&sources),
                _ => files(Path::new(crate::rsync::SYNC_RECORD)),
            };
            let value = measured.unwrap_or_else(|e| unknown(format!("{e:#}")));
            let _ = sender.send((section, value));
        });
    }
    drop(sender);
    let mut report = Map::new();
    let deadline = std::time::Instant::now() + sources.timeout;
    while report.len() < SECTIONS.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match receiver.recv_timeout(left) {
            Ok((section, value)) => {
                report.insert(section.to_string(), value);
            }
            Err(_) => break,
        }
    }
    for section in SECTIONS {
        report.entry(section).or_insert_with(|| {
            unknown(format!(
                "no answer within {} s: the service hangs",
                sources.timeout.as_secs_f64()
            ))
        });
    }
    report
}

/// Whether every section was measured.
pub fn healthy(report: &Map<String, Value>) -> bool {
    SECTIONS
        .iter()
        .all(|s| report.get(*s).is_some_and(|v| v["status"] != "unknown"))
}

fn query_json(cluster: &Cluster, sql: &str) -> Result<Value> {
    let text = cluster.query(sql)?;
    serde_json::from_str(&text).with_context(|| format!("PostgreSQL answered {text:?}"))
}

/// On a primary, each standby (`pg_stat_replication`) and each slot's
/// retained WAL; on a standby, its WAL receiver and replay.
fn postgres(cluster: &Cluster) -> Result<Value> {
    let standby = cluster.query("SELECT pg_is_in_recovery()")? == "t";
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
            return Ok(unknown(
                "no standby and no replication slot: replication is not set up",
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
        return Ok(unknown(
            "a standby with no WAL receiver: it does not stream from the primary",
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
                return Ok(unknown("no replica is connected to this Redis"));
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

/// MirrorMaker on this host (a secondary): whether it runs, and per topic
/// the records on the primary not yet here, from both clusters' end
/// offsets. That figure is approximate: mirrored records keep their order
/// but not their offsets.
fn event_bus(sources: &Sources) -> Result<Value> {
    let Some((primary, login)) = &sources.kafka_primary else {
        return Ok(unknown("measured on the secondary, where MirrorMaker runs"));
    };
    let mirrormaker = crate::services::Unit::new(crate::kafka::MIRRORMAKER_UNIT);
    if !mirrormaker.is_active()? {
        return Ok(unknown(format!(
            "MirrorMaker ({mirrormaker}) is not running"
        )));
    }
    let source = sources.kafka.all_end_offsets(primary, Some(login))?;
    let target = sources.kafka.all_end_offsets(&sources.kafka_local, None)?;
    let mut topics = Map::new();
    for (topic, end) in &source {
        if topic.starts_with("__") || topic.starts_with("mm2-") || topic.ends_with(".internal") {
            continue;
        }
        let here = target.get(topic).copied().unwrap_or(0);
        topics.insert(
            topic.clone(),
            json!({"primary_end": end, "secondary_end": here, "behind": end.saturating_sub(here)}),
        );
    }
    Ok(json!({"status": "ok", "mirrormaker": "running", "topics": topics}))
}

/// The last file sync's record (`cluster_replicate_files`).
fn files(record: &Path) -> Result<Value> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_healthy_only_when_every_section_was_measured() {
        let mut report = Map::new();
        for section in SECTIONS {
            report.insert(section.into(), json!({"status": "ok"}));
        }
        assert!(healthy(&report));
        report.insert("files".into(), unknown("never synced"));
        assert!(!healthy(&report));
        report.remove("files");
        assert!(!healthy(&report));
    }
}
