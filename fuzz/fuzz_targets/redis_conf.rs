//! redis.conf: the include line is added once and no other line moves; a
//! quoted value reads back, by Redis's own rules (sdssplitargs), as one
//! argument equal to what went in.
#![no_main]

use hapair_core::files::config_lines;
use hapair_core::redis::{quote, with_line};
use libfuzzer_sys::fuzz_target;

/// Redis's reading of one double-quoted argument.
fn read_quoted(text: &str) -> String {
    let inner = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap();
    let bytes = inner.as_bytes();
    let mut value = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            match bytes[i + 1] {
                b'x' => {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap();
                    value.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 4;
                    continue;
                }
                other => value.push(other),
            }
            i += 2;
        } else {
            assert_ne!(bytes[i], b'"', "an unescaped quote ends the argument");
            value.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(value).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(read_quoted(&quote(text)), text);
    let include = "include /etc/redis/hapair.conf";
    let once = with_line(text, include);
    assert_eq!(with_line(&once, include), once);
    assert!(config_lines(&once).any(|l| l.trim() == include));
    let before: Vec<&str> = config_lines(text).collect();
    let kept: Vec<&str> = config_lines(&once).take(before.len()).collect();
    assert_eq!(kept, before, "a line moved or went");
});
