//! Crash and resume, the modules: on a fresh pair with data on its primary,
//! each unsafe module of ha_setup.yml is killed (SIGKILL) part-way through,
//! at a point where it has begun to change the host, by a watcher on that
//! host. The run fails there; the next whole run of the playbook resumes it
//! and goes on to the next unsafe module, which is killed in turn; the last
//! run goes through, passes the verification (the monitor says healthy),
//! and everything on the primary before the set-up is on both hosts.
//!
//! Steps 5 and 6 (instance_conf) are not among them: each writes one file by
//! a rename, with nothing between begun and done to kill.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_tests::crash::{ha_setup, load_primary, nothing_lost};
use hapair_tests::{suite, Fleet, Host, Test};

const TESTS: &[Test] = &[(
    "each_unsafe_module_killed_part_way_is_resumed_by_the_next_run",
    killed_part_way,
)];

fn main() -> ExitCode {
    suite("crash-kill", 2, 24, TESTS)
}

/// A module killed part-way: on which host, and once what is true there.
struct Kill {
    module: &'static str,
    on_primary: bool,
    /// A shell condition: the module has begun to change the host.
    begun: &'static str,
    what: &'static str,
}

const KILLS: &[Kill] = &[
    Kill {
        module: "cluster_enter_primary_mode",
        on_primary: true,
        begun: "[ -e /etc/postgresql/15/main/conf.d/hapair.conf ]",
        what: "step 4, its settings written, the restarts not yet done",
    },
    Kill {
        module: "cluster_add_secondary",
        on_primary: true,
        begun: "grep -q hapair /etc/postgresql/15/main/pg_hba.conf",
        what: "step 7, the pg_hba rule written",
    },
    Kill {
        module: "cluster_replicate_postgres",
        on_primary: false,
        begun: "pgrep -x pg_basebackup >/dev/null",
        what: "step 8, during the copy",
    },
    Kill {
        module: "cluster_kvstore_copy",
        on_primary: false,
        begun: "sleep 0.5",
        what: "step 9, half a second in",
    },
    Kill {
        module: "cluster_start_kafka_sync",
        on_primary: false,
        begun: "sleep 2",
        what: "step 10, two seconds in",
    },
    Kill {
        module: "cluster_replicate_files",
        on_primary: false,
        begun: "pgrep -x rsync >/dev/null",
        what: "files, during rsync",
    },
];

/// Watches `host` for `kill.module` (an installed build, or Ansible's async
/// copy of it, AnsiballZ_MODULE: a command line that starts with its path, where the async
/// wrapper's starts with Python's) and kills it with SIGKILL once
/// `kill.begun` holds while it runs; a run of it that ends first (step 8's
/// and 9's plans, in check mode) is let be. Prints `killed`, or `not
/// killed` once told to stop (by /run/hapair-test-stop-watch).
fn watch(host: &Host, kill: &Kill) -> Result<std::process::Child> {
    host.sh("rm -f /run/hapair-test-stop-watch")?;
    host.spawn_sh(&format!(
        r#"running() {{ pgrep -f '^[^ ]*/(AnsiballZ_)?{module}(-[0-9a-f]+)?( |$)' | head -n 1; }}
        until [ -e /run/hapair-test-stop-watch ]; do
          pid=$(running)
          while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
            if {begun}; then kill -KILL "$pid" && {{ echo killed; exit; }}; fi
            sleep 0.02
          done
          sleep 0.02
        done
        echo "not killed""#,
        module = kill.module,
        begun = kill.begun,
    ))
}

fn killed_part_way(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    load_primary(primary)?;
    for kill in KILLS {
        let host = if kill.on_primary { primary } else { secondary };
        let mut watcher = watch(host, kill)?;
        let run = ha_setup(fleet, &[])?;
        host.sh("touch /run/hapair-test-stop-watch")?;
        let mut said = String::new();
        watcher
            .stdout
            .take()
            .map(|mut out| out.read_to_string(&mut said));
        watcher.wait()?;
        if said.trim() != "killed" {
            bail!(
                "{} ({}) was not killed part-way: the watcher says {:?}\n{}",
                kill.module,
                kill.what,
                said.trim(),
                run.output
            );
        }
        if run.succeeded {
            bail!(
                "the run went through with {} killed ({}):\n{}",
                kill.module,
                kill.what,
                run.output
            );
        }
        eprintln!(
            "killed {} ({}); that run took {:.1} s",
            kill.module, kill.what, run.seconds
        );
    }
    let last = ha_setup(fleet, &[])?;
    if !last.succeeded || last.recap.len() != 2 {
        bail!(
            "the run after the last kill did not go through:\n{}",
            last.output
        );
    }
    nothing_lost(fleet, primary, secondary)?;
    println!(
        "crash and resume: {n}/{n} unsafe modules killed part-way, each resumed by the next \
         run, to a healthy pair with nothing lost",
        n = KILLS.len()
    );
    Ok(())
}
