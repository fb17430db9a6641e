//! Kafka: the one place that knows its configuration file, a Java
//! properties file without includes, edited in place one key at a time,
//! and the pair's listener on it.
//!
//! The pair listener: after a failover the secondary serves clients, so
//! each host's Kafka listens on the pair's address, and there it requires
//! SASL SCRAM-SHA-512 with the pair's credential. The loopback listener
//! stays as it is for this host's own clients and tools, but a plaintext
//! listener that was open to every address is narrowed to loopback:
//! otherwise any host on the network reads and writes every topic. Kafka
//! refuses two IPv4 listeners on one port, so the pair listener has a port
//! of its own (9094 by default).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::command::{Command, Output};
use crate::files::{self, FilePlan, Owner};
use crate::secret::Secret;
use crate::services::Unit;

mod wire;

// The tarball's layout under /opt/kafka, for `#[serde(default = "...")]`.
pub fn default_home() -> PathBuf {
    "/opt/kafka".into()
}
pub fn default_config() -> PathBuf {
    "/opt/kafka/config/server.properties".into()
}
pub fn default_port() -> u16 {
    9092
}
pub fn default_unit() -> String {
    "kafka".into()
}
pub fn default_pair_port() -> u16 {
    9094
}
pub fn default_user() -> String {
    "hapair".into()
}
pub fn default_run_as() -> String {
    "kafka".into()
}

/// The unit that runs MirrorMaker 2 on the secondary (seed step 10).
pub const MIRRORMAKER_UNIT: &str = "hapair-mirrormaker";
/// MirrorMaker's configuration, in root's directory.
pub const MIRRORMAKER_CONFIG: &str = "/etc/hapair/mirrormaker.properties";
/// MirrorMaker's name for the primary's cluster (the source): its
/// heartbeats arrive as `primary.heartbeats`, and it keeps the source
/// offsets it has mirrored in `mm2-offsets.primary.internal`.
pub const MIRRORMAKER_SOURCE: &str = "primary";
/// MirrorMaker's name for this host's cluster, the target.
pub const MIRRORMAKER_TARGET: &str = "secondary";

/// The pair listener's name in `listeners`.
pub const PAIR_LISTENER: &str = "PAIR";
/// The one SASL mechanism of the pair listener.
pub const MECHANISM: &str = "SCRAM-SHA-512";

/// This host's Kafka as one end of the pair: its files, its unit, and the
/// pair listener with the pair's login. Seed step 4 sets it up on the
/// primary, step 10 on the secondary.
#[derive(Debug, Clone)]
pub struct PairKafka {
    pub config: PathBuf,
    pub unit: Unit,
    /// The loopback listener's port, which hapair's tools use.
    pub port: u16,
    pub address: Ipv4Addr,
    pub pair_port: u16,
    pub login: Login,
    pub tools: Tools,
}

impl PairKafka {
    /// The pair listener, as a client's bootstrap (`host:port`).
    pub fn pair_bootstrap(&self) -> String {
        format!("{}:{}", self.address, self.pair_port)
    }

    fn local_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Plans server.properties with the pair listener.
    pub fn plan(&self, files: &mut FilePlan) -> Result<()> {
        let state = files::existing(&self.config)?;
        files.try_file(
            &self.config,
            |text| with_pair_listener(text, self.address, self.pair_port),
            state.config_mode(),
            Some(state.owner),
        )
    }

    /// Whether the pair listener already lets the pair's login in. Asked
    /// only when nothing is planned for Kafka: a listener still to be set
    /// up has nothing to ask, and its credential is (re)set with it.
    pub fn login_works(&self, files: &FilePlan) -> Result<bool> {
        if files.changes(&self.config) || !self.unit.is_active()? {
            return Ok(false);
        }
        logs_in(&self.pair_bootstrap(), &self.login)
    }

    /// After the files are written: restarts Kafka if its configuration
    /// changed (true), then sets the credential unless `login_works`, and
    /// proves it by logging in through the pair listener.
    pub fn apply(&self, files: &FilePlan, login_works: bool) -> Result<bool> {
        let restart = files.changes(&self.config);
        if restart {
            self.unit.restart()?;
            self.unit.wait_for_port(self.address, self.pair_port)?;
            self.unit.wait_for_port(Ipv4Addr::LOCALHOST, self.port)?;
        }
        if !login_works {
            set_credential(&self.local_bootstrap(), &self.login)?;
            // The broker learns the credential from its metadata log.
            let works = crate::wait::until(Duration::from_secs(30), Duration::from_secs(1), || {
                logs_in(&self.pair_bootstrap(), &self.login).unwrap_or(false)
            });
            if !works {
                bail!(
                    "the pair's Kafka credential was set, but the pair listener {} still refuses \
                     it: see journalctl -u {}",
                    self.pair_bootstrap(),
                    self.unit
                );
            }
        }
        Ok(restart)
    }
}

/// A tool's output lines, trimmed, the empty ones left out.
fn nonempty_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether the pair listener at `bootstrap` (`ip:port`) lets `login` in:
/// false when it refuses the credential, an error when it does not answer.
pub fn logs_in(bootstrap: &str, login: &Login) -> Result<bool> {
    wire::logs_in(address(bootstrap)?, login)
}

/// Sets `login`'s SCRAM credential in the cluster's metadata, through the
/// loopback listener at `local`.
pub fn set_credential(local: &str, login: &Login) -> Result<()> {
    wire::set_credential(address(local)?, login, SCRAM_ITERATIONS)
}

/// Each partition's end offset at `bootstrap`, logged in with `login` when
/// given.
pub fn partition_end_offsets(bootstrap: &str, login: Option<&Login>) -> Result<PartitionOffsets> {
    wire::partition_end_offsets(address(bootstrap)?, login, None)
}

/// Every topic's records at `bootstrap` (the sum of its partitions' end
/// offsets), logged in with `login` when given.
pub fn all_end_offsets(
    bootstrap: &str,
    login: Option<&Login>,
) -> Result<std::collections::BTreeMap<String, u64>> {
    Ok(topic_sums(&partition_end_offsets(bootstrap, login)?))
}

/// How many records `topic` holds at `bootstrap` (a loopback listener):
/// the sum of its partitions' end offsets (0 when it does not exist).
pub fn end_offsets(bootstrap: &str, topic: &str) -> Result<u64> {
    let partitions = wire::partition_end_offsets(address(bootstrap)?, None, Some(topic))?;
    Ok(topic_sums(&partitions).remove(topic).unwrap_or(0))
}

/// A bootstrap server (`ip:port`) as an address to connect to.
fn address(bootstrap: &str) -> Result<std::net::SocketAddr> {
    bootstrap
        .parse()
        .with_context(|| format!("{bootstrap:?} is not an address and port"))
}

/// Kafka's default for SCRAM-SHA-512.
const SCRAM_ITERATIONS: u32 = 8192;

/// Root's runtime directory, where a tool's login is handed over for the
/// length of one call: not in /etc/hapair, where a transient file would
/// show as a change of the host's configuration (and outlive a crash past
/// a reboot).
const PRIVATE_DIR: &str = crate::lock::LOCK_DIR;

/// A tool's client settings: the login, and timeouts short enough that a
/// tool pointed at a listener that does not answer says so soon.
fn client_config_text(login: &Login) -> Result<String> {
    Ok(format!(
        "{}request.timeout.ms = 15000\ndefault.api.timeout.ms = 20000\n",
        login.client_properties("")?
    ))
}

/// A SCRAM login to a pair listener: the pair's account and password.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: Secret,
}

impl Login {
    pub fn new(user: &str, password: &Secret) -> Result<Login> {
        // SCRAM escapes `,` and `=` in names; a plain name needs neither.
        let plain = user.len() <= 64
            && user.starts_with(|c: char| c.is_ascii_alphabetic())
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !plain {
            bail!(
                "kafka_user takes letters, digits, _ and - (starting with a letter), not {:?}",
                crate::protocol::excerpt(user)
            );
        }
        Ok(Login {
            user: user.to_string(),
            password: password.clone(),
        })
    }

    /// A client's settings for a pair listener, each key after `prefix`
    /// (`primary.` for MirrorMaker's source cluster, `` for a tool).
    pub fn client_properties(&self, prefix: &str) -> Result<String> {
        let jaas = format!(
            "org.apache.kafka.common.security.scram.ScramLoginModule required username={} password={};",
            jaas_quote(&self.user),
            jaas_quote(self.password.expose())
        );
        Ok(format!(
            "{prefix}security.protocol = SASL_PLAINTEXT\n\
             {prefix}sasl.mechanism = {MECHANISM}\n\
             {prefix}sasl.jaas.config = {}\n",
            property_value("sasl.jaas.config", &jaas)?
        ))
    }
}

/// `value` as a quoted JAAS option value: in double quotes, `\` and `"`
/// escaped (Kafka's JAAS parser reads Java's string escapes).
pub fn jaas_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Kafka's command-line tools, from its home (`bin/*.sh`), run as Kafka's
/// own account: its home is often that account's to write, and root never
/// runs a program from there.
#[derive(Debug, Clone)]
pub struct Tools {
    pub home: PathBuf,
    pub run_as: String,
}

impl Tools {
    /// Kafka's tools under `home`, run as `run_as`: both checked, since
    /// root runs them (a clean absolute path, a plain account name).
    pub fn new(home: &Path, run_as: &str) -> Result<Tools> {
        crate::account::check_name(run_as)?;
        Ok(Tools {
            home: files::clean_path("kafka_home", home)?,
            run_as: run_as.to_string(),
        })
    }

    fn tool(&self, name: &str) -> Command {
        Command::new("runuser")
            .args(["-u", &self.run_as, "--", "env", "KAFKA_HEAP_OPTS=-Xmx128m"])
            .arg(self.home.join("bin").join(name))
    }

    /// Runs the client tool `name` against `bootstrap` with `args`, logged
    /// in with `login` when given (its settings in a private file, for
    /// `--command-config`).
    fn run_client(
        &self,
        name: &str,
        bootstrap: &str,
        args: &[&str],
        login: Option<&Login>,
    ) -> Result<Output> {
        let run = |config: Option<&Path>| {
            let mut tool = self
                .tool(name)
                .args(["--bootstrap-server", bootstrap])
                .args(args);
            if let Some(config) = config {
                tool = tool.arg("--command-config").arg(config);
            }
            tool.run()
        };
        match login {
            Some(login) => self.with_private_file(&client_config_text(login)?, |f| run(Some(f))),
            None => run(None),
        }
    }

    /// The topics of the cluster at `bootstrap` (`host:port`), logged in
    /// with `login` when given: reaching it proves it answers and its
    /// metadata reads.
    pub fn topics(&self, bootstrap: &str, login: Option<&Login>) -> Result<Vec<String>> {
        let out = self.run_client("kafka-topics.sh", bootstrap, &["--list"], login)?;
        Ok(nonempty_lines(&out.stdout))
    }

    /// The topics at `bootstrap` whose whole name matches `pattern` (a Java
    /// regex, read by Kafka itself as MirrorMaker reads its `topics`),
    /// internal topics left out.
    pub fn topics_matching(
        &self,
        bootstrap: &str,
        login: Option<&Login>,
        pattern: &str,
    ) -> Result<Vec<String>> {
        let args = ["--list", "--exclude-internal", "--topic", pattern];
        let out = self.run_client("kafka-topics.sh", bootstrap, &args, login)?;
        Ok(nonempty_lines(&out.stdout))
    }

    /// The source offsets MirrorMaker has committed for `source`'s
    /// partitions, from its offsets topic on the cluster at `bootstrap`
    /// (the secondary's): read whole, the last record of each partition
    /// wins. The reader stops 1 s after the last record: one stopped early
    /// sees older positions, which only ever reads as more to mirror.
    pub fn mirrored_offsets(&self, bootstrap: &str, source: &str) -> Result<PartitionOffsets> {
        let topic = format!("mm2-offsets.{source}.internal");
        let out = self.run_client(
            "kafka-console-consumer.sh",
            bootstrap,
            &[
                "--topic",
                &topic,
                "--from-beginning",
                "--timeout-ms",
                "1000",
                "--property",
                "print.key=true",
                "--property",
                "key.separator=\t",
                // Never created by reading it: MirrorMaker makes it
                // compacted, and refuses one a reader made first.
                "--consumer-property",
                "allow.auto.create.topics=false",
            ],
            None,
        )?;
        Ok(parse_mirrored_offsets(&out.stdout, source))
    }

    /// The cluster-wide default of the broker setting `key`, as set
    /// dynamically through the loopback listener at `local` (`None` when
    /// not set that way).
    pub fn broker_default(&self, local: &str, key: &str) -> Result<Option<String>> {
        let out = self
            .tool("kafka-configs.sh")
            .args(["--bootstrap-server", local, "--describe"])
            .args(["--entity-type", "brokers", "--entity-default"])
            .run()?;
        Ok(parse_broker_default(&out.stdout, key))
    }

    /// Sets (`Some`) or removes (`None`) the cluster-wide default of the
    /// broker setting `key`, through the loopback listener at `local`.
    /// Brokers apply it at once, without a restart.
    pub fn set_broker_default(&self, local: &str, key: &str, value: Option<&str>) -> Result<()> {
        let tool = self
            .tool("kafka-configs.sh")
            .args(["--bootstrap-server", local, "--alter"])
            .args(["--entity-type", "brokers", "--entity-default"]);
        match value {
            Some(value) => tool.args(["--add-config", &format!("{key}={value}")]),
            None => tool.args(["--delete-config", key]),
        }
        .run()?;
        Ok(())
    }

    /// Deletes `topics` through the loopback listener at `local`, and
    /// waits until each is gone or, recreated by a producer's request
    /// (`auto.create.topics.enable`), empty.
    pub fn delete_topics(&self, local: &str, topics: &[String]) -> Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        self.tool("kafka-topics.sh")
            .args(["--bootstrap-server", local, "--delete", "--topic"])
            .arg(exact_topics_pattern(topics)?)
            .run()?;
        let gone = crate::wait::until(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis(500),
            || {
                all_end_offsets(local, None)
                    .map(|left| !topics.iter().any(|t| left.get(t).is_some_and(|&n| n > 0)))
                    .unwrap_or(false)
            },
        );
        if !gone {
            bail!("Kafka still holds records of the deleted topics 60 s after their deletion");
        }
        Ok(())
    }

    /// Runs `use_file` on a file holding `text` (a password: never on a
    /// command line) in root's directory, readable by Kafka's group only,
    /// and removed after.
    fn with_private_file<T>(
        &self,
        text: &str,
        use_file: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        let account = crate::account::Account::lookup(&self.run_as)?
            .with_context(|| format!("Kafka's account {} does not exist", self.run_as))?;
        let path = PathBuf::from(format!("{PRIVATE_DIR}/.kafka-login.{}", std::process::id()));
        files::ensure_dir(Path::new(PRIVATE_DIR), 0o755, None)?;
        let reader = Owner {
            uid: 0,
            gid: account.gid,
        };
        files::write_atomic(&path, text.as_bytes(), 0o640, Some(reader))?;
        let result = use_file(&path);
        let removed = std::fs::remove_file(&path);
        let value = result?;
        removed.with_context(|| format!("removing {}", path.display()))?;
        Ok(value)
    }
}

/// The value of `key` among kafka-configs' `--describe` lines for the
/// brokers' defaults (`  key=value sensitive=false synonyms={...}`).
pub fn parse_broker_default(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (name, rest) = line.trim().split_once('=')?;
        (name == key).then(|| rest.split(' ').next().unwrap_or("").to_string())
    })
}

/// A `--topic` pattern (Kafka reads a regular expression) matching exactly
/// `topics`. Topic names hold only letters, digits, `.`, `_` and `-`; any
/// other name is refused rather than quoted.
pub fn exact_topics_pattern(topics: &[String]) -> Result<String> {
    let mut names = Vec::new();
    for topic in topics {
        if topic.is_empty()
            || !topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            bail!("{topic:?} is not a Kafka topic name");
        }
        names.push(topic.replace('.', "\\."));
    }
    Ok(format!("^({})$", names.join("|")))
}

/// Each topic's records: the sum of its partitions' end offsets,
/// saturating.
pub fn topic_sums(partitions: &PartitionOffsets) -> std::collections::BTreeMap<String, u64> {
    let mut topics = std::collections::BTreeMap::new();
    for ((topic, _), offset) in partitions {
        let sum: &mut u64 = topics.entry(topic.clone()).or_default();
        *sum = sum.saturating_add(*offset);
    }
    topics
}

/// An offset per partition: (topic, partition) to offset.
pub type PartitionOffsets = std::collections::BTreeMap<(String, u32), u64>;

/// MirrorMaker's offsets topic as the console consumer prints it: a line
/// per record, `KEY<TAB>VALUE`, where the key names the source partition
/// (`["MirrorSourceConnector",{"cluster":"primary","partition":0,"topic":"t"}]`)
/// and the value the last source offset mirrored (`{"offset":41}`), or
/// `null` when it was forgotten. The last record of a partition wins; other
/// connectors' and clusters' records are left out.
pub fn parse_mirrored_offsets(text: &str, source: &str) -> PartitionOffsets {
    let mut partitions = PartitionOffsets::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('\t') else {
            continue;
        };
        let Ok(serde_json::Value::Array(key)) = serde_json::from_str(key) else {
            continue;
        };
        let (Some(connector), Some(partition)) = (key.first(), key.get(1)) else {
            continue;
        };
        if connector != "MirrorSourceConnector" || partition["cluster"] != source {
            continue;
        }
        let (Some(topic), Some(number)) = (
            partition["topic"].as_str(),
            partition["partition"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok()),
        ) else {
            continue;
        };
        let at = (topic.to_string(), number);
        match serde_json::from_str::<serde_json::Value>(value.trim()) {
            Ok(value) => match value["offset"].as_u64() {
                Some(offset) => {
                    partitions.insert(at, offset);
                }
                None => {
                    partitions.remove(&at);
                }
            },
            Err(_) => continue,
        }
    }
    partitions
}

/// Per topic, the records of `source` not yet mirrored: each partition's
/// end offset past the next one MirrorMaker would read (the one after the
/// offset it committed; from the start when it committed none).
pub fn not_yet_mirrored(
    source: &PartitionOffsets,
    mirrored: &PartitionOffsets,
) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut topics = std::collections::BTreeMap::new();
    for ((topic, partition), end) in source {
        let next = mirrored
            .get(&(topic.clone(), *partition))
            .map_or(0, |committed| committed.saturating_add(1));
        let (records, behind): &mut (u64, u64) = topics.entry(topic.clone()).or_default();
        *records = records.saturating_add(*end);
        *behind = behind.saturating_add(end.saturating_sub(next));
    }
    topics
}

/// The value the last assignment of `key` gives it, as Kafka reads the
/// file (the last one wins), trimmed. Escapes are not undone: the values
/// hapair reads (listener lists, names) hold none.
pub fn property(text: &str, key: &str) -> Option<String> {
    crate::files::config_lines(text)
        .filter(|line| assigns(line, key))
        .last()
        .map(|line| {
            let rest = line.trim_start()[key.len()..].trim_start();
            rest[1..].trim().to_string()
        })
}

/// One entry of `listeners` or `advertised.listeners`: `NAME://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listener {
    name: String,
    host: String,
    port: u16,
}

impl Listener {
    fn parse(entry: &str) -> Result<Listener> {
        let parsed = entry.split_once("://").and_then(|(name, rest)| {
            let (host, port) = rest.rsplit_once(':')?;
            let name_ok =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(v6) => v6
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
                None => host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
            };
            let port = port.parse().ok()?;
            (name_ok && host_ok).then(|| Listener {
                name: name.to_ascii_uppercase(),
                host: host.to_string(),
                port,
            })
        });
        parsed.with_context(|| {
            format!(
                "the listener {:?} is not NAME://host:port",
                crate::protocol::excerpt(entry)
            )
        })
    }

    fn list(value: Option<String>) -> Result<Vec<Listener>> {
        value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(Listener::parse)
            .collect()
    }

    fn render(list: &[Listener]) -> String {
        let entries: Vec<String> = list
            .iter()
            .map(|l| format!("{}://{}:{}", l.name, l.host, l.port))
            .collect();
        entries.join(",")
    }

    /// Whether it accepts connections on `address` (all addresses, or it).
    fn open_to(&self, address: Ipv4Addr) -> bool {
        matches!(self.host.as_str(), "" | "0.0.0.0" | "::" | "[::]")
            || self.host == address.to_string()
    }
}

/// `listener.security.protocol.map` as Kafka reads it: `NAME:PROTOCOL`
/// pairs; without it, each protocol is a listener name of its own.
fn protocol_map(text: &str) -> Vec<(String, String)> {
    match property(text, "listener.security.protocol.map") {
        Some(map) => map
            .split(',')
            .filter_map(|pair| pair.split_once(':'))
            .map(|(n, p)| (n.trim().to_ascii_uppercase(), p.trim().to_ascii_uppercase()))
            .collect(),
        None => ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
            .iter()
            .map(|p| (p.to_string(), p.to_string()))
            .collect(),
    }
}

/// server.properties with the pair listener on `address:port`, SCRAM its
/// only mechanism there, and every plaintext listener that was open to the
/// pair's address (or to all addresses) narrowed to loopback. Controller
/// listeners are left as they are.
pub fn with_pair_listener(text: &str, address: Ipv4Addr, port: u16) -> Result<String> {
    let map = protocol_map(text);
    let controllers: Vec<String> = property(text, "controller.listener.names")
        .unwrap_or_default()
        .split(',')
        .map(|n| n.trim().to_ascii_uppercase())
        .collect();
    let plaintext = |name: &str| map.iter().any(|(n, p)| n == name && p == "PLAINTEXT");
    let narrowed = |l: &Listener| {
        l.name != PAIR_LISTENER
            && !controllers.contains(&l.name)
            && plaintext(&l.name)
            && l.open_to(address)
    };
    let pair = Listener {
        name: PAIR_LISTENER.into(),
        host: address.to_string(),
        port,
    };

    let mut listeners = Listener::list(property(text, "listeners"))?;
    if listeners.is_empty() {
        bail!("listeners is not set: hapair can't tell which listener is Kafka's own");
    }
    let mut narrowed_names = Vec::new();
    for listener in listeners.iter_mut().filter(|l| narrowed(l)) {
        listener.host = "127.0.0.1".into();
        narrowed_names.push(listener.name.clone());
    }
    listeners.retain(|l| l.name != PAIR_LISTENER);
    if let Some(clash) = listeners.iter().find(|l| l.port == port) {
        bail!(
            "the pair listener's port {port} is taken by the listener {}: choose another kafka_pair_port",
            clash.name
        );
    }
    listeners.push(pair.clone());

    // Advertised: as before, with narrowed listeners at loopback and the
    // pair listener at the pair's address. Never a controller listener.
    let advertised = match property(text, "advertised.listeners") {
        Some(value) => Listener::list(Some(value))?,
        None => listeners.clone(),
    };
    let mut advertised: Vec<Listener> = advertised
        .into_iter()
        .filter(|l| l.name != PAIR_LISTENER && !controllers.contains(&l.name))
        .map(|mut l| {
            if narrowed_names.contains(&l.name) {
                l.host = "127.0.0.1".into();
            }
            l
        })
        .collect();
    advertised.push(pair);

    let mut map: Vec<(String, String)> = map
        .into_iter()
        .filter(|(n, _)| n != PAIR_LISTENER)
        .collect();
    map.push((PAIR_LISTENER.into(), "SASL_PLAINTEXT".into()));
    let map: Vec<String> = map.iter().map(|(n, p)| format!("{n}:{p}")).collect();

    let prefix = format!("listener.name.{}", PAIR_LISTENER.to_ascii_lowercase());
    let mechanism = MECHANISM.to_ascii_lowercase();
    let mut text = with_property(text, "listeners", &Listener::render(&listeners));
    text = with_property(
        &text,
        "advertised.listeners",
        &Listener::render(&advertised),
    );
    text = with_property(&text, "listener.security.protocol.map", &map.join(","));
    text = with_property(
        &text,
        &format!("{prefix}.sasl.enabled.mechanisms"),
        MECHANISM,
    );
    // The broker side of SCRAM needs a login module, and no credential:
    // the credentials are in the cluster's metadata.
    text = with_property(
        &text,
        &format!("{prefix}.{mechanism}.sasl.jaas.config"),
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    );
    Ok(text)
}

/// `value` as a Java properties file reads it back (Properties.load):
/// backslashes doubled (they are escapes there: a regex `a\.b` would lose
/// its backslash), a leading space escaped. A control character, which
/// would end the line or worse, is refused.
pub fn property_value(what: &str, value: &str) -> Result<String> {
    if value.chars().any(char::is_control) {
        bail!("{what} must be one line, without control characters");
    }
    let escaped = value.replace('\\', "\\\\");
    Ok(match escaped.strip_prefix(' ') {
        Some(rest) => format!("\\ {rest}"),
        None => escaped,
    })
}

/// Whether MirrorMaker leaves `topic` out whatever its `topics` say: its
/// default `topics.exclude` (`.*[\-\.]internal`, `.*\.replica`, `__.*`),
/// which keeps its own topics, such as the offset syncs it writes into the
/// source, from being mirrored.
pub fn excluded_from_mirroring(topic: &str) -> bool {
    topic.ends_with(".internal")
        || topic.ends_with("-internal")
        || topic.ends_with(".replica")
        || topic.starts_with("__")
}

/// Whether `topic` holds MirrorMaker's heartbeats (`heartbeats`, and
/// `primary.heartbeats` ... as mirrored ones are named): its own proof of
/// the flow, not the application's records.
pub fn is_heartbeats(topic: &str) -> bool {
    topic == "heartbeats" || topic.ends_with(".heartbeats")
}

/// A value [`property_value`] wrote, read back as Java does: each
/// backslash escapes the character after it.
pub fn property_unescaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Whether `line` assigns `key` (`key=value`, `key = value`, `key: value`).
fn assigns(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
}

/// A properties file with `key=value` set: the first assignment of the key
/// is replaced (later ones, which Java would let win, are dropped), or one
/// is appended. Every other line stays as it is.
pub fn with_property(text: &str, key: &str, value: &str) -> String {
    let wanted = format!("{key}={value}");
    let mut done = false;
    let mut lines: Vec<&str> = Vec::new();
    for line in crate::files::config_lines(text) {
        if assigns(line, key) {
            if !done {
                lines.push(&wanted);
                done = true;
            }
        } else {
            lines.push(line);
        }
    }
    if !done {
        lines.push(&wanted);
    }
    crate::files::join_lines(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_values_read_back_as_written() {
        for value in [r"heartbeats|orders\..*", " lead", r"a\\b", "plain"] {
            assert_eq!(
                property_unescaped(&property_value("x", value).unwrap()),
                value
            );
        }
    }

    #[test]
    fn broker_defaults_and_topic_patterns() {
        let text = "Default configs for brokers in the cluster are:\n  message.max.bytes=0 \
                    sensitive=false synonyms={DYNAMIC_DEFAULT_BROKER_CONFIG:message.max.bytes=0}\n";
        assert_eq!(
            parse_broker_default(text, "message.max.bytes").as_deref(),
            Some("0")
        );
        assert_eq!(parse_broker_default(text, "max.message"), None);
        let topics = vec!["a.b".to_string(), "c_d-1".to_string()];
        assert_eq!(exact_topics_pattern(&topics).unwrap(), "^(a\\.b|c_d-1)$");
        assert!(exact_topics_pattern(&["a|.*".to_string()]).is_err());
        assert!(exact_topics_pattern(&[String::new()]).is_err());
    }

    #[test]
    fn property_values_read_back_as_given() {
        assert_eq!(property_value("t", r"orders\..*").unwrap(), r"orders\\..*");
        assert_eq!(property_value("t", " x").unwrap(), r"\ x");
        assert!(property_value("t", "a\nb=c").is_err());
    }

    const FLEET: &str = "process.roles=broker,controller\n\
        controller.listener.names=CONTROLLER\n\
        listeners=PLAINTEXT://:9092,CONTROLLER://localhost:9093\n\
        advertised.listeners=PLAINTEXT://localhost:9092\n\
        listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n";

    #[test]
    fn the_pair_listener_is_added_and_plaintext_narrowed_to_loopback() {
        let address = Ipv4Addr::new(10, 0, 0, 1);
        let text = with_pair_listener(FLEET, address, 9094).unwrap();
        assert_eq!(
            property(&text, "listeners").unwrap(),
            "PLAINTEXT://127.0.0.1:9092,CONTROLLER://localhost:9093,PAIR://10.0.0.1:9094"
        );
        assert_eq!(
            property(&text, "advertised.listeners").unwrap(),
            "PLAINTEXT://127.0.0.1:9092,PAIR://10.0.0.1:9094"
        );
        assert_eq!(
            property(&text, "listener.security.protocol.map").unwrap(),
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PAIR:SASL_PLAINTEXT"
        );
        assert_eq!(
            property(&text, "listener.name.pair.sasl.enabled.mechanisms").unwrap(),
            "SCRAM-SHA-512"
        );
        assert!(text.contains("listener.name.pair.scram-sha-512.sasl.jaas.config="));
        // Once is enough: a second pass changes nothing.
        assert_eq!(with_pair_listener(&text, address, 9094).unwrap(), text);
        // A new address or port replaces the pair listener.
        let moved = with_pair_listener(&text, Ipv4Addr::new(10, 0, 0, 9), 9095).unwrap();
        assert_eq!(
            property(&moved, "listeners").unwrap(),
            "PLAINTEXT://127.0.0.1:9092,CONTROLLER://localhost:9093,PAIR://10.0.0.9:9095"
        );
    }

    #[test]
    fn what_the_operator_set_up_otherwise_stays() {
        let address = Ipv4Addr::new(10, 0, 0, 1);
        // A TLS listener on another network, and a plaintext one on
        // another address: not the pair's, left alone.
        let text = "listeners=SSL://192.168.1.5:9093,PLAINTEXT://192.168.1.5:9092\n";
        let out = with_pair_listener(text, address, 9094).unwrap();
        assert_eq!(
            property(&out, "listeners").unwrap(),
            "SSL://192.168.1.5:9093,PLAINTEXT://192.168.1.5:9092,PAIR://10.0.0.1:9094"
        );
        // Without a map, the protocols' own names are the map, and it is
        // written out with the pair listener's.
        assert!(property(&out, "listener.security.protocol.map")
            .unwrap()
            .ends_with("SASL_SSL:SASL_SSL,PAIR:SASL_PLAINTEXT"));
        // A plaintext listener on the pair's address itself is narrowed.
        let on_pair =
            with_pair_listener("listeners=PLAINTEXT://10.0.0.1:9092\n", address, 9094).unwrap();
        assert!(property(&on_pair, "listeners")
            .unwrap()
            .starts_with("PLAINTEXT://127.0.0.1:9092,"));
    }

    #[test]
    fn a_clash_or_an_unreadable_listener_is_refused() {
        let address = Ipv4Addr::new(10, 0, 0, 1);
        let err = with_pair_listener(FLEET, address, 9093).unwrap_err();
        assert!(format!("{err:#}").contains("kafka_pair_port"), "{err:#}");
        assert!(with_pair_listener("listeners=nonsense\n", address, 9094).is_err());
        assert!(with_pair_listener("a=1\n", address, 9094).is_err());
    }

    #[test]
    fn a_login_is_quoted_for_jaas_then_for_the_file() {
        assert_eq!(jaas_quote(r#"a"b\c"#), r#""a\"b\\c""#);
        let login = Login::new("hapair", &Secret::new(r#"pass "word"\x"#)).unwrap();
        let text = login.client_properties("primary.").unwrap();
        assert!(text.contains("primary.security.protocol = SASL_PLAINTEXT\n"));
        assert!(text.contains(r#"username="hapair""#));
        assert!(
            text.contains(r#"password="pass \\"word\\"\\\\x";"#),
            "{text}"
        );
        for bad in ["", "1abc", "a,b", "a=b", "a b"] {
            assert!(
                Login::new(bad, &Secret::new("long enough password")).is_err(),
                "{bad}"
            );
        }
    }

    /// Partition offsets from `(topic, partition, offset)`.
    fn partitions(entries: &[(&str, u32, u64)]) -> PartitionOffsets {
        entries
            .iter()
            .map(|&(topic, partition, offset)| ((topic.to_string(), partition), offset))
            .collect()
    }

    #[test]
    fn offsets_are_summed_per_topic() {
        let topics = topic_sums(&partitions(&[("a", 0, 5), ("a", 1, 7), ("b.c", 0, 3)]));
        assert_eq!(topics.get("a"), Some(&12));
        assert_eq!(topics.get("b.c"), Some(&3));
        assert_eq!(topics.len(), 2);
        // Found by fuzzing: a sum past u64 saturates, never panics.
        let huge = partitions(&[("t", 0, u64::MAX), ("t", 1, u64::MAX)]);
        assert_eq!(topic_sums(&huge).get("t"), Some(&u64::MAX));
    }

    #[test]
    fn mirrored_offsets_are_the_last_of_each_partition_and_give_the_exact_lag() {
        let consumed = concat!(
            r#"["MirrorSourceConnector",{"cluster":"primary","partition":0,"topic":"t"}]"#,
            "\t{\"offset\":3}\n",
            r#"["MirrorSourceConnector",{"cluster":"primary","partition":0,"topic":"t"}]"#,
            "\t{\"offset\":9}\n",
            r#"["MirrorSourceConnector",{"cluster":"primary","partition":1,"topic":"t"}]"#,
            "\t{\"offset\":4}\n",
            r#"["MirrorSourceConnector",{"cluster":"primary","partition":1,"topic":"t"}]"#,
            "\tnull\n",
            r#"["MirrorSourceConnector",{"cluster":"other","partition":0,"topic":"t"}]"#,
            "\t{\"offset\":99}\n",
            r#"["MirrorCheckpointConnector",{"cluster":"primary","partition":0,"topic":"t"}]"#,
            "\t{\"offset\":99}\n",
            "Processed a total of 6 messages\n"
        );
        let mirrored = parse_mirrored_offsets(consumed, "primary");
        assert_eq!(mirrored.len(), 1);
        assert_eq!(mirrored.get(&("t".to_string(), 0)), Some(&9));
        let source = partitions(&[("t", 0, 15), ("t", 1, 4), ("u", 0, 2)]);
        let lag = not_yet_mirrored(&source, &mirrored);
        // t:0 has 10 of 15 mirrored; t:1's offset was forgotten (all 4);
        // u was never mirrored.
        assert_eq!(lag.get("t"), Some(&(19, 9)));
        assert_eq!(lag.get("u"), Some(&(2, 2)));
    }

    #[test]
    fn properties_are_set_once_in_place() {
        let text = "a=1\nadvertised.listeners=PLAINTEXT://localhost:9092\nb=2\n";
        assert_eq!(
            with_property(text, "advertised.listeners", "PLAINTEXT://10.0.0.1:9092"),
            "a=1\nadvertised.listeners=PLAINTEXT://10.0.0.1:9092\nb=2\n"
        );
        assert_eq!(with_property("a=1", "k", "v"), "a=1\nk=v\n");
        assert_eq!(with_property("k = old\nk: older\n", "k", "v"), "k=v\n");
        assert_eq!(with_property("kk=1\n", "k", "v"), "kk=1\nk=v\n");
    }
}
