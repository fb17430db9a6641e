//! Each module on a real host: the binary is copied in and run with an args
//! file, as Ansible runs it, and the assertions are on the host's state.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::{ensure_eq, suite, Fleet, Test, MODULE_DIR};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    // instance_conf (the seed's alation_conf)
    (
        "instance_conf_sets_a_key_in_a_0644_file_and_a_rerun_changes_nothing",
        conf_set_and_rerun,
    ),
    (
        "instance_conf_check_mode_leaves_the_disk_unchanged",
        conf_check_mode,
    ),
    (
        "instance_conf_reads_protection_as_on_by_default",
        conf_protection_default,
    ),
    (
        "instance_conf_rejects_bad_values_and_keeps_the_file",
        conf_bad_values,
    ),
    ("instance_conf_unsets_a_key", conf_unset),
    ("instance_conf_seed_shorthand_works_by_hand", conf_shorthand),
    (
        "instance_conf_answers_bad_args_with_json_and_exit_2",
        conf_bad_args,
    ),
    // cluster_generate_keys (seed step 2)
    (
        "generate_keys_creates_the_account_and_a_0600_key_it_owns",
        keys_create,
    ),
    ("generate_keys_check_mode_creates_nothing", keys_check_mode),
    ("generate_keys_repairs_modes_without_a_new_key", keys_repair),
    (
        "generate_keys_never_replaces_a_key_without_force",
        keys_force,
    ),
];

fn main() -> ExitCode {
    suite("modules", 1, 1, TESTS)
}

/// Ansible's internal keys, as ansible-core 2.19 sends them.
fn ansible(mut options: Value, check_mode: bool) -> Value {
    let internal = json!({
        "_ansible_check_mode": check_mode,
        "_ansible_diff": true,
        "_ansible_no_log": false,
        "_ansible_verbosity": 0,
        "_ansible_module_name": "test",
        "_ansible_version": "2.19.4",
        "_ansible_keep_remote_files": false,
        "_ansible_remote_tmp": "~/.ansible/tmp",
        "_ansible_tmpdir": "/tmp",
    });
    options
        .as_object_mut()
        .unwrap()
        .extend(internal.as_object().unwrap().clone());
    options
}

// --- instance_conf ------------------------------------------------------------

fn conf_set_and_rerun(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let path = "/etc/hapair-t1/instance.json";
    host.sh("rm -rf /etc/hapair-t1")?;
    let args = ansible(
        json!({"key": "cluster.protected_instance", "value": false, "path": path}),
        false,
    );
    let first = host.run_module("instance_conf", &args)?.ok()?;
    ensure_eq!(first.changed(), true);
    ensure_eq!(
        host.sh(&format!("cat {path}"))?,
        "{\n  \"cluster\": {\n    \"protected_instance\": false\n  }\n}\n"
    );
    ensure_eq!(
        host.sh(&format!("stat -c '%a %U:%G' {path}"))?.trim(),
        "644 root:root"
    );
    // Turning protection off warns, and the diff shows the file.
    if !first.json["warnings"][0]
        .as_str()
        .unwrap_or("")
        .contains("may delete")
    {
        bail!("no warning about deletable data: {}", first.stdout);
    }
    ensure_eq!(first.json["diff"]["before"], "");

    let before = host.snapshot(&["/etc/hapair-t1"])?;
    let second = host.run_module("instance_conf", &args)?.ok()?;
    ensure_eq!(second.changed(), false);
    before.ensure_unchanged(&host.snapshot(&["/etc/hapair-t1"])?)?;

    // A second key joins the first; the first stays.
    let hosts = ansible(
        json!({"key": "cluster.hosts", "value": ["198.18.1.11", "198.18.1.12"], "path": path}),
        false,
    );
    host.run_module("instance_conf", &hosts)?.ok()?;
    let stored: Value = serde_json::from_str(&host.sh(&format!("cat {path}"))?)?;
    ensure_eq!(
        stored,
        json!({"cluster": {"protected_instance": false, "hosts": ["198.18.1.11", "198.18.1.12"]}})
    );
    Ok(())
}

fn conf_check_mode(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    host.sh("rm -rf /etc/hapair-t2 && mkdir -p /etc/hapair-t2 && echo '{\"app\": {\"version\": \"1\"}}' > /etc/hapair-t2/instance.json")?;
    let before = host.snapshot(&["/etc/hapair-t2"])?;
    let args = ansible(
        json!({"key": "app.version", "value": "2", "path": "/etc/hapair-t2/instance.json"}),
        true,
    );
    let run = host.run_module("instance_conf", &args)?.ok()?;
    ensure_eq!(run.changed(), true);
    ensure_eq!(run.json["value"], "2");
    if !run.json["diff"]["after"]
        .as_str()
        .unwrap_or("")
        .contains("\"2\"")
    {
        bail!("check mode with diff shows no diff: {}", run.stdout);
    }
    before.ensure_unchanged(&host.snapshot(&["/etc/hapair-t2"])?)?;
    // Nor does check mode create a missing config or its directory.
    let fresh = ansible(
        json!({"key": "app.version", "value": "2", "path": "/etc/hapair-t2b/instance.json"}),
        true,
    );
    host.run_module("instance_conf", &fresh)?.ok()?;
    if host.succeeds("test -e /etc/hapair-t2b")? {
        bail!("check mode created /etc/hapair-t2b");
    }
    Ok(())
}

fn conf_protection_default(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let args = ansible(
        json!({"key": "cluster.protected_instance", "path": "/nonexistent/instance.json"}),
        false,
    );
    let run = host.run_module("instance_conf", &args)?.ok()?;
    ensure_eq!(run.json["value"], true);
    ensure_eq!(run.json["is_default"], true);
    ensure_eq!(run.json["safety_relevant"], true);
    ensure_eq!(run.changed(), false);
    // A read creates nothing: no config, no directory, no lock file.
    if host.succeeds("test -e /nonexistent")? {
        bail!("reading a key created /nonexistent");
    }
    Ok(())
}

fn conf_bad_values(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let path = "/etc/hapair-t3/instance.json";
    host.sh("rm -rf /etc/hapair-t3 && mkdir /etc/hapair-t3 && echo '{\"cluster\": {\"hosts\": [\"198.18.1.11\"]}}' > /etc/hapair-t3/instance.json")?;
    let before = host.snapshot(&["/etc/hapair-t3"])?;
    for (key, value, expected) in [
        (
            "cluster.override_ip",
            json!("10.0.0.256"),
            "is not an IPv4 address",
        ),
        (
            "cluster.override_ip",
            json!("abc"),
            "is not an IPv4 address",
        ),
        ("cluster.override_ip", json!("fe80::1"), "IPv6"),
        (
            "cluster.hosts",
            json!(["198.18.1.11", "nope"]),
            "is not an IPv4 address",
        ),
        (
            "cluster.protected_instance",
            json!("perhaps"),
            "takes true or false",
        ),
        (
            "cluster.replication_mode",
            json!("master"),
            "takes one of standalone, primary, secondary",
        ),
        ("cluster.protected_instnace", json!(false), "unknown key"),
    ] {
        let run = host.run_module(
            "instance_conf",
            &ansible(json!({"key": key, "value": value, "path": path}), false),
        )?;
        if !run.failed() || run.exit == 0 || !run.msg().contains(expected) {
            bail!(
                "{key}={value}: expected a failure saying {expected:?}, got exit {}: {}",
                run.exit,
                run.stdout
            );
        }
    }
    before.ensure_unchanged(&host.snapshot(&["/etc/hapair-t3"])?)?;

    // A corrupt config is reported, never overwritten.
    host.sh(&format!("echo '{{ broken' > {path}"))?;
    let run = host.run_module(
        "instance_conf",
        &ansible(
            json!({"key": "app.version", "value": "3", "path": path}),
            false,
        ),
    )?;
    if !run.failed() || !run.msg().contains("not valid JSON") {
        bail!("a corrupt config was not reported: {}", run.stdout);
    }
    ensure_eq!(host.sh(&format!("cat {path}"))?, "{ broken\n");
    Ok(())
}

fn conf_unset(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let path = "/etc/hapair-t4/instance.json";
    host.sh("rm -rf /etc/hapair-t4 && mkdir /etc/hapair-t4 && echo '{\"cluster\": {\"override_ip\": \"198.18.1.11\"}, \"app\": {\"version\": \"7\"}}' > /etc/hapair-t4/instance.json")?;
    let args = ansible(
        json!({"key": "cluster.override_ip", "state": "absent", "path": path}),
        false,
    );
    let run = host.run_module("instance_conf", &args)?.ok()?;
    ensure_eq!(run.changed(), true);
    let stored: Value = serde_json::from_str(&host.sh(&format!("cat {path}"))?)?;
    ensure_eq!(stored, json!({"app": {"version": "7"}}));
    ensure_eq!(
        host.run_module("instance_conf", &args)?.ok()?.changed(),
        false
    );
    Ok(())
}

fn conf_shorthand(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    host.sh("rm -rf /etc/hapair-t5 && mkdir /etc/hapair-t5")?;
    let conf = format!("{MODULE_DIR}/instance_conf");
    let path = "/etc/hapair-t5/instance.json";
    let set = host
        .run_module_raw(&format!(
            "{conf} cluster.protected_instance -s False --path {path}"
        ))?
        .ok()?;
    ensure_eq!(set.json["value"], false);
    let read = host
        .run_module_raw(&format!("{conf} cluster.protected_instance --path {path}"))?
        .ok()?;
    ensure_eq!(read.json["value"], false);
    // JSON on stdin, as a person might pipe it.
    let piped = host
        .run_module_raw(&format!(
            "echo '{{\"key\": \"cluster.hosts\", \"value\": \"198.18.1.11,198.18.1.12\", \"path\": \"{path}\"}}' | {conf}"
        ))?
        .ok()?;
    ensure_eq!(piped.json["value"], json!(["198.18.1.11", "198.18.1.12"]));
    // --check by hand changes nothing.
    let before = host.snapshot(&["/etc/hapair-t5"])?;
    let checked = host
        .run_module_raw(&format!(
            "{conf} --check cluster.protected_instance -s true --path {path}"
        ))?
        .ok()?;
    ensure_eq!(checked.changed(), true);
    before.ensure_unchanged(&host.snapshot(&["/etc/hapair-t5"])?)?;
    Ok(())
}

fn conf_bad_args(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let conf = format!("{MODULE_DIR}/instance_conf");
    for (command, expected) in [
        (
            format!("{conf} '{{\"key\": \"a.b\", \"bogus\": 1}}'"),
            "unsupported option bogus",
        ),
        (
            format!("{conf} '{{\"value\": 1}}'"),
            "missing required option key",
        ),
        (
            format!("{conf} '{{\"key\": \"a.b\", \"state\": \"gone\"}}'"),
            "option state: unknown variant",
        ),
        (format!("{conf} '{{\"key\": '"), "not valid JSON"),
        (
            format!(": > /tmp/empty-args && {conf} /tmp/empty-args"),
            "is empty",
        ),
        (
            format!("{conf} --args-file /nonexistent"),
            "can't read the args file",
        ),
    ] {
        let run = host.run_module_raw(&command)?;
        if run.exit != 2 || !run.failed() || !run.msg().contains(expected) {
            bail!(
                "`{command}`: expected exit 2 and {expected:?}, got exit {}: {}",
                run.exit,
                run.stdout
            );
        }
        if run.stdout.contains("panicked") || run.stdout.contains("RUST_BACKTRACE") {
            bail!("a backtrace leaked: {}", run.stdout);
        }
    }
    Ok(())
}

// --- cluster_generate_keys ---------------------------------------------------

fn keys_create(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let args = ansible(json!({"account": "hapair-k1"}), false);
    let first = host.run_module("cluster_generate_keys", &args)?.ok()?;
    ensure_eq!(first.changed(), true);

    let home = host.sh("getent passwd hapair-k1 | cut -d: -f6")?;
    ensure_eq!(home.trim(), "/var/lib/hapair-k1");
    let modes = host.sh(
        "cd /var/lib/hapair-k1 && stat -c '%n %a %U' .ssh .ssh/id_ed25519 .ssh/id_ed25519.pub",
    )?;
    ensure_eq!(
        modes,
        ".ssh 700 hapair-k1\n.ssh/id_ed25519 600 hapair-k1\n.ssh/id_ed25519.pub 644 hapair-k1\n"
    );
    // The returned key is the one on disk, and it is the private key's half.
    let on_disk = host.sh("cat /var/lib/hapair-k1/.ssh/id_ed25519.pub")?;
    ensure_eq!(first.json["public_key"], on_disk.trim());
    let derived =
        host.sh("ssh-keygen -y -f /var/lib/hapair-k1/.ssh/id_ed25519 | cut -d' ' -f1,2")?;
    if !on_disk.starts_with(derived.trim()) {
        bail!("the public key does not match the private key");
    }
    let fingerprint =
        host.sh("ssh-keygen -lf /var/lib/hapair-k1/.ssh/id_ed25519.pub | cut -d' ' -f2")?;
    ensure_eq!(first.json["fingerprint"], fingerprint.trim());
    // The account can use the key: its own ssh accepts it as an identity.
    host.sh(
        "runuser -u hapair-k1 -- ssh-keygen -y -f /var/lib/hapair-k1/.ssh/id_ed25519 >/dev/null",
    )?;

    let before = host.snapshot(&["/var/lib/hapair-k1", "/etc/passwd", "/etc/group"])?;
    let second = host.run_module("cluster_generate_keys", &args)?.ok()?;
    ensure_eq!(second.changed(), false);
    ensure_eq!(second.json["public_key"], on_disk.trim());
    before.ensure_unchanged(&host.snapshot(&[
        "/var/lib/hapair-k1",
        "/etc/passwd",
        "/etc/group",
    ])?)?;
    Ok(())
}

fn keys_check_mode(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let watched = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];
    let before = host.snapshot(&watched)?;
    let run = host
        .run_module(
            "cluster_generate_keys",
            &ansible(json!({"account": "hapair-k2"}), true),
        )?
        .ok()?;
    ensure_eq!(run.changed(), true);
    ensure_eq!(run.json["public_key"], Value::Null);
    if !run.msg().contains("would create account hapair-k2") {
        bail!("check mode does not say what it would do: {}", run.msg());
    }
    before.ensure_unchanged(&host.snapshot(&watched)?)?;
    if host.succeeds("test -e /var/lib/hapair-k2")? {
        bail!("check mode created the account's home");
    }
    Ok(())
}

fn keys_repair(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let args = ansible(json!({"account": "hapair-k3"}), false);
    let first = host.run_module("cluster_generate_keys", &args)?.ok()?;
    host.sh(
        "cd /var/lib/hapair-k3/.ssh && chmod 644 id_ed25519 && chmod 755 . && rm id_ed25519.pub",
    )?;
    // Check mode sees the damage and leaves it.
    let checked = host
        .run_module(
            "cluster_generate_keys",
            &ansible(json!({"account": "hapair-k3"}), true),
        )?
        .ok()?;
    ensure_eq!(checked.changed(), true);
    ensure_eq!(
        host.sh("stat -c %a /var/lib/hapair-k3/.ssh/id_ed25519")?
            .trim(),
        "644"
    );

    let repaired = host.run_module("cluster_generate_keys", &args)?.ok()?;
    ensure_eq!(repaired.changed(), true);
    ensure_eq!(repaired.json["fingerprint"], first.json["fingerprint"]);
    ensure_eq!(
        host.sh(
            "cd /var/lib/hapair-k3 && stat -c '%a %U' .ssh .ssh/id_ed25519 .ssh/id_ed25519.pub"
        )?,
        "700 hapair-k3\n600 hapair-k3\n644 hapair-k3\n"
    );
    ensure_eq!(
        host.run_module("cluster_generate_keys", &args)?
            .ok()?
            .changed(),
        false
    );
    Ok(())
}

fn keys_force(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    // An RSA key is there: not ours to replace silently.
    host.sh(
        "useradd --system --create-home --home-dir /var/lib/hapair-k4 hapair-k4 && \
         runuser -u hapair-k4 -- sh -c 'mkdir -m 700 ~/.ssh && ssh-keygen -q -t rsa -b 2048 -N \"\" -f ~/.ssh/id_ed25519'",
    )?;
    let old_private = host.sh("sha256sum < /var/lib/hapair-k4/.ssh/id_ed25519")?;
    let refused = host.run_module(
        "cluster_generate_keys",
        &ansible(json!({"account": "hapair-k4"}), false),
    )?;
    if !refused.failed()
        || !refused.msg().contains("not ed25519")
        || !refused.msg().contains("force: true")
    {
        bail!("a foreign key was not refused clearly: {}", refused.stdout);
    }
    ensure_eq!(
        host.sh("sha256sum < /var/lib/hapair-k4/.ssh/id_ed25519")?,
        old_private
    );

    let forced = host
        .run_module(
            "cluster_generate_keys",
            &ansible(json!({"account": "hapair-k4", "force": true}), false),
        )?
        .ok()?;
    ensure_eq!(forced.changed(), true);
    ensure_eq!(
        host.sh("ssh-keygen -lf /var/lib/hapair-k4/.ssh/id_ed25519.pub | awk '{print $NF}'")?
            .trim(),
        "(ED25519)"
    );
    // The old key is kept beside the new one.
    let kept = host.sh("cat /var/lib/hapair-k4/.ssh/id_ed25519.replaced-* | sha256sum")?;
    ensure_eq!(kept, old_private);
    Ok(())
}
