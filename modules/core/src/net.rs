//! This host's addresses, and whether a peer's ports answer.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::command::Command;

/// This host's IPv4 addresses, loopback excluded, as `ip` reports them.
pub fn host_ipv4_addresses() -> Result<Vec<Ipv4Addr>> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .run()?;
    Ok(parse_ip_addr(&out.stdout)
        .into_iter()
        .filter(|a| !a.is_loopback())
        .collect())
}

/// Parses `ip -4 -o addr show`: `2: eth0    inet 198.18.0.11/24 brd ... `.
/// Refuses `address` unless it is one of this host's: a service told to
/// listen there, or a peer told to reach this host there, would fail.
pub fn ensure_own_address(address: Ipv4Addr) -> Result<()> {
    let own = host_ipv4_addresses()?;
    if !own.contains(&address) {
        let own: Vec<String> = own.iter().map(|a| a.to_string()).collect();
        anyhow::bail!(
            "{address} is not an address of this host (its addresses are {})",
            own.join(", ")
        );
    }
    Ok(())
}

pub fn parse_ip_addr(output: &str) -> Vec<Ipv4Addr> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The address this host uses to reach `peer` (`ip route get`'s `src`).
pub fn source_address_for(peer: Ipv4Addr) -> Result<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "route", "get", &peer.to_string()])
        .run()?;
    parse_route_source(&out.stdout).with_context(|| {
        format!(
            "no route to {peer} gives a source address: {}",
            out.stdout.trim()
        )
    })
}

/// Parses `ip route get`: `198.18.0.12 dev eth0 src 198.18.0.11 uid 0`.
pub fn parse_route_source(output: &str) -> Option<Ipv4Addr> {
    let mut words = output.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next()?.parse().ok()
}

/// The answer of one TCP port.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PortProbe {
    pub open: bool,
    /// Time to connect, or to give up, in milliseconds.
    pub latency_ms: f64,
    /// Why it is closed (refused, timed out ...).
    pub error: Option<String>,
}

/// Tries a TCP connection to `address:port` within `timeout`.
pub fn probe(address: Ipv4Addr, port: u16, timeout: Duration) -> PortProbe {
    let started = Instant::now();
    let result = TcpStream::connect_timeout(&SocketAddr::from((address, port)), timeout);
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    match result {
        Ok(_) => PortProbe {
            open: true,
            latency_ms,
            error: None,
        },
        Err(e) => PortProbe {
            open: false,
            latency_ms,
            error: Some(match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    format!("no answer within {timeout:?}")
                }
                _ => e.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let output = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                      42: eth0    inet 198.18.0.11/24 brd 198.18.0.255 scope global eth0\\  valid_lft forever\n\
                      43: eth1    inet 10.1.2.3/16 scope global eth1\n";
        assert_eq!(
            parse_ip_addr(output),
            vec![
                Ipv4Addr::new(127, 0, 0, 1),
                Ipv4Addr::new(198, 18, 0, 11),
                Ipv4Addr::new(10, 1, 2, 3)
            ]
        );
        assert!(parse_ip_addr("").is_empty());
    }

    #[test]
    fn parses_route_source() {
        assert_eq!(
            parse_route_source("198.18.0.12 dev eth0 src 198.18.0.11 uid 0 \n    cache"),
            Some(Ipv4Addr::new(198, 18, 0, 11))
        );
        assert_eq!(parse_route_source("unreachable"), None);
    }

    #[test]
    fn probes_an_open_and_a_closed_loopback_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = probe(Ipv4Addr::LOCALHOST, port, Duration::from_secs(2));
        assert!(open.open && open.error.is_none(), "{open:?}");
        drop(listener);
        let closed = probe(Ipv4Addr::LOCALHOST, port, Duration::from_secs(2));
        assert!(!closed.open);
        assert_eq!(closed.error.as_deref(), Some("connection refused"));
    }
}
