//! Kafka's properties file: setting a key twice equals once; the key is
//! assigned exactly once after; every line that doesn't assign it stays,
//! in order. The pair listener: once it is set, setting it again changes
//! nothing, and no plaintext listener is left open to the pair's address.
#![no_main]

use hapair_core::files::config_lines;
use hapair_core::kafka::{property, with_pair_listener, with_property};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = "advertised.listeners";
    let value = "PLAINTEXT://198.18.0.11:9092";
    let assigns = |line: &str| {
        line.trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
    };
    let once = with_property(text, key, value);
    assert_eq!(with_property(&once, key, value), once);
    assert_eq!(config_lines(&once).filter(|l| assigns(l)).count(), 1);
    let others = |t: &str| -> Vec<String> {
        config_lines(t)
            .filter(|l| !assigns(l))
            .map(String::from)
            .collect()
    };
    assert_eq!(others(&once), others(text));

    let address = std::net::Ipv4Addr::new(198, 18, 0, 11);
    if let Ok(paired) = with_pair_listener(text, address, 9094) {
        assert_eq!(with_pair_listener(&paired, address, 9094).unwrap(), paired);
        let listeners = property(&paired, "listeners").unwrap();
        assert_eq!(listeners.matches("PAIR://198.18.0.11:9094").count(), 1, "{listeners}");
        // Without a map or controllers, a listener named PLAINTEXT is one.
        let plain = property(text, "listener.security.protocol.map").is_none()
            && property(text, "controller.listener.names").is_none();
        for entry in listeners.split(',').filter(|_| plain) {
            for open in ["PLAINTEXT://:", "PLAINTEXT://0.0.0.0:", "PLAINTEXT://198.18.0.11:"] {
                assert!(!entry.starts_with(open), "{listeners}");
            }
        }
    }
});
