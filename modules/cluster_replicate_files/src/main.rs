//! `cluster_replicate_files`: the seed's `cluster_replicate_files`, on the
//! secondary ("Verification: Files/Configurations").
//!
//! Pulls the pair's directories from the primary with rsync over SSH, as
//! the cluster account with the pair's key and pinned host key (see
//! `core::rsync` for what a copy keeps). Before anything changes, a dry
//! run of every directory:
//! - more deletions than `max_delete` in any directory fails the run, and
//!   nothing is deleted anywhere: an empty or unmounted directory on the
//!   primary must never wipe the secondary;
//! - no change anywhere: changed=false.
//!
//! This host's own state is never overwritten: its instance config's
//! directory and the cluster account's `~/.ssh` are excluded wherever they
//! lie under a synced directory, and syncing one of them is refused.
//!
//! Each run records its outcome (`/run/hapair/files-sync.json`) for the
//! monitor. With `timer: present` the module installs itself as a systemd
//! timer that runs the same sync every `interval` seconds, as the seed's
//! overview has configuration pulled every minute; `timer: absent` removes
//! it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::account::{self, Account};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::lock::RunLock;
use hapair_core::protocol::Seconds;
use hapair_core::rsync::{self, Preview, Pull, Stats};
use hapair_core::services::{self, InstalledSelf, Presence, Unit};
use hapair_core::{protocol, Action, Context, Diff, Outcome, Plan, Spec};
use serde::{Deserialize, Serialize};
use serde_json::json;

const SPEC: Spec = Spec {
    name: "cluster_replicate_files",
    doc: include_str!("../cluster_replicate_files.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct Args {
    primary_address: String,
    /// The directories to pull, each the same path on both hosts: a path,
    /// or `{path, exclude}` with rsync patterns of its own.
    directories: Vec<Directory>,
    /// rsync patterns left out of every directory.
    #[serde(default)]
    exclude: Vec<String>,
    /// The most files a run may delete in one directory.
    #[serde(default = "default_max_delete")]
    max_delete: u32,
    #[serde(default = "account::default_name")]
    account: String,
    /// `present`: install the timer; `absent`: remove it; unset: leave it.
    #[serde(default, skip_serializing)]
    timer: Option<Presence>,
    /// Seconds between the timer's runs.
    #[serde(default = "default_interval")]
    interval: Seconds,
    #[serde(default = "default_ssh_timeout")]
    ssh_timeout: Seconds,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

/// A directory to pull, with rsync patterns of its own: given as a path,
/// or as `{path, exclude}`.
#[derive(Debug, Clone, Serialize)]
struct Directory {
    path: PathBuf,
    exclude: Vec<String>,
}

impl<'de> Deserialize<'de> for Directory {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: PathBuf,
            #[serde(default)]
            exclude: Vec<String>,
        }
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(path) => Ok(Directory {
                path: path.into(),
                exclude: Vec::new(),
            }),
            object @ serde_json::Value::Object(_) => serde_json::from_value::<Full>(object)
                .map(|full| Directory {
                    path: full.path,
                    exclude: full.exclude,
                })
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "expected a path, or {{\"path\": ..., \"exclude\": [...]}}, not {}",
                protocol::excerpt(&other.to_string())
            ))),
        }
    }
}

fn default_max_delete() -> u32 {
    50
}
fn default_interval() -> Seconds {
    Seconds::new(60)
}
fn default_ssh_timeout() -> Seconds {
    Seconds::new(10)
}

/// The timer's units, its options, and where the module installs itself.
const UNIT: &str = rsync::SYNC_UNIT;
const TIMER_ARGS: &str = rsync::SYNC_ARGS;
const INSTALLED: InstalledSelf = InstalledSelf("/usr/local/libexec/hapair/cluster_replicate_files");
const RECORD: &str = rsync::SYNC_RECORD;

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_replicate_files)
}

fn cluster_replicate_files(args: Args, ctx: &mut Context) -> Result<Outcome> {
    // Whatever stops a run, the monitor learns of it.
    sync_files(args, ctx).map_err(|e| record_failure(ctx, e))
}

fn sync_files(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let account = Account::lookup(&args.account)?.with_context(|| {
        format!(
            "the cluster account {} does not exist: run cluster_generate_keys and \
             replication_helper first (seed steps 2 and 3)",
            args.account
        )
    })?;
    let protected = [
        files::parent_of(&args.instance_config),
        account.home.join(".ssh"),
    ];
    let directories = directories(&args, &protected)?;

    // One sync at a time: the timer's and a run by hand or by Ansible, which
    // waits for the other to end.
    let _lock = match ctx.check_mode {
        true => None,
        false => Some(RunLock::take_waiting(
            "replicate-files",
            SPEC.name,
            Duration::from_secs(600),
        )?),
    };
    let started = Instant::now();
    let pulls: Vec<Pull> = directories
        .iter()
        .map(|(path, excludes)| Pull {
            account: &account,
            peer: primary,
            directory: path,
            excludes,
            max_delete: args.max_delete,
            timeout: args.ssh_timeout.duration(),
        })
        .collect();
    let mut previews = Vec::with_capacity(pulls.len());
    for pull in &pulls {
        let preview = pull.preview()?;
        if preview.deletions > args.max_delete as usize {
            bail!(
                "syncing {} would delete {} files here, more than max_delete ({}): nothing was \
                 changed in any directory. Is the primary's directory empty or unmounted? Check \
                 it; if the deletions are meant, raise max_delete for one run",
                pull.directory.display(),
                preview.deletions,
                args.max_delete
            );
        }
        previews.push(preview);
    }

    let timer = TimerPlan::observe(&args)?;
    let mut plan = Plan::new(timer.files);
    for (index, (pull, preview)) in pulls.iter().zip(&previews).enumerate() {
        if !preview.changes.is_empty() {
            plan.push(Change::Sync {
                index,
                directory: pull.directory.to_path_buf(),
                changes: preview.changes.len(),
                deletions: preview.deletions,
            });
        }
    }
    plan.actions.extend(timer.actions);
    if !plan.is_empty() && InstanceConfig::load(&args.instance_config)?.is_protected() {
        bail!(
            "this host is a protected instance: its files won't be replaced with the \
             primary's. {}",
            instance::UNPROTECT_HINT
        );
    }

    let mut totals = Stats::default();
    let synced = format!("the files already match {primary}'s");
    let outcome = plan.run(ctx, synced, |plan, ctx| {
        if plan.files.changes(Path::new(TIMER_ARGS)) {
            instance::ensure_config_dir(Path::new(TIMER_ARGS))?;
        }
        plan.files.apply()?;
        for change in &plan.actions {
            match change {
                Change::Sync { index, .. } => {
                    let (stats, warning) = pulls[*index].run(ctx.interactive)?;
                    totals.add(&stats);
                    if let Some(warning) = warning {
                        ctx.warn(warning);
                    }
                }
                Change::InstallSelf => INSTALLED.install()?,
                Change::EnableTimer => {
                    services::daemon_reload()?;
                    Unit::new(format!("{UNIT}.timer")).enable()?;
                    Unit::new(format!("{UNIT}.timer")).start()?;
                }
                Change::RemoveTimer => remove_timer()?,
            }
        }
        Ok(Vec::new())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if !ctx.check_mode {
        record(&json!({
            "time": files::unix_time(),
            "ok": true,
            "msg": outcome.msg,
            "directories": directories.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            "files_transferred": totals.files_transferred,
            "bytes_transferred": totals.bytes_transferred,
            "files_deleted": totals.files_deleted,
            "seconds": seconds,
        }))?;
    }
    let mut outcome = outcome
        .with("files_transferred", totals.files_transferred)
        .with("bytes_transferred", totals.bytes_transferred)
        .with("files_deleted", totals.files_deleted)
        .with("seconds", seconds);
    for (pull, preview) in pulls.iter().zip(&previews) {
        if !preview.changes.is_empty() {
            outcome = outcome.with_diff(itemized(pull.directory, preview));
        }
    }
    Ok(outcome)
}

/// The directories to pull, each with its rsync patterns: checked paths,
/// never one of this host's own state, which is excluded wherever it lies
/// under one.
fn directories(args: &Args, protected: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<String>)>> {
    if args.directories.is_empty() {
        bail!("directories is empty: name the directories to pull from the primary");
    }
    let mut found = Vec::new();
    for directory in &args.directories {
        let own = &directory.exclude;
        let path = files::clean_path("directories", &directory.path)?;
        if path == Path::new("/") {
            bail!("directories: / is the whole host; name the application's directories");
        }
        if let Some(own) = protected.iter().find(|p| path.starts_with(p)) {
            bail!(
                "directories: {} is this host's own state ({}), never copied from the primary",
                path.display(),
                own.display()
            );
        }
        let mut patterns: Vec<String> = args.exclude.iter().chain(own).cloned().collect();
        if let Some(bad) = patterns
            .iter()
            .find(|p| p.is_empty() || p.chars().any(char::is_control))
        {
            bail!(
                "exclude: {:?} is not an rsync pattern",
                protocol::excerpt(bad)
            );
        }
        patterns.extend(rsync::protecting(&path, protected));
        found.push((path, patterns));
    }
    Ok(found)
}

/// A run's changes besides the timer's files.
#[derive(Debug, PartialEq)]
enum Change {
    Sync {
        /// Which of the run's pulls.
        index: usize,
        directory: PathBuf,
        changes: usize,
        deletions: usize,
    },
    InstallSelf,
    EnableTimer,
    RemoveTimer,
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::Sync {
                directory,
                changes,
                deletions,
                ..
            } => format!(
                "sync {} ({changes} changes, {deletions} of them deletions)",
                directory.display()
            ),
            Change::InstallSelf => format!("install this module as {}", INSTALLED.0),
            Change::EnableTimer => format!("enable and start {UNIT}.timer"),
            Change::RemoveTimer => format!("stop and remove {UNIT}.timer"),
        }
    }
}

/// The timer as it should be, against what is on disk.
struct TimerPlan {
    files: FilePlan,
    actions: Vec<Change>,
}

impl TimerPlan {
    fn observe(args: &Args) -> Result<TimerPlan> {
        let mut plan = TimerPlan {
            files: FilePlan::default(),
            actions: Vec::new(),
        };
        let timer = Unit::new(format!("{UNIT}.timer"));
        match args.timer {
            None => {}
            Some(Presence::Absent) if files::state(&timer.file())?.is_some() => {
                plan.actions.push(Change::RemoveTimer);
            }
            Some(Presence::Absent) => {}
            Some(Presence::Present) => {
                let options = serde_json::to_string_pretty(args)? + "\n";
                plan.files
                    .file(Path::new(TIMER_ARGS), |_| options, 0o600, None)?;
                let service = Unit::new(format!("{UNIT}.service"));
                plan.files
                    .file(&service.file(), |_| service_text(), 0o644, None)?;
                plan.files
                    .file(&timer.file(), |_| timer_text(args.interval), 0o644, None)?;
                if !INSTALLED.is_current()? {
                    plan.actions.push(Change::InstallSelf);
                }
                if !plan.files.changes.is_empty() || !timer.is_active()? || !timer.is_enabled()? {
                    plan.actions.push(Change::EnableTimer);
                }
            }
        }
        Ok(plan)
    }
}

fn service_text() -> String {
    format!(
        "# Written by hapair's cluster_replicate_files: changes here are overwritten.\n\
         [Unit]\n\
         Description=hapair: pull the pair's files from the primary\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart={} --args-file {TIMER_ARGS}\n",
        INSTALLED.0
    )
}

fn timer_text(interval: Seconds) -> String {
    let every = interval.get();
    format!(
        "# Written by hapair's cluster_replicate_files: changes here are overwritten.\n\
         [Unit]\n\
         Description=hapair: pull the pair's files from the primary every {every} s\n\
         \n\
         [Timer]\n\
         OnActiveSec={every}s\n\
         OnUnitActiveSec={every}s\n\
         AccuracySec=1s\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n"
    )
}

fn remove_timer() -> Result<()> {
    let service = Unit::new(format!("{UNIT}.service")).file();
    services::remove_unit(
        &Unit::new(format!("{UNIT}.timer")),
        &[service, PathBuf::from(TIMER_ARGS)],
    )
}

/// The dry run's itemized changes of one directory, as a diff.
fn itemized(directory: &Path, preview: &Preview) -> Diff {
    let header = format!("{} (rsync itemized changes)", directory.display());
    Diff {
        before: String::new(),
        after: preview.changes.join("\n") + "\n",
        before_header: header.clone(),
        after_header: header,
    }
}

fn record(outcome: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(outcome)? + "\n";
    let path = Path::new(RECORD);
    files::ensure_dir(&files::parent_of(path), 0o755, None)?;
    files::write_atomic(path, text.as_bytes(), 0o644, None)
}

/// Records a failed run for the monitor (not in check mode), and returns
/// the error.
fn record_failure(ctx: &Context, error: anyhow::Error) -> anyhow::Error {
    if !ctx.check_mode {
        let recorded = record(&json!({
            "time": files::unix_time(),
            "ok": false,
            "msg": format!("{error:#}"),
        }));
        if let Err(e) = recorded {
            return error.context(format!("(and the outcome could not be recorded: {e:#})"));
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    hapair_core::doc_test!(
        Args,
        json!({"primary_address": "10.0.0.1", "directories": ["/srv/app"]})
    );

    fn args(value: serde_json::Value) -> Args {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn this_hosts_own_state_is_never_a_directory_and_always_excluded() {
        let protected = [
            PathBuf::from("/etc/hapair"),
            PathBuf::from("/var/lib/hapair/.ssh"),
        ];
        for refused in [
            "/etc/hapair",
            "/etc/hapair/x",
            "/var/lib/hapair/.ssh",
            "/",
            "relative",
        ] {
            let a = args(json!({"primary_address": "10.0.0.1", "directories": [refused]}));
            assert!(directories(&a, &protected).is_err(), "{refused}");
        }
        let a = args(json!({"primary_address": "10.0.0.1", "exclude": ["*.tmp"],
            "directories": ["/var/lib/hapair/", {"path": "/srv/app", "exclude": ["/cache/"]}]}));
        let found = directories(&a, &protected).unwrap();
        assert_eq!(found[0].0, PathBuf::from("/var/lib/hapair"));
        assert_eq!(found[0].1, vec!["*.tmp", "/.ssh"]);
        assert_eq!(found[1].1, vec!["*.tmp", "/cache/"]);
        let bad = args(json!({"primary_address": "10.0.0.1", "exclude": ["a\nb"],
            "directories": ["/srv/app"]}));
        assert!(directories(&bad, &protected).is_err());
        let none = args(json!({"primary_address": "10.0.0.1", "directories": []}));
        assert!(directories(&none, &protected).is_err());
    }

    #[test]
    fn a_directory_is_a_path_or_a_path_with_patterns_and_nothing_else() {
        let a = args(json!({"primary_address": "10.0.0.1",
            "directories": ["/a", {"path": "/b", "exclude": ["/c/"]}, {"path": "/d"}]}));
        assert_eq!(a.directories[1].exclude, vec!["/c/"]);
        assert!(a.directories[2].exclude.is_empty());
        for bad in [
            json!(5),
            json!({"pth": "/x"}),
            json!({"path": "/x", "exclude": "/c/"}),
        ] {
            let err = serde_json::from_value::<Args>(
                json!({"primary_address": "10.0.0.1", "directories": [bad]}),
            )
            .unwrap_err()
            .to_string();
            assert!(!err.contains("untagged"), "{err}");
        }
    }

    #[test]
    fn the_timer_runs_the_installed_module_on_its_interval() {
        assert!(service_text().contains(&format!(
            "ExecStart={} --args-file {TIMER_ARGS}\n",
            INSTALLED.0
        )));
        let timer = timer_text(Seconds::new(60));
        assert!(timer.contains("OnUnitActiveSec=60s\n") && timer.contains("OnActiveSec=60s\n"));
        // The timer's own runs leave the timer as it is.
        let a = args(
            json!({"primary_address": "10.0.0.1", "directories": ["/srv/app"],
            "timer": "present"}),
        );
        let saved = serde_json::to_value(&a).unwrap();
        assert!(saved.get("timer").is_none(), "{saved}");
    }
}
