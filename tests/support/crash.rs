//! Crash and resume (the crash_stop and crash_kill suites): data of every
//! kind put on a fresh primary before the set-up, runs of ha_setup.yml cut
//! short by a crash of the controller or of a module, and the check that
//! the last, whole run leaves a healthy pair with nothing lost.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::pair::{produce, redis_cli, sql, topic_records};
use crate::playbook::{playbook_with_env, PlaybookRun};
use crate::{ensure_eq, repo_root, wait_for, Fleet, Host};

/// pgbench's scale for the primary's data: 8 is 800,000 rows, about
/// 120 MB, so step 8's copy lasts long enough to be killed part-way.
const PGBENCH_SCALE: u32 = 8;
const ROWS: &str = "800000";
const MESSAGES: u32 = 200;
const FILES: u32 = 400;

/// Puts rows, a key, messages and files on the fresh primary (before step
/// 4 there are no passwords), for [`nothing_lost`] to find on both hosts.
pub fn load_primary(primary: &Host) -> Result<()> {
    primary.sh(&format!(
        "runuser -u postgres -- pgbench -q -i -s {PGBENCH_SCALE} postgres >/dev/null 2>&1 && \
         runuser -u postgres -- psql -XAtqc \"create table crash_note (note text); \
         insert into crash_note values ('written before the set-up')\""
    ))?;
    primary.sh("redis-cli SET crash:note 'written before the set-up' >/dev/null")?;
    produce(primary, "crash", 2, 1, MESSAGES)?;
    // 400 files of 100 kB: rsync lasts long enough to be killed part-way.
    primary.sh(&format!(
        "mkdir -p /srv/app/crash && for i in $(seq 1 {FILES}); do \
         head -c 100000 /dev/urandom > /srv/app/crash/$i; done && \
         (cd /srv/app/crash && sha256sum $(seq 1 {FILES}) > /srv/app/crash.sums)"
    ))?;
    Ok(())
}

/// ha_setup.yml, confirmed, with the crash suites' callback enabled and
/// `env` (its settings) given.
pub fn ha_setup(fleet: &Fleet, env: &[(&str, &str)]) -> Result<PlaybookRun> {
    let callbacks = repo_root().join("tests/callbacks");
    let callbacks = callbacks
        .to_str()
        .context("the repository's path is not UTF-8")?;
    let mut env = env.to_vec();
    env.extend([
        ("ANSIBLE_CALLBACK_PLUGINS", callbacks),
        ("ANSIBLE_CALLBACKS_ENABLED", "stop_after_task"),
    ]);
    playbook_with_env(
        fleet,
        "ha_setup.yml",
        &["-e", "hapair_confirm_unsafe_steps=true"],
        &env,
    )
}

/// The number of the account's rows in pgbench_accounts on `host`.
fn rows(host: &Host) -> Result<String> {
    sql(host, "select count(*) from pgbench_accounts")
}

/// After the last, whole run (which passed the verification, so the
/// monitor said healthy): everything [`load_primary`] wrote is on the
/// primary still and has reached the secondary, and no copy of step 8 is
/// left behind.
pub fn nothing_lost(fleet: &Fleet, primary: &Host, secondary: &Host) -> Result<()> {
    ensure_eq!(rows(primary)?, ROWS);
    ensure_eq!(
        sql(primary, "select note from crash_note")?,
        "written before the set-up"
    );
    wait_for("the rows on the secondary", Duration::from_secs(60), || {
        Ok(rows(secondary).unwrap_or_default() == ROWS)
    })?;
    ensure_eq!(
        sql(secondary, "select note from crash_note")?,
        "written before the set-up"
    );
    // The secondary is a standby.
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "t");
    for host in [primary, secondary] {
        ensure_eq!(
            redis_cli(fleet, host, "GET crash:note")?,
            "written before the set-up"
        );
    }
    ensure_eq!(topic_records(primary, "crash")?, u64::from(MESSAGES));
    wait_for(
        "the messages on the secondary",
        Duration::from_secs(120),
        || Ok(topic_records(secondary, "crash")? == u64::from(MESSAGES)),
    )?;
    secondary.sh("cd /srv/app/crash && sha256sum --check --quiet /srv/app/crash.sums")?;
    let leftovers = secondary
        .sh("ls -d /var/lib/postgresql/15/*hapair-* 2>/dev/null; pgrep -a pg_basebackup; true")?;
    if !leftovers.trim().is_empty() {
        bail!("left behind on the secondary: {leftovers}");
    }
    Ok(())
}
