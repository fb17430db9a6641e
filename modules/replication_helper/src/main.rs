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
use hapair_core::instance::{self, InstanceConfig, Key};
use hapair_core::ssh::{self, KeyPair, PublicKey};
use hapair_core::{net, protocol, Context, Outcome, Spec};
use serde::Deserialize;
use serde_json::Value;

const SPEC: Spec = Spec {
    name: "replication_helper",
    doc: include_str!("../replication_helper.yml"),
    shorthand: None,
};

const AUTHORIZED_KEYS_MODE: u32 = 0o600;
// As ssh itself writes it when it adds the peer's other host keys.
const KNOWN_HOSTS_MODE: u32 = 0o600;

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
    let mut plan = FilePlan::default();
    let (peer_host_key, host_key_source) = peer_host_key(&args, &ssh_dir, peer.address, ctx)?;
    let authorized = ssh_dir.join("authorized_keys");
    plan.file(
        &authorized,
        |current| ssh::authorized_keys_with(current, &peer.public_key, peer.address),
        AUTHORIZED_KEYS_MODE,
        owner,
    )?;
    let known_hosts = ssh_dir.join("known_hosts");
    let mut replaced = None;
    plan.file(
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
    let mut with_hosts = config.clone();
    let hosts_changed = with_hosts.add_hosts(&[address, peer.address])?;
    let hosts_after = with_hosts
        .stored(instance::HOSTS)
        .cloned()
        .unwrap_or_default();

    let changed = !plan.changes.is_empty() || hosts_changed;
    if changed && !ctx.check_mode {
        plan.apply()?;
        if hosts_changed {
            InstanceConfig::update(&args.instance_config, |config| {
                config.add_hosts(&[address, peer.address]).map(|_| ())
            })?;
        }
    }

    let mut actions: Vec<String> = plan.changes.iter().map(|c| c.action.clone()).collect();
    if hosts_changed {
        actions.push(format!("record cluster.hosts = {hosts_after}"));
    }
    let msg = if changed {
        let would = if ctx.check_mode { "would " } else { "" };
        format!("{would}{}", actions.join(", "))
    } else {
        format!(
            "{} already trusts {} from {} and pins its host key",
            args.account, args.account, peer.address
        )
    };
    let own_host_key = ssh::own_host_key().ok().map(|k| k.material());
    let mut outcome = Outcome::new(changed, msg)
        .with("public_key", &own_key)
        .with("address", address.to_string())
        .with("host_key", own_host_key)
        .with("peer_address", peer.address.to_string())
        .with("peer_host_key", peer_host_key.material())
        .with("host_key_source", host_key_source)
        .with("actions", &actions);
    for change in plan.changes {
        outcome = outcome.with_diff(change.diff);
    }
    Ok(outcome)
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
    let own = net::host_ipv4_addresses()?;
    let chosen = if let Some(address) = &args.address {
        instance::parse_ipv4_str("address", address)?
    } else if let (Some(true), Some(Value::String(ip))) = (
        config
            .value(&Key::parse(instance::ENABLE_OVERRIDE_IP)?)
            .and_then(|v| v.as_bool()),
        config.value(&Key::parse(instance::OVERRIDE_IP)?),
    ) {
        instance::parse_ipv4(instance::OVERRIDE_IP, &Value::String(ip))?
    } else if let Some(peer) = peer {
        net::source_address_for(peer)?
    } else {
        *own.first()
            .context("this host has no IPv4 address besides loopback")?
    };
    if !own.contains(&chosen) {
        bail!("address {chosen} is not one of this host's addresses ({own:?})");
    }
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
}
