//! `make bench`: seed step 8's copy against a plain `tar` over SSH.
//!
//! Sets up a pair, loads at least 1 GiB into the primary (pgbench), then,
//! in one run on the same two hosts:
//! - times `cluster_replicate_postgres` on the secondary, whole (checks,
//!   copy, verification, swap, until streaming) and its copy alone;
//! - times `tar` of the same data directory streamed over SSH from the
//!   primary to the secondary and unpacked there.
//!
//! It prints the figures and their ratio. It asserts nothing about speed:
//! these machines are noisy, and a ratio measured in one run is the figure.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use hapair_tests::{exchange_keys, Fleet, Host};
use serde_json::json;

/// pgbench scale 70 is about 1.05 GiB on disk.
const SCALE: u32 = 70;
const PASSWORD: &str = "bench-Secret-0123456789";

fn main() -> ExitCode {
    hapair_tests::bench_main(bench)
}

fn bench() -> Result<()> {
    let fleet = Fleet::up("bench", 2, 12)?;
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    exchange_keys(primary, secondary)?;
    primary
        .run_module(
            "cluster_enter_primary_mode",
            &json!({"address": primary.ip, "replication_password": PASSWORD,
                    "redis_password": PASSWORD, "kafka_password": PASSWORD}),
        )?
        .ok()?;
    secondary
        .run_module(
            "instance_conf",
            &json!({"key": "cluster.protected_instance", "value": false}),
        )?
        .ok()?;
    primary
        .run_module(
            "cluster_add_secondary",
            &json!({"secondary_address": secondary.ip}),
        )?
        .ok()?;

    eprintln!("loading pgbench scale {SCALE} into the primary...");
    primary.sh(&format!(
        "runuser -u postgres -- pgbench -q -i -s {SCALE} postgres >/dev/null 2>&1"
    ))?;
    primary.sh("runuser -u postgres -- psql -XAtc checkpoint")?;
    let bytes: u64 = primary
        .sh("du -sb /var/lib/postgresql/15/main | cut -f1")?
        .trim()
        .parse()?;
    if bytes < 1 << 30 {
        bail!("only {bytes} bytes loaded; the benchmark needs at least 1 GiB");
    }

    let started = Instant::now();
    let run = secondary
        .run_module(
            "cluster_replicate_postgres",
            &json!({"primary_address": primary.ip, "replication_password": PASSWORD}),
        )?
        .ok()?;
    let module_seconds = started.elapsed().as_secs_f64();
    let copy_seconds = run.json["copy_seconds"].as_f64().unwrap_or(f64::NAN);

    let tar_seconds = tar_over_ssh(primary, secondary)?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("data directory: {gib:.2} GiB");
    println!(
        "cluster_replicate_postgres: {module_seconds:.1} s in all ({:.0} MiB/s), of which pg_basebackup {copy_seconds:.1} s",
        gib * 1024.0 / module_seconds
    );
    println!(
        "tar over ssh:               {tar_seconds:.1} s ({:.0} MiB/s)",
        gib * 1024.0 / tar_seconds
    );
    println!(
        "ratio module/tar: {:.2} (whole module), {:.2} (copy alone)",
        module_seconds / tar_seconds,
        copy_seconds / tar_seconds
    );
    Ok(())
}

/// The same data directory, tarred on the primary, streamed over the
/// pair's SSH (the cluster account's key) and unpacked on the secondary.
/// tar of a live data directory exits 1 when a file changes as it reads
/// it; that is expected here, anything else is not.
fn tar_over_ssh(primary: &Host, secondary: &Host) -> Result<f64> {
    let ssh = format!(
        "runuser -u hapair -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -i /var/lib/hapair/.ssh/id_ed25519 {}",
        secondary.ip
    );
    primary.write(
        "/tmp/tar-over-ssh.sh",
        &format!(
            "tar -C /var/lib/postgresql/15 -cf - main 2>/dev/null | {ssh} 'tar -xf - -C ~/tarcopy'\n\
             status=(\"${{PIPESTATUS[@]}}\")\n\
             [ \"${{status[0]}}\" -le 1 ] && [ \"${{status[1]}}\" -eq 0 ]\n"
        ),
    )?;
    primary.sh(&format!("{ssh} 'rm -rf ~/tarcopy && mkdir ~/tarcopy'"))?;
    let started = Instant::now();
    primary.sh("bash /tmp/tar-over-ssh.sh")?;
    let seconds = started.elapsed().as_secs_f64();
    primary.sh(&format!("{ssh} 'rm -rf ~/tarcopy'"))?;
    Ok(seconds)
}
