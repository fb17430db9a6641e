//! The event bus on a real pair, as the seed's step 10: MirrorMaker 2, run
//! by hapair on the secondary, mirrors the primary's Kafka under the same
//! topic names. Assertions are on what the secondary's Kafka holds.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{primary_mode, produce, set_protected, KAFKA_PASSWORD, REDIS_PASSWORD};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, ModuleRun, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "step10_a_protected_secondary_is_refused_and_nothing_runs",
        protected,
    ),
    (
        "step10_every_message_arrives_in_order_per_partition",
        messages_arrive,
    ),
    ("step10_a_topic_created_later_is_mirrored_too", later_topic),
    (
        "step10_consumer_group_offsets_are_translated",
        group_offsets,
    ),
    ("step10_a_rerun_changes_nothing_and_restarts_nothing", rerun),
    (
        "steps9_10_a_secondary_cut_off_catches_up_with_every_key_and_message",
        partition,
    ),
];

fn main() -> ExitCode {
    suite("eventbus", 2, 8, TESTS)
}

const KAFKA: &str = "KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin";
const UNIT: &str = "hapair-mirrormaker";

fn sync(secondary: &Host, primary: &Host) -> Result<ModuleRun> {
    // A short refresh, so that new topics and group offsets show up soon.
    secondary.run_module(
        "cluster_start_kafka_sync",
        &json!({"primary_address": primary.ip, "refresh_interval": 5,
                "kafka_password": KAFKA_PASSWORD}),
    )
}

fn ready(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    sync(secondary, primary)?.ok()?;
    Ok(())
}

/// Every message of `topic` on `host`, per partition, in order.
fn messages(host: &Host, topic: &str) -> Result<BTreeMap<u32, Vec<String>>> {
    let out = host.sh(&format!(
        "{KAFKA}/kafka-console-consumer.sh --bootstrap-server 127.0.0.1:9092 --topic {topic} \
         --from-beginning --timeout-ms 8000 --property print.partition=true 2>/dev/null || true"
    ))?;
    let mut by_partition: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        if let Some((partition, value)) = line
            .strip_prefix("Partition:")
            .and_then(|l| l.split_once('\t'))
        {
            by_partition
                .entry(partition.trim().parse()?)
                .or_default()
                .push(value.to_string());
        }
    }
    Ok(by_partition)
}

/// Waits until `topic` on the secondary holds all `expected` messages of
/// the primary's, then checks they are the same messages, in the same
/// partitions, in the same order.
fn mirrored(
    primary: &Host,
    secondary: &Host,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<()> {
    let sent = messages(primary, topic)?;
    ensure_eq!(count(&sent), expected);
    wait_for(
        &format!("{expected} messages of {topic} on the secondary"),
        timeout,
        || Ok(count(&messages(secondary, topic)?) == expected),
    )?;
    ensure_eq!(messages(secondary, topic)?, sent);
    Ok(())
}

fn count(by_partition: &BTreeMap<u32, Vec<String>>) -> usize {
    by_partition.values().map(Vec::len).sum()
}

fn protected(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    set_protected(secondary, true)?;
    let run = sync(secondary, primary)?;
    if !run.failed() || !run.msg().contains("protected instance") {
        bail!("a protected secondary was not refused: {}", run.stdout);
    }
    ensure_eq!(
        secondary.succeeds(&format!("systemctl is-active --quiet {UNIT}"))?,
        false
    );
    ensure_eq!(
        secondary.succeeds("test -e /etc/hapair/mirrormaker.properties")?,
        false
    );
    Ok(())
}

fn messages_arrive(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    produce(primary, "orders", 4, 1, 500)?;
    mirrored(primary, secondary, "orders", 500, Duration::from_secs(60))
}

fn later_topic(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    produce(primary, "created_later", 2, 1, 50)?;
    mirrored(
        primary,
        secondary,
        "created_later",
        50,
        Duration::from_secs(90),
    )
}

fn group_offsets(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    produce(primary, "billing", 1, 1, 100)?;
    // A consumer group reads 60 of the 100 messages on the primary.
    primary.sh(&format!(
        "{KAFKA}/kafka-console-consumer.sh --bootstrap-server 127.0.0.1:9092 --topic billing \
         --group billing-app --from-beginning --max-messages 60 --timeout-ms 15000 \
         --consumer-property enable.auto.commit=true \
         --consumer-property auto.commit.interval.ms=100 >/dev/null"
    ))?;
    let committed = |host: &Host| -> Result<Option<u64>> {
        let out = host.sh(&format!(
            "{KAFKA}/kafka-consumer-groups.sh --bootstrap-server 127.0.0.1:9092 --describe \
             --group billing-app 2>/dev/null || true"
        ))?;
        Ok(out
            .lines()
            .find(|l| l.contains("billing"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok()))
    };
    let on_primary = committed(primary)?;
    if on_primary.is_none_or(|o| o == 0) {
        bail!("the group committed nothing on the primary: {on_primary:?}");
    }
    // Translated offsets may be a little early (KAFKA-15202), never later.
    wait_for(
        "the group's offset on the secondary",
        Duration::from_secs(90),
        || Ok(committed(secondary)?.is_some_and(|o| o > 0 && Some(o) <= on_primary)),
    )?;
    Ok(())
}

fn rerun(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    let since = |host: &Host| {
        host.sh(&format!(
            "systemctl show -p ActiveEnterTimestampMonotonic --value {UNIT}"
        ))
    };
    let before = since(secondary)?;
    let again = sync(secondary, primary)?.ok()?;
    ensure_eq!(again.changed(), false);
    let check = secondary.run_module(
        "cluster_start_kafka_sync",
        &json!({"primary_address": primary.ip, "refresh_interval": 5,
                "kafka_password": KAFKA_PASSWORD, "_ansible_check_mode": true}),
    )?;
    ensure_eq!(check.ok()?.changed(), false);
    ensure_eq!(since(secondary)?, before);
    // A changed setting rewrites the configuration and restarts the unit.
    let changed = secondary.run_module(
        "cluster_start_kafka_sync",
        &json!({"primary_address": primary.ip, "refresh_interval": 6,
                "kafka_password": KAFKA_PASSWORD, "_ansible_diff": true}),
    )?;
    let changed = changed.ok()?;
    ensure_eq!(changed.changed(), true);
    if since(secondary)? == before {
        bail!("a changed setting did not restart MirrorMaker");
    }
    let diff: Value = changed.json["diff"].clone();
    if !diff.to_string().contains("interval.seconds = 6") {
        bail!("the diff does not show the new interval: {diff}");
    }
    // The configuration holds the pair's login: the diff masks it, and
    // only root and Kafka's group read the file.
    if diff.to_string().contains("Secret") || !diff.to_string().contains("sasl.jaas.config") {
        bail!("the diff shows the login, or no line of it: {diff}");
    }
    ensure_eq!(
        secondary
            .sh("stat -c '%a %U %G' /etc/hapair/mirrormaker.properties")?
            .trim(),
        "640 root kafka"
    );
    sync(secondary, primary)?.ok()?;
    Ok(())
}

/// The pair cut apart while the primary keeps taking keys and messages;
/// once joined again, Redis and MirrorMaker catch up by themselves.
fn partition(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    secondary
        .run_module(
            "cluster_kvstore_copy",
            &json!({"primary_address": primary.ip, "redis_password": REDIS_PASSWORD}),
        )?
        .ok()?;
    produce(primary, "during_cut", 3, 1, 10)?;
    wait_for(
        "the topic on the secondary",
        Duration::from_secs(60),
        || Ok(count(&messages(secondary, "during_cut")?) == 10),
    )?;

    secondary.cut()?;
    let written = (|| -> Result<()> {
        let keys: String = (1..=200).map(|n| format!("SET cut:{n} {n}\n")).collect();
        primary.write("/tmp/cut-keys", &keys)?;
        primary.sh(&format!(
            "REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli --no-auth-warning < /tmp/cut-keys >/dev/null"
        ))?;
        produce(primary, "during_cut", 3, 11, 200)
    })();
    secondary.join()?;
    written?;

    let redis_count = || -> Result<String> {
        secondary.sh(&format!(
            "REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli --no-auth-warning --scan --pattern 'cut:*' | wc -l"
        ))
    };
    wait_for(
        "every key written during the cut",
        Duration::from_secs(120),
        || Ok(redis_count()?.trim() == "200"),
    )?;
    mirrored(
        primary,
        secondary,
        "during_cut",
        210,
        Duration::from_secs(180),
    )
}
