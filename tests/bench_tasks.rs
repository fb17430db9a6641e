//! `make bench`: what a task costs, and the whole set-up, on one fresh pair
//! in one run:
//! 1. per task: a hapair module through its action (installed, one exec),
//!    the same module by Ansible's own path for binary modules (copied with
//!    an args file on every task), `raw`, and a Python module with
//!    pipelining; each a playbook of `TASKS` tasks on both hosts, less an
//!    empty playbook's time, the median of `ROUNDS` interleaved rounds;
//! 2. ha_setup.yml's first run on the fresh pair (empty app data), to the
//!    verification's healthy `/monitor/replication`, and a re-run;
//! 3. three fresh pairs (six hosts) set up by one run, against the one.
//!
//! It prints the figures and their ratios (goals: a hapair task at most
//! 1.5 raw tasks; the set-up 60 s, the re-run 5 s; three pairs at most 1.5
//! times one); it asserts nothing about speed.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::pair::{regroup_into_pairs, THREE_PAIRS};
use hapair_tests::playbook::playbook_with_env;
use hapair_tests::Fleet;

const TASKS: usize = 30;
const ROUNDS: usize = 5;
const CONFIRM: &str = "hapair_confirm_unsafe_steps=true";

fn main() -> ExitCode {
    hapair_tests::bench_main(bench)
}

/// A kind of task: its name, the task, the environment its playbook runs
/// with.
type Kind = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const KINDS: &[Kind] = &[
    ("empty", "", &[]),
    ("raw", "    - raw: 'true'\n", &[]),
    (
        "hapair",
        "    - hapair.ha.instance_conf: {key: cluster.hosts}\n",
        &[],
    ),
    (
        "hapair_without_action",
        "    - instance_conf: {key: cluster.hosts}\n",
        // The same build by its short name from a library: no action of
        // the collection's, Ansible's own path for a binary module.
        &[(
            "ANSIBLE_LIBRARY",
            "target/collection/ansible_collections/hapair/ha/plugins/modules",
        )],
    ),
    (
        "python_pipelined",
        "    - ansible.builtin.stat: {path: /etc/hostname}\n",
        &[("ANSIBLE_PIPELINING", "true")],
    ),
];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn bench() -> Result<()> {
    let fleet = Fleet::up("bench-tasks", 2, 19)?;
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    for round in 0..=ROUNDS {
        for (i, (kind, task, env)) in KINDS.iter().enumerate() {
            let path = fleet.dir().join(format!("{kind}.yml"));
            let tasks = if task.is_empty() {
                "    []\n".to_string()
            } else {
                task.repeat(TASKS)
            };
            std::fs::write(
                &path,
                format!("- hosts: pair\n  gather_facts: false\n  tasks:\n{tasks}"),
            )?;
            let run = playbook_with_env(&fleet, &path.display().to_string(), &[], env)?;
            if !run.succeeded {
                bail!("the {kind} playbook failed:\n{}", run.output);
            }
            // Round 0 installs the module and warms the SSH connections.
            if round > 0 {
                seconds[i].push(run.seconds);
            }
        }
    }
    let empty = median(seconds[0].clone());
    let per_task: Vec<f64> = seconds
        .iter()
        .map(|s| (median(s.clone()) - empty) / TASKS as f64)
        .collect();
    println!(
        "per task ({TASKS} tasks on 2 hosts, median of {ROUNDS} rounds, less an empty \
         playbook's {empty:.2} s):"
    );
    let raw = per_task[1];
    for ((kind, _, _), cost) in KINDS.iter().zip(&per_task).skip(1) {
        println!(
            "  {kind:<22} {:>6.1} ms   {:.2} x raw",
            cost * 1000.0,
            cost / raw
        );
    }

    let setup = playbook_with_env(&fleet, "ha_setup.yml", &["-e", CONFIRM], &[])?.ok()?;
    // The re-run is short enough for the fleet's own timers (the monitor's
    // measures) to sway one run: the median of three.
    let mut reruns = Vec::new();
    for _ in 0..3 {
        let rerun = playbook_with_env(&fleet, "ha_setup.yml", &["-e", CONFIRM], &[])?.ok()?;
        if rerun.changed() != 0 {
            bail!("the re-run changed something:\n{}", rerun.output);
        }
        reruns.push(rerun.seconds);
    }
    let rerun_seconds = median(reruns);
    println!(
        "ha_setup.yml on a fresh pair, to a healthy /monitor/replication: {:.1} s (goal 60 s, \
         {:.2} x the goal)",
        setup.seconds,
        setup.seconds / 60.0
    );
    println!(
        "ha_setup.yml re-run, changed=0 (median of 3): {rerun_seconds:.1} s (goal 5 s, {:.2} x \
         the goal)",
        rerun_seconds / 5.0
    );
    drop(fleet);

    let six = Fleet::up("bench-pairs", 6, 22)?;
    regroup_into_pairs(&six, &THREE_PAIRS)?;
    let three = playbook_with_env(&six, "ha_setup.yml", &["-e", CONFIRM], &[])?;
    if !three.succeeded || three.recap.iter().any(|(_, _, failed)| *failed > 0) {
        bail!("the three pairs' set-up failed:\n{}", three.output);
    }
    println!(
        "three pairs set up by one run: {:.1} s, {:.2} x one pair (goal at most 1.5)",
        three.seconds,
        three.seconds / setup.seconds
    );
    Ok(())
}
