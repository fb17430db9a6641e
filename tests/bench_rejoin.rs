//! `make bench`: an old primary rejoining after a switchover, by pg_rewind
//! and by a full copy of the same data directory, on one pair in one run:
//! 1. a pair set up by ha_setup.yml over pgbench's tables at scale
//!    `HAPAIR_BENCH_REJOIN_SCALE` (130 by default: about 1.9 GB);
//! 2. switchover.yml: the old primary rejoins by rewind;
//! 3. switchover.yml back, with `hapair_rejoin_rewind=false`: it rejoins by
//!    step 8's full copy.
//!
//! It prints the rewind's and the copy's own times (the modules' figures),
//! each switchover's total, and their ratios; it asserts nothing about speed.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use hapair_tests::pair::sql;
use hapair_tests::playbook::playbook;
use hapair_tests::Fleet;

const CONFIRM: &str = "hapair_confirm_unsafe_steps=true";

fn main() -> ExitCode {
    hapair_tests::bench_main(bench)
}

/// The number after `prefix` in `text` ("rewound in 1.2 s").
fn seconds_after(text: &str, prefix: &str) -> Result<f64> {
    let rest = text
        .split(prefix)
        .nth(1)
        .with_context(|| format!("no {prefix:?} in the run's output"))?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Ok(number.parse()?)
}

fn bench() -> Result<()> {
    let scale: u32 = std::env::var("HAPAIR_BENCH_REJOIN_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(130);
    let fleet = Fleet::up("bench-rejoin", 2, 17)?;
    let primary = fleet.host("primary");
    primary.sh(&format!(
        "runuser -u postgres -- pgbench -q -i -s {scale} postgres >/dev/null 2>&1"
    ))?;
    let size = sql(
        primary,
        "select pg_size_pretty(pg_database_size('postgres'))",
    )?;
    let setup = playbook(&fleet, "ha_setup.yml", &["-e", CONFIRM])?.ok()?;

    let rewound = playbook(&fleet, "switchover.yml", &["-v", "-e", CONFIRM])?.ok()?;
    let rewind = seconds_after(&rewound.output, "rewound in ")?;
    let copied = playbook(
        &fleet,
        "switchover.yml",
        &["-v", "-e", CONFIRM, "-e", "hapair_rejoin_rewind=false"],
    )?
    .ok()?;
    let copy = seconds_after(&copied.output, "copied in ")?;

    println!(
        "\nrejoin of the old primary after a switchover, database {size} (pgbench scale {scale}):"
    );
    println!(
        "  set-up (step 8 copies everything): {:.1} s",
        setup.seconds
    );
    println!(
        "  by pg_rewind: rewind {rewind:.1} s; switchover.yml in all {:.1} s",
        rewound.seconds
    );
    println!(
        "  by full copy: copy {copy:.1} s; switchover.yml in all {:.1} s",
        copied.seconds
    );
    println!(
        "  rewind / copy: {:.3}; switchover by rewind / by copy: {:.2}",
        rewind / copy,
        rewound.seconds / copied.seconds
    );
    Ok(())
}
