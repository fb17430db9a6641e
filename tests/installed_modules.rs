//! The modules' action (plugins/action/hapair_module.py): each module is
//! installed on a host once, by its checksum, and each task is then one
//! exec. A changed build is installed again; an installed file someone
//! changed is replaced, never run. Check mode, diff and no_log still work.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _, Result};
use hapair_tests::playbook::{playbook_with_env, PlaybookRun};
use hapair_tests::{ensure_eq, staged_collection, staged_module, suite, Fleet, Host, Test};

const TESTS: &[Test] = &[
    (
        "a_module_is_installed_once_then_each_task_is_one_exec",
        installed_once,
    ),
    (
        "a_changed_build_is_installed_on_its_next_task",
        changed_build,
    ),
    (
        "an_installed_module_someone_changed_is_replaced_and_never_run",
        tampered,
    ),
    (
        "a_directory_others_may_write_to_runs_nothing_and_is_refused",
        unsafe_directory,
    ),
    (
        "check_mode_diff_and_no_log_work_through_the_action",
        check_diff_no_log,
    ),
];

fn main() -> ExitCode {
    suite("installed", 1, 18, TESTS)
}

const INSTALL_DIR: &str = "/usr/local/libexec/hapair";

/// A playbook of `tasks` (YAML, indented for a task list) on the host,
/// whatever its outcome.
fn play(fleet: &Fleet, tasks: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<PlaybookRun> {
    let path = fleet.dir().join("tasks.yml");
    std::fs::write(
        &path,
        format!("- hosts: primary\n  gather_facts: false\n  tasks:\n{tasks}"),
    )?;
    playbook_with_env(fleet, &path.display().to_string(), extra, env)
}

/// [`play`], which must succeed.
fn run_tasks(
    fleet: &Fleet,
    tasks: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<PlaybookRun> {
    let run = play(fleet, tasks, extra, env)?;
    if !run.succeeded {
        bail!("ansible-playbook failed:\n{}", run.output);
    }
    Ok(run)
}

const READ_TWICE: &str = "    - hapair.ha.instance_conf: {key: cluster.hosts}\n      register: first\n    \
                          - hapair.ha.instance_conf: {key: cluster.hosts}\n      register: second\n    \
                          - assert: {that: [\"first.value == []\", \"second.value == []\"]}\n";

fn sha256(path: &Path) -> Result<String> {
    let output = Command::new("sha256sum").arg(path).output()?;
    let text = String::from_utf8(output.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("no checksum")?
        .to_string())
}

/// The installed files of `module` on the host, and where its command
/// on the PATH points.
fn installed(host: &Host, module: &str) -> Result<(Vec<String>, String)> {
    let files = host.sh(&format!("ls {INSTALL_DIR} | grep '^{module}-' || true"))?;
    let command = host.sh(&format!("readlink /usr/local/sbin/{module} || true"))?;
    Ok((
        files.lines().map(str::to_string).collect(),
        command.trim().to_string(),
    ))
}

/// How many commands Ansible ran on a host, from `-vvv` output.
fn execs(output: &str) -> usize {
    output
        .lines()
        .filter(|l| l.contains("SSH: EXEC ssh"))
        .count()
}

fn installed_once(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let library = staged_module("instance_conf");
    let digest = sha256(&library)?;
    let first = run_tasks(fleet, READ_TWICE, &["-vvv"], &[])?;
    let name = format!("instance_conf-{digest}");
    ensure_eq!(
        installed(host, "instance_conf")?,
        (vec![name.clone()], format!("{INSTALL_DIR}/{name}"))
    );
    ensure_eq!(
        host.sh(&format!(
            "stat -c '%a %U' {INSTALL_DIR} {INSTALL_DIR}/{name}"
        ))?,
        "755 root\n755 root\n"
    );
    // Installed: each task is one command on the host, where the first
    // run also made a directory, copied the build and removed the directory.
    let second = run_tasks(fleet, READ_TWICE, &["-vvv"], &[])?;
    ensure_eq!(execs(&second.output), 2);
    if execs(&first.output) <= 2 {
        bail!("the first run did not install:\n{}", first.output);
    }
    // The operator's command on the host is the installed module.
    ensure_eq!(
        host.sh("instance_conf cluster.hosts </dev/null | head -c 1")?,
        "{"
    );
    Ok(())
}

fn changed_build(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    // Another build: the same binary with a byte more (an ELF file runs
    // with trailing bytes), in a collection tree of its own.
    let collections = fleet.dir().join("another-build");
    let tree = collections.join("ansible_collections/hapair");
    let _ = std::fs::remove_dir_all(&collections);
    std::fs::create_dir_all(&tree)?;
    let copied = Command::new("cp")
        .arg("-a")
        .arg(staged_collection())
        .arg(&tree)
        .status()?;
    ensure_eq!(copied.success(), true);
    let binary = tree.join("ha/plugins/modules/instance_conf");
    let mut bytes = std::fs::read(&binary)?;
    bytes.push(0);
    std::fs::write(&binary, bytes)?;
    let digest = sha256(&binary)?;
    let env = [(
        "ANSIBLE_COLLECTIONS_PATH",
        collections.to_str().context("path")?,
    )];
    run_tasks(fleet, READ_TWICE, &[], &env)?;
    let name = format!("instance_conf-{digest}");
    // The new build alone: the old one is gone, the command points here.
    ensure_eq!(
        installed(host, "instance_conf")?,
        (vec![name.clone()], format!("{INSTALL_DIR}/{name}"))
    );
    // And back to the staged build.
    run_tasks(fleet, READ_TWICE, &[], &[])?;
    let staged = sha256(&staged_module("instance_conf"))?;
    ensure_eq!(
        installed(host, "instance_conf")?.0,
        vec![format!("instance_conf-{staged}")]
    );
    Ok(())
}

fn tampered(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let digest = sha256(&staged_module("instance_conf"))?;
    let path = format!("{INSTALL_DIR}/instance_conf-{digest}");
    run_tasks(fleet, READ_TWICE, &[], &[])?;
    let impostor = "#!/bin/sh\ntouch /tmp/the-impostor-ran\n\
                    echo '{\"changed\": false, \"value\": \"impostor\"}'\n";
    host.write("/tmp/impostor", impostor)?;
    // A file changed in place, then a symlink to another program: each is
    // replaced by the build, and the task gets the module's answer.
    for plant in [
        format!("cp /tmp/impostor {path} && chmod 755 {path}"),
        format!("chmod 755 /tmp/impostor && rm {path} && ln -s /tmp/impostor {path}"),
    ] {
        host.sh(&plant)?;
        run_tasks(fleet, READ_TWICE, &[], &[])?;
        ensure_eq!(host.succeeds("test -e /tmp/the-impostor-ran")?, false);
        let now = host.sh(&format!("test ! -L {path} && sha256sum < {path}"))?;
        ensure_eq!(now.split_whitespace().next(), Some(digest.as_str()));
    }
    Ok(())
}

/// A directory another account could write to: nothing there is run, and
/// the install refuses, saying how to fix it.
fn unsafe_directory(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    run_tasks(fleet, READ_TWICE, &[], &[])?;
    host.sh(&format!("chmod 777 {INSTALL_DIR}"))?;
    let refused = play(fleet, READ_TWICE, &[], &[])?;
    if refused.succeeded
        || !refused
            .output
            .contains("must be a directory of root's, mode 755")
    {
        bail!(
            "an install into a directory all may write to was not refused:\n{}",
            refused.output
        );
    }
    host.sh(&format!("chmod 755 {INSTALL_DIR}"))?;
    run_tasks(fleet, READ_TWICE, &[], &[])?;
    Ok(())
}

fn check_diff_no_log(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("primary");
    let before = host.snapshot(&["/etc/hapair"])?;
    let set = "    - hapair.ha.instance_conf: {key: cluster.hosts, value: ['198.18.18.11']}\n";
    let check = run_tasks(fleet, set, &["--check", "--diff"], &[])?;
    before.ensure_unchanged(&host.snapshot(&["/etc/hapair"])?)?;
    if !check
        .output
        .contains("+++ after: /etc/hapair/instance.json")
        || !check.output.contains("198.18.18.11")
        || check.changed() != 1
    {
        bail!("check mode showed no planned change:\n{}", check.output);
    }
    let hidden =
        "    - hapair.ha.instance_conf: {key: cluster.hosts, value: ['198.18.18.11']}\n      no_log: true\n";
    let run = run_tasks(fleet, hidden, &["-v"], &[])?;
    if run.output.contains("198.18.18.11") || !run.output.contains("censored") {
        bail!("no_log did not hide the result:\n{}", run.output);
    }
    ensure_eq!(
        host.sh("instance_conf --json cluster.hosts </dev/null")?
            .contains("[\"198.18.18.11\"]"),
        true
    );
    Ok(())
}
