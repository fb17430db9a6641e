//! PostgreSQL, Redis and Kafka replication on a real pair, step by step as
//! the seed's steps 4, 7 and 8. Assertions are on the hosts.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::{ensure_eq, suite, Fleet, Host, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "step4_check_mode_on_a_fresh_host_changes_and_restarts_nothing",
        primary_mode_check,
    ),
    (
        "step4_primary_mode_configures_the_three_services_and_a_rerun_restarts_nothing",
        primary_mode,
    ),
];

fn main() -> ExitCode {
    suite("replication", 2, 5, TESTS)
}

const REPLICATION_PASSWORD: &str = "repl-Secret-0123456789";
const REDIS_PASSWORD: &str = "redis-Secret-0123456789";

fn primary_mode_args(host: &Host) -> Value {
    json!({
        "address": host.ip,
        "replication_password": REPLICATION_PASSWORD,
        "redis_password": REDIS_PASSWORD,
        "_ansible_diff": true,
    })
}

/// What a restart would change: the server start time and main PIDs.
fn service_lives(host: &Host) -> Result<String> {
    host.sh(
        "runuser -u postgres -- psql -XAtc 'select pg_postmaster_start_time()'; \
         systemctl show -p MainPID --value redis-server kafka",
    )
}

const CONFIG_PATHS: &[&str] = &[
    "/etc/postgresql/15/main",
    "/etc/redis",
    "/opt/kafka/config",
    "/etc/hapair",
];

fn primary_mode_check(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("secondary");
    let (files, lives) = (host.snapshot(CONFIG_PATHS)?, service_lives(host)?);
    let mut args = primary_mode_args(host);
    args["_ansible_check_mode"] = json!(true);
    let run = host.run_module("cluster_enter_primary_mode", &args)?.ok()?;
    ensure_eq!(run.changed(), true);
    files.ensure_unchanged(&host.snapshot(CONFIG_PATHS)?)?;
    ensure_eq!(service_lives(host)?, lives);
    no_secret_in(&run.stdout)
}

fn primary_mode(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let first = primary
        .run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?
        .ok()?;
    ensure_eq!(first.changed(), true);
    no_secret_in(&first.stdout)?;
    if !first.stdout.contains("not shown: the file holds a secret") {
        bail!("the Redis drop-in's diff is not hidden: {}", first.stdout);
    }

    // PostgreSQL: streaming settings, reachable on the pair's address, and
    // the role logs in with its password (so our SCRAM verifier is right).
    let show = |setting: &str| {
        primary.sh(&format!(
            "runuser -u postgres -- psql -XAtc 'show {setting}'"
        ))
    };
    ensure_eq!(show("wal_level")?.trim(), "replica");
    ensure_eq!(show("max_slot_wal_keep_size")?.trim(), "10GB");
    if !secondary.succeeds(&format!("nc -z -w 2 {} 5432", primary.ip))? {
        bail!("PostgreSQL does not listen on the pair's address");
    }
    let login = primary.sh(&format!(
        "PGPASSWORD='{REPLICATION_PASSWORD}' psql -XAt 'host=127.0.0.1 user=hapair_replication dbname=postgres' \
         -c 'select rolreplication from pg_roles where rolname = current_user'"
    ))?;
    ensure_eq!(login.trim(), "t");
    let stored = primary.sh("runuser -u postgres -- psql -XAtc \"select rolpassword from pg_authid where rolname='hapair_replication'\"")?;
    if !stored.starts_with("SCRAM-SHA-256$4096:") {
        bail!("the role's password is not a SCRAM verifier: {stored}");
    }

    // Redis: on the pair's address, refusing clients without the password.
    let unauthenticated = secondary.sh_output(&format!("redis-cli -h {} ping", primary.ip))?;
    if !String::from_utf8_lossy(&unauthenticated.stdout).contains("NOAUTH") {
        bail!("Redis answers without a password: {:?}", unauthenticated);
    }
    let pong = secondary.sh(&format!(
        "REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli -h {} ping",
        primary.ip
    ))?;
    ensure_eq!(pong.trim(), "PONG");
    ensure_eq!(
        primary.sh("stat -c '%a %U' /etc/redis/hapair.conf")?.trim(),
        "640 redis"
    );

    // Kafka: a client on the secondary, bootstrapping from the primary's
    // address, gets an advertised listener it can reach.
    let topics = secondary.sh(&format!(
        "/opt/kafka/bin/kafka-topics.sh --bootstrap-server {}:9092 --create --if-not-exists \
         --topic step4 --partitions 1 --replication-factor 1 && \
         echo hello | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server {0}:9092 --topic step4 && \
         /opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server {0}:9092 --topic step4 \
         --from-beginning --max-messages 1 --timeout-ms 30000",
        primary.ip
    ))?;
    ensure_eq!(topics.trim().lines().last(), Some("hello"));

    let config: Value = serde_json::from_str(&primary.sh("cat /etc/hapair/instance.json")?)?;
    ensure_eq!(config["cluster"]["replication_mode"], "primary");

    // A second run changes nothing and restarts nothing.
    let (files, lives) = (primary.snapshot(CONFIG_PATHS)?, service_lives(primary)?);
    let second = primary
        .run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?
        .ok()?;
    ensure_eq!(second.json["actions"], json!([]));
    ensure_eq!(second.changed(), false);
    ensure_eq!(second.json["restarted"], json!([]));
    files.ensure_unchanged(&primary.snapshot(CONFIG_PATHS)?)?;
    ensure_eq!(service_lives(primary)?, lives);

    // A new replication password changes the role only: no restart.
    let mut new_password = primary_mode_args(primary);
    new_password["replication_password"] = json!("another-Secret-987654321");
    let third = primary
        .run_module("cluster_enter_primary_mode", &new_password)?
        .ok()?;
    ensure_eq!(third.changed(), true);
    ensure_eq!(third.json["restarted"], json!([]));
    ensure_eq!(service_lives(primary)?, lives);
    if third.stdout.contains("another-Secret") {
        bail!("the new password is in the output: {}", third.stdout);
    }
    Ok(())
}

fn no_secret_in(output: &str) -> Result<()> {
    for secret in [REPLICATION_PASSWORD, REDIS_PASSWORD] {
        if output.contains(secret) {
            bail!("a password is in the module's output: {output}");
        }
    }
    Ok(())
}
