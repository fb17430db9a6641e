//! The instance config: this host's part of the cluster state.
//!
//! It plays the part of the seed's `alation_conf` store. It is a JSON file
//! (`/etc/hapair/instance.json` by default) of nested objects, addressed by
//! dotted keys: `cluster.protected_instance` is `{"cluster":
//! {"protected_instance": ...}}`. Each host keeps its own; it is never
//! copied between hosts.
//!
//! The keys hapair acts on are listed in [`KEYS`] with their types and
//! defaults. The `cluster.` namespace is hapair's: an unknown key there is a
//! typo, and refused, since a misspelt protection flag would protect
//! nothing. Keys elsewhere are free-form.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde_json::{Map, Value};

use crate::files;
use crate::protocol::ansible_bool_value;

pub const DEFAULT_PATH: &str = "/etc/hapair/instance.json";

/// [`DEFAULT_PATH`], for `#[serde(default = "...")]`.
pub fn default_path() -> std::path::PathBuf {
    DEFAULT_PATH.into()
}
/// The instance config holds no secrets, and the cluster account reads it
/// when the peer checks this host's protection over SSH.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

pub const PROTECTED: &str = "cluster.protected_instance";
pub const OVERRIDE_IP: &str = "cluster.override_ip";
pub const ENABLE_OVERRIDE_IP: &str = "cluster.enable_override_ip";
pub const HOSTS: &str = "cluster.hosts";
pub const REPLICATION_MODE: &str = "cluster.replication_mode";
pub const BACKUP_V2: &str = "feature_flags.backup_v2";
pub const APP_VERSION: &str = "app.version";

/// How to turn protection off, for refusal messages.
pub const UNPROTECT_HINT: &str = "if this host's data may be replaced, back it up, then run \
     instance_conf '{\"key\": \"cluster.protected_instance\", \"value\": false}' on it \
     (the seed's `alation_conf alation.cluster.protected_instance -s False`)";

/// The way out of two primaries (both hosts' `cluster.replication_mode`
/// primary, both taking writes), for the monitor and the set-up's refusal.
pub const TWO_PRIMARIES_FIX: &str = "stop the application's writes to the host whose writes \
     you give up, and make it rejoin the other: playbooks/rejoin.yml -e hapair_rejoin=<that \
     host> (cluster_rejoin: pg_rewind, its discarded writes reported)";

/// Makes the directory of `path` (a file of hapair's own, such as
/// /etc/hapair/instance.json) when it is missing, root's, mode 0755.
pub fn ensure_config_dir(path: &Path) -> Result<()> {
    let dir = files::parent_of(path);
    if files::state(&dir)?.is_none() {
        files::ensure_dir(&dir, DIR_MODE, None)?;
    }
    Ok(())
}

/// The type of a known key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Text,
    Ipv4,
    Ipv4List,
    Choice(&'static [&'static str]),
}

/// A key hapair knows.
#[derive(Debug)]
pub struct KeySpec {
    pub name: &'static str,
    pub kind: Kind,
    /// The value when the key is absent, as JSON text.
    pub default: Option<&'static str>,
    /// Whether the key decides what may be deleted or where data flows.
    pub safety_relevant: bool,
}

pub const KEYS: &[KeySpec] = &[
    KeySpec {
        name: PROTECTED,
        kind: Kind::Bool,
        default: Some("true"),
        safety_relevant: true,
    },
    KeySpec {
        name: OVERRIDE_IP,
        kind: Kind::Ipv4,
        default: None,
        safety_relevant: true,
    },
    KeySpec {
        name: ENABLE_OVERRIDE_IP,
        kind: Kind::Bool,
        default: Some("false"),
        safety_relevant: true,
    },
    KeySpec {
        name: HOSTS,
        kind: Kind::Ipv4List,
        default: Some("[]"),
        safety_relevant: true,
    },
    KeySpec {
        name: REPLICATION_MODE,
        kind: Kind::Choice(&["standalone", "primary", "secondary", "fenced"]),
        default: Some("\"standalone\""),
        safety_relevant: true,
    },
    KeySpec {
        name: BACKUP_V2,
        kind: Kind::Bool,
        default: Some("false"),
        safety_relevant: false,
    },
    KeySpec {
        name: APP_VERSION,
        kind: Kind::Text,
        default: None,
        safety_relevant: false,
    },
];

/// How deep the config's JSON may nest: well within what serde_json reads
/// back (128), so that whatever is written loads again.
const MAX_DEPTH: usize = 64;

/// How deep `value` nests: 0 for a scalar.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The most dotted parts a key may have, and its longest name.
pub const MAX_KEY_DEPTH: usize = 16;
pub const MAX_KEY_LEN: usize = 256;

/// A checked key: its syntax is valid, and a key in hapair's namespace is
/// one hapair knows.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub name: &'a str,
    pub spec: Option<&'static KeySpec>,
}

impl<'a> Key<'a> {
    pub fn parse(name: &'a str) -> Result<Key<'a>> {
        let valid_segment = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        // Bounded, so that every config hapair writes also loads again
        // (serde_json refuses JSON nested deeper than 128).
        if name.len() > MAX_KEY_LEN || name.split('.').count() > MAX_KEY_DEPTH {
            bail!(
                "{:?} is too long a key: at most {MAX_KEY_DEPTH} dotted parts and \
                 {MAX_KEY_LEN} characters",
                crate::protocol::excerpt(name)
            );
        }
        if !name.split('.').all(valid_segment) {
            bail!(
                "{name:?} is not a valid key: use dotted names of letters, digits, _ and -, \
                 e.g. cluster.protected_instance"
            );
        }
        let spec = KEYS.iter().find(|k| k.name == name);
        // A group that holds known keys (`cluster`, `feature_flags`) is not
        // a key: setting it would replace every key in it, protection too.
        let group = format!("{name}.");
        let inside: Vec<&str> = KEYS
            .iter()
            .map(|k| k.name)
            .filter(|n| n.starts_with(&group))
            .collect();
        if !inside.is_empty() {
            bail!(
                "{name} is a group of keys, not a key: name one of {}",
                inside.join(", ")
            );
        }
        if spec.is_none() && name.starts_with("cluster.") {
            let known: Vec<&str> = KEYS
                .iter()
                .map(|k| k.name)
                .filter(|n| n.starts_with("cluster."))
                .collect();
            bail!(
                "unknown key {name}: the cluster.* keys are {}",
                known.join(", ")
            );
        }
        Ok(Key { name, spec })
    }

    pub fn safety_relevant(&self) -> bool {
        self.spec.is_some_and(|s| s.safety_relevant)
    }

    pub fn default_value(&self) -> Option<Value> {
        self.spec
            .and_then(|s| s.default)
            .map(|text| serde_json::from_str(text).expect("KEYS defaults are valid JSON"))
    }

    /// Checks `value` against the key's type, converting what an operator
    /// would expect to work ("False" for a boolean, as the seed writes it).
    pub fn coerce(&self, value: Value) -> Result<Value> {
        let Some(spec) = self.spec else {
            return Ok(value);
        };
        let name = self.name;
        Ok(match spec.kind {
            Kind::Bool => match ansible_bool_value(&value) {
                Some(b) => Value::Bool(b),
                None => bail!("{name} takes true or false, not {value}"),
            },
            Kind::Text => match value {
                Value::String(_) => value,
                // `value: 2021.4` in YAML arrives as a number.
                Value::Number(n) => Value::String(n.to_string()),
                other => bail!("{name} takes a string, not {other}"),
            },
            Kind::Ipv4 => Value::String(parse_ipv4(name, &value)?.to_string()),
            Kind::Ipv4List => {
                let items = match value {
                    Value::Array(items) => items,
                    // `-s 10.0.0.1,10.0.0.2` by hand.
                    Value::String(text) => text
                        .split(',')
                        .map(|s| Value::String(s.trim().to_string()))
                        .collect(),
                    other => bail!("{name} takes a list of IPv4 addresses, not {other}"),
                };
                let addresses = items
                    .iter()
                    .map(|item| parse_ipv4(name, item).map(|a| Value::String(a.to_string())))
                    .collect::<Result<Vec<_>>>()?;
                Value::Array(addresses)
            }
            Kind::Choice(choices) => match value.as_str() {
                Some(s) if choices.contains(&s) => value,
                _ => bail!("{name} takes one of {}, not {value}", choices.join(", ")),
            },
        })
    }
}

/// Checks what only this host can tell: an override IP must be one of its
/// own addresses, or the peer would be told to reach it somewhere else.
pub fn check_on_this_host(key: &Key, value: &Value) -> Result<()> {
    if key.name != OVERRIDE_IP {
        return Ok(());
    }
    let address = parse_ipv4(key.name, value)?;
    crate::net::ensure_own_address(address).context(
        "set cluster.override_ip on each host to that host's own address, the one its peer \
         reaches it at",
    )
}

/// Parses an IPv4 address given as a JSON value; see [`parse_ipv4_str`].
pub fn parse_ipv4(what: &str, value: &Value) -> Result<Ipv4Addr> {
    match value.as_str() {
        Some(text) => parse_ipv4_str(what, text),
        None => bail!("{what}: expected an IPv4 address such as 10.0.0.1, not {value}"),
    }
}

/// Parses an IPv4 address in dotted-quad form (e.g. 10.0.0.1), explaining
/// what is wrong with anything else. `what` names it in the message.
pub fn parse_ipv4_str(what: &str, text: &str) -> Result<Ipv4Addr> {
    text.parse::<Ipv4Addr>().map_err(|_| {
        let why = if text.contains(':') {
            "that is an IPv6 address, and the pair is set up over IPv4"
        } else {
            "an IPv4 address is four numbers from 0 to 255 separated by dots"
        };
        anyhow::anyhow!("{what}: {text:?} is not an IPv4 address: {why}, e.g. 10.0.0.1")
    })
}

/// The pair role a host records in `cluster.replication_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    Standalone,
    Primary,
    Secondary,
    /// The primary before a failover: its writes stopped, its services
    /// kept from serving until `cluster_rejoin` makes it the secondary.
    Fenced,
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Standalone => "standalone",
            ReplicationMode::Primary => "primary",
            ReplicationMode::Secondary => "secondary",
            ReplicationMode::Fenced => "fenced",
        }
    }
}

impl std::fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The instance config of this host, as read from disk.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceConfig {
    pub path: PathBuf,
    root: Map<String, Value>,
}

impl InstanceConfig {
    /// Reads the config at `path`; a missing file is an empty config (every
    /// key at its default).
    pub fn load(path: &Path) -> Result<InstanceConfig> {
        let text = files::read_optional(path)?.unwrap_or_default();
        InstanceConfig::parse(path, &text)
    }

    /// The config at `path` from its text (a peer's, read over SSH, say).
    pub fn parse(path: &Path, text: &str) -> Result<InstanceConfig> {
        let root = match text {
            text if text.trim().is_empty() => Map::new(),
            text => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(root)) => root,
                Ok(_) => bail!(
                    "{} is not a JSON object; restore it from a backup",
                    path.display()
                ),
                Err(e) => bail!(
                    "{} is not valid JSON ({e}); fix it or restore it from a backup. \
                     hapair does not overwrite a config it can't read",
                    path.display()
                ),
            },
        };
        Ok(InstanceConfig {
            path: path.to_path_buf(),
            root,
        })
    }

    /// Takes the config's lock for a read-modify-write, creating the config
    /// directory if needed. Held until the returned file is dropped.
    pub fn lock(path: &Path) -> Result<File> {
        ensure_config_dir(path)?;
        let dir = files::parent_of(path);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let lock_path = dir.join(format!(".{name}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("can't open {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("can't lock {}", lock_path.display()))?;
        Ok(lock)
    }

    /// The peer's instance config at `path`, read over SSH as the cluster
    /// `account` with the pair's key. None there yet reads as empty (every
    /// key at its default: protected).
    pub fn from_peer(
        account: &crate::account::Account,
        peer: Ipv4Addr,
        path: &Path,
        timeout: std::time::Duration,
    ) -> Result<InstanceConfig> {
        let remote = path
            .to_str()
            .context("the peer's instance config path is not UTF-8")?;
        let read = crate::ssh::run_on_peer(account, peer, &["cat", "--", remote], timeout)?;
        let text = match (read.code, read.stderr.contains("No such file")) {
            (Some(0), _) => read.stdout,
            (_, true) => String::new(),
            _ => bail!(
                "can't read the instance config of {peer} over SSH as {} ({}): run \
                 replication_helper on both hosts first (seed step 3)",
                account.name,
                read.stderr.trim()
            ),
        };
        InstanceConfig::parse(path, &text)
            .with_context(|| format!("the instance config of {peer} can't be read; fix it there"))
    }

    /// The value stored for `key`, if any.
    pub fn stored(&self, key: &str) -> Option<&Value> {
        let mut segments = key.split('.');
        let first = segments.next()?;
        segments.try_fold(self.root.get(first)?, |node, segment| node.get(segment))
    }

    /// The value of `key`: stored, or else its default.
    pub fn value(&self, key: &Key) -> Option<Value> {
        self.stored(key.name)
            .cloned()
            .or_else(|| key.default_value())
    }

    /// The recorded role; a missing or hand-edited unknown value reads as
    /// standalone, the default, which no step takes for a pair role.
    pub fn replication_mode(&self) -> ReplicationMode {
        match self.stored(REPLICATION_MODE).and_then(Value::as_str) {
            Some("primary") => ReplicationMode::Primary,
            Some("secondary") => ReplicationMode::Secondary,
            Some("fenced") => ReplicationMode::Fenced,
            _ => ReplicationMode::Standalone,
        }
    }

    pub fn set_replication_mode(&mut self, mode: ReplicationMode) -> Result<()> {
        self.set(REPLICATION_MODE, Value::String(mode.as_str().into()))
    }

    /// The pair's hosts recorded in `cluster.hosts`. An entry that is not
    /// an IPv4 address (a hand edit) is an error that names it.
    pub fn hosts(&self) -> Result<Vec<Ipv4Addr>> {
        match self.stored(HOSTS) {
            Some(Value::Array(hosts)) => hosts.iter().map(|h| parse_ipv4(HOSTS, h)).collect(),
            None => Ok(Vec::new()),
            Some(other) => bail!("{HOSTS} holds {other}, not a list of IPv4 addresses"),
        }
    }

    /// This host's override IP, when it is enabled (seed step 6).
    pub fn override_ip(&self) -> Result<Option<Ipv4Addr>> {
        if self.stored(ENABLE_OVERRIDE_IP) != Some(&Value::Bool(true)) {
            return Ok(None);
        }
        match self.stored(OVERRIDE_IP) {
            Some(value) => parse_ipv4(OVERRIDE_IP, value).map(Some),
            None => Ok(None),
        }
    }

    /// Whether destructive work must be refused on this host.
    pub fn is_protected(&self) -> bool {
        // Anything but an explicit false protects: a hand-edited "no" too.
        !matches!(self.stored(PROTECTED), Some(Value::Bool(false)))
    }

    /// Stores `value` at `key`, creating the objects on the way. A value
    /// nested so deep that the config would not load again is refused.
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        let segments: Vec<&str> = key.split('.').collect();
        if segments.len() + depth(&value) > MAX_DEPTH {
            bail!(
                "can't set {key}: the value is nested too deep (at most {MAX_DEPTH} levels in \
                 all, key included)"
            );
        }
        let (leaf, parents) = segments.split_last().context("empty key")?;
        let mut node = &mut self.root;
        for (depth, segment) in parents.iter().enumerate() {
            let child = node
                .entry(segment.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            node = child.as_object_mut().with_context(|| {
                format!(
                    "can't set {key}: {} holds a value, not a group of keys",
                    segments[..=depth].join(".")
                )
            })?;
        }
        node.insert(leaf.to_string(), value);
        Ok(())
    }

    /// Removes `key`, and any group it leaves empty. Returns the old value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        fn remove_in(node: &mut Map<String, Value>, segments: &[&str]) -> Option<Value> {
            match segments {
                [] => None,
                [leaf] => node.remove(*leaf),
                [first, rest @ ..] => {
                    let child = node.get_mut(*first)?.as_object_mut()?;
                    let removed = remove_in(child, rest);
                    if child.is_empty() {
                        node.remove(*first);
                    }
                    removed
                }
            }
        }
        let segments: Vec<&str> = key.split('.').collect();
        remove_in(&mut self.root, &segments)
    }

    /// The file's text: pretty JSON with sorted keys, so diffs are small.
    pub fn render(&self) -> String {
        let mut text = serde_json::to_string_pretty(&self.root).expect("a JSON map serializes");
        text.push('\n');
        text
    }

    /// This config, replacing `before` on disk, as a planned file change
    /// (written by [`files::FilePlan::apply`]; take [`InstanceConfig::lock`]
    /// first). A config that did not exist diffs as empty, not as `{}`.
    pub fn rewrite_of(
        &self,
        before: &InstanceConfig,
        existed: bool,
        action: String,
    ) -> files::FileChange {
        let header = self.path.display().to_string();
        files::FileChange {
            path: self.path.clone(),
            text: self.render(),
            mode: FILE_MODE,
            owner: None,
            action,
            diff: crate::protocol::Diff {
                before: if existed {
                    before.render()
                } else {
                    String::new()
                },
                after: self.render(),
                before_header: header.clone(),
                after_header: header,
            },
        }
    }

    /// Writes the config atomically. Take [`InstanceConfig::lock`] first.
    pub fn save(&self) -> Result<()> {
        files::write_atomic(&self.path, self.render().as_bytes(), FILE_MODE, None)
    }

    /// Reads the config at `path`, changes it and writes it, all under its
    /// lock, so that concurrent runs can't lose each other's change.
    pub fn update(
        path: &Path,
        change: impl FnOnce(&mut InstanceConfig) -> Result<()>,
    ) -> Result<()> {
        let _lock = InstanceConfig::lock(path)?;
        let mut config = InstanceConfig::load(path)?;
        change(&mut config)?;
        config.save()
    }

    /// Adds the `addresses` missing from `cluster.hosts`, in order. Returns
    /// whether any was missing.
    pub fn add_hosts(&mut self, addresses: &[Ipv4Addr]) -> Result<bool> {
        let mut hosts = match self.stored(HOSTS) {
            Some(Value::Array(hosts)) => hosts.clone(),
            _ => Vec::new(),
        };
        let before = hosts.len();
        for address in addresses {
            let address = Value::String(address.to_string());
            if !hosts.contains(&address) {
                hosts.push(address);
            }
        }
        if hosts.len() == before && self.stored(HOSTS).is_some() {
            return Ok(false);
        }
        self.set(HOSTS, Value::Array(hosts))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(root: Value) -> InstanceConfig {
        InstanceConfig {
            path: "/nonexistent".into(),
            root: root.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn keys_are_bounded_so_that_what_is_set_loads_again() {
        let deep = vec!["a"; 200].join(".");
        assert!(Key::parse(&deep)
            .unwrap_err()
            .to_string()
            .contains("too long"));
        let ok = vec!["a"; MAX_KEY_DEPTH].join(".");
        let key = Key::parse(&ok).unwrap();
        let path = Path::new("/etc/hapair/instance.json");
        let mut config = InstanceConfig::parse(path, "").unwrap();
        config.set(key.name, Value::Bool(true)).unwrap();
        let again = InstanceConfig::parse(path, &config.render()).unwrap();
        assert_eq!(again.value(&key), Some(Value::Bool(true)));
        let nested: Value =
            serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100))).unwrap();
        assert!(config.set("custom.deep", nested).is_err());
    }

    #[test]
    fn a_group_of_known_keys_is_not_a_key() {
        for group in ["cluster", "feature_flags", "app"] {
            let err = Key::parse(group).unwrap_err().to_string();
            assert!(err.contains("is a group of keys"), "{group}: {err}");
        }
        assert!(Key::parse("cluster.protected_instance").is_ok());
        assert!(Key::parse("custom.thing").is_ok());
    }

    #[test]
    fn protection_defaults_to_on_and_only_an_explicit_false_lifts_it() {
        assert!(config(json!({})).is_protected());
        assert!(config(json!({"cluster": {"protected_instance": "no"}})).is_protected());
        assert!(config(json!({"cluster": {"protected_instance": true}})).is_protected());
        assert!(!config(json!({"cluster": {"protected_instance": false}})).is_protected());
    }

    #[test]
    fn the_role_and_hosts_read_typed() {
        assert_eq!(
            config(json!({})).replication_mode(),
            ReplicationMode::Standalone
        );
        let mut pair = config(json!({"cluster": {"replication_mode": "primary",
            "hosts": ["10.0.0.1", "10.0.0.2"]}}));
        assert_eq!(pair.replication_mode(), ReplicationMode::Primary);
        assert_eq!(
            pair.hosts().unwrap(),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        for odd in [
            json!(["10.0.0.1", "not an address"]),
            json!([7]),
            json!("10.0.0.1"),
        ] {
            assert!(config(json!({"cluster": {"hosts": odd}})).hosts().is_err());
        }
        pair.set_replication_mode(ReplicationMode::Secondary)
            .unwrap();
        assert_eq!(pair.replication_mode(), ReplicationMode::Secondary);
        let odd = config(json!({"cluster": {"replication_mode": "master"}}));
        assert_eq!(odd.replication_mode(), ReplicationMode::Standalone);
        let key = Key::parse(PROTECTED).unwrap();
        assert_eq!(config(json!({})).value(&key), Some(json!(true)));
    }

    #[test]
    fn set_and_remove_nest_and_prune() {
        let mut c = config(json!({}));
        c.set("cluster.hosts", json!(["10.0.0.1"])).unwrap();
        c.set("app.version", json!("2024.1")).unwrap();
        assert_eq!(c.stored("cluster.hosts"), Some(&json!(["10.0.0.1"])));
        assert_eq!(c.remove("cluster.hosts"), Some(json!(["10.0.0.1"])));
        assert_eq!(
            c.root,
            *json!({"app": {"version": "2024.1"}}).as_object().unwrap()
        );
        assert!(c.set("app.version.major", json!(1)).is_err());
    }

    #[test]
    fn hosts_gain_missing_addresses_in_order() {
        let mut c = config(json!({}));
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert!(c.add_hosts(&[a, b]).unwrap());
        assert_eq!(c.stored(HOSTS), Some(&json!(["10.0.0.1", "10.0.0.2"])));
        assert!(!c.add_hosts(&[b, a]).unwrap());
        let mut other = config(json!({"cluster": {"hosts": ["10.0.0.2"]}}));
        assert!(other.add_hosts(&[a, b]).unwrap());
        assert_eq!(other.stored(HOSTS), Some(&json!(["10.0.0.2", "10.0.0.1"])));
    }

    #[test]
    fn known_keys_are_typed() {
        let coerce = |k: &str, v: Value| Key::parse(k).unwrap().coerce(v);
        assert_eq!(coerce(PROTECTED, json!("False")).unwrap(), json!(false));
        assert_eq!(coerce(PROTECTED, json!(true)).unwrap(), json!(true));
        assert!(coerce(PROTECTED, json!("maybe")).is_err());
        assert_eq!(coerce(APP_VERSION, json!(2021.4)).unwrap(), json!("2021.4"));
        assert!(coerce(REPLICATION_MODE, json!("master")).is_err());
        assert_eq!(
            coerce(HOSTS, json!(["10.0.0.1", "10.0.0.2"])).unwrap(),
            json!(["10.0.0.1", "10.0.0.2"])
        );
        assert_eq!(
            coerce("custom.anything", json!([1, {"a": 2}])).unwrap(),
            json!([1, {"a": 2}])
        );
    }

    #[test]
    fn bad_ipv4_addresses_are_explained() {
        for bad in [
            "10.0.0.256",
            "abc",
            "::1",
            "fe80::1",
            "10.0.0",
            "010.0.0.1",
            "",
        ] {
            let err = parse_ipv4("cluster.override_ip", &json!(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not an IPv4 address"), "{bad}: {err}");
            assert!(err.contains("e.g. 10.0.0.1"), "{bad}: {err}");
        }
        let v6 = parse_ipv4("x", &json!("::1")).unwrap_err().to_string();
        assert!(v6.contains("IPv6"), "{v6}");
        assert!(parse_ipv4("x", &json!(10)).is_err());
        assert_eq!(
            parse_ipv4("x", &json!("10.0.0.1")).unwrap(),
            Ipv4Addr::new(10, 0, 0, 1)
        );
    }

    #[test]
    fn keys_in_the_cluster_namespace_must_be_known() {
        let err = Key::parse("cluster.protected_instnace")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.protected_instance"), "{err}");
        assert!(Key::parse("app.custom_thing").unwrap().spec.is_none());
        for bad in ["", ".x", "a..b", "a b", "a/b"] {
            assert!(Key::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn load_refuses_a_corrupt_file_rather_than_starting_empty() {
        let path =
            std::env::temp_dir().join(format!("hapair-instance-{}.json", std::process::id()));
        std::fs::write(&path, "{ not json").unwrap();
        let err = InstanceConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(InstanceConfig::load(&path).unwrap().root.is_empty());
    }
}
