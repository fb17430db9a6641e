//! authorized_keys and known_hosts: an edit applied twice equals once, the
//! peer's entry is there once, and every line about another key or host
//! stays. Also the parsers of ssh-keygen's and getent's output.
#![no_main]

use std::net::Ipv4Addr;

use hapair_core::files::{config_lines, line_content};
use hapair_core::ssh::{
    authorized_entry, authorized_keys_with, known_hosts_with, parse_fingerprint, pinned_key,
    PublicKey,
};
use libfuzzer_sys::fuzz_target;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOdJ0pq7aN9aX8Q7m3kGq4uYQm1g0hQb5g2w4WZ3v0aA hapair@peer";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = PublicKey::parse(text);
    let _ = parse_fingerprint(text);
    let _ = hapair_core::account::parse_passwd_line(text);
    let key = PublicKey::parse(KEY).unwrap();
    let peer = Ipv4Addr::new(198, 18, 0, 12);

    let once = authorized_keys_with(text, &key, peer);
    assert_eq!(authorized_keys_with(&once, &key, peer), once);
    let entry = authorized_entry(&key, peer);
    assert_eq!(
        config_lines(&once)
            .filter(|l| line_content(l) == entry)
            .count(),
        1
    );
    for line in config_lines(text).filter(|l| !l.contains(&key.base64)) {
        assert!(config_lines(&once).any(|l| l == line), "dropped: {line:?}");
    }

    let pinned = known_hosts_with(text, peer, &key);
    assert_eq!(known_hosts_with(&pinned.text, peer, &key).text, pinned.text);
    let for_peer = |line: &str| {
        let mut words = line_content(line).split_whitespace();
        words
            .next()
            .is_some_and(|h| h.split(',').any(|h| h == "198.18.0.12"))
            && words.next() == Some("ssh-ed25519")
    };
    assert_eq!(
        config_lines(&pinned.text).filter(|l| for_peer(l)).count(),
        1
    );
    assert_eq!(
        pinned_key(&pinned.text, peer).map(|k| k.material()),
        Some(key.material())
    );
    for line in config_lines(text).filter(|l| !for_peer(l)) {
        assert!(
            config_lines(&pinned.text).any(|l| l == line),
            "dropped: {line:?}"
        );
    }
});
