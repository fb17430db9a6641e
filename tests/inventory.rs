//! inventory/example: the documented production-style inventory parses,
//! every hapair variable reaches every host, each pair has a name and
//! passwords of its own, and the passwords are vaulted on disk. On this
//! machine only: the example's hosts are not ours to reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hapair_tests::playbook::venv_bin;
use hapair_tests::repo_root;
use serde_json::Value;

const PASSWORDS: [&str; 3] = [
    "hapair_replication_password",
    "hapair_redis_password",
    "hapair_kafka_password",
];

fn example() -> PathBuf {
    repo_root().join("inventory/example")
}

fn ansible(tool: &str, args: &[&str]) -> Output {
    let vault_password = example().join("vault-password.example");
    let output = Command::new(venv_bin(tool).unwrap())
        .arg("-i")
        .arg(example())
        .arg("--vault-password-file")
        .arg(vault_password)
        .args(args)
        .env("ANSIBLE_CONFIG", repo_root().join("ansible.cfg"))
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The top-level keys of a YAML file of `key: value` lines.
fn keys_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(':'))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect()
}

fn plain_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            plain_files(&path, found);
        } else {
            found.push(path);
        }
    }
}

#[test]
fn the_example_gives_every_host_every_variable_its_pair_and_vaulted_passwords() {
    let listed = ansible("ansible-inventory", &["--list"]);
    let inventory: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let hostvars = &inventory["_meta"]["hostvars"];
    let defaults = keys_of(&repo_root().join("inventory/group_vars/all.yml"));
    assert!(defaults.len() > 20, "{defaults:?}");
    let mut secrets = Vec::new();
    for (host, pair) in [
        ("db-alpha-1", "alpha"),
        ("db-alpha-2", "alpha"),
        ("db-beta-1", "beta"),
        ("db-beta-2", "beta"),
    ] {
        let vars = &hostvars[host];
        assert_eq!(vars["hapair_pair"], pair, "{host}");
        for key in &defaults {
            assert!(!vars[key].is_null(), "{host} lacks {key}");
        }
        for key in PASSWORDS {
            let password = vars[key].as_str().unwrap_or_default();
            assert!(password.len() >= 12, "{host}: {key} is too short");
            secrets.push((pair, password.to_string()));
        }
    }
    // Each pair's passwords are its own.
    for (pair, password) in &secrets {
        assert!(
            !secrets
                .iter()
                .any(|(other, p)| other != pair && p == password),
            "a password of pair {pair} is another pair's too"
        );
    }
    // On disk, every password is in a vault, never in the clear.
    let mut files = Vec::new();
    plain_files(&example(), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if file.ends_with("vault.yml") {
            assert!(
                text.starts_with("$ANSIBLE_VAULT;"),
                "{} is not vaulted",
                file.display()
            );
        }
        for (_, password) in &secrets {
            assert!(
                !text.contains(password.as_str()),
                "{} holds a password",
                file.display()
            );
        }
    }
}

#[test]
fn the_playbooks_take_the_example_and_see_both_pairs() {
    for book in [
        "ha_setup.yml",
        "switchover.yml",
        "failover.yml",
        "rejoin.yml",
        "break.yml",
        "verify.yml",
        "demo.yml",
    ] {
        let path = repo_root().join("playbooks").join(book);
        ansible(
            "ansible-playbook",
            &["--syntax-check", path.to_str().unwrap()],
        );
    }
    let hosts = ansible(
        "ansible-playbook",
        &[
            "--list-hosts",
            repo_root().join("playbooks/ha_setup.yml").to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&hosts.stdout);
    for host in ["db-alpha-1", "db-alpha-2", "db-beta-1", "db-beta-2"] {
        assert!(text.contains(host), "{host} missing:\n{text}");
    }
}
