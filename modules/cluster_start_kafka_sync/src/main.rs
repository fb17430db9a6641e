//! `cluster_start_kafka_sync`: seed step 10, on the secondary.
//!
//! Runs MirrorMaker 2 in dedicated mode as a systemd unit hapair owns on
//! the secondary, mirroring the primary's Kafka into this host's:
//! - `IdentityReplicationPolicy`: topic names stay the same, so clients
//!   work unchanged after a failover. Only one direction is ever enabled:
//!   with identity names, two would loop.
//! - Group offsets are synced, checkpoints and heartbeats emitted; internal
//!   topics fit a one-broker cluster; new topics are found within the
//!   refresh interval (MirrorMaker's default is ten minutes).
//!
//! This host's Kafka gets the pair listener too (as step 4 gives the
//! primary's): after a failover it serves the pair's clients. MirrorMaker
//! reads the primary through the primary's pair listener, with the pair's
//! login.
//!
//! The primary is checked first. Once the unit runs, the module waits until
//! the primary's heartbeats arrive here (`primary.heartbeats`): mirroring
//! is proven running, not just started. A re-run with the same settings
//! and the unit running changes nothing and restarts nothing.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hapair_core::account::Account;
use hapair_core::files::{self, FilePlan, Owner};
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::kafka::{self, Login, PairKafka, Tools};
use hapair_core::protocol::Seconds;
use hapair_core::services::{self, Unit};
use hapair_core::{net, protocol, wait, Action, Context, Outcome, Plan, Secret, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "cluster_start_kafka_sync",
    doc: include_str!("../cluster_start_kafka_sync.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    primary_address: String,
    /// This host's address on the pair's network (default: the one it
    /// reaches the primary from).
    address: Option<String>,
    #[serde(default = "kafka::default_user")]
    kafka_user: String,
    kafka_password: Secret,
    /// The pair listener's port, the same on both hosts.
    #[serde(default = "kafka::default_pair_port")]
    kafka_pair_port: u16,
    #[serde(default = "kafka::default_config")]
    kafka_config: PathBuf,
    #[serde(default = "kafka::default_unit")]
    kafka_unit: String,
    /// The topics to mirror (a Java regex).
    #[serde(default = "default_pattern")]
    topics: String,
    /// The consumer groups whose offsets are synced (a Java regex).
    #[serde(default = "default_pattern")]
    groups: String,
    /// How often MirrorMaker looks for new topics and groups, and syncs
    /// group offsets.
    #[serde(default = "default_refresh_interval")]
    refresh_interval: Seconds,
    #[serde(default = "kafka::default_port")]
    kafka_port: u16,
    #[serde(default = "kafka::default_home")]
    kafka_home: PathBuf,
    /// The account Kafka, its tools and MirrorMaker run as.
    #[serde(default = "kafka::default_run_as")]
    run_as: String,
    #[serde(default = "default_heap")]
    heap: String,
    /// Seconds to wait for the primary's heartbeats to arrive here.
    #[serde(default = "default_start_timeout")]
    start_timeout: Seconds,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
}

fn default_pattern() -> String {
    ".*".into()
}
fn default_refresh_interval() -> Seconds {
    Seconds::new(30)
}
fn default_heap() -> String {
    "256m".into()
}
fn default_start_timeout() -> Seconds {
    Seconds::new(300)
}

/// The unit hapair owns, and its configuration, in root's directory.
const UNIT: &str = kafka::MIRRORMAKER_UNIT;
const CONFIG: &str = kafka::MIRRORMAKER_CONFIG;
/// MirrorMaker's names for the two clusters.
const SOURCE: &str = kafka::MIRRORMAKER_SOURCE;
const TARGET: &str = kafka::MIRRORMAKER_TARGET;

fn main() -> ExitCode {
    protocol::run(&SPEC, cluster_start_kafka_sync)
}

fn cluster_start_kafka_sync(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let primary = instance::parse_ipv4_str("primary_address", &args.primary_address)?;
    let address = match &args.address {
        Some(a) => instance::parse_ipv4_str("address", a)?,
        None => net::source_address_for(primary)?,
    };
    hapair_core::account::check_name(&args.run_as)?;
    let heap = check_heap(&args.heap)?;
    let home = files::clean_path("kafka_home", &args.kafka_home)?;
    let kafka = PairKafka {
        config: args.kafka_config.clone(),
        unit: Unit::new(&args.kafka_unit),
        port: args.kafka_port,
        address,
        pair_port: args.kafka_pair_port,
        login: Login::new(&args.kafka_user, &args.kafka_password)?,
        tools: Tools {
            home: home.clone(),
            run_as: args.run_as.clone(),
        },
    };
    let unit = Unit::new(UNIT);
    let mut files = FilePlan::default();
    kafka.plan(&mut files)?;
    let properties = mirrormaker_properties(&args, primary, &kafka.login)?;
    let kafka_group = Account::lookup(&args.run_as)?
        .with_context(|| format!("Kafka's account {} does not exist", args.run_as))?
        .gid;
    // It holds the pair's login: root's, read by Kafka's group. Its diff
    // masks the login's line.
    files.file(
        Path::new(CONFIG),
        |_| properties,
        0o640,
        Some(Owner {
            uid: 0,
            gid: kafka_group,
        }),
    )?;
    files.file(
        &unit.file(),
        |_| unit_text(&home, &args.run_as, heap),
        0o644,
        None,
    )?;

    let local = format!("127.0.0.1:{}", args.kafka_port);
    let active = unit.is_active()?;
    let login_works = kafka.login_works(&files)?;
    let unchanged = format!(
        "MirrorMaker 2 already mirrors {primary}:{} into this host's Kafka",
        args.kafka_pair_port
    );
    if files.changes.is_empty() && login_works && active && unit.is_enabled()? {
        return Ok(Outcome::unchanged(unchanged).with("unit", UNIT));
    }

    // Mirrored records are appended to this host's topics of the same name.
    if InstanceConfig::load(&args.instance_config)?.is_protected() {
        bail!(
            "this host is a protected instance: MirrorMaker would write into its Kafka topics. {}",
            instance::UNPROTECT_HINT
        );
    }
    // The primary first, through its pair listener with the pair's login.
    let source = format!("{primary}:{}", args.kafka_pair_port);
    let refused = format!(
        "the primary's Kafka at {source} does not let the pair's login in; nothing was changed \
         here. Check that it runs with the pair listener and the same kafka_password (seed step 4)"
    );
    if !kafka::logs_in(&source, &kafka.login).with_context(|| refused.clone())? {
        bail!(refused);
    }

    let mut plan = Plan::new(files);
    if !login_works {
        plan.push(Change::KafkaLogin);
    }
    plan.push(Change::StartMirrorMaker { source });
    let outcome = plan.run(ctx, unchanged, |plan, _| {
        let files = &plan.files;
        files.apply()?;
        kafka.apply(files, login_works)?;
        if files.changes(&unit.file()) {
            services::daemon_reload()?;
        }
        unit.enable()?;
        // A changed configuration, or a unit that is down.
        if !files.changes.is_empty() || !active {
            unit.restart()?;
        }
        wait_for_heartbeats(&local, &unit, args.start_timeout)?;
        Ok(vec!["the primary's heartbeats arrive here".into()])
    })?;
    Ok(outcome.with("unit", UNIT).with("config", CONFIG))
}

/// Step 10's changes besides its files.
enum Change {
    /// Set the pair's login on this host's Kafka (and prove it).
    KafkaLogin,
    /// Run MirrorMaker 2, reading the primary at `source`.
    StartMirrorMaker { source: String },
}

impl Action for Change {
    fn describe(&self) -> String {
        match self {
            Change::KafkaLogin => "set the pair's Kafka login".into(),
            Change::StartMirrorMaker { source } => {
                format!("start MirrorMaker 2 ({UNIT}), mirroring {source} into this host's Kafka")
            }
        }
    }
}

/// The heap, as `-Xmx` takes it: digits and a unit (m or g).
fn check_heap(heap: &str) -> Result<&str> {
    let digits = heap.trim_end_matches(['m', 'g', 'M', 'G']);
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "heap takes a size such as 256m or 1g, not {:?}",
            protocol::excerpt(heap)
        );
    }
    Ok(heap)
}

/// MirrorMaker 2's configuration: one direction only, identity names, and
/// replication factors of 1 for a one-broker cluster.
fn mirrormaker_properties(args: &Args, primary: Ipv4Addr, login: &Login) -> Result<String> {
    // The primary's heartbeats are always mirrored: they prove the flow.
    let topics = kafka::property_value("topics", &format!("heartbeats|{}", args.topics))?;
    let groups = kafka::property_value("groups", &args.groups)?;
    let refresh = args.refresh_interval.get();
    let port = args.kafka_port;
    let pair_port = args.kafka_pair_port;
    let source_login = login.client_properties(&format!("{SOURCE}."))?;
    Ok(format!(
        "# Written by hapair's cluster_start_kafka_sync: changes here are overwritten.\n\
         clusters = {SOURCE}, {TARGET}\n\
         {SOURCE}.bootstrap.servers = {primary}:{pair_port}\n\
         {source_login}\
         {TARGET}.bootstrap.servers = 127.0.0.1:{port}\n\
         # One direction only: with identity names, two would loop.\n\
         {SOURCE}->{TARGET}.enabled = true\n\
         {TARGET}->{SOURCE}.enabled = false\n\
         replication.policy.class = org.apache.kafka.connect.mirror.IdentityReplicationPolicy\n\
         {SOURCE}->{TARGET}.topics = {topics}\n\
         {SOURCE}->{TARGET}.groups = {groups}\n\
         sync.group.offsets.enabled = true\n\
         sync.group.offsets.interval.seconds = {refresh}\n\
         emit.checkpoints.enabled = true\n\
         emit.checkpoints.interval.seconds = {refresh}\n\
         emit.heartbeats.enabled = true\n\
         refresh.topics.interval.seconds = {refresh}\n\
         refresh.groups.interval.seconds = {refresh}\n\
         # How often the mirrored positions are committed (60 s by default):\n\
         # the monitor's lag and a planned failover's catch-up read them.\n\
         offset.flush.interval.ms = 2000\n\
         # A one-broker cluster on each side.\n\
         replication.factor = 1\n\
         checkpoints.topic.replication.factor = 1\n\
         heartbeats.topic.replication.factor = 1\n\
         offset-syncs.topic.replication.factor = 1\n\
         offset.storage.replication.factor = 1\n\
         status.storage.replication.factor = 1\n\
         config.storage.replication.factor = 1\n"
    ))
}

fn unit_text(home: &Path, run_as: &str, heap: &str) -> String {
    format!(
        "# Written by hapair's cluster_start_kafka_sync: changes here are overwritten.\n\
         [Unit]\n\
         Description=hapair: MirrorMaker 2, mirroring the primary's Kafka into this host's\n\
         After=network-online.target kafka.service\n\
         \n\
         [Service]\n\
         Type=simple\n\
         User={run_as}\n\
         Environment=\"KAFKA_HEAP_OPTS=-Xms64m -Xmx{heap}\"\n\
         ExecStart={} {CONFIG}\n\
         SuccessExitStatus=143\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        home.join("bin/connect-mirror-maker.sh").display()
    )
}

/// Waits until the primary's heartbeats arrive here: MirrorMaker reads the
/// primary and writes this host's Kafka.
fn wait_for_heartbeats(local: &str, unit: &Unit, timeout: Seconds) -> Result<()> {
    let topic = format!("{SOURCE}.heartbeats");
    let arrived = wait::until(timeout.duration(), Duration::from_secs(3), || {
        kafka::end_offsets(local, &topic).unwrap_or(0) > 0
    });
    if !arrived {
        bail!(
            "MirrorMaker 2 ({unit}) started, but no heartbeat of the primary arrived here \
             ({topic}) within {} s: see journalctl -u {unit}",
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
        json!({"primary_address": "10.0.0.1", "kafka_password": "a long test password"})
    );

    fn login() -> Login {
        Login::new("hapair", &Secret::new("a \"long\" test\\password")).unwrap()
    }

    #[test]
    fn only_one_direction_is_enabled_with_identity_names() {
        let args: Args = serde_json::from_value(
            json!({"primary_address": "10.0.0.1", "topics": r"orders\..*",
                                          "kafka_password": "a long test password"}),
        )
        .unwrap();
        let text = mirrormaker_properties(&args, Ipv4Addr::new(10, 0, 0, 1), &login()).unwrap();
        assert!(text.contains("primary->secondary.enabled = true\n"));
        assert!(text.contains("secondary->primary.enabled = false\n"));
        assert!(text.contains("IdentityReplicationPolicy\n"));
        assert!(text.contains(r"primary->secondary.topics = heartbeats|orders\\..*"));
        assert!(text.contains("refresh.topics.interval.seconds = 30\n"));
        // The primary is read through its pair listener, logged in; the
        // password quoted for JAAS, then for the properties file.
        assert!(text.contains("primary.bootstrap.servers = 10.0.0.1:9094\n"));
        assert!(text.contains("primary.security.protocol = SASL_PLAINTEXT\n"));
        assert!(
            text.contains(r#"password="a \\"long\\" test\\\\password";"#),
            "{text}"
        );
        assert!(!text.contains("secondary.security.protocol"));
        let bad: Args = serde_json::from_value(
            json!({"primary_address": "10.0.0.1", "topics": "x\nsecondary->primary.enabled = true",
                   "kafka_password": "a long test password"}),
        )
        .unwrap();
        assert!(mirrormaker_properties(&bad, Ipv4Addr::new(10, 0, 0, 1), &login()).is_err());
        assert!(check_heap("256m").is_ok() && check_heap("1g; rm").is_err());
    }
}
