//! `make bench`: hapair-monitor's answers under a steady load, as a load
//! balancer or a dashboard asks them, on one pair in one run:
//! - the latency of `GET /monitor/replication` and `GET /metrics` from the
//!   control node, at 50 requests per second for 20 s each (a new
//!   connection per request), p50 and p99;
//! - the same with Redis hung (SIGSTOP: it accepts connections and never
//!   answers), and the ratio of the two;
//! - the daemon's resident memory after both runs.
//!
//! It prints the figures and their ratios, and asserts nothing about speed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hapair_tests::pair::{all_replicating, install_monitor, monitor_report, MONITOR_PORT};
use hapair_tests::{http_get, wait_for, Fleet, Host};
use serde_json::json;

const RATE: u32 = 50;
const SECONDS: u32 = 20;

fn main() -> ExitCode {
    hapair_tests::bench_main(bench)
}

fn bench() -> Result<()> {
    let fleet = Fleet::up("bench-monitor", 2, 14)?;
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    // The production defaults: PostgreSQL, Redis and files every 5 s, the
    // bus every 30 s.
    let defaults = json!({"interval": 5, "event_bus_interval": 30, "timeout": 5});
    install_monitor(secondary, defaults.clone())?;
    install_monitor(primary, defaults)?;
    wait_for("a healthy report", Duration::from_secs(90), || {
        Ok(monitor_report(primary)?["healthy"] == true)
    })?;

    let mut rows = Vec::new();
    for path in ["/monitor/replication", "/metrics"] {
        rows.push((path, "all services up", load(primary, path)?));
    }
    primary.sh("pkill -STOP -x redis-server")?;
    let hung = (|| -> Result<Vec<(&str, &str, Latency)>> {
        wait_for("Redis reported as hung", Duration::from_secs(30), || {
            Ok(monitor_report(primary)?["kvstore"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("hangs"))
        })?;
        let mut rows = Vec::new();
        for path in ["/monitor/replication", "/metrics"] {
            rows.push((path, "Redis hung", load(primary, path)?));
        }
        Ok(rows)
    })();
    primary.sh("pkill -CONT -x redis-server")?;
    rows.extend(hung?);
    let rss_kib: u64 = primary
        .sh("ps -o rss= -p \"$(systemctl show -p MainPID --value hapair-monitor)\"")?
        .trim()
        .parse()?;
    let threads = primary
        .sh("ls /proc/\"$(systemctl show -p MainPID --value hapair-monitor)\"/task | wc -l")?;

    println!(
        "\nhapair-monitor on {} ({RATE} requests/s for {SECONDS} s each, from the control node)",
        primary.ip
    );
    println!(
        "{:<22} {:<16} {:>9} {:>9} {:>9}",
        "endpoint", "backends", "p50 ms", "p99 ms", "max ms"
    );
    for (path, backends, latency) in &rows {
        println!(
            "{path:<22} {backends:<16} {:>9.2} {:>9.2} {:>9.2}",
            latency.p50, latency.p99, latency.max
        );
    }
    for path in ["/monitor/replication", "/metrics"] {
        let of = |backends: &str| {
            rows.iter()
                .find(|(p, b, _)| *p == path && *b == backends)
                .map(|(_, _, l)| l.p99)
                .unwrap_or(f64::NAN)
        };
        println!(
            "{path}: p99 with Redis hung / p99 with all up = {:.2}",
            of("Redis hung") / of("all services up")
        );
    }
    println!(
        "daemon resident memory: {:.1} MiB ({rss_kib} KiB), {} threads",
        rss_kib as f64 / 1024.0,
        threads.trim()
    );
    Ok(())
}

struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

/// GETs `path` at RATE per second for SECONDS, each on its schedule
/// (a slow answer does not push the next one back); the latencies.
fn load(host: &Host, path: &str) -> Result<Latency> {
    let address = format!("{}:{MONITOR_PORT}", host.ip);
    let period = Duration::from_secs(1) / RATE;
    let count = RATE * SECONDS;
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..count {
        let due = start + period * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (address, path) = (address.clone(), path.to_string());
        handles.push(std::thread::spawn(move || -> Result<f64> {
            let sent = Instant::now();
            let answer = http_get(&address, &path)?;
            if answer.status != 200 {
                bail!("{path} answered {}", answer.status);
            }
            Ok(sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut millis = Vec::new();
    for handle in handles {
        millis.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a request panicked"))??,
        );
    }
    millis.sort_by(f64::total_cmp);
    let at = |q: f64| millis[((millis.len() as f64 * q) as usize).min(millis.len() - 1)];
    Ok(Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: millis[millis.len() - 1],
    })
}
