//! `make bench`: seed step 8's copy against a plain `tar` over SSH, and
//! against the secondary's own disk.
//!
//! Sets up a pair, loads at least 1 GiB into the primary (pgbench), then,
//! in one run on the same two hosts:
//! - times `cluster_replicate_postgres` on the secondary, whole (checks,
//!   copy, verification, swap, until streaming) and its copy alone;
//! - times `tar` of the same data directory streamed over SSH from the
//!   primary to the secondary and unpacked there;
//! - times `cp -a` of the copied data directory on the secondary, then
//!   `sync`: the disk's own limit (goal: the module's copy at most 1.3 times
//!   that);
//! - with the primary's link throttled to 100 Mbit/s (tc), times the module
//!   again (the secondary made a cluster of its own first, so it copies
//!   anew), with and without `compress: server-zstd`, and tar over SSH.
//!
//! It prints the figures and their ratios. It asserts nothing about speed:
//! these machines are noisy, and a ratio measured in one run is the figure.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use hapair_tests::pair::make_foreign_cluster;
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

    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("data directory: {gib:.2} GiB");
    let mib_s = |seconds: f64| gib * 1024.0 / seconds;

    let (module_seconds, copy_seconds) = replicate(primary, secondary, None)?;
    let tar_seconds = tar_over_ssh(primary, secondary)?;
    let cp_seconds = cp_and_sync(secondary)?;
    println!(
        "cluster_replicate_postgres: {module_seconds:.1} s in all ({:.0} MiB/s), of which pg_basebackup {copy_seconds:.1} s",
        mib_s(module_seconds)
    );
    println!(
        "tar over ssh:               {tar_seconds:.1} s ({:.0} MiB/s)",
        mib_s(tar_seconds)
    );
    println!(
        "cp -a and sync (secondary): {cp_seconds:.1} s ({:.0} MiB/s)",
        mib_s(cp_seconds)
    );
    println!(
        "ratio module/tar: {:.2} (whole module), {:.2} (copy alone)",
        module_seconds / tar_seconds,
        copy_seconds / tar_seconds
    );
    println!(
        "ratio module/cp -a: {:.2} (whole module), {:.2} (copy alone; goal at most 1.3)",
        module_seconds / cp_seconds,
        copy_seconds / cp_seconds
    );

    // The primary's side of the link at 100 Mbit/s: the copy flows out of it.
    primary.sh(&format!(
        "tc qdisc replace dev eth0 root tbf rate {THROTTLE} burst 256kb latency 100ms"
    ))?;
    let throttled = (|| -> Result<[(f64, f64); 2]> {
        let mut copies = [(0.0, 0.0); 2];
        for (copy, compress) in copies.iter_mut().zip([None, Some("server-zstd")]) {
            make_foreign_cluster(secondary)?;
            *copy = replicate(primary, secondary, compress)?;
        }
        Ok(copies)
    })();
    let throttled_tar = tar_over_ssh(primary, secondary);
    primary.sh("tc qdisc del dev eth0 root")?;
    let [(plain, plain_copy), (zstd, zstd_copy)] = throttled?;
    let throttled_tar = throttled_tar?;
    println!("with the primary's link at {THROTTLE}:");
    println!("  cluster_replicate_postgres:                      {plain:.1} s in all, pg_basebackup {plain_copy:.1} s");
    println!("  cluster_replicate_postgres, compress server-zstd: {zstd:.1} s in all, pg_basebackup {zstd_copy:.1} s");
    println!("  tar over ssh:                                    {throttled_tar:.1} s");
    println!(
        "  ratio to tar: {:.2} plain, {:.2} server-zstd (whole module)",
        plain / throttled_tar,
        zstd / throttled_tar
    );
    Ok(())
}

/// The link speed of the throttled copies (tc's tbf rate).
const THROTTLE: &str = "100mbit";

/// Step 8 on the secondary, with `compress` if given: the whole module's
/// seconds and pg_basebackup's.
fn replicate(primary: &Host, secondary: &Host, compress: Option<&str>) -> Result<(f64, f64)> {
    let mut args = json!({"primary_address": primary.ip, "replication_password": PASSWORD});
    if let Some(compress) = compress {
        args["compress"] = json!(compress);
    }
    let started = Instant::now();
    let run = secondary
        .run_module("cluster_replicate_postgres", &args)?
        .ok()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        seconds,
        run.json["copy_seconds"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// `cp -a` of the secondary's data directory beside it, then `sync`: what
/// its disk does alone.
fn cp_and_sync(secondary: &Host) -> Result<f64> {
    secondary.sh("rm -rf /var/lib/postgresql/15/cpcopy && sync")?;
    let started = Instant::now();
    secondary.sh("cp -a /var/lib/postgresql/15/main /var/lib/postgresql/15/cpcopy && sync")?;
    let seconds = started.elapsed().as_secs_f64();
    secondary.sh("rm -rf /var/lib/postgresql/15/cpcopy")?;
    Ok(seconds)
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
