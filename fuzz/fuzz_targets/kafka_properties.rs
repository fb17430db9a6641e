//! Kafka's properties file: setting a key twice equals once; the key is
//! assigned exactly once after; every line that doesn't assign it stays,
//! in order.
#![no_main]

use hapair_core::files::config_lines;
use hapair_core::kafka::with_property;
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
});
