//! ansible-playbook against a fleet, as an operator runs it: the output,
//! and the PLAY RECAP's counts per host.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::{repo_root, Fleet};

/// A tool of the project's Python venv (`make venv`).
pub fn venv_bin(tool: &str) -> Result<PathBuf> {
    let path = repo_root().join(".venv/bin").join(tool);
    if !path.is_file() {
        bail!("{} is missing: run `make venv`", path.display());
    }
    Ok(path)
}

/// One ansible-playbook run: its output and the PLAY RECAP counts per host.
pub struct PlaybookRun {
    pub output: String,
    pub succeeded: bool,
    pub recap: Vec<(String, u32, u32)>, // host, changed, failed
    pub seconds: f64,
}

impl PlaybookRun {
    pub fn changed(&self) -> u32 {
        self.recap.iter().map(|(_, changed, _)| changed).sum()
    }

    /// Fails unless the run passed with a recap for both hosts.
    pub fn ok(self) -> Result<PlaybookRun> {
        if !self.succeeded || self.recap.len() != 2 {
            bail!("ansible-playbook failed:\n{}", self.output);
        }
        Ok(self)
    }
}

/// Warnings our modules give on purpose. Any other warning means something
/// is off even when the run passed (junk after a module's JSON, say).
const EXPECTED_WARNINGS: &[&str] = &["cluster.protected_instance is now false"];

pub fn playbook(fleet: &Fleet, playbook: &str, extra: &[&str]) -> Result<PlaybookRun> {
    playbook_with_env(fleet, playbook, extra, &[])
}

/// [`playbook`] with more environment (an `ANSIBLE_LIBRARY` of another
/// build, say). `playbook` may also be an absolute path.
pub fn playbook_with_env(
    fleet: &Fleet,
    playbook: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<PlaybookRun> {
    let started = Instant::now();
    let output = Command::new(venv_bin("ansible-playbook")?)
        .arg("-i")
        .arg(fleet.inventory())
        .arg(repo_root().join("playbooks").join(playbook))
        .args(extra)
        .env("ANSIBLE_CONFIG", repo_root().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .envs(env.iter().copied())
        .current_dir(repo_root())
        .output()
        .context("can't run ansible-playbook")?;
    let seconds = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let unexpected = text.lines().find(|line| {
        line.contains("[WARNING]") && !EXPECTED_WARNINGS.iter().any(|w| line.contains(w))
    });
    if let Some(warning) = unexpected {
        bail!("ansible-playbook warned: {warning}\n{text}");
    }
    Ok(PlaybookRun {
        recap: parse_recap(&text),
        output: text,
        succeeded: output.status.success(),
        seconds,
    })
}

/// "TASK name: host" for each task that reported a change.
pub fn changed_tasks(output: &str) -> Vec<String> {
    let mut task = "";
    let mut changed = Vec::new();
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("TASK [") {
            task = name.split(']').next().unwrap_or(name);
        } else if let Some(host) = line.strip_prefix("changed: [") {
            changed.push(format!(
                "{task}: {}",
                host.split(']').next().unwrap_or(host)
            ));
        }
    }
    changed
}

/// `demo-primary : ok=4 changed=2 unreachable=0 failed=0 ...`
pub fn parse_recap(output: &str) -> Vec<(String, u32, u32)> {
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
