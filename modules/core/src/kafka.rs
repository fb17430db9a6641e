//! Kafka: the one place that knows its configuration file, a Java
//! properties file without includes, edited in place one key at a time.

use std::path::PathBuf;

// The tarball's layout under /opt/kafka, for `#[serde(default = "...")]`.
pub fn default_home() -> PathBuf {
    "/opt/kafka".into()
}
pub fn default_config() -> PathBuf {
    "/opt/kafka/config/server.properties".into()
}
pub fn default_port() -> u16 {
    9092
}
pub fn default_unit() -> String {
    "kafka".into()
}

/// Whether `line` assigns `key` (`key=value`, `key = value`, `key: value`).
fn assigns(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
}

/// A properties file with `key=value` set: the first assignment of the key
/// is replaced (later ones, which Java would let win, are dropped), or one
/// is appended. Every other line stays as it is.
pub fn with_property(text: &str, key: &str, value: &str) -> String {
    let wanted = format!("{key}={value}");
    let mut done = false;
    let mut lines: Vec<&str> = Vec::new();
    for line in crate::files::config_lines(text) {
        if assigns(line, key) {
            if !done {
                lines.push(&wanted);
                done = true;
            }
        } else {
            lines.push(line);
        }
    }
    if !done {
        lines.push(&wanted);
    }
    crate::files::join_lines(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_set_once_in_place() {
        let text = "a=1\nadvertised.listeners=PLAINTEXT://localhost:9092\nb=2\n";
        assert_eq!(
            with_property(text, "advertised.listeners", "PLAINTEXT://10.0.0.1:9092"),
            "a=1\nadvertised.listeners=PLAINTEXT://10.0.0.1:9092\nb=2\n"
        );
        assert_eq!(with_property("a=1", "k", "v"), "a=1\nk=v\n");
        assert_eq!(with_property("k = old\nk: older\n", "k", "v"), "k=v\n");
        assert_eq!(with_property("kk=1\n", "k", "v"), "kk=1\nk=v\n");
    }
}
