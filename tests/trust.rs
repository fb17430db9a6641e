//! Trust and prerequisites on real hosts: preflight, the key exchange,
//! instance protection and override IP, and the port check.
//!
//! Three hosts: the pair, and `host3`, which plays an intruder holding a
//! copy of the primary's key.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::{ensure_eq, exchange_keys, suite, Fleet, Host, ModuleRun, Test, MODULE_DIR};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    ("prerequisites_identical_hosts_pass", preflight_identical),
    (
        "prerequisites_another_app_version_fails_showing_both",
        preflight_app_version,
    ),
    (
        "prerequisites_another_data_partition_size_fails_showing_both",
        preflight_partition,
    ),
    (
        "prerequisites_addresses_of_another_host_mean_moved_disks",
        preflight_moved_disks,
    ),
    (
        "step3_exchange_lets_each_account_in_to_the_other_with_strict_host_keys",
        exchange,
    ),
    (
        "step3_a_third_host_with_the_same_key_is_refused",
        intruder_refused,
    ),
    (
        "step3_without_a_host_key_it_is_scanned_and_pinned",
        host_key_scanned,
    ),
    (
        "step3_by_hand_it_prompts_and_explains_bad_answers",
        helper_prompts,
    ),
    ("step3_and_step6_refuse_bad_ipv4_addresses", bad_addresses),
    (
        "step5_unprotecting_warns_that_data_can_be_deleted",
        unprotect_warns,
    ),
    (
        "verification_ports_all_open_then_a_stopped_redis_is_named",
        port_check,
    ),
];

fn main() -> ExitCode {
    suite("trust", 3, 4, TESTS)
}

fn run(host: &Host, module: &str, args: Value) -> Result<ModuleRun> {
    host.run_module(module, &args)
}

fn preflight_facts(host: &Host, args: Value) -> Result<Value> {
    Ok(run(host, "cluster_preflight", args)?.ok()?.json["facts"].clone())
}

fn preflight_identical(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let facts = preflight_facts(secondary, json!({}))?;
    ensure_eq!(facts["addresses"], json!([secondary.ip]));
    ensure_eq!(
        facts["postgresql_version"]
            .as_str()
            .map(|v| v.starts_with("15.")),
        Some(true)
    );
    ensure_eq!(facts["kafka_version"], "4.1.1");
    let compared = run(primary, "cluster_preflight", json!({"peer": facts}))?.ok()?;
    ensure_eq!(compared.json["mismatches"], json!([]));
    ensure_eq!(compared.changed(), false);
    Ok(())
}

fn preflight_app_version(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let config = "/etc/hapair-pf1/instance.json";
    for (host, version) in [(primary, "2024.1"), (secondary, "2023.3")] {
        host.sh("mkdir -p /etc/hapair-pf1")?;
        run(
            host,
            "instance_conf",
            json!({"key": "app.version", "value": version, "path": config}),
        )?
        .ok()?;
    }
    let facts = preflight_facts(secondary, json!({"instance_config": config}))?;
    let compared = run(
        primary,
        "cluster_preflight",
        json!({"instance_config": config, "peer": facts}),
    )?;
    if !compared.failed()
        || !compared.msg().contains("2024.1")
        || !compared.msg().contains("2023.3")
    {
        bail!(
            "an app version mismatch did not fail showing both values: {}",
            compared.stdout
        );
    }
    ensure_eq!(
        compared.json["mismatches"],
        json!([{"item": "app version", "this": "2024.1", "peer": "2023.3"}])
    );
    Ok(())
}

fn preflight_partition(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    for (host, size) in [(primary, "64m"), (secondary, "128m")] {
        host.sh(&format!(
            "mkdir -p /srv/pf-data && mount -t tmpfs -o size={size} tmpfs /srv/pf-data"
        ))?;
    }
    let result = (|| {
        let facts = preflight_facts(secondary, json!({"data_path": "/srv/pf-data"}))?;
        ensure_eq!(facts["data_partition_bytes"], 128u64 << 20);
        run(
            primary,
            "cluster_preflight",
            json!({"data_path": "/srv/pf-data", "peer": facts}),
        )
    })();
    for host in [primary, secondary] {
        host.sh("umount /srv/pf-data")?;
    }
    let compared = result?;
    let msg = compared.msg();
    if !compared.failed()
        || !msg.contains("data partition size")
        || !msg.contains("64.0 MiB")
        || !msg.contains("128.0 MiB")
    {
        bail!(
            "a partition size mismatch did not fail showing both sizes: {}",
            compared.stdout
        );
    }
    Ok(())
}

fn preflight_moved_disks(fleet: &Fleet) -> Result<()> {
    let primary = fleet.host("primary");
    primary.sh("mkdir -p /etc/hapair-pf2")?;
    primary.write(
        "/etc/hapair-pf2/instance.json",
        r#"{"cluster": {"override_ip": "198.18.4.99", "hosts": ["198.18.4.99", "198.18.4.98"]}}"#,
    )?;
    let moved = run(
        primary,
        "cluster_preflight",
        json!({"instance_config": "/etc/hapair-pf2/instance.json"}),
    )?;
    if !moved.failed()
        || !moved.msg().contains("set up HA anew")
        || !moved.msg().contains("198.18.4.99")
    {
        bail!("moved disks were not reported: {}", moved.stdout);
    }
    Ok(())
}

/// SSH as the cluster account from `from` to `to`, with the account's
/// pinned known_hosts and nothing else.
fn cluster_ssh(from: &Host, to: &Host) -> Result<std::process::Output> {
    from.sh_output(&format!(
        "runuser -u hapair -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o GlobalKnownHostsFile=/dev/null -o UserKnownHostsFile=/var/lib/hapair/.ssh/known_hosts \
         -o ConnectTimeout=5 {} hostname",
        to.ip
    ))
}

fn exchange(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let first = exchange_keys(primary, secondary)?;
    ensure_eq!(first[0].changed(), true);
    ensure_eq!(first[0].json["host_key_source"], "given");

    for (from, to) in [(primary, secondary), (secondary, primary)] {
        let output = cluster_ssh(from, to)?;
        if !output.status.success() {
            bail!(
                "hapair@{} can't ssh to {}: {}",
                from.name,
                to.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        ensure_eq!(String::from_utf8_lossy(&output.stdout).trim(), to.name);
        // The entry is restricted to the peer's address.
        let entry = to.sh("cat /var/lib/hapair/.ssh/authorized_keys")?;
        let from_key = from.sh("cut -d' ' -f1,2 /var/lib/hapair/.ssh/id_ed25519.pub")?;
        ensure_eq!(entry.lines().count(), 1);
        if !entry.starts_with(&format!(
            "from=\"{}\",restrict {}",
            from.ip,
            from_key.trim()
        )) {
            bail!("unexpected authorized_keys on {}: {entry}", to.name);
        }
        ensure_eq!(to.sh("stat -c '%a %U' /var/lib/hapair/.ssh/authorized_keys /var/lib/hapair/.ssh/known_hosts")?, "600 hapair\n600 hapair\n");
        // The pinned host key is the one the peer holds.
        let pinned = from.sh("cat /var/lib/hapair/.ssh/known_hosts")?;
        let real = to.sh("cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub")?;
        ensure_eq!(pinned, format!("{} {}\n", to.ip, real.trim()));
        // Both addresses are recorded.
        let config: Value = serde_json::from_str(&from.sh("cat /etc/hapair/instance.json")?)?;
        let hosts = config["cluster"]["hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !hosts.contains(&json!(from.ip)) || !hosts.contains(&json!(to.ip)) {
            bail!("cluster.hosts on {} lacks the pair: {hosts:?}", from.name);
        }
    }
    let snapshot = |h: &Host| h.snapshot(&["/var/lib/hapair/.ssh", "/etc/hapair"]);
    let before = [snapshot(primary)?, snapshot(secondary)?];
    let second = exchange_keys(primary, secondary)?;
    ensure_eq!((second[0].changed(), second[1].changed()), (false, false));
    before[0].ensure_unchanged(&snapshot(primary)?)?;
    before[1].ensure_unchanged(&snapshot(secondary)?)
}

fn intruder_refused(fleet: &Fleet) -> Result<()> {
    let (primary, secondary, intruder) = (
        fleet.host("primary"),
        fleet.host("secondary"),
        fleet.host("host3"),
    );
    if !secondary.succeeds("test -s /var/lib/hapair/.ssh/authorized_keys")? {
        exchange_keys(primary, secondary)?;
    }
    // host3 gets an exact copy of the primary's cluster account and key.
    run(intruder, "cluster_generate_keys", json!({}))?.ok()?;
    for file in ["id_ed25519", "id_ed25519.pub"] {
        let content = primary.sh(&format!("cat /var/lib/hapair/.ssh/{file}"))?;
        intruder.write(&format!("/var/lib/hapair/.ssh/{file}"), &content)?;
    }
    intruder.sh("chown hapair: /var/lib/hapair/.ssh/id_ed25519* && chmod 600 /var/lib/hapair/.ssh/id_ed25519")?;
    // The port answers: a refusal is the key's from= restriction, not the network.
    if !intruder.succeeds(&format!("nc -z -w 2 {} 22", secondary.ip))? {
        bail!("host3 can't reach the secondary's SSH port at all");
    }
    let output = intruder.sh_output(&format!(
        "runuser -u hapair -- ssh -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 {} hostname",
        secondary.ip
    ))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || !stderr.contains("Permission denied") {
        bail!("host3 with the primary's key was not refused: {stderr}");
    }
    // The same key from the primary's address still works.
    if !cluster_ssh(primary, secondary)?.status.success() {
        bail!("the primary itself was refused");
    }
    Ok(())
}

fn host_key_scanned(fleet: &Fleet) -> Result<()> {
    let (secondary, host3) = (fleet.host("secondary"), fleet.host("host3"));
    run(host3, "cluster_generate_keys", json!({}))?.ok()?;
    let secondary_key = run(secondary, "cluster_generate_keys", json!({}))?
        .ok()?
        .json["public_key"]
        .clone();
    let config = "/etc/hapair-scan/instance.json";
    host3.sh("mkdir -p /etc/hapair-scan && rm -f /var/lib/hapair/.ssh/known_hosts")?;
    let scanned = run(host3, "replication_helper", json!({
        "peer_public_key": secondary_key, "peer_address": secondary.ip, "instance_config": config,
    }))?.ok()?;
    ensure_eq!(scanned.json["host_key_source"], "scanned");
    if !scanned.json["warnings"][0]
        .as_str()
        .unwrap_or("")
        .contains("trusted on first use")
    {
        bail!("scanning did not warn: {}", scanned.stdout);
    }
    let real = secondary.sh("cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub")?;
    ensure_eq!(scanned.json["peer_host_key"], real.trim());
    // A second run keeps the pinned key rather than scanning again.
    let again = run(host3, "replication_helper", json!({
        "peer_public_key": secondary_key, "peer_address": secondary.ip, "instance_config": config,
    }))?.ok()?;
    ensure_eq!(again.json["host_key_source"], "already pinned");
    ensure_eq!(again.changed(), false);
    Ok(())
}

fn helper_prompts(fleet: &Fleet) -> Result<()> {
    let (primary, host3) = (fleet.host("primary"), fleet.host("host3"));
    // host3 may hold a copy of the primary's key (the intruder test): the
    // helper would rightly refuse the primary's key as host3's own.
    run(host3, "cluster_generate_keys", json!({"force": true}))?.ok()?;
    let primary_key = run(primary, "cluster_generate_keys", json!({}))?.ok()?.json["public_key"]
        .as_str()
        .unwrap_or("")
        .to_string();
    // A person at a terminal: `script` gives the helper a pty. The answers
    // are a bad key, the right one, a bad address, the right one.
    let answers = format!(
        "ssh-ed25519 garbage!\n{primary_key}\n10.0.0.256\n{}\n",
        primary.ip
    );
    host3.write("/tmp/answers", &answers)?;
    let session = host3.sh(&format!(
        "script -qec '{MODULE_DIR}/replication_helper' /dev/null < /tmp/answers"
    ))?;
    for expected in [
        "This host's public key",
        "This host's IP address: ",
        "Paste the public key of the remote server",
        "is not base64",
        "Enter the IP address of the remote server",
        "is not an IPv4 address",
        "try again",
    ] {
        if !session.contains(expected) {
            bail!("the interactive session lacks {expected:?}:\n{session}");
        }
    }
    let authorized = host3.sh("cat /var/lib/hapair/.ssh/authorized_keys")?;
    let key_material: String = primary_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    if !authorized.contains(&format!("from=\"{}\",restrict {key_material}", primary.ip)) {
        bail!("the answers were not applied: {authorized}");
    }
    Ok(())
}

fn bad_addresses(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let key = run(secondary, "cluster_generate_keys", json!({}))?
        .ok()?
        .json["public_key"]
        .clone();
    run(primary, "cluster_generate_keys", json!({}))?.ok()?;
    for (bad, expected) in [
        ("10.0.0.256", "is not an IPv4 address"),
        ("abc", "is not an IPv4 address"),
        ("fe80::1", "IPv6"),
    ] {
        let helper = run(
            primary,
            "replication_helper",
            json!({"peer_public_key": key, "peer_address": bad}),
        )?;
        if !helper.failed()
            || helper.exit == 0
            || !helper.msg().contains(expected)
            || !helper.msg().contains("e.g. 10.0.0.1")
        {
            bail!(
                "replication_helper took peer_address {bad:?}: {}",
                helper.stdout
            );
        }
        let conf = run(
            primary,
            "instance_conf",
            json!({"key": "cluster.override_ip", "value": bad, "path": "/etc/hapair-bad/instance.json"}),
        )?;
        if !conf.failed() || !conf.msg().contains(expected) {
            bail!("instance_conf took override_ip {bad:?}: {}", conf.stdout);
        }
    }
    // An address of another host is refused as an override IP (seed step 6).
    let other = run(
        primary,
        "instance_conf",
        json!({"key": "cluster.override_ip", "value": secondary.ip, "path": "/etc/hapair-bad/instance.json"}),
    )?;
    if !other.failed() || !other.msg().contains("is not an address of this host") {
        bail!(
            "instance_conf took another host's override IP: {}",
            other.stdout
        );
    }
    let own = run(primary, "instance_conf", json!({"key": "cluster.override_ip", "value": primary.ip, "path": "/etc/hapair-bad/instance.json"}))?.ok()?;
    ensure_eq!(own.json["value"], json!(primary.ip));
    Ok(())
}

fn unprotect_warns(fleet: &Fleet) -> Result<()> {
    let secondary = fleet.host("secondary");
    let path = "/etc/hapair-un/instance.json";
    secondary.sh("mkdir -p /etc/hapair-un")?;
    let off = run(
        secondary,
        "instance_conf",
        json!({"key": "cluster.protected_instance", "value": false, "path": path}),
    )?
    .ok()?;
    let warning = off.json["warnings"][0].as_str().unwrap_or("");
    if !warning.contains("may delete this host's") || !warning.contains("\"value\": true") {
        bail!(
            "unprotecting did not warn and say how to undo it: {}",
            off.stdout
        );
    }
    ensure_eq!(
        secondary.sh(&format!("cat {path}"))?,
        "{\n  \"cluster\": {\n    \"protected_instance\": false\n  }\n}\n"
    );
    Ok(())
}

/// Makes PostgreSQL and Redis listen on the pair's network, as a set-up
/// pair's hosts do (the replication steps configure this).
fn listen_on_the_pair_network(host: &Host) -> Result<()> {
    host.sh(
        "echo \"listen_addresses = '*'\" > /etc/postgresql/15/main/conf.d/test-listen.conf && \
         sed -i 's/^bind .*/bind 0.0.0.0 -::1/' /etc/redis/redis.conf && \
         systemctl restart postgresql@15-main redis-server",
    )?;
    Ok(())
}

fn port_check(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    for host in [primary, secondary] {
        listen_on_the_pair_network(host)?;
    }
    let ports = json!([
        {"service": "ssh", "port": 22}, {"service": "postgresql", "port": 5432},
        {"service": "redis", "port": 6379}, {"service": "kafka", "port": 9092},
    ]);
    let config = "/etc/hapair-ports/instance.json";
    primary.sh("mkdir -p /etc/hapair-ports")?;
    run(
        primary,
        "instance_conf",
        json!({"key": "cluster.hosts", "value": [primary.ip, secondary.ip], "path": config}),
    )?
    .ok()?;

    // No hosts given: cluster.hosts is read.
    let healthy = run(
        primary,
        "replication_port_check",
        json!({"ports": ports, "instance_config": config}),
    )?
    .ok()?;
    let report = healthy.json["report"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure_eq!(report.len(), 8);
    if let Some(closed) = report.iter().find(|c| c["open"] != true) {
        bail!("a port is closed on a healthy pair: {closed}");
    }
    ensure_eq!(healthy.json["hosts"], json!([primary.ip, secondary.ip]));

    secondary.sh("systemctl stop redis-server")?;
    let result = run(
        primary,
        "replication_port_check",
        json!({"ports": ports, "instance_config": config}),
    );
    secondary.sh("systemctl start redis-server")?;
    let down = result?;
    let expected = format!("{}:6379 (redis", secondary.ip);
    if !down.failed() || down.exit == 0 || !down.msg().contains(&expected) {
        bail!(
            "a stopped redis was not named ({expected}): {}",
            down.stdout
        );
    }
    ensure_eq!(down.json["closed"].as_array().map(|c| c.len()), Some(1));

    // By hand on a terminal: a table.
    primary.write(
        "/tmp/port-args.json",
        &json!({"ports": ports, "instance_config": config}).to_string(),
    )?;
    let table = primary.sh(&format!(
        "script -qec '{MODULE_DIR}/replication_port_check --args-file /tmp/port-args.json' /dev/null"
    ))?;
    let header = table.lines().find(|l| l.starts_with("host")).unwrap_or("");
    let ssh_row = table.lines().any(|l| {
        l.split_whitespace()
            .take(4)
            .eq([primary.ip.as_str(), "22", "ssh", "open"])
    });
    if !header.contains("service") || !header.contains("latency") || !ssh_row {
        bail!("no table on a terminal:\n{table}");
    }
    Ok(())
}
