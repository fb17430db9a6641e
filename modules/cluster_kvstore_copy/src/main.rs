//! `cluster_kvstore_copy`: seed step 9, on the secondary.
//!
//! Makes this host's Redis a read-only replica of the primary's. As the
//! seed warns, this replaces the secondary's KV data: Redis flushes it for
//! the primary's on the first full sync. So:
//! 1. Already replicating from this primary, in sync, with hapair's
//!    settings in place: nothing to do, and Redis is not restarted.
//! 2. A protected instance is refused.
//! 3. The primary's Redis is checked first: it answers with the pair's
//!    password, and it keeps its data on disk. (Redis's own docs warn that
//!    a primary without persistence that restarts comes back empty, and its
//!    replicas copy the empty set.)
//! 4. What will be replaced is recorded: the key count and memory.
//! 5. `replicaof` and `masterauth` go in hapair's include file, so they
//!    hold across restarts; Redis restarts, and the module waits until the
//!    link is up and the first sync is done.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_core::files::FilePlan;
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::protocol::Seconds;
use hapair_core::redis::{self, Info, Server};
use hapair_core::services::Unit;
use hapair_core::{net, protocol, wait, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_kvstore_copy",
    doc: include_str!("../cluster_kvstore_copy.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    primary_address: String,
    redis_password: Secret,
    /// This host's address on the pair's network; found from the route to
    /// the primary when not given.
    #[serde(default)]
    address: Option<String>,
    #[serde(default = "redis::default_port")]
    redis_port: u16,
    #[serde(default = "redis::default_config")]
    redis_config: PathBuf,
    #[serde(default = "redis::default_unit")]
    redis_unit: String,
    /// Seconds to wait for the first sync.
    #[serde(default = "default_sync_timeout")]
    sync_timeout: Seconds,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_sync_timeout() -> Seconds {
    Seconds::new(3600)
}

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_kvstore_copy)
}

fn cluster_kvstore_copy(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let address = match &args.address {
        Some(a) => instance::parse_ipv4_str("address", a)?,
        None => net::source_address_for(primary)?,
    };
    let mut files = FilePlan::default();
    redis::plan_files(
        &mut files,
        SPEC.name,
        &args.redis_config,
        address,
        &args.redis_password,
        Some((primary, args.redis_port)),
    )?;
    let local = Server::local(args.redis_port, Some(args.redis_password.clone()));
    let unit = Unit::new(&args.redis_unit);

    // 1. Replicating from this primary, in sync, settings in place?
    let replication = local.info("replication").ok();
    let state = replication
        .as_ref()
        .map(|info| Sync::of(info, primary, args.redis_port));
    if files.changes.is_empty() && state == Some(Sync::Done) {
        return Ok(Outcome::unchanged(format!(
            "Redis already replicates from {primary}:{} and is in sync",
            args.redis_port
        ))
        .with("primary", primary.to_string()));
    }

    // 2. The seed: this step deletes the secondary's KV data.
    if InstanceConfig::load(&args.instance_config)?.is_protected() {
        bail!(
            "this host is a protected instance: its KV store (Redis) data won't be replaced. {}",
            instance::UNPROTECT_HINT
        );
    }

    // 3. The primary first.
    let source = Server {
        host: primary.to_string(),
        port: args.redis_port,
        password: Some(args.redis_password.clone()),
    };
    check_primary(&source)?;

    // 4. What the sync will replace, and the plan.
    let replaced = Replaced::read(&local);
    let restart = !files.changes.is_empty() || !unit.is_active()?;
    let mut plan = Plan::new(files);
    if restart {
        plan.push(MakeReplica {
            primary,
            port: args.redis_port,
            replacing: replaced.describe(),
        });
    }

    // 5. Replicate, and wait for the first sync: after a restart, or
    // already under way (the plan then has nothing to change).
    let started = Instant::now();
    let sync = |ctx: &Context| -> Result<String> {
        wait_for_sync(&local, primary, args.redis_port, args.sync_timeout, ctx)?;
        Ok(format!(
            "in sync after {:.1} s",
            started.elapsed().as_secs_f64()
        ))
    };
    let syncing = format!(
        "Redis already replicates from {primary}:{}; its first sync was under way",
        args.redis_port
    );
    let mut outcome = plan.run(ctx, syncing, |plan, ctx| {
        plan.files.apply()?;
        unit.restart()?;
        Ok(vec![sync(ctx)?])
    })?;
    if !restart && !ctx.check_mode {
        outcome.msg = format!("{}, and is {}", outcome.msg, sync(ctx)?);
    }
    if !ctx.check_mode {
        outcome = outcome.with("sync_seconds", started.elapsed().as_secs_f64());
    }
    Ok(replaced.returned(outcome.with("primary", primary.to_string())))
}

/// Step 9's change besides its files: Redis restarted as a replica of the
/// primary, which replaces its data with the primary's.
struct MakeReplica {
    primary: Ipv4Addr,
    port: u16,
    replacing: String,
}

impl Action for MakeReplica {
    fn describe(&self) -> String {
        format!(
            "restart Redis as a replica of {}:{}, replacing {}",
            self.primary, self.port, self.replacing
        )
    }
}

/// Where a replica stands with its primary, from `INFO replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sync {
    /// Not a replica of this primary.
    Elsewhere,
    /// The link is down, or the first sync runs: `left` bytes to go.
    Syncing { left: Option<u64> },
    /// Link up, no sync under way.
    Done,
}

impl Sync {
    fn of(info: &Info, primary: Ipv4Addr, port: u16) -> Sync {
        let field = |name: &str| info.get(name).map(String::as_str);
        if field("role") != Some("slave")
            || field("master_host") != Some(&primary.to_string())
            || field("master_port") != Some(&port.to_string())
        {
            return Sync::Elsewhere;
        }
        if field("master_link_status") == Some("up")
            && field("master_sync_in_progress") == Some("0")
        {
            return Sync::Done;
        }
        Sync::Syncing {
            left: field("master_sync_left_bytes").and_then(|b| b.parse().ok()),
        }
    }
}

/// The primary answers with the pair's password and keeps its data on
/// disk (RDB snapshots or AOF).
fn check_primary(source: &Server) -> Result<()> {
    let pong = source.command(&["PING"]).with_context(|| {
        format!(
            "the primary's Redis at {}:{} does not take the pair's password; nothing was \
             changed here. Run cluster_enter_primary_mode on the primary (seed step 4), with \
             the same redis_password",
            source.host, source.port
        )
    })?;
    if pong != "PONG" {
        bail!("the primary's Redis answered {pong:?} to PING");
    }
    let save = source.command(&["CONFIG", "GET", "save"])?;
    let appendonly = source.command(&["CONFIG", "GET", "appendonly"])?;
    if !persistent(&save, &appendonly) {
        bail!(
            "the primary's Redis keeps nothing on disk (save is empty, appendonly is no): if it \
             restarts, it comes back empty and this replica copies the empty set. Turn on RDB \
             snapshots (save) or AOF (appendonly yes) on the primary; nothing was changed here"
        );
    }
    Ok(())
}

/// Whether `CONFIG GET save` and `CONFIG GET appendonly` (two lines each:
/// name, value) say the data reaches the disk.
fn persistent(save: &str, appendonly: &str) -> bool {
    let value = |reply: &str| reply.lines().nth(1).unwrap_or("").trim().to_string();
    !value(save).is_empty() || value(appendonly) == "yes"
}

/// What the first sync replaces on this host, read before it.
struct Replaced {
    keys: Option<u64>,
    used_memory: Option<u64>,
}

impl Replaced {
    fn read(local: &Server) -> Replaced {
        // This host's Redis may not take the pair's password yet.
        let open = Server {
            password: None,
            ..local.clone()
        };
        let ask = |server: &Server, args: &[&str]| server.command(args).ok();
        let keys = ask(local, &["DBSIZE"])
            .or_else(|| ask(&open, &["DBSIZE"]))
            .and_then(|n| n.trim().parse().ok());
        let used_memory = local
            .info("memory")
            .or_else(|_| open.info("memory"))
            .ok()
            .and_then(|info| info.get("used_memory")?.parse().ok());
        Replaced { keys, used_memory }
    }

    fn describe(&self) -> String {
        match (self.keys, self.used_memory) {
            (Some(keys), Some(bytes)) => format!("this host's {keys} keys ({bytes} bytes used)"),
            (Some(keys), None) => format!("this host's {keys} keys"),
            _ => "this host's KV data (its size could not be read)".to_string(),
        }
    }

    fn returned(&self, outcome: Outcome) -> Outcome {
        outcome
            .with("replaced_keys", self.keys)
            .with("replaced_used_memory", self.used_memory)
    }
}

/// Waits until the replica's link is up and its first sync done, showing
/// what is left on a terminal.
fn wait_for_sync(
    local: &Server,
    primary: Ipv4Addr,
    port: u16,
    timeout: Seconds,
    ctx: &Context,
) -> Result<()> {
    let mut last = Sync::Elsewhere;
    let mut shown = Instant::now();
    let synced = wait::until(timeout.duration(), Duration::from_millis(250), || {
        last = match local.info("replication") {
            Ok(info) => Sync::of(&info, primary, port),
            Err(_) => Sync::Syncing { left: None }, // restarting, or loading
        };
        if ctx.interactive && shown.elapsed() > Duration::from_secs(2) {
            if let Sync::Syncing { left: Some(left) } = last {
                eprintln!("cluster_kvstore_copy: {left} bytes left to sync");
            }
            shown = Instant::now();
        }
        last == Sync::Done
    });
    if !synced {
        bail!(
            "Redis did not finish its first sync from {primary}:{port} within {} s (last: \
             {last:?}); it keeps trying by itself. See its log, and run this step again to \
             wait for it",
            timeout.get()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(
        Args,
        json!({"primary_address": "10.0.0.1", "redis_password": "a long test password"})
    );

    #[test]
    fn a_replica_is_done_only_when_linked_to_this_primary_and_not_syncing() {
        let primary = Ipv4Addr::new(10, 0, 0, 1);
        let info = |text: &str| redis::parse_info(text);
        let linked = "role:slave\nmaster_host:10.0.0.1\nmaster_port:6379\n\
                      master_link_status:up\nmaster_sync_in_progress:0\n";
        assert_eq!(Sync::of(&info(linked), primary, 6379), Sync::Done);
        assert_eq!(Sync::of(&info(linked), primary, 6380), Sync::Elsewhere);
        assert_eq!(
            Sync::of(&info("role:master\n"), primary, 6379),
            Sync::Elsewhere
        );
        let syncing = "role:slave\nmaster_host:10.0.0.1\nmaster_port:6379\n\
                       master_link_status:down\nmaster_sync_in_progress:1\n\
                       master_sync_left_bytes:1024\n";
        assert_eq!(
            Sync::of(&info(syncing), primary, 6379),
            Sync::Syncing { left: Some(1024) }
        );
    }

    #[test]
    fn a_primary_keeping_nothing_on_disk_is_refused() {
        assert!(persistent(
            "save\n3600 1 300 100 60 10000",
            "appendonly\nno"
        ));
        assert!(persistent("save\n", "appendonly\nyes"));
        assert!(!persistent("save\n", "appendonly\nno"));
    }
}
