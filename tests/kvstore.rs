//! The KV store on a real pair, as the seed's step 9: Redis on the
//! secondary becomes a read-only replica of the primary's, and what it held
//! is replaced only when it may be. Assertions are on the hosts' Redis.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{primary_mode, set_protected, REDIS_PASSWORD};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, ModuleRun, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "step9_a_protected_secondary_is_refused_and_its_keys_stay",
        protected,
    ),
    (
        "step9_a_primary_keeping_nothing_on_disk_is_refused",
        not_persistent,
    ),
    (
        "step9_every_kind_of_key_arrives_and_the_replica_is_read_only",
        every_kind_of_key,
    ),
    ("step9_a_rerun_changes_nothing_and_restarts_nothing", rerun),
];

fn main() -> ExitCode {
    suite("kvstore", 2, 7, TESTS)
}

/// Runs redis-cli commands (one a line, quoted as redis-cli reads them:
/// `"a\x00b"` is a NUL) on `host`'s Redis; what it printed.
fn redis(host: &Host, password: Option<&str>, commands: &str) -> Result<String> {
    host.write("/tmp/redis-commands", commands)?;
    let auth = password.map_or(String::new(), |p| format!("REDISCLI_AUTH='{p}' "));
    host.sh(&format!(
        "{auth}redis-cli --no-auth-warning < /tmp/redis-commands"
    ))
}

/// A key's type and value, in a form equal on two hosts when the values
/// are: members of sets and fields of hashes sorted (their order is not
/// part of the value).
fn contents(host: &Host, key: &str) -> Result<Vec<String>> {
    let pw = Some(REDIS_PASSWORD);
    let kind = redis(host, pw, &format!("TYPE \"{key}\"\n"))?
        .trim()
        .to_string();
    let read = match kind.as_str() {
        "string" => "GET",
        "hash" => "HGETALL",
        "list" => "LRANGE",
        "set" => "SMEMBERS",
        "zset" => "ZRANGE",
        "stream" => "XRANGE",
        other => bail!("{key} has the type {other:?}"),
    };
    let range = match read {
        "LRANGE" => " 0 -1",
        "ZRANGE" => " 0 -1 WITHSCORES",
        "XRANGE" => " - +",
        _ => "",
    };
    let out = host.sh(&format!(
        "printf '%s\\n' '{read} \"{key}\"{range}' > /tmp/read && \
         REDISCLI_AUTH='{REDIS_PASSWORD}' redis-cli --no-auth-warning --no-raw < /tmp/read"
    ))?;
    // --no-raw quotes and escapes each value, and numbers it: `1) "x"`.
    let unnumbered = |line: &str| -> String {
        match line.trim_start().split_once(") ") {
            Some((n, value)) if n.bytes().all(|b| b.is_ascii_digit()) => value.to_string(),
            _ => line.to_string(),
        }
    };
    let mut lines: Vec<String> = out.lines().map(unnumbered).collect();
    if read == "SMEMBERS" {
        lines.sort();
    }
    if read == "HGETALL" {
        let mut pairs: Vec<String> = lines.chunks(2).map(|p| p.join(" = ")).collect();
        pairs.sort();
        lines = pairs;
    }
    lines.insert(0, kind);
    Ok(lines)
}

fn copy(secondary: &Host, primary: &Host, extra: Value) -> Result<ModuleRun> {
    let mut args = json!({"primary_address": primary.ip, "redis_password": REDIS_PASSWORD});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    secondary.run_module("cluster_kvstore_copy", &args)
}

fn protected(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    redis(secondary, None, "SET mine \"kept\"\n")?;
    set_protected(secondary, true)?;
    let run = copy(secondary, primary, json!({}))?;
    if !run.failed() || !run.msg().contains("protected instance") {
        bail!("a protected secondary was not refused: {}", run.stdout);
    }
    ensure_eq!(redis(secondary, None, "GET mine\n")?.trim(), "kept");
    ensure_eq!(
        redis(secondary, None, "INFO replication\n")?.contains("role:master"),
        true
    );
    Ok(())
}

fn not_persistent(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    let saved = redis(primary, Some(REDIS_PASSWORD), "CONFIG GET save\n")?;
    let schedule = saved.lines().nth(1).unwrap_or("").to_string();
    redis(
        primary,
        Some(REDIS_PASSWORD),
        "CONFIG SET save \"\"\nCONFIG SET appendonly no\n",
    )?;
    let run = copy(secondary, primary, json!({}));
    redis(
        primary,
        Some(REDIS_PASSWORD),
        &format!("CONFIG SET save \"{schedule}\"\n"),
    )?;
    let run = run?;
    if !run.failed() || !run.msg().contains("keeps nothing on disk") {
        bail!(
            "a primary without persistence was not refused: {}",
            run.stdout
        );
    }
    ensure_eq!(redis(secondary, None, "GET mine\n")?.trim(), "kept");
    Ok(())
}

/// Keys of every type, a binary value, a key name with NUL bytes, and one
/// with a time to live.
const KEYS: &[&str] = &[
    "text",
    "hash",
    "list",
    "set",
    "zset",
    "stream",
    "binary",
    "bin\\x00key\\x00",
    "expiring",
];

fn every_kind_of_key(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    redis(
        primary,
        Some(REDIS_PASSWORD),
        "FLUSHALL\n\
         SET text \"plain words\"\n\
         HSET hash field1 one field2 two\n\
         RPUSH list a b c a\n\
         SADD set x y z\n\
         ZADD zset 1 one 2.5 two\n\
         XADD stream 1-1 reading 17\n\
         SET binary \"\\x00\\xff\\xfe\\r\\n\"\n\
         SET \"bin\\x00key\\x00\" \"value\\x00\"\n\
         SET expiring soon EX 3600\n",
    )?;
    // Check mode: what would be replaced, and nothing happens.
    let check = copy(secondary, primary, json!({"_ansible_check_mode": true}))?.ok()?;
    ensure_eq!(check.changed(), true);
    ensure_eq!(check.json["replaced_keys"], 1);
    ensure_eq!(redis(secondary, None, "GET mine\n")?.trim(), "kept");

    let run = copy(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(run.changed(), true);
    ensure_eq!(run.json["replaced_keys"], 1);
    if run.stdout.contains(REDIS_PASSWORD) {
        bail!("the password is in the output: {}", run.stdout);
    }
    let pw = Some(REDIS_PASSWORD);
    for key in KEYS {
        let (a, b) = (contents(primary, key)?, contents(secondary, key)?);
        if a.len() < 2 || a != b {
            bail!("{key} differs: primary {a:?}, secondary {b:?}");
        }
    }
    let ttl: i64 = redis(secondary, pw, "PTTL expiring\n")?.trim().parse()?;
    if !(0..=3_600_000).contains(&ttl) {
        bail!("the key's time to live did not arrive: {ttl}");
    }
    ensure_eq!(redis(secondary, pw, "EXISTS mine\n")?.trim(), "0");
    let write = redis(secondary, pw, "SET forbidden 1\n")?;
    if !write.contains("READONLY") {
        bail!("a write to the replica was not refused: {write}");
    }
    // Keys written later arrive too.
    redis(primary, pw, "SET later \"after set-up\"\n")?;
    wait_for(
        "a later key on the secondary",
        Duration::from_secs(10),
        || Ok(redis(secondary, pw, "GET later\n")?.trim() == "after set-up"),
    )?;
    ensure_eq!(
        secondary
            .sh("stat -c '%a %U' /etc/redis/hapair.conf")?
            .trim(),
        "640 redis"
    );
    Ok(())
}

fn rerun(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    // A replica in sync first: this test runs alone too.
    primary_mode(primary)?;
    set_protected(secondary, false)?;
    copy(secondary, primary, json!({}))?.ok()?;
    let run_id = |host: &Host| -> Result<String> {
        let info = redis(host, Some(REDIS_PASSWORD), "INFO server\n")?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or("")
            .trim()
            .to_string())
    };
    let before = run_id(secondary)?;
    let again = copy(secondary, primary, json!({"_ansible_diff": true}))?.ok()?;
    ensure_eq!(again.changed(), false);
    let check = copy(secondary, primary, json!({"_ansible_check_mode": true}))?.ok()?;
    ensure_eq!(check.changed(), false);
    ensure_eq!(run_id(secondary)?, before);
    Ok(())
}
