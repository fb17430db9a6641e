//! The instance config: any text either loads or is refused; what loads
//! renders and loads back the same; any key either parses or is refused,
//! and a value set at a known key reads back as set.
#![no_main]

use std::path::Path;

use hapair_core::instance::{InstanceConfig, Key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (key_text, config_text) = text.split_once('\n').unwrap_or((text, ""));
    let path = Path::new("/etc/hapair/instance.json");
    if let Ok(config) = InstanceConfig::parse(path, config_text) {
        let rendered = config.render();
        let again = InstanceConfig::parse(path, &rendered).expect("a rendered config loads");
        assert_eq!(again.render(), rendered);
        let _ = config.is_protected();
        if let Ok(key) = Key::parse(key_text) {
            // The value: the text itself as JSON when it is JSON (nested,
            // perhaps deeply), else its first characters as a string.
            let value = serde_json::from_str(config_text).unwrap_or_else(|_| {
                serde_json::Value::String(config_text.chars().take(32).collect())
            });
            if let Ok(value) = key.coerce(value) {
                let mut changed = config.clone();
                if changed.set(key.name, value.clone()).is_ok() {
                    assert_eq!(changed.value(&key), Some(value));
                    let reloaded = InstanceConfig::parse(path, &changed.render()).unwrap();
                    assert_eq!(reloaded.render(), changed.render());
                }
            }
        }
    }
});
