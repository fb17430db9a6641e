//! The test fleet itself: its hosts are what production hosts would be.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Test};

const TESTS: &[Test] = &[
    (
        "each_host_answers_ssh_with_its_pinned_host_key",
        answers_ssh,
    ),
    (
        "postgresql_redis_and_kafka_are_active_and_accept_connections",
        services_answer,
    ),
    ("each_host_has_its_own_identity", own_identity),
    (
        "hosts_reach_each_other_and_a_cut_host_is_unreachable_until_joined",
        cut_and_join,
    ),
    ("a_stopped_host_comes_back_with_its_data", stop_and_start),
];

fn main() -> ExitCode {
    suite("smoke", 2, 3, TESTS)
}

fn answers_ssh(fleet: &Fleet) -> Result<()> {
    for host in &fleet.hosts {
        let output = fleet.ssh(host, "hostname")?;
        if !output.status.success() {
            bail!(
                "ssh to {} failed: {}",
                host.ip,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        ensure_eq!(String::from_utf8_lossy(&output.stdout).trim(), host.name);
    }
    Ok(())
}

fn services_answer(fleet: &Fleet) -> Result<()> {
    for host in &fleet.hosts {
        host.sh("systemctl is-active postgresql@15-main redis-server kafka")?;
        let one = host.sh("runuser -u postgres -- psql -XAtc 'select 1'")?;
        ensure_eq!(one.trim(), "1");
        ensure_eq!(host.sh("redis-cli ping")?.trim(), "PONG");
        // Kafka: a message produced to a new topic is consumed back.
        host.sh(
            "/opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 \
             --create --if-not-exists --topic smoke --partitions 1 --replication-factor 1",
        )?;
        host.sh(&format!(
            "echo 'hello from {}' | /opt/kafka/bin/kafka-console-producer.sh \
             --bootstrap-server localhost:9092 --topic smoke",
            host.name
        ))?;
        let consumed = host.sh(
            "/opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server localhost:9092 \
             --topic smoke --from-beginning --max-messages 1 --timeout-ms 30000",
        )?;
        ensure_eq!(consumed.trim(), format!("hello from {}", host.name));
    }
    Ok(())
}

fn own_identity(fleet: &Fleet) -> Result<()> {
    let identity = |script: &str| -> Result<Vec<String>> {
        fleet
            .hosts
            .iter()
            .map(|h| Ok(h.sh(script)?.trim().to_string()))
            .collect()
    };
    let system_ids = identity(
        "runuser -u postgres -- psql -XAtc 'select system_identifier from pg_control_system()'",
    )?;
    let host_keys = identity("cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub")?;
    let kafka_ids = identity("grep cluster.id /var/lib/kafka/data/meta.properties")?;
    for (what, ids) in [
        ("PostgreSQL system identifiers", system_ids),
        ("SSH host keys", host_keys),
        ("Kafka cluster ids", kafka_ids),
    ] {
        if ids[0] == ids[1] {
            bail!("{what} are the same on both hosts: {}", ids[0]);
        }
    }
    Ok(())
}

fn cut_and_join(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let reach = format!("nc -z -w 2 {} 22", secondary.ip);
    if !primary.succeeds(&reach)? {
        bail!("primary can't reach the secondary's SSH port");
    }
    secondary.cut()?;
    let cut_result = primary.succeeds(&reach);
    secondary.join()?;
    if cut_result? {
        bail!("primary still reaches the secondary after it was cut off");
    }
    wait_for(
        "the secondary to be reachable again",
        Duration::from_secs(20),
        || primary.succeeds(&reach),
    )
}

fn stop_and_start(fleet: &Fleet) -> Result<()> {
    let secondary = fleet.host("secondary");
    secondary.sh("runuser -u postgres -- psql -Xc 'create table marker (note text)'")?;
    secondary.stop()?;
    if secondary.succeeds("true").unwrap_or(false) {
        bail!("the secondary still runs commands after stop");
    }
    secondary.start()?;
    let tables = secondary.sh("runuser -u postgres -- psql -XAtc '\\dt marker'")?;
    if !tables.contains("marker") {
        bail!("the marker table is gone after a restart: {tables}");
    }
    Ok(())
}
