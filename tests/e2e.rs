//! End to end: ansible-playbook over SSH against a pair of fleet hosts, as an
//! operator runs it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hapair_tests::pair::{kafka_login_file, monitor_report, KAFKA_PAIR_PORT};
use hapair_tests::playbook::{changed_tasks, playbook, PlaybookRun};
use hapair_tests::{
    ensure_eq, module_binary, module_names, repo_root, staged_module, suite, wait_for, Fleet, Host,
    Test,
};
use serde_json::{json, Value};

const TESTS: &[Test] = &[(
    "ha_setup_checks_then_sets_up_a_fresh_pair_and_a_rerun_changes_nothing",
    ha_setup,
)];

fn main() -> ExitCode {
    // The third host is the outsider: on the pair's network, not of it.
    suite("e2e", 3, 2, TESTS)
}

/// The staged collection must hold exactly the release binaries and docs.
fn check_staged() -> Result<()> {
    for module in module_names()? {
        let staged = std::fs::read(staged_module(&module)).ok();
        let built = std::fs::read(module_binary(&module)?)?;
        let doc = std::fs::read(repo_root().join(format!("modules/{module}/{module}.yml")))?;
        let staged_doc = std::fs::read(staged_module(&format!("{module}.yml"))).ok();
        if staged.as_ref() != Some(&built) || staged_doc.as_ref() != Some(&doc) {
            bail!("{module} in the staged collection is missing or stale: run `make stage`");
        }
    }
    Ok(())
}

/// What the set-up touches on a host.
const SET_UP_PATHS: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/hapair",
    "/var/lib/hapair",
    "/etc/postgresql/15/main",
    "/etc/redis",
    "/opt/kafka/config",
];

/// The pair's passwords, as the fleet wrote them into its inventory.
fn passwords(fleet: &Fleet) -> Result<Vec<String>> {
    let inventory = std::fs::read_to_string(fleet.inventory())?;
    ["replication", "redis", "kafka"]
        .iter()
        .map(|name| {
            inventory_password(&inventory, &format!("hapair_{name}_password")).map(String::from)
        })
        .collect()
}

/// Fails when any of `secrets` is in the run's output.
fn no_secret_in(run: &PlaybookRun, secrets: &[String]) -> Result<()> {
    if secrets.iter().any(|s| run.output.contains(s.as_str())) {
        bail!("a password is in the playbook's output");
    }
    Ok(())
}

const CONFIRM: &[&str] = &["-e", "hapair_confirm_unsafe_steps=true"];

fn ha_setup(fleet: &Fleet) -> Result<()> {
    check_staged()?;
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let fresh = [
        primary.snapshot(SET_UP_PATHS)?,
        secondary.snapshot(SET_UP_PATHS)?,
    ];

    // --check --diff on a fresh pair: says what it would do, does nothing,
    // and needs no confirmation.
    let check = playbook(fleet, "ha_setup.yml", &["--check", "--diff"])?.ok()?;
    if check.changed() == 0 {
        bail!(
            "check mode on a fresh pair reports nothing to do:\n{}",
            check.output
        );
    }
    for expected in [
        "+++ after: /etc/hapair/instance.json",
        &format!("\"override_ip\": \"{}\"", secondary.ip),
    ] {
        if !check.output.contains(expected) {
            bail!("the check-mode diff lacks {expected:?}:\n{}", check.output);
        }
    }
    fresh[0].ensure_unchanged(&primary.snapshot(SET_UP_PATHS)?)?;
    fresh[1].ensure_unchanged(&secondary.snapshot(SET_UP_PATHS)?)?;
    // Every unsafe step is in the plan: a planned change, or (steps 7 on,
    // which build on steps 4 and 5) what it would do once they have run.
    for step in UNSAFE_STEPS {
        if !planned(&check.output, step) {
            bail!(
                "the dry run does not show {step:?} as a planned change:\n{}",
                check.output
            );
        }
    }

    // Without the confirmation the play stops before step 4, and says how
    // to go on: the primary is not in primary mode, the secondary protected.
    let unconfirmed = playbook(fleet, "ha_setup.yml", &[])?;
    if unconfirmed.succeeded
        || !unconfirmed
            .output
            .contains("-e hapair_confirm_unsafe_steps=true")
    {
        bail!(
            "the unsafe steps ran without confirmation:\n{}",
            unconfirmed.output
        );
    }
    let secondary_config = secondary.sh("cat /etc/hapair/instance.json")?;
    if !secondary_config.contains("\"hosts\"") || secondary_config.contains("protected_instance") {
        bail!("the secondary's protection changed without confirmation: {secondary_config}");
    }
    if primary.succeeds("test -e /etc/postgresql/15/main/conf.d/hapair.conf")? {
        bail!("step 4 ran without confirmation");
    }
    let secrets = passwords(fleet)?;

    // Backup V2 on before the set-up on the primary, off on the secondary;
    // a file of the application's on the primary.
    primary
        .run_module(
            "instance_conf",
            &json!({"key": "feature_flags.backup_v2", "value": true}),
        )?
        .ok()?;
    primary.sh("mkdir -p /srv/app/conf && echo 'from the primary' > /srv/app/conf/app.ini")?;

    // Confirmed, the run sets up both hosts.
    let first = playbook(fleet, "ha_setup.yml", CONFIRM)?.ok()?;
    no_secret_in(&first, &secrets)?;
    for (host, changed, failed) in &first.recap {
        if *changed == 0 || *failed != 0 {
            bail!("first confirmed run on {host}: changed={changed} failed={failed}");
        }
    }
    assert_set_up(primary, secondary, true)?;
    assert_set_up(secondary, primary, false)?;
    // Step 4: the primary is in primary mode, the secondary is not.
    let mode = |host: &Host| -> Result<Value> {
        let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
        Ok(config["cluster"]["replication_mode"].clone())
    };
    ensure_eq!(mode(primary)?, "primary");
    ensure_eq!(
        primary
            .sh("runuser -u postgres -- psql -XAtc 'show wal_level'")?
            .trim(),
        "replica"
    );
    // Steps 7 and 8: the secondary streams, and a row written on the
    // primary arrives.
    let psql = |host: &Host, query: &str| {
        host.sh(&format!("runuser -u postgres -- psql -XAtc \"{query}\""))
    };
    ensure_eq!(
        psql(secondary, "select status from pg_stat_wal_receiver")?.trim(),
        "streaming"
    );
    ensure_eq!(mode(secondary)?, "secondary");
    psql(
        primary,
        "create table e2e (note text); insert into e2e values ('from the primary')",
    )?;
    wait_for("the row on the secondary", Duration::from_secs(30), || {
        Ok(secondary
            .sh("runuser -u postgres -- psql -XAtc 'select note from e2e' 2>/dev/null || true")?
            .trim()
            == "from the primary")
    })?;
    // Step 9: the secondary's Redis is a read-only replica, and a key set
    // on the primary arrives.
    let inventory = std::fs::read_to_string(fleet.inventory())?;
    let redis_password = inventory_password(&inventory, "hapair_redis_password")?;
    let redis = |host: &Host, command: &str| {
        host.sh(&format!(
            "REDISCLI_AUTH='{redis_password}' redis-cli --no-auth-warning {command}"
        ))
    };
    redis(primary, "SET e2e 'from the primary'")?;
    wait_for("the key on the secondary", Duration::from_secs(30), || {
        Ok(redis(secondary, "GET e2e")?.trim() == "from the primary")
    })?;
    if !redis(secondary, "SET e2e other")?.contains("READONLY") {
        bail!("the secondary's Redis takes writes");
    }
    only_the_pair_gets_in(fleet, &inventory)?;
    // Files: the application's directory arrived, and the timer keeps
    // pulling it.
    ensure_eq!(
        secondary.sh("cat /srv/app/conf/app.ini")?.trim(),
        "from the primary"
    );
    ensure_eq!(
        secondary
            .sh("systemctl is-active hapair-files-sync.timer")?
            .trim(),
        "active"
    );
    // The monitor runs on both hosts; the verification asserted the
    // primary's report healthy, and so does the control node, over the
    // pair's network.
    for host in [primary, secondary] {
        ensure_eq!(
            host.sh("systemctl is-active hapair-monitor")?.trim(),
            "active"
        );
    }
    let report = monitor_report(primary)?;
    if report["healthy"] != true {
        bail!("the primary's monitor says the pair is not healthy: {report}");
    }
    if !first
        .output
        .contains("Healthy: postgres, kvstore, event_bus, files ok")
    {
        bail!(
            "the verification does not report the pair healthy:\n{}",
            first.output
        );
    }

    // Backup V2 is as it was on each host: on stays on, off stays off.
    let backup_v2 = |host: &Host| -> Result<Value> {
        let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
        Ok(config["feature_flags"]["backup_v2"].clone())
    };
    ensure_eq!(backup_v2(primary)?, true);
    if backup_v2(secondary)? == true {
        bail!("Backup V2 was turned on on the secondary");
    }
    if !first.output.contains("feature_flags.backup_v2 is True on")
        && !first.output.contains("feature_flags.backup_v2 is true on")
    {
        bail!("the play does not report Backup V2:\n{}", first.output);
    }

    let start_times = (started(primary)?, started(secondary)?);
    // Each runs where it should (MirrorMaker on the secondary alone), so a
    // restart would show.
    let running = |started: &[String], unit: &str| {
        started
            .iter()
            .any(|s| s.starts_with(&format!("{unit}: ")) && s.contains("ActiveState=active"))
    };
    for unit in SERVICES {
        let on_primary = *unit != "hapair-mirrormaker";
        ensure_eq!(running(&start_times.0, unit), on_primary);
        ensure_eq!(running(&start_times.1, unit), true);
    }
    let set_up = [
        primary.snapshot(SET_UP_PATHS)?,
        secondary.snapshot(SET_UP_PATHS)?,
    ];

    // A second run changes nothing, on the hosts either. At -vvv, it still
    // shows no password.
    let verbose: Vec<&str> = CONFIRM.iter().copied().chain(["-vvv"]).collect();
    let second = playbook(fleet, "ha_setup.yml", &verbose)?.ok()?;
    no_secret_in(&second, &secrets)?;
    if second.changed() != 0 {
        bail!(
            "the second run changed: {}\n{}",
            changed_tasks(&second.output).join("; "),
            second.output
        );
    }
    set_up[0].ensure_unchanged(&primary.snapshot(SET_UP_PATHS)?)?;
    set_up[1].ensure_unchanged(&secondary.snapshot(SET_UP_PATHS)?)?;
    ensure_eq!((started(primary)?, started(secondary)?), start_times);

    // And check mode after set-up has nothing to do.
    let recheck = playbook(fleet, "ha_setup.yml", &["--check", "--diff"])?.ok()?;
    ensure_eq!(recheck.changed(), 0);

    eprintln!(
        "ha_setup.yml wall time: first run {:.1}s, second (idempotent) run {:.1}s",
        first.seconds, second.seconds
    );
    Ok(())
}

/// The seed's unsafe steps, as ha_setup.yml's task names begin.
const UNSAFE_STEPS: &[&str] = &[
    "Step 4:", "Step 5:", "Step 6:", "Step 7:", "Step 8:", "Step 9:", "Step 10:", "Files:",
];

/// Whether a check-mode run's output shows `step` planned: a task of it
/// changed, or its "in check mode, waits" task said what it would do.
fn planned(output: &str, step: &str) -> bool {
    let mut task = "";
    output.lines().any(|line| {
        if let Some(name) = line.strip_prefix("TASK [") {
            task = name;
            return false;
        }
        task.starts_with(step)
            && (line.starts_with("changed: [")
                || (task.contains("in check mode, waits") && line.starts_with("ok: [")))
    })
}

/// The services the set-up runs, and when each started (systemd's
/// monotonic clock) with its main process: a restart changes both.
const SERVICES: &[&str] = &[
    "postgresql@15-main",
    "redis-server",
    "kafka",
    "hapair-mirrormaker",
    "hapair-monitor",
];

fn started(host: &Host) -> Result<Vec<String>> {
    // One systemctl for all: a block of properties a unit, in order.
    let shown = host.sh(&format!(
        "systemctl show -p ActiveState,ExecMainStartTimestampMonotonic,MainPID {}",
        SERVICES.join(" ")
    ))?;
    let blocks: Vec<&str> = shown.split("\n\n").collect();
    ensure_eq!(blocks.len(), SERVICES.len());
    Ok(SERVICES
        .iter()
        .zip(blocks)
        .map(|(unit, block)| {
            format!(
                "{unit}: {}",
                block.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })
        .collect())
}

/// A password of the fleet's inventory.
fn inventory_password<'a>(inventory: &'a str, name: &str) -> Result<&'a str> {
    inventory
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .with_context(|| format!("the fleet inventory has no {name}"))
}

/// After set-up, both hosts' PostgreSQL, Redis and Kafka listen on the
/// pair's network, and the outsider (a third host on it) is refused by
/// each of them without the pair's credentials.
fn only_the_pair_gets_in(fleet: &Fleet, inventory: &str) -> Result<()> {
    let outsider = fleet.host("host3");
    let replication_password = inventory_password(inventory, "hapair_replication_password")?;
    let redis_password = inventory_password(inventory, "hapair_redis_password")?;
    let kafka_password = inventory_password(inventory, "hapair_kafka_password")?;
    // A Kafka client's settings: plaintext (no login), a wrong login, the
    // pair's login. Short timeouts: a refused client retries until then.
    let timeouts = "request.timeout.ms=5000\ndefault.api.timeout.ms=8000\n";
    outsider.write(
        "/tmp/plaintext.properties",
        &format!("security.protocol=PLAINTEXT\n{timeouts}"),
    )?;
    for (file, password) in [("wrong", "not-the-pair-password"), ("pair", kafka_password)] {
        kafka_login_file(outsider, &format!("/tmp/{file}.properties"), password)?;
    }
    let topics = |ip: &str, port: u16, config: &str| {
        outsider.sh_output(&format!(
            "/opt/kafka/bin/kafka-topics.sh --bootstrap-server {ip}:{port} \
             --command-config /tmp/{config}.properties --list"
        ))
    };
    let said = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    for host in [fleet.host("primary"), fleet.host("secondary")] {
        let ip = &host.ip;
        // Every service listens on the pair's address.
        for port in [5432, 6379, KAFKA_PAIR_PORT] {
            if !outsider.succeeds(&format!("nc -z -w 3 {ip} {port}"))? {
                bail!("{}: nothing listens on {ip}:{port}", host.name);
            }
        }
        // Kafka's plaintext listener is not open beyond loopback.
        if outsider.succeeds(&format!("nc -z -w 3 {ip} 9092"))? {
            bail!(
                "{}: Kafka's plaintext listener is open on {ip}:9092",
                host.name
            );
        }

        // PostgreSQL: no rule lets the outsider in, even with the
        // replication role's own password.
        let pg = outsider.sh_output(&format!(
            "PGPASSWORD='{replication_password}' psql -XAt \
             'host={ip} user=hapair_replication dbname=postgres sslmode=require connect_timeout=5' \
             -c 'select 1'"
        ))?;
        if pg.status.success() || !said(&pg).contains("no pg_hba.conf entry") {
            bail!(
                "{}: PostgreSQL let the outsider in: {}",
                host.name,
                said(&pg)
            );
        }

        // Redis: nothing without the password.
        let redis = outsider.sh_output(&format!("redis-cli -h {ip} get e2e"))?;
        if !said(&redis).contains("NOAUTH") {
            bail!(
                "{}: Redis answers without a password: {}",
                host.name,
                said(&redis)
            );
        }
        let with_password = outsider.sh(&format!(
            "REDISCLI_AUTH='{redis_password}' redis-cli --no-auth-warning -h {ip} ping"
        ))?;
        ensure_eq!(with_password.trim(), "PONG");

        // Kafka: the pair listener refuses a client without a login and a
        // wrong login, and lets the pair's login in.
        let plaintext = topics(ip, KAFKA_PAIR_PORT, "plaintext")?;
        if plaintext.status.success() {
            bail!(
                "{}: Kafka's pair listener answers without a login: {}",
                host.name,
                said(&plaintext)
            );
        }
        let wrong = topics(ip, KAFKA_PAIR_PORT, "wrong")?;
        if wrong.status.success() || !said(&wrong).contains("Authentication failed") {
            bail!(
                "{}: Kafka's pair listener took a wrong login: {}",
                host.name,
                said(&wrong)
            );
        }
        let pair = topics(ip, KAFKA_PAIR_PORT, "pair")?;
        if !pair.status.success() {
            bail!(
                "{}: Kafka's pair listener refused the pair's login: {}",
                host.name,
                said(&pair)
            );
        }
    }
    Ok(())
}

/// `host` is set up as one side of the pair with `peer`: its cluster account
/// has its key and reaches the peer's with strict host key checking, and its
/// instance config records the pair, its override IP and its protection.
fn assert_set_up(host: &Host, peer: &Host, protected: bool) -> Result<()> {
    ensure_eq!(
        host.sh("stat -c '%a %U' /var/lib/hapair/.ssh/id_ed25519")?
            .trim(),
        "600 hapair"
    );
    let reached = host.sh(&format!(
        "runuser -u hapair -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o GlobalKnownHostsFile=/dev/null {} hostname",
        peer.ip
    ))?;
    ensure_eq!(reached.trim(), peer.name);
    let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
    let cluster = &config["cluster"];
    let hosts = cluster["hosts"].as_array().cloned().unwrap_or_default();
    if hosts.len() != 2 || !hosts.contains(&json!(host.ip)) || !hosts.contains(&json!(peer.ip)) {
        bail!("cluster.hosts on {}: {hosts:?}", host.name);
    }
    ensure_eq!(cluster["override_ip"], json!(host.ip));
    ensure_eq!(cluster["enable_override_ip"], true);
    // Protection is lifted on the secondary only.
    ensure_eq!(cluster["protected_instance"] != false, protected);
    ensure_eq!(
        host.sh("stat -c '%a %U' /etc/hapair/instance.json")?.trim(),
        "644 root"
    );
    Ok(())
}
