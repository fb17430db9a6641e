//! PostgreSQL, Redis and Kafka replication on a real pair, step by step as
//! the seed's steps 4, 7 and 8. Assertions are on the hosts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{
    add_secondary, kafka_login_file, make_foreign_cluster, primary_mode_args, ready_for_step8,
    replicate, set_protected, sql, streaming, trust, KAFKA_PAIR_PORT, KAFKA_PASSWORD, PSQL,
    REDIS_PASSWORD, REPLICATION_PASSWORD,
};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, Test, MODULE_DIR};
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
    (
        "step7_8_a_protected_secondary_is_refused_and_its_data_stays",
        protected_secondary,
    ),
    (
        "step7_8_the_secondary_streams_rows_and_is_read_only",
        secondary_streams,
    ),
    (
        "step7_8_a_rerun_changes_nothing_and_restarts_nothing",
        rerun_restarts_nothing,
    ),
    (
        "step8_a_secondary_of_another_cluster_is_reseeded",
        reseeds_another_cluster,
    ),
    (
        "step8_the_primary_stopped_mid_copy_loses_nothing_and_a_rerun_converges",
        primary_stops_mid_copy,
    ),
];

fn main() -> ExitCode {
    suite("replication", 2, 5, TESTS)
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
    // WAL back to the last checkpoint before a fork stays, so that this
    // host can be rewound after an unplanned failover.
    ensure_eq!(show("wal_keep_size")?.trim(), "1GB");
    ensure_eq!(show("wal_log_hints")?.trim(), "on");
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

    // Kafka: a client on the secondary, logged in to the primary's pair
    // listener, gets an advertised listener it can reach.
    kafka_login_file(secondary, "/tmp/pair-login.properties", KAFKA_PASSWORD)?;
    let topics = secondary.sh(&format!(
        "B={}:{KAFKA_PAIR_PORT}; C='--command-config /tmp/pair-login.properties'; \
         /opt/kafka/bin/kafka-topics.sh --bootstrap-server $B $C --create --if-not-exists \
         --topic step4 --partitions 1 --replication-factor 1 && \
         echo hello | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server $B \
         --producer.config /tmp/pair-login.properties --topic step4 && \
         /opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server $B \
         --consumer.config /tmp/pair-login.properties --topic step4 \
         --from-beginning --max-messages 1 --timeout-ms 30000",
        primary.ip
    ))?;
    ensure_eq!(topics.trim().lines().last(), Some("hello"));
    // Kafka's plaintext listener is on loopback only now.
    ensure_eq!(
        primary
            .sh("ss -Hltn 'sport = :9092' | awk '{print $4}'")?
            .trim(),
        "127.0.0.1:9092"
    );
    // The password reached the broker in a file, removed at once: nothing
    // of it is left in root's directories.
    ensure_eq!(
        primary
            .sh("ls -A /etc/hapair /run/hapair | grep -c kafka-login || true")?
            .trim(),
        "0"
    );

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

    // A new Kafka password: the login's check (SCRAM, spoken natively) finds
    // the listener refuses it, so the credential is set; then it finds it
    // let in, and the old password is refused by Kafka's own client.
    let mut new_kafka = primary_mode_args(primary);
    new_kafka["kafka_password"] = json!("another-Kafka-987654321");
    for (args, changed) in [(&new_kafka, true), (&new_kafka, false)] {
        let run = primary
            .run_module("cluster_enter_primary_mode", args)?
            .ok()?;
        ensure_eq!(run.changed(), changed);
    }
    let old_login = secondary.sh_output(&format!(
        "/opt/kafka/bin/kafka-topics.sh --bootstrap-server {}:{KAFKA_PAIR_PORT} --list \
         --command-config /tmp/pair-login.properties",
        primary.ip
    ))?;
    let said = String::from_utf8_lossy(&old_login.stderr).into_owned()
        + &String::from_utf8_lossy(&old_login.stdout);
    if old_login.status.success() || !said.contains("Authentication failed") {
        bail!("the old Kafka password still logs in: {said}");
    }
    // And back, for the tests after this one.
    let back = primary
        .run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?
        .ok()?;
    ensure_eq!(back.changed(), true);
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

// --- Steps 7 and 8 ---------------------------------------------------------

fn protected_secondary(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    trust(primary, secondary)?;
    sql(
        secondary,
        "create table if not exists marker (note text); insert into marker values ('mine')",
    )?;
    set_protected(secondary, true)?;
    let added = add_secondary(primary, secondary)?;
    if !added.failed()
        || !added.msg().contains("protected")
        || !added.msg().contains("\"value\": false")
    {
        bail!(
            "cluster_add_secondary did not refuse a protected secondary clearly: {}",
            added.stdout
        );
    }
    let copied = replicate(secondary, primary, json!({}))?;
    if !copied.failed() || !copied.msg().contains("protected instance") {
        bail!(
            "cluster_replicate_postgres did not refuse a protected instance: {}",
            copied.stdout
        );
    }
    ensure_eq!(sql(secondary, "select note from marker")?, "mine");
    Ok(())
}

/// A checksum of a table's rows, the same on both hosts when in sync.
fn checksum(host: &Host, table: &str) -> Result<String> {
    sql(
        host,
        &format!("select md5(string_agg(t::text, ',' order by t::text)) from {table} t"),
    )
}

fn secondary_streams(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    trust(primary, secondary)?;
    primary
        .run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?
        .ok()?;
    set_protected(secondary, false)?;
    let hba_before = primary.sh("cat /etc/postgresql/15/main/pg_hba.conf")?;
    let added = add_secondary(primary, secondary)?.ok()?;
    ensure_eq!(added.changed(), true);
    // pg_hba gains two rules for the role from the secondary's /32 only:
    // replication, and the postgres database that pg_rewind reads from
    // when this host is the one rejoining after a failover.
    let hba_after = primary.sh("cat /etc/postgresql/15/main/pg_hba.conf")?;
    let rules: Vec<Vec<&str>> = hba_after
        .lines()
        .filter(|l| !hba_before.lines().any(|b| b == *l))
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let from_secondary = format!("{}/32", secondary.ip);
    let rule = |database| {
        vec![
            "hostssl",
            database,
            "\"hapair_replication\"",
            from_secondary.as_str(),
            "scram-sha-256",
        ]
    };
    ensure_eq!(rules, vec![rule("replication"), rule("postgres")]);
    // Replication runs over TLS with channel binding only: without TLS the
    // primary refuses the secondary, with the password right.
    let plain = secondary.sh_output(&format!(
        "PGPASSWORD='{REPLICATION_PASSWORD}' psql -XAt -d 'host={} user=hapair_replication \
         replication=true dbname=replication sslmode=disable' -c IDENTIFY_SYSTEM",
        primary.ip
    ))?;
    let said = String::from_utf8_lossy(&plain.stderr);
    if plain.status.success() || !said.contains("no encryption") {
        bail!("a replication connection without TLS was not refused by pg_hba: {said}");
    }

    primary.sh("runuser -u postgres -- pgbench -q -i -s 2 postgres")?;
    let copied = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(copied.changed(), true);
    no_secret_in(&copied.stdout)?;
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "t");
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    // Either host may be rewound after a failover.
    ensure_eq!(sql(secondary, "show wal_log_hints")?, "on");
    // The standby's connection requires TLS with channel binding.
    let conninfo = secondary
        .sh("runuser -u postgres -- psql -XAtc 'select conninfo from pg_stat_wal_receiver'")?;
    if !conninfo.contains("channel_binding=require") || !conninfo.contains("sslmode=require") {
        bail!("the standby's connection does not require channel binding: {conninfo}");
    }
    let tls = primary.sh(
        "runuser -u postgres -- psql -XAtc \"select ssl from pg_stat_ssl join pg_stat_replication using (pid)\"",
    )?;
    ensure_eq!(tls.trim(), "t");

    // Rows written on the primary after set-up reach the secondary.
    sql(
        primary,
        "create table after_setup (n int); insert into after_setup select generate_series(1, 1000)",
    )?;
    wait_for("rows on the secondary", Duration::from_secs(30), || {
        Ok(secondary
            .sh(&format!(
                "{PSQL} -c 'select count(*) from after_setup' 2>/dev/null"
            ))?
            .trim()
            == "1000")
    })?;
    sql(
        primary,
        "update pgbench_accounts set abalance = abalance + 1 where aid % 7 = 0",
    )?;
    wait_for("the secondary to catch up", Duration::from_secs(30), || {
        Ok(checksum(primary, "pgbench_accounts")? == checksum(secondary, "pgbench_accounts")?)
    })?;
    // The secondary is read-only.
    let write = secondary.sh_output(&format!("{PSQL} -c 'insert into after_setup values (1)'"))?;
    if write.status.success() || !String::from_utf8_lossy(&write.stderr).contains("read-only") {
        bail!("a write on the secondary was not refused as read-only");
    }
    let config: Value = serde_json::from_str(&secondary.sh("cat /etc/hapair/instance.json")?)?;
    ensure_eq!(config["cluster"]["replication_mode"], "secondary");
    // No old data directory or copy left behind, and no password in the standby settings.
    ensure_eq!(
        secondary.sh("ls -d /var/lib/postgresql/15/main.hapair-* 2>/dev/null || true")?,
        ""
    );
    if secondary
        .sh("cat /etc/postgresql/15/main/conf.d/hapair-standby.conf")?
        .contains(REPLICATION_PASSWORD)
    {
        bail!("the standby settings hold the password inline");
    }
    ensure_eq!(
        secondary
            .sh("stat -c '%a %U' /var/lib/postgresql/15/hapair.pgpass")?
            .trim(),
        "600 postgres"
    );
    Ok(())
}

fn rerun_restarts_nothing(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    streaming(primary, secondary)?;
    let started = |h: &Host| sql(h, "select pg_postmaster_start_time()");
    let before = (started(primary)?, started(secondary)?);
    ensure_eq!(add_secondary(primary, secondary)?.ok()?.changed(), false);
    ensure_eq!(
        replicate(secondary, primary, json!({}))?.ok()?.changed(),
        false
    );
    ensure_eq!((started(primary)?, started(secondary)?), before);
    Ok(())
}

/// Turns the secondary into a standalone cluster of its own: a new system
/// identifier, with a marker table.
fn reseeds_another_cluster(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    let foreign = make_foreign_cluster(secondary)?;
    let primary_id = sql(primary, "select system_identifier from pg_control_system()")?;
    if foreign == primary_id {
        bail!("the foreign cluster has the primary's system identifier");
    }
    let copied = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(copied.changed(), true);
    ensure_eq!(
        sql(
            secondary,
            "select system_identifier from pg_control_system()"
        )?,
        primary_id
    );
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    Ok(())
}

fn primary_stops_mid_copy(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    // Enough data, and a slow enough copy, to stop the primary half-way.
    primary.sh("runuser -u postgres -- pgbench -q -i -s 8 postgres")?;
    let foreign = make_foreign_cluster(secondary)?;
    secondary.write(
        "/tmp/slow-copy.json",
        &json!({"primary_address": primary.ip, "replication_password": REPLICATION_PASSWORD, "max_rate": "16M"}).to_string(),
    )?;
    secondary.sh(&format!(
        "rm -f /tmp/slow-copy.out; nohup sh -c '{MODULE_DIR}/cluster_replicate_postgres /tmp/slow-copy.json > /tmp/slow-copy.out' >/dev/null 2>&1 &"
    ))?;
    wait_for("the copy to start", Duration::from_secs(20), || {
        secondary.succeeds("test -d /var/lib/postgresql/15/main.hapair-new/base")
    })?;
    primary.sh("systemctl stop postgresql@15-main")?;
    let finished = wait_for("the module to give up", Duration::from_secs(120), || {
        secondary.succeeds("test -s /tmp/slow-copy.out")
    });
    primary.sh("systemctl start postgresql@15-main")?;
    finished?;
    let out: Value = serde_json::from_str(secondary.sh("cat /tmp/slow-copy.out")?.trim())?;
    let msg = out["msg"].as_str().unwrap_or("");
    if out["failed"] != true || !msg.contains("nothing was lost") {
        bail!("stopping the primary mid-copy did not fail clearly: {out}");
    }
    // The secondary's own data is intact and running; no half copy is left.
    ensure_eq!(
        sql(
            secondary,
            "select system_identifier from pg_control_system()"
        )?,
        foreign
    );
    ensure_eq!(sql(secondary, "select note from marker")?, "foreign");
    ensure_eq!(
        secondary.sh("ls -d /var/lib/postgresql/15/main.hapair-* 2>/dev/null || true")?,
        ""
    );

    // With the primary back, a re-run converges.
    let again = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(again.changed(), true);
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    ensure_eq!(
        checksum(primary, "pgbench_accounts")?,
        checksum(secondary, "pgbench_accounts")?
    );
    Ok(())
}
