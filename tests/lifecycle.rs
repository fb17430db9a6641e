//! The pair's life after set-up, on real hosts: breaking it
//! (`cluster_enter_standalone_mode`). Assertions are on the services: who
//! takes writes, what still replicates, what data is where.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{
    all_replicating, install_monitor, monitor_report, sql, MONITOR_PORT, REDIS_PASSWORD,
};
use hapair_tests::playbook::playbook;
use hapair_tests::{ensure_eq, http_get, suite, wait_for, Fleet, Host, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "two_primaries_are_reported_by_both_monitors_and_ha_setup_stops",
        two_primaries,
    ),
    (
        "break_leaves_both_hosts_standalone_writable_protected_with_their_data",
        break_pair,
    ),
];

fn main() -> ExitCode {
    suite("lifecycle", 2, 15, TESTS)
}

fn redis(host: &Host, command: &str) -> Result<String> {
    Ok(host
        .sh(&format!(
            "REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli --no-auth-warning {command}"
        ))?
        .trim()
        .to_string())
}

fn standalone(host: &Host) -> Result<hapair_tests::ModuleRun> {
    host.run_module(
        "cluster_enter_standalone_mode",
        &json!({"redis_password": REDIS_PASSWORD, "_ansible_diff": true}),
    )?
    .ok()
}

/// What breaking must leave alone and what it must change, on one host.
const BROKEN_PATHS: &[&str] = &[
    "/etc/postgresql/15/main",
    "/etc/redis",
    "/etc/hapair",
    "/etc/systemd/system",
];

fn break_pair(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    sql(
        primary,
        "create table if not exists kept (n int); truncate kept; \
         insert into kept select generate_series(1, 100)",
    )?;
    redis(primary, "SET kept before-the-break")?;
    wait_for(
        "the row and the key on the secondary",
        Duration::from_secs(30),
        || {
            Ok(
                sql(secondary, "select count(*) from kept").unwrap_or_default() == "100"
                    && redis(secondary, "GET kept")? == "before-the-break",
            )
        },
    )?;

    // Through the playbook, as an operator breaks a pair. The hosts were set
    // up with the suites' passwords, not the inventory's.
    let password = format!("hapair_redis_password={REDIS_PASSWORD}");
    let with = |extra: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(["-e".to_string(), password.clone()]);
        args
    };
    let run = |extra: &[&'static str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        playbook(fleet, "break.yml", &args)
    };

    // --check --diff: the plan, and nothing changed.
    let before = [
        primary.snapshot(BROKEN_PATHS)?,
        secondary.snapshot(BROKEN_PATHS)?,
    ];
    let check = run(&["--check", "--diff"])?.ok()?;
    // The diffs: the replica's and the standby's settings, the primary's rule.
    let planned = ["-replicaof", "-primary_conninfo", "-hostssl replication"];
    if check.changed() != 2 || planned.iter().any(|line| !check.output.contains(line)) {
        bail!("check mode does not show the plan:\n{}", check.output);
    }
    before[0].ensure_unchanged(&primary.snapshot(BROKEN_PATHS)?)?;
    before[1].ensure_unchanged(&secondary.snapshot(BROKEN_PATHS)?)?;
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "t");

    // Without the confirmation: refused, the variable named.
    let refused = run(&[])?;
    if refused.succeeded
        || !refused
            .output
            .contains("-e hapair_confirm_unsafe_steps=true")
    {
        bail!("break.yml ran without confirmation:\n{}", refused.output);
    }
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "t");

    // Confirmed: the secondary, then the primary.
    let broken = run(&["-e", "hapair_confirm_unsafe_steps=true"])?.ok()?;
    for (host, changed, _) in &broken.recap {
        if *changed != 1 {
            bail!(
                "break.yml changed {changed} tasks on {host}:\n{}",
                broken.output
            );
        }
    }

    for host in [primary, secondary] {
        // Writable, with its data.
        ensure_eq!(sql(host, "select pg_is_in_recovery()")?, "f");
        sql(host, "insert into kept values (1000)")?;
        ensure_eq!(sql(host, "select count(*) from kept")?, "101");
        ensure_eq!(
            redis(host, "INFO replication | grep ^role:")?,
            "role:master"
        );
        ensure_eq!(redis(host, "GET kept")?, "before-the-break");
        ensure_eq!(redis(host, &format!("SET written-on {}", host.name))?, "OK");
        // No replication link of any service.
        ensure_eq!(sql(host, "select count(*) from pg_stat_replication")?, "0");
        ensure_eq!(sql(host, "select count(*) from pg_stat_wal_receiver")?, "0");
        ensure_eq!(sql(host, "select count(*) from pg_replication_slots")?, "0");
        ensure_eq!(
            redis(host, "INFO replication | grep ^connected_slaves:")?,
            "connected_slaves:0"
        );
        for unit in ["hapair-mirrormaker.service", "hapair-files-sync.timer"] {
            if host.succeeds(&format!("test -e /etc/systemd/system/{unit}"))?
                || host.succeeds(&format!("systemctl is-active --quiet {unit}"))?
            {
                bail!("{unit} is left on {}", host.name);
            }
        }
        let settings = host.sh(
            "cat /etc/postgresql/15/main/conf.d/hapair.conf /etc/postgresql/15/main/pg_hba.conf \
             /etc/redis/hapair.conf 2>/dev/null || true",
        )?;
        for setting in [
            "primary_conninfo",
            "primary_slot_name",
            "replicaof",
            "BEGIN hapair",
        ] {
            if settings.contains(setting) {
                bail!("{setting} is left on {}:\n{settings}", host.name);
            }
        }
        if host.succeeds("test -e /var/lib/postgresql/15/hapair.pgpass")? {
            bail!("the standby's passfile is left on {}", host.name);
        }
        // Standalone and protected; its hosts kept.
        let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
        ensure_eq!(config["cluster"]["replication_mode"], "standalone");
        ensure_eq!(config["cluster"]["protected_instance"], true);
        if config["cluster"]["hosts"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            bail!("cluster.hosts was lost on {}: {config}", host.name);
        }
        // The files that were synced stay.
        ensure_eq!(host.sh("cat /srv/app/x")?.trim(), "x");
    }
    // What one host writes now stays there.
    std::thread::sleep(Duration::from_secs(2));
    ensure_eq!(redis(secondary, "GET written-on")?, "secondary");
    ensure_eq!(redis(primary, "GET written-on")?, "primary");

    // A second run changes nothing, through the playbook and by hand.
    let before = [
        primary.snapshot(BROKEN_PATHS)?,
        secondary.snapshot(BROKEN_PATHS)?,
    ];
    let again = run(&["-e", "hapair_confirm_unsafe_steps=true"])?.ok()?;
    ensure_eq!(again.changed(), 0);
    for host in [primary, secondary] {
        ensure_eq!(standalone(host)?.changed(), false);
    }
    before[0].ensure_unchanged(&primary.snapshot(BROKEN_PATHS)?)?;
    before[1].ensure_unchanged(&secondary.snapshot(BROKEN_PATHS)?)?;
    Ok(())
}

/// A standby promoted by hand and recorded as primary, as an old primary
/// back after an unplanned failover would be: both monitors say so, loudly,
/// with the way out; the primary gate closes on both; ha_setup.yml refuses
/// to re-seed either.
fn two_primaries(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    install_monitor(primary, json!({}))?;
    install_monitor(secondary, json!({}))?;
    sql(secondary, "select pg_promote(true, 60)")?;
    secondary
        .run_module(
            "instance_conf",
            &json!({"key": "cluster.replication_mode", "value": "primary"}),
        )?
        .ok()?;
    for host in [primary, secondary] {
        let mut report = Value::Null;
        wait_for("two primaries reported", Duration::from_secs(30), || {
            report = monitor_report(host)?;
            Ok(report["two_primaries"].is_object())
        })?;
        ensure_eq!(report["healthy"], false);
        if !report["two_primaries"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains("rejoin.yml")
        {
            bail!("the report names no way out: {report}");
        }
        let address = format!("{}:{MONITOR_PORT}", host.ip);
        ensure_eq!(http_get(&address, "/primary")?.status, 503);
        ensure_eq!(http_get(&address, "/health")?.status, 503);
        if !http_get(&address, "/metrics")?
            .body
            .contains("hapair_two_primaries 1\n")
        {
            bail!("the metrics of {} do not say two primaries", host.name);
        }
        if !http_get(&address, "/")?
            .body
            .contains("id=\"two-primaries\"")
        {
            bail!(
                "the status page of {} does not say two primaries",
                host.name
            );
        }
    }
    let refused = playbook(
        fleet,
        "ha_setup.yml",
        &["-e", "hapair_confirm_unsafe_steps=true"],
    )?;
    if refused.succeeded || !refused.output.contains("Two primaries") {
        bail!(
            "ha_setup.yml did not refuse two primaries:\n{}",
            refused.output
        );
    }
    // Nothing was re-seeded: the promoted host still takes writes.
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "f");
    Ok(())
}
