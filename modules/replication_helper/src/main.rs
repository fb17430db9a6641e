//! `replication_helper`: seed step 3, the key exchange, without copy-paste.
//!
//! Given the peer's public key and IPv4 address, it lets the peer's cluster
//! account in, but only from the peer's address (`from="<peer ip>"` with
//! `restrict`: no forwarding, no pty). It pins the peer's SSH host key in the
//! cluster account's known_hosts, and records both addresses in
//! `cluster.hosts`. The playbook moves keys between the hosts through the
//! controller. Run by hand on a terminal with no options, it prompts for the
//! peer's key and address, as the seed's helper does.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use hapair_core::account::{self, Account};
use hapair_core::files::{self, FilePlan};
use hapair_core::instance::{self, InstanceConfig};
use hapair_core::ssh::{self, KeyPair, PublicKey, AUTHORIZED_KEYS_MODE, KNOWN_HOSTS_MODE};
use hapair_core::{net, protocol, Action, Context, Outcome, Plan, Spec};
use serde::Deserialize;

const SPEC: Spec = Spec {
    name: "replication_helper",
    doc: include_str!("../replication_helper.yml"),
    shorthand: None,
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    #[serde(default = "account::default_name")]
    account: String,
    /// The peer cluster account's public key (its `cluster_generate_keys`).
    #[serde(default)]
    peer_public_key: Option<String>,
    /// The peer's IPv4 address on the pair's network.
    #[serde(default)]
    peer_address: Option<String>,
    /// The peer's SSH host key, read on the peer. Scanned when not given.
    #[serde(default)]
    peer_host_key: Option<String>,
    /// This host's address on the pair's network; found from the route to
    /// the peer when not given.
    #[serde(default)]
    address: Option<String>,
    #[serde(default = "instance::default_path")]
    instance_config: PathBuf,
    /// Seconds to wait for the peer's SSH port when scanning its host key.
    #[serde(default = "default_scan_timeout")]
    scan_timeout: protocol::Seconds,
}

fn default_scan_timeout() -> protocol::Seconds {
    protocol::Seconds::new(5)
}

/// The peer as validated.
struct Peer {
    public_key: PublicKey,
    address: Ipv4Addr,
}

fn main() -> ExitCode {
    protocol::run(&SPEC, replication_helper)
}

fn replication_helper(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let account = Account::lookup(&args.account)?.with_context(|| {
        format!(
            "the cluster account {} does not exist: run cluster_generate_keys first (seed step 2)",
            args.account
        )
    })?;
    let ssh_dir = account.home.join(".ssh");
    let own_key = KeyPair::in_ssh_dir(&ssh_dir, Some(&args.account))
        .read_public()?
        .with_context(|| {
            format!(
                "{} has no key pair in {}: run cluster_generate_keys first (seed step 2)",
                args.account,
                ssh_dir.display()
            )
        })?;
    let config = InstanceConfig::load(&args.instance_config)?;

    let peer = match (&args.peer_public_key, &args.peer_address) {
        (Some(key), Some(address)) => Peer {
            public_key: PublicKey::validate(key).context("peer_public_key")?,
            address: instance::parse_ipv4_str("peer_address", address)?,
        },
        (None, None) if ctx.can_prompt => ask_for_peer(ctx, &own_key, &args, &config)?,
        _ => bail!(
            "pass both peer_public_key and peer_address (the peer's cluster_generate_keys \
             public_key and its IPv4 address), or run replication_helper by hand on a \
             terminal to be asked for them"
        ),
    };
    if ssh::same_key(&own_key, &peer.public_key.line()) {
        bail!("peer_public_key is this host's own key: pass the key generated on the peer");
    }
    let address = own_address(&args, Some(peer.address), &config)?;
    if address == peer.address {
        bail!(
            "peer_address {} is this host's own address: pass the peer's",
            peer.address
        );
    }

    let owner = Some(account.owner());
    let mut plan_files = FilePlan::default();
    let (peer_host_key, host_key_source) = peer_host_key(&args, &ssh_dir, peer.address, ctx)?;
    let authorized = ssh_dir.join("authorized_keys");
    plan_files.file(
        &authorized,
        |current| ssh::authorized_keys_with(current, &peer.public_key, peer.address),
        AUTHORIZED_KEYS_MODE,
        owner,
    )?;
    let known_hosts = ssh_dir.join("known_hosts");
    let mut replaced = None;
    plan_files.file(
        &known_hosts,
        |current| {
            let pinned = ssh::known_hosts_with(current, peer.address, &peer_host_key);
            replaced = pinned.replaced;
            pinned.text
        },
        KNOWN_HOSTS_MODE,
        owner,
    )?;
    if let Some(old) = replaced {
        ctx.warn(format!(
            "the host key pinned for {} changed: {old} is replaced by {}. \
             Make sure the peer was reinstalled and this is its key",
            peer.address,
            peer_host_key.material()
        ));
    }
    let plan = plan(plan_files, &config, address, peer.address)?;
    let unchanged = format!(
        "{} already trusts {} from {} and pins its host key",
        args.account, args.account, peer.address
    );
    let outcome = plan.run(ctx, unchanged, |plan, _| {
        plan.files.apply()?;
        for RecordHosts(hosts) in &plan.actions {
            InstanceConfig::update(&args.instance_config, |config| {
                config.add_hosts(hosts).map(|_| ())
            })?;
        }
        Ok(Vec::new())
    })?;
    let own_host_key = ssh::own_host_key().ok().map(|k| k.material());
    Ok(outcome
        .with("public_key", &own_key)
        .with("address", address.to_string())
        .with("host_key", own_host_key)
        .with("peer_address", peer.address.to_string())
        .with("peer_host_key", peer_host_key.material())
        .with("host_key_source", host_key_source))
}

/// Step 3's change besides the two files: both hosts in `cluster.hosts`.
#[derive(Debug, PartialEq)]
struct RecordHosts(Vec<Ipv4Addr>);

impl Action for RecordHosts {
    fn describe(&self) -> String {
        let hosts: Vec<String> = self.0.iter().map(|h| format!("\"{h}\"")).collect();
        format!("record cluster.hosts = [{}]", hosts.join(","))
    }
}

/// Step 3's decisions: the files as planned, and the hosts' record when
/// either address is missing from it (the full list it will hold).
fn plan(
    files: FilePlan,
    config: &InstanceConfig,
    address: Ipv4Addr,
    peer: Ipv4Addr,
) -> Result<Plan<RecordHosts>> {
    let mut plan = Plan::new(files);
    let mut with_hosts = config.clone();
    if with_hosts.add_hosts(&[address, peer])? {
        plan.push(RecordHosts(with_hosts.hosts()?));
    }
    Ok(plan)
}

/// The seed's way: show this host's key and address, ask for the peer's,
/// and explain what is wrong with an answer until it is right.
fn ask_for_peer(
    ctx: &Context,
    own_key: &str,
    args: &Args,
    config: &InstanceConfig,
) -> Result<Peer> {
    let address = own_address(args, None, config)?;
    eprintln!(
        "This host's public key (paste it into replication_helper on the peer):\n\n{own_key}\n"
    );
    eprintln!("This host's IP address: {address}\n");
    let public_key = ask_until_valid(
        ctx,
        "Paste the public key of the remote server: ",
        PublicKey::validate,
    )?;
    let address = ask_until_valid(
        ctx,
        "Enter the IP address of the remote server (IPv4, e.g. 10.0.0.1): ",
        |answer| instance::parse_ipv4_str("the remote address", answer),
    )?;
    Ok(Peer {
        public_key,
        address,
    })
}

fn ask_until_valid<T>(
    ctx: &Context,
    question: &str,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<T> {
    const TRIES: usize = 3;
    for _ in 1..TRIES {
        match parse(&ctx.prompt(question)?) {
            Ok(value) => return Ok(value),
            Err(e) => eprintln!("  {e:#}; try again"),
        }
    }
    parse(&ctx.prompt(question)?)
}

/// This host's pair address: as given, else the override IP when enabled,
/// else the source address of the route to the peer (or, with no peer yet,
/// the first address of this host).
fn own_address(args: &Args, peer: Option<Ipv4Addr>, config: &InstanceConfig) -> Result<Ipv4Addr> {
    let chosen = if let Some(address) = &args.address {
        instance::parse_ipv4_str("address", address)?
    } else if let Some(ip) = config.override_ip()? {
        ip
    } else if let Some(peer) = peer {
        net::source_address_for(peer)?
    } else {
        *net::host_ipv4_addresses()?
            .first()
            .context("this host has no IPv4 address besides loopback")?
    };
    net::ensure_own_address(chosen)?;
    Ok(chosen)
}

/// The peer's host key to pin, and where it came from.
fn peer_host_key(
    args: &Args,
    ssh_dir: &Path,
    peer: Ipv4Addr,
    ctx: &mut Context,
) -> Result<(PublicKey, &'static str)> {
    if let Some(given) = &args.peer_host_key {
        return Ok((PublicKey::parse(given).context("peer_host_key")?, "given"));
    }
    let known = files::read_optional(&ssh_dir.join("known_hosts"))?.unwrap_or_default();
    if let Some(pinned) = ssh::pinned_key(&known, peer) {
        return Ok((pinned, "already pinned"));
    }
    let scanned = ssh::scan_host_key(peer, args.scan_timeout.duration())?;
    ctx.warn(format!(
        "the host key of {peer} was scanned over the network and trusted on first use; \
         pass peer_host_key (read on the peer, e.g. from its cluster_preflight facts) to pin \
         a key you know"
    ));
    Ok((scanned, "scanned"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    hapair_core::doc_test!(Args, json!({}));

    fn config(root: serde_json::Value) -> InstanceConfig {
        InstanceConfig::parse(Path::new("/nonexistent"), &root.to_string()).unwrap()
    }

    #[test]
    fn the_hosts_are_recorded_once_both_and_in_order() {
        let (me, peer) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let fresh = plan(FilePlan::default(), &config(json!({})), me, peer).unwrap();
        assert_eq!(fresh.actions, vec![RecordHosts(vec![me, peer])]);
        assert_eq!(
            fresh.describe(),
            vec![r#"record cluster.hosts = ["10.0.0.1","10.0.0.2"]"#]
        );
        let both = config(json!({"cluster": {"hosts": ["10.0.0.2", "10.0.0.1"]}}));
        assert!(plan(FilePlan::default(), &both, me, peer)
            .unwrap()
            .is_empty());
        // A third host already recorded stays, and the missing one is added.
        let other = config(json!({"cluster": {"hosts": ["10.0.0.9", "10.0.0.1"]}}));
        let third = plan(FilePlan::default(), &other, me, peer).unwrap();
        assert_eq!(
            third.actions,
            vec![RecordHosts(vec![Ipv4Addr::new(10, 0, 0, 9), me, peer])]
        );
    }

    #[test]
    fn the_override_ip_is_this_hosts_address_only_when_enabled() {
        let on =
            config(json!({"cluster": {"override_ip": "10.0.0.7", "enable_override_ip": true}}));
        assert_eq!(on.override_ip().unwrap(), Some(Ipv4Addr::new(10, 0, 0, 7)));
        let off =
            config(json!({"cluster": {"override_ip": "10.0.0.7", "enable_override_ip": false}}));
        assert_eq!(off.override_ip().unwrap(), None);
        let bad = config(json!({"cluster": {"override_ip": "nope", "enable_override_ip": true}}));
        assert!(bad.override_ip().is_err());
    }
}
