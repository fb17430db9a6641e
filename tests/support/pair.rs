//! A pair of fleet hosts taken through the seed's steps, for the suites
//! that need PostgreSQL replication set up: the pair's test passwords, and
//! one call per step.

use anyhow::Result;
use serde_json::{json, Value};

use crate::{exchange_keys, Fleet, Host, ModuleRun};

/// The pair's test passwords (the fleet's hosts are throwaway).
pub const REPLICATION_PASSWORD: &str = "repl-Secret-0123456789";
pub const REDIS_PASSWORD: &str = "redis-Secret-0123456789";
/// The Kafka login's: quotes and a backslash, which the JAAS line and the
/// properties file each quote by their own rules.
pub const KAFKA_PASSWORD: &str = r#"kafka-"Secret"\0123456789"#;
pub const KAFKA_USER: &str = "hapair";
/// Kafka's pair listener (SASL SCRAM) on each host's pair address.
pub const KAFKA_PAIR_PORT: u16 = 9094;

/// Seed step 4's options for `host`.
pub fn primary_mode_args(host: &Host) -> Value {
    json!({
        "address": host.ip,
        "replication_password": REPLICATION_PASSWORD,
        "redis_password": REDIS_PASSWORD,
        "kafka_password": KAFKA_PASSWORD,
        "_ansible_diff": true,
    })
}

/// Writes the client settings of a Kafka tool on `host` that logs in to a
/// pair listener with `password`, at `path` (for `--command-config`).
pub fn kafka_login_file(host: &Host, path: &str, password: &str) -> Result<()> {
    let jaas_password = password.replace('\\', "\\\\").replace('"', "\\\"");
    let text = format!(
        "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n\
         sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \
         username=\"{KAFKA_USER}\" password=\"{}\";\n\
         request.timeout.ms=10000\ndefault.api.timeout.ms=15000\n",
        jaas_password.replace('\\', "\\\\")
    );
    host.write(path, &text)?;
    Ok(())
}

pub const PSQL: &str = "runuser -u postgres -- psql -XAt";

/// Runs `query` as postgres on `host`; the rows, trimmed.
pub fn sql(host: &Host, query: &str) -> Result<String> {
    Ok(host
        .sh(&format!("{PSQL} -c \"{query}\""))?
        .trim()
        .to_string())
}

/// Keys and trust between the pair (seed steps 2 and 3), once.
pub fn trust(primary: &Host, secondary: &Host) -> Result<()> {
    if !secondary.succeeds("test -s /var/lib/hapair/.ssh/authorized_keys")? {
        exchange_keys(primary, secondary)?;
    }
    Ok(())
}

/// Seed step 7 on the primary.
pub fn add_secondary(primary: &Host, secondary: &Host) -> Result<ModuleRun> {
    primary.run_module(
        "cluster_add_secondary",
        &json!({"secondary_address": secondary.ip, "_ansible_diff": true}),
    )
}

/// Seed step 8 on the secondary, with `extra` options.
pub fn replicate(secondary: &Host, primary: &Host, extra: Value) -> Result<ModuleRun> {
    let mut args =
        json!({"primary_address": primary.ip, "replication_password": REPLICATION_PASSWORD});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    secondary.run_module("cluster_replicate_postgres", &args)
}

/// Seed step 5, or its reverse.
pub fn set_protected(host: &Host, protected: bool) -> Result<()> {
    host.run_module(
        "instance_conf",
        &json!({"key": "cluster.protected_instance", "value": protected}),
    )?
    .ok()?;
    Ok(())
}

/// Makes `secondary` a cluster of its own (a fresh initdb holding a
/// `marker` row), as a host of another pair would be; its system identifier.
pub fn make_foreign_cluster(secondary: &Host) -> Result<String> {
    secondary.sh(
        "systemctl stop postgresql@15-main && \
         rm -rf /var/lib/postgresql/15/main && \
         install -d -o postgres -g postgres -m 700 /var/lib/postgresql/15/main && \
         runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/15/main >/dev/null && \
         rm -f /var/lib/postgresql/15/main/postgresql.conf /var/lib/postgresql/15/main/pg_hba.conf /var/lib/postgresql/15/main/pg_ident.conf && \
         systemctl start postgresql@15-main",
    )?;
    sql(
        secondary,
        "create table marker (note text); insert into marker values ('foreign')",
    )?;
    sql(
        secondary,
        "select system_identifier from pg_control_system()",
    )
}

/// Seed step 4 on the primary (a no-op once done).
pub fn primary_mode(primary: &Host) -> Result<()> {
    primary
        .run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?
        .ok()?;
    Ok(())
}

/// Seed steps 2 to 8 on the pair, as far as they aren't done yet: a
/// secondary that streams, for a test that starts from one and runs alone.
pub fn streaming(primary: &Host, secondary: &Host) -> Result<()> {
    ready_for_step8(primary, secondary)?;
    let status = sql(secondary, "select status from pg_stat_wal_receiver")?;
    if status != "streaming" {
        replicate(secondary, primary, json!({}))?.ok()?;
    }
    Ok(())
}

/// Seed steps 2 to 7 on the pair, as far as they aren't done yet: what a
/// test of step 8 needs, so that it can run alone.
pub fn ready_for_step8(primary: &Host, secondary: &Host) -> Result<()> {
    trust(primary, secondary)?;
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    add_secondary(primary, secondary)?.ok()?;
    Ok(())
}

/// All four replicating: PostgreSQL streams, Redis is a replica,
/// MirrorMaker runs (refreshing its topics every 5 s), and the files of
/// /srv/app were synced once.
pub fn all_replicating(primary: &Host, secondary: &Host) -> Result<()> {
    streaming(primary, secondary)?;
    set_protected(secondary, false)?;
    secondary
        .run_module(
            "cluster_kvstore_copy",
            &json!({"primary_address": primary.ip, "redis_password": REDIS_PASSWORD}),
        )?
        .ok()?;
    secondary
        .run_module(
            "cluster_start_kafka_sync",
            &json!({"primary_address": primary.ip, "kafka_password": KAFKA_PASSWORD,
                    "refresh_interval": 5}),
        )?
        .ok()?;
    primary.sh("mkdir -p /srv/app && echo x > /srv/app/x")?;
    secondary
        .run_module(
            "cluster_replicate_files",
            &json!({"primary_address": primary.ip, "directories": ["/srv/app"]}),
        )?
        .ok()?;
    Ok(())
}

/// The monitor's port on the test hosts.
pub const MONITOR_PORT: u16 = 8080;

/// Installs hapair-monitor on `host`, listening on its pair address too,
/// measuring every second (the event bus every 10 s), so tests see a
/// change within seconds; `extra` options are added.
pub fn install_monitor(host: &Host, extra: Value) -> Result<ModuleRun> {
    let mut args = json!({
        "redis_password": REDIS_PASSWORD,
        "kafka_password": KAFKA_PASSWORD,
        "monitor": "present",
        "monitor_address": host.ip,
        "interval": 1,
        "event_bus_interval": 10,
        "timeout": 3,
        "_ansible_diff": true,
    });
    if let (Some(args), Some(extra)) = (args.as_object_mut(), extra.as_object()) {
        args.extend(extra.clone());
    }
    host.run_module("replication_status", &args)?.ok()
}

/// `host`'s monitor's report, from the control node.
pub fn monitor_report(host: &Host) -> Result<Value> {
    let answer = crate::http_get(
        &format!("{}:{MONITOR_PORT}", host.ip),
        "/monitor/replication",
    )?;
    anyhow::ensure!(
        answer.status == 200,
        "the monitor answered {}: {}",
        answer.status,
        answer.body
    );
    Ok(serde_json::from_str(&answer.body)?)
}

/// The bytes of WAL the primary has written that its standby has not
/// replayed, from `pg_stat_replication` directly.
pub fn replay_lag_bytes(primary: &Host) -> Result<i64> {
    Ok(sql(
        primary,
        "select pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint \
         from pg_stat_replication",
    )?
    .parse()?)
}

/// How many records `topic` holds on `host`'s Kafka (the sum of its
/// partitions' end offsets; 0 when it does not exist), by Kafka's own
/// tool: the tests' reading does not lean on the modules' own client.
pub fn topic_records(host: &Host, topic: &str) -> Result<u64> {
    let out = host.sh(&format!(
        "KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin/kafka-get-offsets.sh \
         --bootstrap-server 127.0.0.1:9092 --topic {topic} 2>/dev/null || true"
    ))?;
    Ok(out
        .lines()
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum())
}

/// Produces `count` numbered messages to `topic` on `host`'s Kafka
/// (created with `partitions`), keyed so that they spread over the
/// partitions, acks=all.
pub fn produce(host: &Host, topic: &str, partitions: u32, from: u32, count: u32) -> Result<()> {
    const KAFKA: &str = "KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin";
    host.sh(&format!(
        "{KAFKA}/kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --create --if-not-exists \
         --topic {topic} --partitions {partitions} >/dev/null && \
         seq {from} {} | awk '{{print \"k\" $1 % 7 \":\" $1}}' | \
         {KAFKA}/kafka-console-producer.sh --bootstrap-server 127.0.0.1:9092 --topic {topic} \
         --property parse.key=true --property key.separator=: --producer-property acks=all",
        from + count - 1
    ))?;
    Ok(())
}

/// Three pairs of a six-host fleet, by host name: pair, primary, secondary.
pub const THREE_PAIRS: [(&str, &str, &str); 3] = [
    ("alpha", "primary", "secondary"),
    ("beta", "host3", "host4"),
    ("gamma", "host5", "host6"),
];

/// Rewrites the fleet's inventory in place as the given pairs (each host
/// told its pair by `hapair_pair`), keeping its variables.
pub fn regroup_into_pairs(fleet: &Fleet, pairs: &[(&str, &str, &str)]) -> Result<()> {
    let original = std::fs::read_to_string(fleet.inventory())?;
    let vars = original
        .split_once("[all:vars]")
        .map(|(_, vars)| vars)
        .unwrap_or_default();
    let line = |pair: &str, host: &Host| {
        format!(
            "{}-{} ansible_host={} hapair_pair={pair}\n",
            fleet.name, host.name, host.ip
        )
    };
    let mut text = String::from("[primary]\n");
    for (pair, primary, _) in pairs {
        text.push_str(&line(pair, fleet.host(primary)));
    }
    text.push_str("[secondary]\n");
    for (pair, _, secondary) in pairs {
        text.push_str(&line(pair, fleet.host(secondary)));
    }
    text.push_str(&format!(
        "[pair:children]\nprimary\nsecondary\n[all:vars]{vars}"
    ));
    std::fs::write(fleet.inventory(), text)?;
    Ok(())
}

/// `redis-cli COMMAND` on `host` with the fleet's Redis password, trimmed.
pub fn redis_cli(fleet: &Fleet, host: &Host, command: &str) -> Result<String> {
    let password = fleet.inventory_var("hapair_redis_password")?;
    Ok(host
        .sh(&format!(
            "REDISCLI_AUTH='{password}' redis-cli --no-auth-warning {command}"
        ))?
        .trim()
        .to_string())
}
