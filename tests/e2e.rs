//! End to end: ansible-playbook over SSH against a pair of fleet hosts, as an
//! operator runs it.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hapair_tests::{ensure_eq, module_binary, module_names, repo_root, suite, Fleet, Host, Test};
use serde_json::Value;

const TESTS: &[Test] = &[
    ("ansible_doc_shows_each_module", ansible_doc),
    (
        "ha_setup_checks_then_sets_up_a_fresh_pair_and_a_rerun_changes_nothing",
        ha_setup,
    ),
];

fn main() -> ExitCode {
    suite("e2e", 2, 2, TESTS)
}

fn venv_bin(tool: &str) -> Result<PathBuf> {
    let path = repo_root().join(".venv/bin").join(tool);
    if !path.is_file() {
        bail!("{} is missing: run `make venv`", path.display());
    }
    Ok(path)
}

/// The staged library must hold exactly the release binaries and docs.
fn check_staged() -> Result<()> {
    let library = repo_root().join("playbooks/library");
    for module in module_names()? {
        let staged = std::fs::read(library.join(&module)).ok();
        let built = std::fs::read(module_binary(&module)?)?;
        let doc = std::fs::read(repo_root().join(format!("modules/{module}/{module}.yml")))?;
        let staged_doc = std::fs::read(library.join(format!("{module}.yml"))).ok();
        if staged.as_ref() != Some(&built) || staged_doc.as_ref() != Some(&doc) {
            bail!("{module} in playbooks/library is missing or stale: run `make stage`");
        }
    }
    Ok(())
}

fn ansible_doc(_fleet: &Fleet) -> Result<()> {
    check_staged()?;
    for module in module_names()? {
        let output = Command::new(venv_bin("ansible-doc")?)
            .args(["--json", "-M"])
            .arg(repo_root().join("playbooks/library"))
            .arg(&module)
            .output()?;
        if !output.status.success() {
            bail!(
                "ansible-doc {module}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let doc: Value = serde_json::from_slice(&output.stdout)?;
        let entry = &doc[&module];
        for section in ["doc", "examples", "return"] {
            if entry[section].is_null() {
                bail!("ansible-doc {module} has no {section}: {entry}");
            }
        }
        if entry["doc"]["options"]
            .as_object()
            .is_none_or(|o| o.is_empty())
        {
            bail!("ansible-doc {module} shows no options");
        }
    }
    Ok(())
}

/// One ansible-playbook run: its output and the PLAY RECAP counts per host.
struct PlaybookRun {
    output: String,
    recap: Vec<(String, u32, u32)>, // host, changed, failed
    seconds: f64,
}

impl PlaybookRun {
    fn changed(&self) -> u32 {
        self.recap.iter().map(|(_, changed, _)| changed).sum()
    }
}

fn playbook(fleet: &Fleet, playbook: &str, extra: &[&str]) -> Result<PlaybookRun> {
    let started = Instant::now();
    let output = Command::new(venv_bin("ansible-playbook")?)
        .arg("-i")
        .arg(fleet.inventory())
        .arg(repo_root().join("playbooks").join(playbook))
        .args(extra)
        .env("ANSIBLE_CONFIG", repo_root().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .current_dir(repo_root())
        .output()
        .context("can't run ansible-playbook")?;
    let seconds = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("ansible-playbook {playbook} {extra:?} failed:\n{text}");
    }
    // A warning means something is off even when the run passed (e.g. junk
    // after a module's JSON).
    if let Some(warning) = text.lines().find(|l| l.contains("[WARNING]")) {
        bail!("ansible-playbook warned: {warning}\n{text}");
    }
    let recap = parse_recap(&text);
    if recap.len() != 2 {
        bail!("expected a PLAY RECAP for 2 hosts:\n{text}");
    }
    Ok(PlaybookRun {
        output: text,
        recap,
        seconds,
    })
}

/// `demo-primary : ok=4 changed=2 unreachable=0 failed=0 ...`
fn parse_recap(output: &str) -> Vec<(String, u32, u32)> {
    let recap = output.split("PLAY RECAP").nth(1).unwrap_or("");
    recap
        .lines()
        .filter_map(|line| {
            let (host, counts) = line.split_once(" : ")?;
            let count = |name: &str| {
                counts
                    .split_whitespace()
                    .find_map(|c| c.strip_prefix(&format!("{name}=")))
                    .and_then(|n| n.parse().ok())
            };
            Some((host.trim().to_string(), count("changed")?, count("failed")?))
        })
        .collect()
}

/// What the set-up touches on a host.
const SET_UP_PATHS: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/hapair",
    "/var/lib/hapair",
];

fn ha_setup(fleet: &Fleet) -> Result<()> {
    check_staged()?;
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    let fresh = [
        primary.snapshot(SET_UP_PATHS)?,
        secondary.snapshot(SET_UP_PATHS)?,
    ];

    // --check --diff on a fresh pair: says what it would do, does nothing.
    let check = playbook(fleet, "ha_setup.yml", &["--check", "--diff"])?;
    if check.changed() == 0 {
        bail!(
            "check mode on a fresh pair reports nothing to do:\n{}",
            check.output
        );
    }
    for expected in [
        "+++ after: /etc/hapair/instance.json",
        &format!("\"{}\"", secondary.ip),
    ] {
        if !check.output.contains(expected) {
            bail!("the check-mode diff lacks {expected:?}:\n{}", check.output);
        }
    }
    fresh[0].ensure_unchanged(&primary.snapshot(SET_UP_PATHS)?)?;
    fresh[1].ensure_unchanged(&secondary.snapshot(SET_UP_PATHS)?)?;

    // The real run sets up both hosts.
    let first = playbook(fleet, "ha_setup.yml", &[])?;
    for (host, changed, failed) in &first.recap {
        if *changed == 0 || *failed != 0 {
            bail!("first run on {host}: changed={changed} failed={failed}");
        }
    }
    for host in [primary, secondary] {
        assert_set_up(host, &[&primary.ip, &secondary.ip])?;
    }
    let set_up = [
        primary.snapshot(SET_UP_PATHS)?,
        secondary.snapshot(SET_UP_PATHS)?,
    ];

    // A second run changes nothing, on the hosts either.
    let second = playbook(fleet, "ha_setup.yml", &[])?;
    for (host, changed, _) in &second.recap {
        if *changed != 0 {
            bail!(
                "second run changed {changed} task(s) on {host}:\n{}",
                second.output
            );
        }
    }
    set_up[0].ensure_unchanged(&primary.snapshot(SET_UP_PATHS)?)?;
    set_up[1].ensure_unchanged(&secondary.snapshot(SET_UP_PATHS)?)?;

    // And check mode after set-up has nothing to do.
    let recheck = playbook(fleet, "ha_setup.yml", &["--check", "--diff"])?;
    ensure_eq!(recheck.changed(), 0);

    eprintln!(
        "ha_setup.yml wall time: first run {:.1}s, second (idempotent) run {:.1}s",
        first.seconds, second.seconds
    );
    Ok(())
}

/// The account has its key, private 0600, and the instance config lists the
/// pair, primary first.
fn assert_set_up(host: &Host, addresses: &[&str]) -> Result<()> {
    ensure_eq!(
        host.sh("stat -c '%a %U' /var/lib/hapair/.ssh/id_ed25519")?
            .trim(),
        "600 hapair"
    );
    let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
    ensure_eq!(config["cluster"]["hosts"], serde_json::json!(addresses));
    ensure_eq!(
        host.sh("stat -c '%a %U' /etc/hapair/instance.json")?.trim(),
        "644 root"
    );
    Ok(())
}
