//! The replication report on a real pair, as the seed's "Verification:
//! Databases": `replication_status` on both hosts of a pair with all four
//! services replicating, then with each one stopped, hung or lagging.
//! Assertions compare the report with the services' own answers.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{
    all_replicating, replay_lag_bytes, sql, streaming, KAFKA_PASSWORD, PSQL, REDIS_PASSWORD,
};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "status_a_replicating_pair_reports_numbers_for_every_service",
        replicating,
    ),
    (
        "status_the_byte_lag_agrees_with_pg_stat_replication",
        lag_agrees,
    ),
    (
        "status_a_stopped_standby_redis_or_mirrormaker_is_named",
        stopped,
    ),
    ("status_a_hung_service_does_not_stall_the_report", hung),
];

fn main() -> ExitCode {
    suite("status", 2, 10, TESTS)
}

fn status(host: &Host) -> Result<Value> {
    let run = host
        .run_module(
            "replication_status",
            &json!({"redis_password": REDIS_PASSWORD, "kafka_password": KAFKA_PASSWORD,
                    "timeout": 20}),
        )?
        .ok()?;
    ensure_eq!(run.changed(), false);
    Ok(run.json)
}

fn replicating(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    let on_primary = status(primary)?;
    let standby = &on_primary["postgres"]["standbys"][0];
    ensure_eq!(standby["state"], "streaming");
    ensure_eq!(standby["client_addr"], json!(secondary.ip));
    if !standby["lag_bytes"].is_i64() || !standby["replay_lag_seconds"].is_number() {
        bail!(
            "the primary reports no numeric lag: {}",
            on_primary["postgres"]
        );
    }
    let slot = &on_primary["postgres"]["slots"][0];
    ensure_eq!(slot["active"], true);
    if !slot["retained_bytes"].is_i64() {
        bail!("no retained WAL for the slot: {slot}");
    }
    let replica = &on_primary["kvstore"]["replicas"][0];
    ensure_eq!(replica["address"], json!(secondary.ip));
    if !replica["lag_bytes"].is_i64() {
        bail!("no Redis offset lag: {}", on_primary["kvstore"]);
    }
    // The primary reads the bus's end offsets on both hosts; the files are
    // recorded on the secondary, whose monitor is not installed here.
    if !on_primary["event_bus"]["topics"]["heartbeats"]["behind"].is_u64() {
        bail!(
            "the primary has no per-topic figure for the bus: {}",
            on_primary["event_bus"]
        );
    }
    ensure_eq!(on_primary["files"]["status"], "unknown");

    // The secondary: its receiver, its Redis link, MirrorMaker per topic,
    // and the last file sync.
    let on_secondary = status(secondary)?;
    ensure_eq!(on_secondary["role"], "secondary");
    let receiver = &on_secondary["postgres"]["receiver"];
    ensure_eq!(receiver["status"], "streaming");
    if !receiver["lag_bytes"].is_i64() {
        bail!("the standby reports no numeric lag: {receiver}");
    }
    ensure_eq!(on_secondary["kvstore"]["link"], "up");
    if !on_secondary["kvstore"]["offset"].is_i64() {
        bail!("no replica offset: {}", on_secondary["kvstore"]);
    }
    let heartbeats = &on_secondary["event_bus"]["topics"]["heartbeats"];
    if !heartbeats["behind"].is_u64() {
        bail!(
            "no per-topic figure for the bus: {}",
            on_secondary["event_bus"]
        );
    }
    ensure_eq!(on_secondary["files"]["status"], "ok");
    if !on_secondary["files"]["age_seconds"].is_u64() {
        bail!("no file sync age: {}", on_secondary["files"]);
    }
    ensure_eq!(on_secondary["healthy"], true);
    Ok(())
}

/// Replay paused on the standby, WAL written on the primary: the report's
/// byte lag and a direct query, taken one after the other, agree.
fn lag_agrees(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    streaming(primary, secondary)?;
    sql(secondary, "select pg_wal_replay_pause()")?;
    let result = (|| -> Result<()> {
        primary.sh(&format!(
            "{PSQL} -c 'create table if not exists lag (n int); \
             insert into lag select generate_series(1, 200000)'"
        ))?;
        let direct = || replay_lag_bytes(primary);
        let before = direct()?;
        let reported = status(primary)?["postgres"]["standbys"][0]["lag_bytes"]
            .as_i64()
            .unwrap_or(-1);
        let after = direct()?;
        if before < 1 << 20 {
            bail!("the paused standby is only {before} bytes behind");
        }
        // Background WAL (a checkpoint, say) may add a little in between.
        if reported < before || reported > after + 64 * 1024 {
            bail!("the report says {reported} bytes behind; a direct query {before} then {after}");
        }
        Ok(())
    })();
    sql(secondary, "select pg_wal_replay_resume()")?;
    result
}

fn stopped(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    // PostgreSQL on the secondary stops: the primary sees no standby, and
    // the slot inactive, within seconds.
    secondary.sh("systemctl stop postgresql@15-main")?;
    let gone = wait_for(
        "the standby gone from the report",
        Duration::from_secs(30),
        || {
            let report = status(primary)?;
            Ok(report["postgres"]["standbys"] == json!([]))
        },
    );
    let slot_active = status(primary)?["postgres"]["slots"][0]["active"].clone();
    secondary.sh("systemctl start postgresql@15-main")?;
    gone?;
    ensure_eq!(slot_active, false);

    // Redis and MirrorMaker stopped on the secondary: each section says so.
    secondary.sh("systemctl stop redis-server hapair-mirrormaker")?;
    let report = status(secondary);
    let on_primary = status(primary);
    secondary.sh("systemctl start redis-server hapair-mirrormaker")?;
    let (report, on_primary) = (report?, on_primary?);
    ensure_eq!(report["kvstore"]["status"], "unknown");
    ensure_eq!(report["event_bus"]["status"], "unknown");
    if !report["event_bus"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("not running")
    {
        bail!(
            "a stopped MirrorMaker is not named: {}",
            report["event_bus"]
        );
    }
    ensure_eq!(report["healthy"], false);
    ensure_eq!(on_primary["kvstore"]["status"], "unknown");
    Ok(())
}

/// Redis stopped but listening (SIGSTOP): its section is reported as hung
/// and the others are measured.
fn hung(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    streaming(primary, secondary)?;
    secondary.sh("pkill -STOP -x redis-server")?;
    let report = secondary.run_module(
        "replication_status",
        &json!({"redis_password": REDIS_PASSWORD, "timeout": 3}),
    );
    secondary.sh("pkill -CONT -x redis-server")?;
    let report = report?.ok()?.json;
    ensure_eq!(report["kvstore"]["status"], "unknown");
    if !report["kvstore"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("hangs")
    {
        bail!(
            "a hung Redis is not reported as such: {}",
            report["kvstore"]
        );
    }
    ensure_eq!(report["postgres"]["receiver"]["status"], "streaming");
    Ok(())
}
