//! Hardening, on a real pair: what the postgres, redis and hapair accounts
//! can leave for root to trip on, input that tries to escape its format,
//! and a step 8 killed, doubled or pointed at awkward directories. Each
//! test plays the attacker or the accident, then asserts on the hosts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hapair_tests::pair::{
    make_foreign_cluster, primary_mode, primary_mode_args, ready_for_step8, replicate,
    set_protected, sql, trust, REPLICATION_PASSWORD,
};
use hapair_tests::{ensure_eq, exchange_keys, suite, wait_for, Fleet, Host, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "prerequisites_run_no_program_named_by_pg_version",
        preflight_pg_version,
    ),
    (
        "step2_never_acts_through_a_link_the_account_planted",
        keys_link,
    ),
    ("step2_repairs_a_key_cut_short", keys_truncated),
    (
        "step3_never_copies_a_root_file_into_authorized_keys",
        helper_link,
    ),
    (
        "step4_refuses_a_linked_redis_file_and_takes_a_quoted_password",
        primary_mode_hostile,
    ),
    (
        "step7_a_forged_config_path_cannot_fake_an_unprotected_secondary",
        forged_config_path,
    ),
    (
        "step8_a_role_name_with_a_newline_is_refused_before_anything",
        bad_role_name,
    ),
    (
        "step8_a_mount_point_is_refused_and_postgres_keeps_running",
        mount_point,
    ),
    (
        "step8_a_trailing_slash_copies_beside_never_inside",
        trailing_slash,
    ),
    (
        "step8_leftovers_of_a_killed_run_are_recovered_or_named",
        leftovers,
    ),
    (
        "step8_never_runs_twice_and_ends_what_a_killed_run_left",
        lock_and_orphan,
    ),
    (
        "step8_a_killed_pg_basebackup_fails_the_run_at_once",
        killed_copy,
    ),
    (
        "step8_tablespaces_are_copied_beside_and_can_be_reseeded",
        tablespaces,
    ),
];

fn main() -> ExitCode {
    suite("hardening", 2, 6, TESTS)
}

const DATA: &str = "/var/lib/postgresql/15/main";

fn sha(host: &Host, path: &str) -> Result<String> {
    host.sh(&format!("sha256sum {path}"))
}

fn no_leak(output: &str, of: &str) -> Result<()> {
    if output.contains("root:") || output.contains(of) {
        bail!("the output shows the content of {of}: {output}");
    }
    Ok(())
}

fn preflight_pg_version(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    host.sh(
        "mkdir -p /tmp/x/bin && printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > /tmp/x/bin/postgres \
         && chmod 755 /tmp/x/bin/postgres && cp -p {DATA}/PG_VERSION /tmp/PG_VERSION.real"
            .replace("{DATA}", DATA)
            .as_str(),
    )?;
    host.sh(&format!(
        "runuser -u postgres -- sh -c 'echo ../../../tmp/x > {DATA}/PG_VERSION'"
    ))?;
    for check in [false, true] {
        let run = host.run_module("cluster_preflight", &json!({"_ansible_check_mode": check}))?;
        let warnings = run.json["warnings"].to_string();
        if !warnings.contains("not a PostgreSQL major version") {
            bail!(
                "preflight did not say PG_VERSION is not a version: {}",
                run.stdout
            );
        }
    }
    let pwned = host.succeeds("test -e /tmp/pwned")?;
    host.sh(&format!("cp -p /tmp/PG_VERSION.real {DATA}/PG_VERSION"))?;
    if pwned {
        bail!("root ran a program named by PG_VERSION");
    }
    Ok(())
}

fn keys_link(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("secondary");
    host.run_module("cluster_generate_keys", &json!({}))?.ok()?;
    let root_ssh = host.sh("ls -A /root/.ssh 2>/dev/null || true")?;
    // The account swaps its ~/.ssh for a link to root's.
    host.sh(
        "runuser -u hapair -- sh -c 'mv ~/.ssh ~/.ssh.real && ln -s /root/.ssh ~/.ssh' && \
         mkdir -p /root/.ssh",
    )?;
    let run = host.run_module("cluster_generate_keys", &json!({"force": true}))?;
    let after = host.sh("ls -A /root/.ssh")?;
    host.sh("runuser -u hapair -- sh -c 'rm ~/.ssh && mv ~/.ssh.real ~/.ssh'")?;
    if !run.failed() || !run.msg().contains("symlink") {
        bail!("a linked ~/.ssh was not refused: {}", run.stdout);
    }
    ensure_eq!(after.trim(), root_ssh.trim());
    host.run_module("cluster_generate_keys", &json!({}))?.ok()?;
    Ok(())
}

fn keys_truncated(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("secondary");
    host.run_module("cluster_generate_keys", &json!({}))?.ok()?;
    // Cut short, as a run killed while writing it would leave it.
    host.sh(
        "cd /var/lib/hapair/.ssh && head -c 120 id_ed25519 > cut && cat cut > id_ed25519 && rm cut",
    )?;
    let run = host.run_module("cluster_generate_keys", &json!({}))?.ok()?;
    ensure_eq!(run.changed(), true);
    if !run.json["warnings"].to_string().contains("cut short") {
        bail!("no warning about the broken key: {}", run.stdout);
    }
    host.sh("ssh-keygen -y -f /var/lib/hapair/.ssh/id_ed25519 >/dev/null")?;
    ensure_eq!(
        host.sh("ls /var/lib/hapair/.ssh | grep -c '[.]broken-'")?
            .trim(),
        "2"
    );
    ensure_eq!(
        host.run_module("cluster_generate_keys", &json!({}))?
            .ok()?
            .changed(),
        false
    );
    Ok(())
}

fn helper_link(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    exchange_keys(primary, secondary)?;
    let shadow = sha(secondary, "/etc/shadow")?;
    secondary.sh(
        "runuser -u hapair -- sh -c 'cd ~/.ssh && mv authorized_keys ak.real && \
         ln -s /etc/shadow authorized_keys'",
    )?;
    let err = exchange_keys(primary, secondary).unwrap_err();
    let link = secondary.sh("readlink /var/lib/hapair/.ssh/authorized_keys")?;
    secondary.sh("runuser -u hapair -- sh -c 'cd ~/.ssh && rm authorized_keys && mv ak.real authorized_keys'")?;
    let said = format!("{err:#}");
    if !said.contains("symlink") {
        bail!("the helper did not refuse a linked authorized_keys: {said}");
    }
    no_leak(&said, "/etc/shadow")?;
    ensure_eq!(link.trim(), "/etc/shadow");
    ensure_eq!(sha(secondary, "/etc/shadow")?, shadow);
    exchange_keys(primary, secondary)?;
    Ok(())
}

fn primary_mode_hostile(fleet: &Fleet) -> Result<()> {
    let primary = fleet.host("primary");
    let shadow = sha(primary, "/etc/shadow")?;
    primary.sh("rm -f /etc/redis/hapair.conf && runuser -u redis -- ln -s /etc/shadow /etc/redis/hapair.conf")?;
    let run = primary.run_module("cluster_enter_primary_mode", &primary_mode_args(primary))?;
    let link = primary.sh("readlink /etc/redis/hapair.conf || true")?;
    primary.sh("rm -f /etc/redis/hapair.conf")?;
    if !run.failed() || !run.msg().contains("symlink") {
        bail!("a linked Redis include was not refused: {}", run.stdout);
    }
    no_leak(&run.stdout, "/etc/shadow")?;
    ensure_eq!(link.trim(), "/etc/shadow");
    ensure_eq!(sha(primary, "/etc/shadow")?, shadow);

    // A password with spaces, quotes and a backslash: Redis starts, takes
    // it, and logs no line of it.
    let password = r#"correct "horse" battery \ staple"#;
    let mut args = primary_mode_args(primary);
    args["redis_password"] = json!(password);
    let run = primary
        .run_module("cluster_enter_primary_mode", &args)?
        .ok()?;
    if run.stdout.contains("horse") {
        bail!("the password is in the output: {}", run.stdout);
    }
    primary.write("/tmp/redis-auth", password)?;
    let pong = primary.sh(&format!(
        "REDISCLI_AUTH=\"$(cat /tmp/redis-auth)\" redis-cli -h {} ping",
        primary.ip
    ))?;
    ensure_eq!(pong.trim(), "PONG");
    let logged = primary.sh(
        "{ journalctl -u redis-server --no-pager; cat /var/log/redis/*.log; } 2>/dev/null \
         | grep -c horse || true",
    )?;
    ensure_eq!(logged.trim(), "0");
    primary_mode(primary)?;
    Ok(())
}

fn forged_config_path(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    trust(primary, secondary)?;
    primary_mode(primary)?;
    set_protected(secondary, true)?;
    let forged = "/dev/null; echo '{\"cluster\": {\"protected_instance\": false}}'";
    let run = primary.run_module(
        "cluster_add_secondary",
        &json!({"secondary_address": secondary.ip, "secondary_instance_config": forged}),
    )?;
    if !run.failed() {
        bail!(
            "a forged config path made the secondary look unprotected: {}",
            run.stdout
        );
    }
    ensure_eq!(
        sql(primary, "select count(*) from pg_replication_slots")?,
        "0"
    );
    Ok(())
}

fn bad_role_name(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    set_protected(secondary, false)?;
    let run = replicate(
        secondary,
        primary,
        json!({"replication_user": "x\nrestore_command='touch /tmp/pwned'"}),
    )?;
    ensure_eq!(run.exit, 2);
    ensure_eq!(
        secondary.succeeds("test -e /etc/postgresql/15/main/conf.d/hapair-standby.conf")?,
        false
    );
    Ok(())
}

fn mount_point(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    sql(
        secondary,
        "create table if not exists marker (note text); insert into marker values ('mine')",
    )?;
    secondary.sh(&format!("mount --bind {DATA} {DATA}"))?;
    let run = replicate(secondary, primary, json!({}));
    let active = secondary.succeeds("systemctl is-active --quiet postgresql@15-main");
    secondary.sh(&format!("umount {DATA}"))?;
    let run = run?;
    if !run.failed() || !run.msg().contains("mount point") {
        bail!(
            "a mount point data directory was not refused: {}",
            run.stdout
        );
    }
    ensure_eq!(active?, true);
    ensure_eq!(sql(secondary, "select note from marker")?, "mine");
    ensure_eq!(
        secondary.sh("ls -d /var/lib/postgresql/15/main.hapair-* 2>/dev/null || true")?,
        ""
    );
    Ok(())
}

fn trailing_slash(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    let run = replicate(secondary, primary, json!({"data_dir": format!("{DATA}/")}))?.ok()?;
    ensure_eq!(run.changed(), true);
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    ensure_eq!(
        secondary.sh(&format!(
            "ls -d {DATA}/main* {DATA}.hapair-* 2>/dev/null || true"
        ))?,
        ""
    );
    Ok(())
}

fn leftovers(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    // Killed after the swap, before removing the old data: the copy streams,
    // so the old data is no longer the last good copy.
    secondary.sh(&format!(
        "cp -a {DATA} {DATA}.hapair-old && install -d -o postgres {DATA}.hapair-failed-1"
    ))?;
    let run = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(run.changed(), true);
    if !run.msg().contains("hapair-old") {
        bail!(
            "the removal of the old data is not reported: {}",
            run.stdout
        );
    }
    if !run.json["warnings"].to_string().contains("hapair-failed-1") {
        bail!("a failed copy is not named: {}", run.stdout);
    }
    ensure_eq!(
        secondary.succeeds(&format!("test -e {DATA}.hapair-old"))?,
        false
    );
    ensure_eq!(
        secondary.succeeds(&format!("test -d {DATA}.hapair-failed-1"))?,
        true
    );

    // Killed between the two renames: the data is only at .hapair-old.
    let rows = sql(secondary, "select count(*) from pgbench_accounts").unwrap_or_default();
    secondary.sh(&format!(
        "systemctl stop postgresql@15-main && mv {DATA} {DATA}.hapair-old"
    ))?;
    let run = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(run.changed(), true);
    if !run.json["warnings"].to_string().contains("it is back at") {
        bail!("the data put back is not reported: {}", run.stdout);
    }
    ensure_eq!(
        secondary.succeeds(&format!("test -e {DATA}.hapair-old"))?,
        false
    );
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    ensure_eq!(
        sql(secondary, "select count(*) from pgbench_accounts").unwrap_or_default(),
        rows
    );
    // Named again, every run, until the operator acts.
    let run = replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(run.changed(), false);
    if !run.json["warnings"].to_string().contains("hapair-failed-1") {
        bail!("a failed copy is not named on a later run: {}", run.stdout);
    }
    secondary.sh(&format!("rm -rf {DATA}.hapair-failed-1"))?;
    Ok(())
}

fn lock_and_orphan(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    primary.sh("runuser -u postgres -- pgbench -q -i -s 10 postgres")?;
    make_foreign_cluster(secondary)?;
    set_protected(secondary, false)?;
    // A slow copy, started by Ansible as an async task, as the playbook
    // starts step 8.
    let job = start_slow_copy(fleet)?;
    let second = replicate(secondary, primary, json!({}))?;
    if !second.failed() || !second.msg().contains("another run") {
        bail!(
            "a second copy was not refused while one runs: {}",
            second.stdout
        );
    }
    // The module dies; its copy goes on, holding the slot.
    // Only the module: its command line starts with its own path (the
    // async wrapper's starts with python3, and this shell's with sh).
    secondary.sh("pkill -KILL -f '^[^ ]*AnsiballZ_cluster_replicate_postgres '")?;
    // Ansible sees the job die at once, rather than polling it for its hour.
    job_failed(fleet, &job)?;
    ensure_eq!(
        secondary.succeeds("pgrep -x pg_basebackup >/dev/null")?,
        true
    );
    let third = replicate(secondary, primary, json!({}))?.ok()?;
    if !third.json["warnings"]
        .to_string()
        .contains("killed earlier run")
    {
        bail!("the orphaned copy was not reported: {}", third.stdout);
    }
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    ensure_eq!(
        secondary.sh(&format!("ls -d {DATA}.hapair-* 2>/dev/null || true"))?,
        ""
    );
    Ok(())
}

/// Starts a slow step 8 on the secondary as Ansible starts it (an async
/// task); returns the job's id once pg_basebackup runs.
fn start_slow_copy(fleet: &Fleet) -> Result<String> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let started = ansible(
        fleet,
        "hapair.ha.cluster_replicate_postgres",
        &format!(
            "primary_address={} replication_password={REPLICATION_PASSWORD} max_rate=2M",
            primary.ip
        ),
        &["-B", "3600", "-P", "0"],
    )?;
    let job = started["ansible_job_id"]
        .as_str()
        .with_context(|| format!("no async job: {started}"))?
        .to_string();
    wait_for("pg_basebackup to run", Duration::from_secs(30), || {
        secondary.succeeds("pgrep -x pg_basebackup >/dev/null")
    })?;
    Ok(job)
}

/// Waits until Ansible's async_status says the job ended in failure; its
/// result.
fn job_failed(fleet: &Fleet, job: &str) -> Result<Value> {
    let mut status = Value::Null;
    let seen = wait_for(
        "async_status to see the job end",
        Duration::from_secs(30),
        || {
            status = ansible(fleet, "async_status", &format!("jid={job}"), &[])?;
            Ok(status["finished"] == true && status["failed"] == true)
        },
    );
    match seen {
        Ok(()) => Ok(status),
        Err(e) => bail!("{e:#}; async_status says {status}"),
    }
}

fn killed_copy(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    primary.sh("runuser -u postgres -- pgbench -q -i -s 10 postgres")?;
    make_foreign_cluster(secondary)?;
    let job = start_slow_copy(fleet)?;
    // pg_basebackup itself dies; its WAL streamer (its child) lives on.
    secondary.sh("kill -KILL $(pgrep -o -x pg_basebackup)")?;
    let status = job_failed(fleet, &job)?;
    if !status["msg"].to_string().contains("nothing was lost") {
        bail!("the failed copy does not say the data is safe: {status}");
    }
    ensure_eq!(
        secondary.succeeds("pgrep -x pg_basebackup >/dev/null")?,
        false
    );
    wait_for("the slot to be free", Duration::from_secs(10), || {
        Ok(sql(
            primary,
            "select count(*) from pg_replication_slots where active",
        )? == "0")
    })?;
    ensure_eq!(sql(secondary, "select note from marker")?, "foreign");
    ensure_eq!(
        secondary.sh(&format!("ls -d {DATA}.hapair-* 2>/dev/null || true"))?,
        ""
    );
    replicate(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(
        sql(secondary, "select status from pg_stat_wal_receiver")?,
        "streaming"
    );
    Ok(())
}

/// One ad-hoc Ansible task on the fleet's secondary, as an operator would
/// run it: its result for that host (what ansible prints after `=>`), with
/// `failed` set from the state it prints before (`FAILED!`).
fn ansible(fleet: &Fleet, module: &str, args: &str, extra: &[&str]) -> Result<Value> {
    let root = hapair_tests::repo_root();
    let output = std::process::Command::new(root.join(".venv/bin/ansible"))
        .arg("secondary")
        .arg("-i")
        .arg(fleet.inventory())
        .args(["-m", module, "-a", args])
        .args(extra)
        .env("ANSIBLE_CONFIG", root.join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .context("can't run .venv/bin/ansible: run `make venv`")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (state, json) = text
        .split_once(" => ")
        .with_context(|| format!("ansible printed no result: {text}"))?;
    let mut result: Value =
        serde_json::from_str(json).with_context(|| format!("ansible printed no JSON: {text}"))?;
    result["failed"] = json!(state.ends_with("FAILED!"));
    Ok(result)
}

fn tablespaces(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready_for_step8(primary, secondary)?;
    // The secondary stops streaming first: it must not replay the
    // primary's tablespace into its own directory.
    make_foreign_cluster(secondary)?;
    for host in [primary, secondary] {
        host.sh("install -d -o postgres -g postgres -m 700 /srv/ts")?;
    }
    sql(primary, "create tablespace ts location '/srv/ts'")?;
    sql(
        primary,
        "create table in_ts (n int) tablespace ts; insert into in_ts select generate_series(1, 500)",
    )?;
    // The secondary's own cluster keeps data in the same directory.
    sql(secondary, "create tablespace ts location '/srv/ts'")?;
    sql(
        secondary,
        "create table own_ts (n int) tablespace ts; insert into own_ts values (1)",
    )?;
    set_protected(secondary, false)?;
    for round in ["seed", "re-seed"] {
        let run = replicate(secondary, primary, json!({}))?.ok()?;
        ensure_eq!(run.changed(), true);
        ensure_eq!(run.json["tablespaces"], json!(["/srv/ts"]));
        wait_for(round, Duration::from_secs(30), || {
            Ok(sql(secondary, "select count(*) from in_ts").unwrap_or_default() == "500")
        })?;
        ensure_eq!(
            secondary
                .sh("readlink /var/lib/postgresql/15/main/pg_tblspc/*")?
                .trim(),
            "/srv/ts"
        );
        ensure_eq!(
            secondary.sh("ls -d /srv/ts.hapair-* 2>/dev/null || true")?,
            ""
        );
        // Made a cluster of its own again, with the copy's data left in /srv/ts.
        make_foreign_cluster(secondary)?;
    }
    Ok(())
}
