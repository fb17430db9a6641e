//! Kafka: the one place that knows its configuration file, a Java
//! properties file without includes, edited in place one key at a time.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::command::Command;

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

/// Kafka's command-line tools, from its home (`bin/*.sh`), run as Kafka's
/// own account: its home is often that account's to write, and root never
/// runs a program from there.
#[derive(Debug, Clone)]
pub struct Tools {
    pub home: PathBuf,
    pub run_as: String,
}

impl Tools {
    fn tool(&self, name: &str) -> Command {
        Command::new("runuser")
            .args(["-u", &self.run_as, "--", "env", "KAFKA_HEAP_OPTS=-Xmx128m"])
            .arg(self.home.join("bin").join(name))
    }

    /// The topics of the cluster at `bootstrap` (`host:port`): reaching it
    /// proves it answers and its metadata reads.
    pub fn topics(&self, bootstrap: &str) -> Result<Vec<String>> {
        let out = self
            .tool("kafka-topics.sh")
            .args(["--bootstrap-server", bootstrap, "--list"])
            .run()?;
        Ok(out
            .stdout
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// How many records `topic` holds at `bootstrap`: the sum of its
    /// partitions' end offsets (0 when it does not exist).
    pub fn end_offsets(&self, bootstrap: &str, topic: &str) -> Result<u64> {
        let out = self
            .tool("kafka-get-offsets.sh")
            .args(["--bootstrap-server", bootstrap, "--topic", topic])
            .output()?;
        if !out.success() {
            return Ok(0);
        }
        Ok(parse_end_offsets(&out.stdout))
    }
}

/// Sums `topic:partition:offset` lines (kafka-get-offsets.sh).
pub fn parse_end_offsets(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.trim().rsplit(':').next()?.parse::<u64>().ok())
        .sum()
}

/// `value` as a Java properties file reads it back (Properties.load):
/// backslashes doubled (they are escapes there: a regex `a\.b` would lose
/// its backslash), a leading space escaped. A control character, which
/// would end the line or worse, is refused.
pub fn property_value(what: &str, value: &str) -> Result<String> {
    if value.chars().any(char::is_control) {
        bail!("{what} must be one line, without control characters");
    }
    let escaped = value.replace('\\', "\\\\");
    Ok(match escaped.strip_prefix(' ') {
        Some(rest) => format!("\\ {rest}"),
        None => escaped,
    })
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
    fn property_values_read_back_as_given() {
        assert_eq!(property_value("t", r"orders\..*").unwrap(), r"orders\\..*");
        assert_eq!(property_value("t", " x").unwrap(), r"\ x");
        assert!(property_value("t", "a\nb=c").is_err());
    }

    #[test]
    fn end_offsets_are_summed_over_partitions() {
        assert_eq!(parse_end_offsets("t:0:5\nt:1:7\n"), 12);
        assert_eq!(parse_end_offsets(""), 0);
        assert_eq!(parse_end_offsets("garbage\n"), 0);
    }

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
