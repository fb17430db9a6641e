//! `make bench`: the KV store's and the event bus's sync, seed steps 9
//! and 10, on one pair in one run:
//! - Redis: the first full sync of `cluster_kvstore_copy` with at least
//!   1 GiB on the primary (time and rate);
//! - Kafka: the rate at which a producer writes to the primary alone, with
//!   MirrorMaker stopped (as when the secondary is cut off), beside the rate
//!   at which MirrorMaker then catches up, from its first mirrored record to
//!   its last (its start-up left out).
//!
//! It prints the figures and their ratio, and asserts nothing about speed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hapair_tests::pair::{
    primary_mode, set_protected, topic_records, KAFKA_PASSWORD, REDIS_PASSWORD,
};
use hapair_tests::{Fleet, Host};
use serde_json::json;

/// Records the producer writes, and their size.
const RECORDS: u64 = 1_000_000;
const RECORD_BYTES: u64 = 512;
const KAFKA: &str = "KAFKA_HEAP_OPTS=-Xmx256m /opt/kafka/bin";

fn main() -> ExitCode {
    hapair_tests::bench_main(bench)
}

fn bench() -> Result<()> {
    let fleet = Fleet::up("bench-sync", 2, 11)?;
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    redis(primary, secondary)?;
    kafka(primary, secondary)?;
    Ok(())
}

fn redis(primary: &Host, secondary: &Host) -> Result<()> {
    eprintln!("loading at least 1 GiB into the primary's Redis...");
    // Test password of a throwaway host: redis-benchmark takes it as -a.
    primary.sh(&format!(
        "redis-benchmark -a '{REDIS_PASSWORD}' -t set -n 1300000 -r 1000000000 -d 1024 -P 32 -q \
         >/dev/null 2>&1"
    ))?;
    let used: u64 = primary
        .sh(&format!(
            "REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli --no-auth-warning INFO memory \
             | sed -n 's/^used_memory:\\([0-9]*\\).*/\\1/p'"
        ))?
        .trim()
        .parse()?;
    if used < 1 << 30 {
        bail!("only {used} bytes in Redis; the benchmark needs at least 1 GiB");
    }
    let run = secondary
        .run_module(
            "cluster_kvstore_copy",
            &json!({"primary_address": primary.ip, "redis_password": REDIS_PASSWORD}),
        )?
        .ok()?;
    let seconds = run.json["sync_seconds"].as_f64().unwrap_or(f64::NAN);
    let gib = used as f64 / (1u64 << 30) as f64;
    println!(
        "redis: first full sync of {gib:.2} GiB (used_memory) in {seconds:.1} s, \
         {:.0} MiB/s (restart included)",
        used as f64 / (1 << 20) as f64 / seconds
    );
    Ok(())
}

fn kafka(primary: &Host, secondary: &Host) -> Result<()> {
    secondary
        .run_module(
            "cluster_start_kafka_sync",
            &json!({"primary_address": primary.ip, "refresh_interval": 5,
                    "kafka_password": KAFKA_PASSWORD}),
        )?
        .ok()?;
    primary.sh(&format!(
        "{KAFKA}/kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --create --topic bench \
         --partitions 3 >/dev/null"
    ))?;
    // Cut off: MirrorMaker stopped while the producer writes.
    secondary.sh("systemctl stop hapair-mirrormaker")?;
    let out = primary.sh(&format!(
        "{KAFKA}/kafka-run-class.sh org.apache.kafka.tools.ProducerPerformance --topic bench \
         --num-records {RECORDS} --record-size {RECORD_BYTES} --throughput -1 \
         --producer-props bootstrap.servers=127.0.0.1:9092 acks=all linger.ms=5 2>/dev/null \
         | tail -n 1"
    ))?;
    let produced = records_per_second(&out)?;
    println!(
        "kafka: the producer alone wrote {RECORDS} records of {RECORD_BYTES} B to the primary \
         at {produced:.0} records/s ({:.1} MiB/s)",
        produced * RECORD_BYTES as f64 / (1 << 20) as f64
    );

    // Joined again: MirrorMaker catches up by itself.
    secondary.sh("systemctl start hapair-mirrormaker")?;
    let offsets = || topic_records(secondary, "bench");
    let deadline = Instant::now() + Duration::from_secs(900);
    let (mut first, mut start) = (None, Instant::now());
    loop {
        let now = offsets()?;
        if first.is_none() && now > 0 {
            first = Some(now);
            start = Instant::now();
        }
        if now >= RECORDS {
            break;
        }
        if Instant::now() > deadline {
            bail!("MirrorMaker mirrored {now} of {RECORDS} records in 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let caught_up = (RECORDS - first.unwrap_or(0)) as f64 / start.elapsed().as_secs_f64();
    println!(
        "kafka: MirrorMaker caught up at {caught_up:.0} records/s ({:.1} MiB/s), from its \
         first mirrored record to the last",
        caught_up * RECORD_BYTES as f64 / (1 << 20) as f64
    );
    println!(
        "kafka: catch-up rate / producer rate = {:.2}",
        caught_up / produced
    );
    Ok(())
}

/// The records/s of ProducerPerformance's last line: `N records sent,
/// R records/sec (M MB/sec), ...`.
fn records_per_second(line: &str) -> Result<f64> {
    line.split(',')
        .nth(1)
        .and_then(|part| part.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected ProducerPerformance output: {line}"))
}
