//! Crash and resume, the controller: ha_setup.yml on a fresh pair with data
//! on its primary, stopped (the controller dies, no recap, no cleanup) right
//! after a task that changed a host; then run again from the top, and
//! stopped after the next task that changes a host; and so on until a run
//! goes through. Each run is the resume of the stop before it.
//!
//! A stop after a task that changed nothing leaves the hosts as the stop
//! after the task before did, so this covers a stop after every task. The
//! last run passes the verification (the monitor says healthy), and
//! everything on the primary before the set-up is on both hosts.

use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::crash::{ha_setup, load_primary, nothing_lost};
use hapair_tests::{suite, Fleet, Test};

const TESTS: &[Test] = &[(
    "a_run_stopped_after_each_task_that_changes_a_host_is_resumed_by_the_next",
    stopped_after_each_task,
)];

fn main() -> ExitCode {
    suite("crash-stop", 2, 23, TESTS)
}

fn stopped_after_each_task(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    load_primary(primary)?;
    let log = fleet.dir().join("tasks.log");
    let mut stops: Vec<String> = Vec::new();
    let mut past = 0;
    let last = loop {
        let _ = std::fs::remove_file(&log);
        let past_text = past.to_string();
        let run = ha_setup(
            fleet,
            &[
                ("HAPAIR_STOP_AFTER_CHANGE_PAST", &past_text),
                ("HAPAIR_TASK_LOG", log.to_str().unwrap_or_default()),
            ],
        )?;
        let stopped = run
            .output
            .lines()
            .find_map(|line| line.strip_prefix("HAPAIR-STOPPED after task "))
            .map(str::to_string);
        let Some(stop) = stopped else {
            break run;
        };
        // Up to the stop, the resumed run failed nowhere.
        if run.output.contains("fatal: [") || run.output.contains("failed: [") {
            bail!(
                "the run resumed after {:?} failed before its stop:\n{}",
                stops.last(),
                run.output
            );
        }
        let number: u32 = stop.split(':').next().unwrap_or_default().parse()?;
        if number <= past {
            bail!(
                "stopped after task {number}, not past {past}:\n{}",
                run.output
            );
        }
        eprintln!("stopped after task {stop} ({:.1} s)", run.seconds);
        past = number;
        stops.push(stop);
    };
    if !last.succeeded || last.recap.len() != 2 {
        bail!(
            "the run resumed after {:?} did not go through:\n{}",
            stops.last(),
            last.output
        );
    }
    let tasks = std::fs::read_to_string(&log)?.lines().count();
    if stops.len() < 10 {
        bail!(
            "only {} stops, after {stops:?}: the set-up of a fresh pair changes hosts in more \
             tasks than that",
            stops.len()
        );
    }
    nothing_lost(fleet, primary, secondary)?;
    println!(
        "crash and resume: {n}/{n} stops resumed to a healthy pair with nothing lost \
         (a stop after each of the {n} tasks of {tasks} that changed a host)",
        n = stops.len()
    );
    Ok(())
}
