//! `/metrics`: the report in Prometheus's text format 0.0.4.
//!
//! Figures the usual exporters already publish keep their names and labels
//! (postgres_exporter's `pg_*`, redis_exporter's `redis_*`), so dashboards
//! and alerts written for them work here; what only hapair measures is
//! `hapair_*`.

use std::fmt::Write as _;

use serde_json::Value;

use super::Snapshot;
use crate::status::SECTIONS;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric families, each written whole: its `# HELP` and `# TYPE`, then
/// every sample.
#[derive(Default)]
struct Families {
    text: String,
}

impl Families {
    /// One family of gauges; nothing at all when it has no sample.
    fn gauge(&mut self, name: &str, help: &str, samples: &[(Vec<(&str, String)>, f64)]) {
        let samples: Vec<_> = samples.iter().filter(|(_, v)| v.is_finite()).collect();
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} gauge");
        for (labels, value) in samples {
            self.text.push_str(name);
            if !labels.is_empty() {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(label, value)| format!("{label}=\"{}\"", escape_label(value)))
                    .collect();
                let _ = write!(self.text, "{{{}}}", labels.join(","));
            }
            let _ = writeln!(self.text, " {value}");
        }
    }

    /// A family with a sample per item of `items` that has a value.
    fn each<'a>(
        &mut self,
        name: &str,
        help: &str,
        items: &[Value],
        labels: impl Fn(&Value) -> Vec<(&'a str, String)>,
        value: impl Fn(&Value) -> Option<f64>,
    ) {
        let samples: Vec<_> = items
            .iter()
            .filter_map(|item| Some((labels(item), value(item)?)))
            .collect();
        self.gauge(name, help, &samples);
    }

    /// A family of one unlabelled gauge, when the value is there.
    fn single(&mut self, name: &str, help: &str, value: Option<f64>) {
        if let Some(value) = value {
            self.gauge(name, help, &[(Vec::new(), value)]);
        }
    }
}

/// A label's value as the format reads it: `\`, `"` and newlines escaped.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

pub fn render(snapshot: &Snapshot) -> String {
    let report = &snapshot.report;
    let mut out = Families::default();
    let measured = |section: &str| report[section]["status"] != "unknown";

    out.single(
        "hapair_replication_healthy",
        "Whether every section of the report is ok (1), or one is unknown or failing (0).",
        Some(flag(snapshot.healthy)),
    );
    out.single(
        "hapair_two_primaries",
        "Whether both hosts are primaries taking writes (1): see two_primaries in /monitor/replication.",
        Some(flag(report.get("two_primaries").is_some_and(|t| t != false))),
    );
    let sections: Vec<_> = SECTIONS
        .iter()
        .map(|s| (vec![("section", s.to_string())], flag(measured(s))))
        .collect();
    out.gauge(
        "hapair_section_up",
        "Whether the section was measured (1) or is unknown (0); see /monitor/replication for why.",
        &sections,
    );
    let measured_at: Vec<_> = SECTIONS
        .iter()
        .filter_map(|s| {
            let at = report[*s]["measured_at"].as_f64()?;
            Some((vec![("section", s.to_string())], at))
        })
        .collect();
    out.gauge(
        "hapair_section_measured_timestamp_seconds",
        "When the section was last measured (Unix time).",
        &measured_at,
    );

    postgres(&mut out, &report["postgres"]);
    redis(&mut out, &report["kvstore"]);
    event_bus(&mut out, &report["event_bus"]);
    files(&mut out, &report["files"]);
    out.text
}

fn postgres(out: &mut Families, pg: &Value) {
    let role = pg["role"].as_str();
    out.single(
        "pg_up",
        "Whether PostgreSQL answered the last measure.",
        Some(flag(role.is_some())),
    );
    let Some(role) = role else { return };
    out.single(
        "pg_replication_is_replica",
        "Whether PostgreSQL is a standby (in recovery).",
        Some(flag(role == "standby")),
    );
    let standbys = list(&pg["standbys"]);
    let labels = |s: &Value| {
        vec![
            ("application_name", text(&s["name"])),
            ("client_addr", text(&s["client_addr"])),
            ("state", text(&s["state"])),
        ]
    };
    out.each(
        "pg_stat_replication_pg_wal_lsn_diff",
        "Bytes of WAL the standby has not replayed yet, from pg_stat_replication.",
        standbys,
        labels,
        |s| s["lag_bytes"].as_f64(),
    );
    out.each(
        "hapair_postgres_replay_lag_seconds",
        "pg_stat_replication's replay_lag of each standby, in seconds.",
        standbys,
        labels,
        |s| s["replay_lag_seconds"].as_f64(),
    );
    let slots = list(&pg["slots"]);
    let slot_labels = |s: &Value| vec![("slot_name", text(&s["name"]))];
    out.each(
        "pg_replication_slots_pg_wal_lsn_diff",
        "Bytes of WAL the replication slot holds back.",
        slots,
        slot_labels,
        |s| s["retained_bytes"].as_f64(),
    );
    out.each(
        "pg_replication_slots_active",
        "Whether a standby is using the replication slot.",
        slots,
        slot_labels,
        |s| Some(flag(s["active"] == true)),
    );
    let receiver = &pg["receiver"];
    if role == "standby" {
        let behind = receiver["lag_bytes"].as_f64();
        // As postgres_exporter: nothing to replay is no lag, however long
        // ago the last transaction was.
        let seconds = match behind {
            Some(0.0) => Some(0.0),
            _ => receiver["replay_delay_seconds"].as_f64(),
        };
        out.single(
            "pg_replication_lag_seconds",
            "Seconds since the last replayed transaction, 0 when all received WAL is replayed.",
            seconds,
        );
        out.single(
            "hapair_postgres_standby_lag_bytes",
            "Bytes of WAL received by this standby and not replayed yet.",
            behind,
        );
        out.single(
            "hapair_postgres_wal_receiver_up",
            "Whether this standby's WAL receiver is streaming from the primary.",
            Some(flag(receiver["status"] == "streaming")),
        );
    }
}

fn redis(out: &mut Families, kv: &Value) {
    let role = kv["role"].as_str();
    out.single(
        "redis_up",
        "Whether Redis answered the last measure.",
        Some(flag(role.is_some())),
    );
    match role {
        Some("primary") => {
            let replicas = list(&kv["replicas"]);
            out.single(
                "redis_master_repl_offset",
                "The primary's replication offset.",
                kv["offset"].as_f64(),
            );
            out.single(
                "redis_connected_slaves",
                "Replicas connected to this primary.",
                Some(replicas.len() as f64),
            );
            let labels = |r: &Value| {
                vec![
                    ("slave_ip", text(&r["address"])),
                    ("slave_port", text(&r["port"])),
                    ("slave_state", text(&r["state"])),
                ]
            };
            out.each(
                "redis_connected_slave_offset_bytes",
                "Each replica's replication offset.",
                replicas,
                labels,
                |r| r["offset"].as_f64(),
            );
            out.each(
                "hapair_kvstore_replica_lag_bytes",
                "Bytes of the primary's replication stream each replica has not acknowledged.",
                replicas,
                labels,
                |r| r["lag_bytes"].as_f64(),
            );
        }
        Some("replica") => {
            out.single(
                "redis_master_link_up",
                "Whether this replica's link to its primary is up.",
                Some(flag(kv["link"] == "up")),
            );
            out.single(
                "redis_slave_repl_offset",
                "This replica's replication offset.",
                kv["offset"].as_f64(),
            );
            out.single(
                "redis_master_last_io_seconds_ago",
                "Seconds since this replica last heard from its primary.",
                kv["last_io_seconds_ago"].as_f64(),
            );
            out.single(
                "redis_master_sync_in_progress",
                "Whether a full sync from the primary is under way.",
                kv["sync_in_progress"].as_bool().map(flag),
            );
        }
        _ => {}
    }
}

fn event_bus(out: &mut Families, bus: &Value) {
    if bus["status"] == "unknown" {
        return;
    }
    out.single(
        "hapair_event_bus_mirrormaker_up",
        "Whether MirrorMaker 2 runs (measured on the secondary, where it runs).",
        (bus["mirrormaker"] == "running").then_some(1.0),
    );
    let topics: Vec<_> = bus["topics"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(topic, t)| Some((vec![("topic", topic.clone())], t["behind"].as_f64()?)))
        .collect();
    out.gauge(
        "hapair_event_bus_records_behind",
        "Records of the primary's topic not yet mirrored (exact when measured on the secondary).",
        &topics,
    );
}

fn files(out: &mut Families, files: &Value) {
    out.single(
        "hapair_files_last_sync_timestamp_seconds",
        "When the last file sync ended (Unix time).",
        files["last_sync"].as_f64(),
    );
    out.single(
        "hapair_files_last_sync_age_seconds",
        "Seconds since the last file sync ended.",
        files["age_seconds"].as_f64(),
    );
    out.single(
        "hapair_files_last_sync_success",
        "Whether the last file sync succeeded.",
        files["last_sync"]
            .as_f64()
            .map(|_| flag(files["status"] == "ok")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn snapshot(sections: Value) -> Snapshot {
        let report: Map<String, Value> = sections.as_object().unwrap().clone();
        Snapshot {
            healthy: crate::status::healthy(&report),
            report,
            time: 0,
        }
    }

    #[test]
    fn each_family_is_declared_once_before_its_samples() {
        let text = render(&snapshot(json!({
            "postgres": {"status": "ok", "role": "primary",
                "standbys": [{"name": "a", "client_addr": "198.18.0.12", "state": "streaming",
                              "lag_bytes": 10, "replay_lag_seconds": 0.5},
                             {"name": "b\"\\\n", "client_addr": null, "state": "catchup",
                              "lag_bytes": 20, "replay_lag_seconds": 1}],
                "slots": [{"name": "s", "active": true, "retained_bytes": 30}]},
            "kvstore": {"status": "unknown", "reason": "down"},
            "event_bus": {"status": "ok", "mirrormaker": "runs on the secondary",
                          "topics": {"orders": {"behind": 3}}},
            "files": {"status": "ok", "last_sync": 1700000000, "age_seconds": 5}
        })));
        assert!(text.ends_with('\n'));
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name.to_string()), "{name} twice");
                declared.push(name.to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
            }
        }
        assert!(text.contains(
            "pg_stat_replication_pg_wal_lsn_diff{application_name=\"b\\\"\\\\\\n\",client_addr=\"\",state=\"catchup\"} 20\n"
        ));
        assert!(text.contains("redis_up 0\n"));
        assert!(text.contains("hapair_section_up{section=\"kvstore\"} 0\n"));
        assert!(text.contains("hapair_event_bus_records_behind{topic=\"orders\"} 3\n"));
        assert!(!text.contains("hapair_event_bus_mirrormaker_up"));
        assert!(text.contains("hapair_replication_healthy 0\n"));
    }
}
