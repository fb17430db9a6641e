//! The command line: words (split at NUL) through argv parsing and, for
//! the seed's shorthand, instance_conf's own. Never a panic; a call is
//! either help, or a source of options.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../modules/instance_conf/src/main.rs"]
mod instance_conf;

fuzz_target!(|data: &[u8]| {
    let words = data
        .split(|&b| b == 0)
        .map(|w| std::ffi::OsString::from(String::from_utf8_lossy(w).into_owned()));
    let Ok(argv) = hapair_core::protocol::utf8_argv(words) else {
        return;
    };
    match hapair_core::protocol::parse_argv(&argv) {
        Ok(hapair_core::protocol::Invocation::Run(call)) => {
            if let hapair_core::protocol::Source::Shorthand(words) = call.source {
                if let Ok(options) = instance_conf::shorthand(&words) {
                    let text = serde_json::Value::Object(options).to_string();
                    let reply =
                        hapair_core::protocol::reply_without_module::<instance_conf::Args>(&text);
                    assert!(reply["failed"].is_boolean());
                }
            }
        }
        Ok(hapair_core::protocol::Invocation::Help) | Err(_) => {}
    }
});
