//! Redis: the one place that knows its configuration file.
//!
//! hapair's settings go in a file of its own beside `redis.conf`
//! (`hapair.conf`), included by one line at the end of `redis.conf`, so the
//! distribution's file keeps its own text and hapair's settings come last
//! and win.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::command::Command;
use crate::files::FilePlan;
use crate::secret::Secret;

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

/// A Redis server, reached with redis-cli. The password goes to redis-cli
/// in its environment (`REDISCLI_AUTH`), never on a command line.
#[derive(Debug, Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub password: Option<Secret>,
}

/// What `INFO` answers: `field:value` lines.
pub type Info = BTreeMap<String, String>;

impl Server {
    /// The Redis of this host, on loopback.
    pub fn local(port: u16, password: Option<Secret>) -> Server {
        Server {
            host: "127.0.0.1".into(),
            port,
            password,
        }
    }

    /// Runs one command; its reply, as redis-cli prints it. An error reply
    /// (or no answer) is an error naming the server. For commands whose
    /// reply is the server's own (PING, INFO, CONFIG GET, DBSIZE): a reply
    /// that is user data could start with `ERR` and be taken for an error.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new("redis-cli")
            .args([
                "--no-auth-warning",
                "-h",
                &self.host,
                "-p",
                &self.port.to_string(),
            ])
            .args(args);
        if let Some(password) = &self.password {
            command = command.secret_env("REDISCLI_AUTH", password);
        }
        let out = command.output()?;
        let reply = out.stdout.trim_end().to_string();
        let refused = [
            "ERR",
            "NOAUTH",
            "WRONGPASS",
            "LOADING",
            "MASTERDOWN",
            "READONLY",
        ]
        .iter()
        .any(|prefix| reply.starts_with(prefix));
        if !out.success() || refused || reply.starts_with("Could not connect") {
            let said = if reply.is_empty() {
                out.stderr.trim()
            } else {
                reply.as_str()
            };
            bail!(
                "Redis at {}:{} answered {}: {said}",
                self.host,
                self.port,
                args.join(" ")
            );
        }
        Ok(reply)
    }

    /// `INFO section`, parsed.
    pub fn info(&self, section: &str) -> Result<Info> {
        Ok(parse_info(&self.command(&["INFO", section])?))
    }
}

/// Parses `INFO`'s `field:value` lines (`#` headers and blanks skipped).
pub fn parse_info(text: &str) -> Info {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.trim_end_matches('\r').split_once(':'))
        .map(|(field, value)| (field.to_string(), value.to_string()))
        .collect()
}

/// hapair's include file's text: listening on loopback and the pair's
/// address, with the pair's password both to let clients in and to log in
/// to a primary (so that the roles can swap without a config change), and,
/// on a replica, whom it replicates.
pub fn dropin_text(
    module: &str,
    address: Ipv4Addr,
    password: &Secret,
    replica_of: Option<(Ipv4Addr, u16)>,
) -> String {
    let password = quote(password.expose());
    let mut text = format!(
        "# Written by hapair's {module}: changes here are overwritten.\n\
         bind 127.0.0.1 -::1 {address}\n\
         requirepass {password}\n\
         masterauth {password}\n"
    );
    if let Some((primary, port)) = replica_of {
        text.push_str(&format!(
            "replicaof {primary} {port}\nreplica-read-only yes\n"
        ));
    }
    text
}

/// Plans this host's Redis as one end of the pair: hapair's include file
/// beside `redis_config` (mode 0640: it holds the password; its diff is
/// never shown) and the line of `redis_config` that includes it, both
/// Redis's own. `replica_of` makes it a replica. Returns `redis_config`
/// as checked (for [`needs_restart`]).
pub fn plan_files(
    files: &mut FilePlan,
    module: &str,
    redis_config: &Path,
    address: Ipv4Addr,
    password: &Secret,
    replica_of: Option<(Ipv4Addr, u16)>,
) -> Result<PathBuf> {
    let redis_config = &crate::files::clean_path("redis_config", redis_config)?;
    let found = crate::files::existing(redis_config)?;
    let dropin = dropin_path(redis_config);
    files.secret_file(
        &dropin,
        |_| dropin_text(module, address, password, replica_of),
        0o640,
        Some(found.owner),
    )?;
    let include = format!("include {}", dropin.display());
    files.file(
        redis_config,
        |text| with_line(text, &include),
        found.config_mode(),
        Some(found.owner),
    )?;
    Ok(redis_config.clone())
}

/// Whether [`plan_files`] planned a change that Redis reads only when it
/// starts.
pub fn needs_restart(files: &FilePlan, redis_config: &Path) -> bool {
    files.changes(&dropin_path(redis_config)) || files.changes(redis_config)
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
    fn info_is_read_as_fields() {
        let info = parse_info(
            "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\nslave0:ip=10.0.0.2,port=6379\r\n",
        );
        assert_eq!(info["role"], "slave");
        assert_eq!(info["master_host"], "10.0.0.1");
        assert_eq!(info["slave0"], "ip=10.0.0.2,port=6379");
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
