//! Redis: the one place that knows its configuration file.
//!
//! hapair's settings go in a file of its own beside `redis.conf`
//! (`hapair.conf`), included by one line at the end of `redis.conf`, so the
//! distribution's file keeps its own text and hapair's settings come last
//! and win.

use std::path::{Path, PathBuf};

/// hapair's file next to Redis's own configuration.
pub const DROPIN: &str = "hapair.conf";

// Debian's defaults, for `#[serde(default = "...")]`.
pub fn default_config() -> PathBuf {
    "/etc/redis/redis.conf".into()
}
pub fn default_unit() -> String {
    "redis-server".into()
}
pub fn default_port() -> u16 {
    6379
}

/// hapair's include file beside `redis_config`.
pub fn dropin_path(redis_config: &Path) -> PathBuf {
    redis_config.with_file_name(DROPIN)
}

/// `value` as one argument of a redis.conf line: in double quotes, with
/// `\` and `"` escaped and anything unprintable as `\xHH`, the escapes
/// Redis's config parser reads (sdssplitargs). A password with spaces or
/// quotes stays one argument, and Redis starts.
pub fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for byte in value.bytes() {
        match byte {
            b'\\' => quoted.push_str("\\\\"),
            b'"' => quoted.push_str("\\\""),
            b' '..=b'~' => quoted.push(byte as char),
            other => quoted.push_str(&format!("\\x{other:02x}")),
        }
    }
    quoted.push('"');
    quoted
}

/// `text` (redis.conf) with `line` as one of its lines, appended when
/// missing, with a comment saying why.
pub fn with_line(text: &str, line: &str) -> String {
    let lines: Vec<&str> = crate::files::config_lines(text).collect();
    if lines.iter().any(|l| l.trim() == line) {
        return crate::files::join_lines(lines);
    }
    let comment = "# Added by hapair: its settings come last and win.";
    crate::files::join_lines(lines.into_iter().chain([comment, line]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_include_line_is_added_once() {
        let once = with_line("bind 127.0.0.1\n", "include /etc/redis/hapair.conf");
        assert!(once.ends_with("include /etc/redis/hapair.conf\n"));
        assert_eq!(with_line(&once, "include /etc/redis/hapair.conf"), once);
    }

    #[test]
    fn values_are_quoted_as_redis_reads_them() {
        assert_eq!(
            quote("correct horse battery staple"),
            "\"correct horse battery staple\""
        );
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("a\nb"), "\"a\\x0ab\"");
    }
}
