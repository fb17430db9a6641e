//! PostgreSQL: the one place that knows how to talk to it, its files and
//! directories, and (in [`standby`]) how a secondary becomes a standby.
//!
//! Queries run as the `postgres` OS user over the local socket, with the SQL
//! on stdin (never on a command line). hapair's settings go in a drop-in
//! under the cluster's `conf.d`, which Debian's `postgresql.conf` includes;
//! the distribution's files are not edited. Role passwords are set as
//! SCRAM-SHA-256 verifiers computed here, so the password itself never
//! reaches the server or its logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::command::Command;
use crate::secret::Secret;
use crate::services::Unit;

pub mod rewind;
pub mod standby;

// Defaults of the options every PostgreSQL step takes: Debian's layout of
// a PostgreSQL 15 cluster named main, and hapair's replication role. For
// `#[serde(default = "...")]`.
pub fn default_config_dir() -> PathBuf {
    "/etc/postgresql/15/main".into()
}
pub fn default_data_dir() -> PathBuf {
    "/var/lib/postgresql/15/main".into()
}
pub fn default_bin_dir() -> PathBuf {
    debian_bin_dir("15")
}
pub fn default_port() -> u16 {
    5432
}
pub fn default_unit() -> String {
    "postgresql@15-main".into()
}
pub fn default_replication_user() -> RoleName {
    RoleName(format!("{}_replication", crate::account::DEFAULT_NAME))
}

/// Where Debian installs the programs of a PostgreSQL major version.
pub fn debian_bin_dir(major: &str) -> PathBuf {
    Path::new("/usr/lib/postgresql").join(major).join("bin")
}

/// The full version of the PostgreSQL that runs the cluster in `data_dir`,
/// or None when it holds no cluster. PG_VERSION is postgres's file: what
/// it holds is taken only as a major version number, which picks Debian's
/// binary of that version.
pub fn installed_version(data_dir: &Path) -> Result<Option<String>> {
    let path = data_dir.join("PG_VERSION");
    let Some(text) = crate::files::read_optional(&path)? else {
        return Ok(None);
    };
    let major = parse_major_version(&text).with_context(|| {
        format!(
            "{} holds {:?}, not a PostgreSQL major version: nothing is run on its word",
            path.display(),
            crate::protocol::excerpt(text.trim())
        )
    })?;
    let out = Command::new(
        debian_bin_dir(&major)
            .join("postgres")
            .display()
            .to_string(),
    )
    .arg("--version")
    .run()?;
    let version: String = out
        .stdout
        .split_once("(PostgreSQL) ")
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    Ok((!version.is_empty()).then_some(version))
}

/// A major version as PG_VERSION holds it: `15`, or `9.6` before 10.
/// Anything else (a path, a word) is `None`.
pub fn parse_major_version(text: &str) -> Option<String> {
    let text = text.trim();
    let number = |part: &str| {
        !part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit())
    };
    let valid = match text.split_once('.') {
        Some((major, minor)) => number(major) && minor.len() == 1 && number(minor),
        None => number(text),
    };
    valid.then(|| text.to_string())
}

/// A PostgreSQL role name, checked once here: lowercase letters, digits and
/// `_`, starting with a letter or `_`, at most 63 bytes. Such a name needs
/// no quoting in SQL, a connection string, a passfile or pg_hba.conf, and
/// can't carry a newline or a `host=` into any of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct RoleName(String);

impl RoleName {
    pub fn parse(text: &str) -> Result<RoleName> {
        let valid = !text.is_empty()
            && text.len() <= 63
            && text.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            bail!(
                "{:?} is not a role name hapair uses: lowercase letters, digits and _, \
                 starting with a letter, at most 63 characters (e.g. hapair_replication)",
                crate::protocol::excerpt(text)
            );
        }
        Ok(RoleName(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for RoleName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<RoleName, D::Error> {
        let text = String::deserialize(deserializer)?;
        RoleName::parse(&text).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// A libpq connection string of `key='value'` pairs, each value quoted by
/// libpq's rules (`\` and `'` escaped), so no value can add a keyword.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| {
            format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A string value for postgresql.conf: single-quoted, `'` doubled and `\`
/// escaped (the file's parser reads backslash escapes). A control character
/// (a newline would end the setting) is refused.
pub fn conf_quote(value: &str) -> Result<String> {
    if value.chars().any(char::is_control) {
        bail!(
            "{:?} holds a control character: it can't go into postgresql.conf",
            crate::protocol::excerpt(value)
        );
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// What every replication connection requires: TLS, and SCRAM bound to the
/// TLS channel, so a machine in the middle can neither ask for the password
/// in clear nor relay the authentication.
pub const CONNECTION_SECURITY: [(&str, &str); 2] =
    [("sslmode", "require"), ("channel_binding", "require")];

/// A PostgreSQL cluster laid out as Debian's postgresql-common does: its
/// configuration, data and program directories, its port and its unit.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub port: u16,
    pub unit: Unit,
}

impl Cluster {
    /// The cluster whose configuration is in `config_dir` (e.g.
    /// `/etc/postgresql/15/main`), run by `unit`, with Debian's data and
    /// program directories (see [`Cluster::with_dirs`]).
    pub fn new(config_dir: impl Into<PathBuf>, port: u16, unit: &str) -> Cluster {
        Cluster {
            config_dir: config_dir.into(),
            data_dir: default_data_dir(),
            bin_dir: default_bin_dir(),
            port,
            unit: Unit::new(unit),
        }
    }

    /// The same cluster with its data and program directories elsewhere.
    pub fn with_dirs(mut self, data_dir: PathBuf, bin_dir: PathBuf) -> Cluster {
        self.data_dir = data_dir;
        self.bin_dir = bin_dir;
        self
    }

    /// The system identifier recorded in `data_dir`'s control file (the
    /// live one, or a copy's), read by pg_controldata as postgres (the
    /// directory is postgres's).
    pub fn control_system_identifier(&self, data_dir: &Path) -> Result<String> {
        self.control_data(data_dir)?
            .remove("Database system identifier")
            .context("pg_controldata shows no system identifier")
    }

    /// `data_dir`'s control file as pg_controldata shows it, field by
    /// field ("Database cluster state", "Latest checkpoint location", ...).
    pub fn control_data(&self, data_dir: &Path) -> Result<BTreeMap<String, String>> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin_dir.join("pg_controldata"))
            .arg(data_dir)
            .env("LC_ALL", "C")
            .run()?;
        Ok(parse_control_data(&out.stdout))
    }

    /// Where a cleanly stopped cluster's WAL ends: its shutdown checkpoint.
    /// An error when the cluster did not shut down cleanly (crashed, or
    /// still running): its WAL may go on past any checkpoint.
    pub fn shutdown_checkpoint(&self) -> Result<Lsn> {
        let control = self.control_data(&self.data_dir)?;
        let state = control
            .get("Database cluster state")
            .map(String::as_str)
            .unwrap_or("unknown");
        if state != "shut down" {
            bail!(
                "PostgreSQL's data directory {} is {state:?}, not \"shut down\": it did not \
                 stop cleanly",
                self.data_dir.display()
            );
        }
        Lsn::parse(
            control
                .get("Latest checkpoint location")
                .context("pg_controldata shows no checkpoint location")?,
        )
    }

    /// Whether the server is a standby (in recovery).
    pub fn in_recovery(&self) -> Result<bool> {
        Ok(self.query("SELECT pg_is_in_recovery()")? == "t")
    }

    /// hapair's drop-in: the last word on the settings it holds.
    pub fn dropin(&self) -> PathBuf {
        self.config_dir.join("conf.d").join("hapair.conf")
    }

    /// A standby's drop-in (step 8): its connection to the primary and the
    /// addresses it listens on.
    pub fn standby_dropin(&self) -> PathBuf {
        self.config_dir.join("conf.d").join(standby::STANDBY_DROPIN)
    }

    /// Runs `sql` as the postgres superuser; returns the rows, one per line,
    /// columns separated by `|`.
    pub fn query(&self, sql: &str) -> Result<String> {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-f", "-"])
            .stdin(sql)
            .run()
            .context("PostgreSQL refused a query")?;
        Ok(out.stdout.trim_end().to_string())
    }

    /// Re-reads the configuration; returns the settings that only a restart
    /// applies.
    pub fn reload(&self) -> Result<Vec<String>> {
        // The postmaster re-reads on SIGHUP, after pg_reload_conf returns:
        // asked too early, pending_restart would miss a setting that needs a
        // restart. Wait until the load time moves instead of guessing.
        let loaded = |cluster: &Cluster| cluster.query("SELECT pg_conf_load_time()");
        let before = loaded(self)?;
        self.query("SELECT pg_reload_conf()")?;
        let mut failed = None;
        let reread =
            crate::wait::until(
                Duration::from_secs(30),
                Duration::from_millis(50),
                || match loaded(self) {
                    Ok(now) => now != before,
                    Err(e) => {
                        failed = Some(e);
                        true
                    }
                },
            );
        if let Some(e) = failed {
            return Err(e);
        }
        if !reread {
            bail!("PostgreSQL did not re-read its configuration within 30 s of a reload");
        }
        let pending =
            self.query("SELECT name FROM pg_settings WHERE pending_restart ORDER BY name")?;
        Ok(pending.lines().map(String::from).collect())
    }

    /// The stored password verifier of `role`: `None` when there is no such
    /// role, `Some(None)` when it has no password.
    pub fn role_password(&self, role: &RoleName) -> Result<Option<Option<String>>> {
        let row = self.query(&format!(
            "SELECT CASE WHEN rolreplication AND rolcanlogin THEN 'usable' ELSE 'unusable' END \
                    || '|' || coalesce(rolpassword, '') \
             FROM pg_authid WHERE rolname = {}",
            quote_literal(role.as_str())
        ))?;
        if row.is_empty() {
            return Ok(None);
        }
        let (rights, password) = row.split_once('|').unwrap_or((&row, ""));
        // A role without the replication and login rights counts as without
        // a usable password: it is altered either way.
        if rights != "usable" || password.is_empty() {
            return Ok(Some(None));
        }
        Ok(Some(Some(password.to_string())))
    }

    /// Creates `role` for replication, or gives it that right and
    /// `password`, as a verifier.
    pub fn ensure_replication_role(
        &self,
        role: &RoleName,
        password: &Secret,
        exists: bool,
    ) -> Result<()> {
        let verifier = scram_verifier(password, &random_salt()?, SCRAM_ITERATIONS)?;
        let verb = if exists { "ALTER" } else { "CREATE" };
        self.query(&format!(
            "{verb} ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
            quote_ident(role.as_str()),
            quote_literal(&verifier)
        ))?;
        Ok(())
    }

    /// Whether `role` may run what pg_rewind asks of its source server.
    pub fn role_can_rewind(&self, role: &RoleName) -> Result<bool> {
        let checks: Vec<String> = REWIND_FUNCTIONS
            .iter()
            .map(|function| {
                format!(
                    "has_function_privilege({}, {}, 'EXECUTE')",
                    quote_literal(role.as_str()),
                    quote_literal(function)
                )
            })
            .collect();
        Ok(self.query(&format!("SELECT {}", checks.join(" AND ")))? == "t")
    }

    /// Lets `role` run what pg_rewind asks of its source server: after a
    /// failover this host's standby becomes that source, and the role is
    /// replicated to it with these rights.
    pub fn grant_rewind(&self, role: &RoleName) -> Result<()> {
        self.query(&format!(
            "GRANT EXECUTE ON FUNCTION {} TO {}",
            REWIND_FUNCTIONS.join(", "),
            quote_ident(role.as_str())
        ))?;
        Ok(())
    }
}

/// A connection to a primary for replication, authenticated by password.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: std::net::Ipv4Addr,
    pub port: u16,
    pub user: RoleName,
    pub password: Secret,
}

impl Upstream {
    /// Runs a replication-protocol command (IDENTIFY_SYSTEM, SHOW ...,
    /// READ_REPLICATION_SLOT) on the primary. The password travels in the
    /// environment, never on a command line.
    pub fn command(&self, command: &str) -> Result<String> {
        let conninfo = self.conninfo(&[
            ("replication", "true"),
            ("dbname", "replication"),
            ("connect_timeout", "10"),
        ]);
        let out = Command::new("psql")
            .args(["-XAtq", "-w", "-d", &conninfo, "-c", command])
            .secret_env("PGPASSWORD", &self.password)
            .output()?;
        if !out.success() {
            bail!(
                "the primary {}:{} refused a replication connection as {}: {}",
                self.host,
                self.port,
                self.user,
                out.stderr.trim()
            );
        }
        Ok(out.stdout.trim().to_string())
    }

    /// The connection string to the primary: host, port, user, the
    /// required channel security, then `extra`. Never the password.
    pub fn conninfo(&self, extra: &[(&str, &str)]) -> String {
        let (host, port) = (self.host.to_string(), self.port.to_string());
        let mut pairs = vec![
            ("host", host.as_str()),
            ("port", port.as_str()),
            ("user", self.user.as_str()),
        ];
        pairs.extend(CONNECTION_SECURITY);
        pairs.extend(extra);
        conninfo(&pairs)
    }

    /// The primary's system identifier (IDENTIFY_SYSTEM).
    pub fn system_identifier(&self) -> Result<String> {
        let row = self.command("IDENTIFY_SYSTEM")?;
        match row.split('|').next() {
            Some(id) if !id.is_empty() && row.contains('|') => Ok(id.to_string()),
            _ => bail!("unexpected IDENTIFY_SYSTEM answer: {row:?}"),
        }
    }

    /// Whether the physical slot `name` exists on the primary.
    pub fn has_slot(&self, name: &str) -> Result<bool> {
        let row = self.command(&format!("READ_REPLICATION_SLOT {}", quote_ident(name)))?;
        Ok(row.starts_with("physical|"))
    }
}

impl Cluster {
    /// This cluster's system identifier, while it runs.
    pub fn system_identifier(&self) -> Result<String> {
        self.query("SELECT system_identifier FROM pg_control_system()")
    }

    /// The WAL receiver's state: status, sender host, slot. `None` when
    /// there is no receiver (not a standby, or not connected).
    pub fn wal_receiver(&self) -> Result<Option<(String, String, String)>> {
        let row = self.query(
            "SELECT status || '|' || coalesce(sender_host, '') || '|' || coalesce(slot_name, '') \
             FROM pg_stat_wal_receiver",
        )?;
        let fields: Vec<&str> = row.split('|').collect();
        Ok(match fields.as_slice() {
            [status, host, slot] if !status.is_empty() => {
                Some((status.to_string(), host.to_string(), slot.to_string()))
            }
            _ => None,
        })
    }

    /// Creates the physical replication slot `name` unless it exists.
    /// Returns whether it was created.
    pub fn ensure_slot(&self, name: &str) -> Result<bool> {
        if self.has_slot(name)? {
            return Ok(false);
        }
        self.query(&format!(
            "SELECT pg_create_physical_replication_slot({})",
            quote_literal(name)
        ))?;
        Ok(true)
    }

    pub fn has_slot(&self, name: &str) -> Result<bool> {
        let found = self.query(&format!(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = {} AND slot_type = 'physical'",
            quote_literal(name)
        ))?;
        Ok(found == "1")
    }

    /// The replication slots hapair made ([`slot_name_for`]'s names).
    pub fn hapair_slots(&self) -> Result<Vec<String>> {
        Ok(self
            .query("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'hapair\\_%'")?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Drops the slot `name`, ending the walsender that holds it. Callers
    /// first take away what lets the standby in again (its pg_hba rule),
    /// or it takes the slot back.
    pub fn drop_slot(&self, name: &str) -> Result<()> {
        let literal = quote_literal(name);
        let dropped =
            crate::wait::until(Duration::from_secs(30), Duration::from_millis(500), || {
                self.query(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = {literal} AND active_pid IS NOT NULL; \
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = {literal} AND NOT active"
                ))
                .is_ok()
                    && !self.has_slot(name).unwrap_or(true)
            });
        if !dropped {
            bail!(
                "the replication slot {name} is still in use after 30 s; is the standby still \
                 connected?"
            );
        }
        Ok(())
    }

    /// Whether the server takes TLS connections (`ssl = on`): the
    /// replication connection requires it.
    pub fn tls_enabled(&self) -> Result<bool> {
        Ok(self.query("SHOW ssl")? == "on")
    }

    /// The cluster's client authentication file.
    pub fn hba_file(&self) -> PathBuf {
        self.config_dir.join("pg_hba.conf")
    }
}

/// The replication slot of the secondary at `address`, as the primary
/// creates it and the secondary uses it: `hapair_10_0_0_2`.
pub fn slot_name_for(address: std::net::Ipv4Addr) -> String {
    format!("hapair_{}", address.to_string().replace('.', "_"))
}

pub const HBA_BEGIN: &str =
    "# BEGIN hapair: replication from the secondary (cluster_add_secondary)";
pub const HBA_END: &str = "# END hapair";

/// The functions pg_rewind runs on its source server, which a role
/// without superuser needs the right to execute (PostgreSQL's pg_rewind
/// documentation).
pub const REWIND_FUNCTIONS: [&str; 4] = [
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
];

/// A WAL position: `16/B374D848` as PostgreSQL writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(text: &str) -> Result<Lsn> {
        let text = text.trim();
        let parsed = text.split_once('/').and_then(|(high, low)| {
            let high = u32::from_str_radix(high, 16).ok()?;
            let low = u32::from_str_radix(low, 16).ok()?;
            Some(Lsn((u64::from(high) << 32) | u64::from(low)))
        });
        parsed.with_context(|| format!("{text:?} is not a WAL position such as 0/3000060"))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// pg_controldata's `Name:   value` lines, by name.
pub fn parse_control_data(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// `pg_hba.conf` text with hapair's block holding exactly the secondary's
/// rules: `role` may replicate from `secondary`/32, and connect to the
/// `postgres` database (pg_rewind's source connection, once roles swap),
/// over TLS only, with scram-sha-256.
/// The block goes first (the first matching rule wins) and replaces any
/// earlier block. Broken markers (a BEGIN without its END, an END alone, a
/// second block) are an error: lines are never dropped on a guess.
pub fn hba_with_replication_rule(
    text: &str,
    role: &RoleName,
    secondary: std::net::Ipv4Addr,
) -> Result<String> {
    let block = format!(
        "{HBA_BEGIN}\nhostssl replication     {role}    {secondary}/32    scram-sha-256\n\
         hostssl postgres        {role}    {secondary}/32    scram-sha-256\n{HBA_END}\n",
        role = quote_ident(role.as_str())
    );
    Ok(format!("{block}{}", hba_without_replication_rule(text)?))
}

/// `pg_hba.conf` text without hapair's block (the pair broken); the same
/// refusals of broken markers as [`hba_with_replication_rule`].
pub fn hba_without_replication_rule(text: &str) -> Result<String> {
    let mut rest: Vec<&str> = Vec::new();
    let mut inside = false;
    let mut blocks = 0;
    for (number, line) in crate::files::config_lines(text).enumerate() {
        let number = number + 1;
        let marker = crate::files::line_content(line).trim_end();
        if marker == HBA_BEGIN {
            if inside || blocks > 0 {
                bail!("pg_hba.conf has a second hapair block at line {number}; keep one, then run again");
            }
            inside = true;
            blocks += 1;
        } else if marker == HBA_END {
            if !inside {
                bail!("pg_hba.conf has an '{HBA_END}' without its BEGIN at line {number}; fix the file by hand, then run again");
            }
            inside = false;
        } else if !inside {
            rest.push(line);
        }
    }
    if inside {
        bail!(
            "pg_hba.conf has hapair's BEGIN marker without its '{HBA_END}': the rules after it \
             would be lost. Fix the file by hand (add the END line after hapair's rule), then \
             run again"
        );
    }
    Ok(crate::files::join_lines(rest))
}

/// `"name"` for SQL, quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` for SQL (standard_conforming_strings, on since 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// PostgreSQL's default iteration count for SCRAM-SHA-256.
pub const SCRAM_ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn scram_verifier(password: &Secret, salt: &[u8], iterations: u32) -> Result<String> {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.expose().as_bytes(), salt, iterations, &mut salted);
    let hmac = |key: &[u8], text: &[u8]| -> Result<Vec<u8>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).context("HMAC key")?;
        mac.update(text);
        Ok(mac.finalize().into_bytes().to_vec())
    };
    let client_key = hmac(&salted, b"Client Key")?;
    let stored_key = Sha256::digest(&client_key);
    let server_key = hmac(&salted, b"Server Key")?;
    Ok(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        BASE64.encode(salt),
        BASE64.encode(stored_key),
        BASE64.encode(server_key)
    ))
}

/// Whether `stored` (a verifier) is the verifier of `password`, computed
/// with the stored salt and iterations.
pub fn verifier_matches(stored: &str, password: &Secret) -> bool {
    let parse = || -> Option<(u32, Vec<u8>)> {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, _) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        Some((iterations.parse().ok()?, BASE64.decode(salt).ok()?))
    };
    match parse() {
        Some((iterations, salt)) => {
            scram_verifier(password, &salt, iterations).is_ok_and(|v| v == stored)
        }
        None => false,
    }
}

fn random_salt() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .context("can't read /dev/urandom")?;
    Ok(salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_version_number_picks_a_program() {
        assert_eq!(parse_major_version("15\n"), Some("15".into()));
        assert_eq!(parse_major_version("9.6"), Some("9.6".into()));
        for hostile in [
            "../../../tmp/x",
            "15/../../x",
            "",
            "15 x",
            "1234",
            "9.6.1",
            "/tmp/x",
        ] {
            assert_eq!(parse_major_version(hostile), None, "{hostile}");
        }
    }

    /// Made by PostgreSQL 15: `CREATE ROLE vec PASSWORD 'correct horse'`.
    const FROM_POSTGRES: &str = "SCRAM-SHA-256$4096:sqYf4fGSVWTmLk4PwJVOqQ==$dCbRd56qiefKzOOwL1V5zG9qs1LuUsKHDchtSSwgkO0=:gR1GDhJkcD5CJIrwrrth7hVnSXhVcMc7iBIVEO2ZT4s=";

    #[test]
    fn verifiers_are_the_ones_postgresql_makes() {
        let password = Secret::new("correct horse");
        assert!(verifier_matches(FROM_POSTGRES, &password));
        assert!(!verifier_matches(
            FROM_POSTGRES,
            &Secret::new("correct horsf")
        ));
        assert!(!verifier_matches("md5abcdef", &password));
        assert!(!verifier_matches("", &password));
        let salt = BASE64.decode("sqYf4fGSVWTmLk4PwJVOqQ==").unwrap();
        assert_eq!(
            scram_verifier(&password, &salt, 4096).unwrap(),
            FROM_POSTGRES
        );
    }

    #[test]
    fn a_new_verifier_has_a_fresh_salt_and_matches() {
        let password = Secret::new("another long password");
        let a = scram_verifier(&password, &random_salt().unwrap(), SCRAM_ITERATIONS).unwrap();
        let b = scram_verifier(&password, &random_salt().unwrap(), SCRAM_ITERATIONS).unwrap();
        assert_ne!(a, b);
        assert!(verifier_matches(&a, &password) && verifier_matches(&b, &password));
        assert!(!a.contains("another long password"));
    }

    #[test]
    fn wal_positions_parse_order_and_print_as_postgresql_writes_them() {
        let a = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(a.0, 0x16_B374_D848);
        assert_eq!(a.to_string(), "16/B374D848");
        assert!(Lsn::parse("0/3000060").unwrap() < Lsn::parse("1/0").unwrap());
        for bad in ["", "16", "x/1", "1/2/3", "100000000/0"] {
            assert!(Lsn::parse(bad).is_err(), "{bad}");
        }
        let control = parse_control_data(
            "Database cluster state:               shut down\nLatest checkpoint location:           0/3000060\n",
        );
        assert_eq!(control["Database cluster state"], "shut down");
        assert_eq!(control["Latest checkpoint location"], "0/3000060");
    }

    #[test]
    fn the_hba_block_is_first_holds_one_rule_and_replaces_an_old_one() {
        let debian = "local   all   postgres   peer\nhost all all 127.0.0.1/32 scram-sha-256\n";
        let a = std::net::Ipv4Addr::new(10, 0, 0, 2);
        let role = default_replication_user();
        let once = hba_with_replication_rule(debian, &role, a).unwrap();
        assert_eq!(
            once,
            format!(
                "{HBA_BEGIN}\nhostssl replication     \"hapair_replication\"    10.0.0.2/32    scram-sha-256\n\
                 hostssl postgres        \"hapair_replication\"    10.0.0.2/32    scram-sha-256\n{HBA_END}\n{debian}"
            )
        );
        assert_eq!(hba_with_replication_rule(&once, &role, a).unwrap(), once);
        let moved =
            hba_with_replication_rule(&once, &role, std::net::Ipv4Addr::new(10, 0, 0, 3)).unwrap();
        assert!(
            moved.contains("10.0.0.3/32") && !moved.contains("10.0.0.2/32"),
            "{moved}"
        );
        assert_eq!(slot_name_for(a), "hapair_10_0_0_2");
        // Breaking the pair takes the block out and leaves every other rule.
        assert_eq!(hba_without_replication_rule(&once).unwrap(), debian);
        assert_eq!(hba_without_replication_rule(debian).unwrap(), debian);
    }

    #[test]
    fn broken_hba_markers_are_an_error_never_a_loss() {
        let role = default_replication_user();
        let a = std::net::Ipv4Addr::new(10, 0, 0, 2);
        let rules = "local all postgres peer\nhost all all 0.0.0.0/0 reject\n";
        for broken in [
            format!("{HBA_BEGIN}\nhost replication x 1.2.3.4/32 md5\n{rules}"),
            format!("{rules}{HBA_END}\n"),
            format!("{HBA_BEGIN}\n{HBA_END}\n{HBA_BEGIN}\n{HBA_END}\n{rules}"),
        ] {
            let err = hba_with_replication_rule(&broken, &role, a).unwrap_err();
            assert!(format!("{err}").contains("run again"), "{err}");
            assert!(hba_without_replication_rule(&broken).is_err());
        }
    }

    #[test]
    fn role_names_are_checked_once_and_connection_strings_quoted() {
        for bad in [
            "",
            "Hapair",
            "x host=evil",
            "a\nrestore_command='touch /tmp/x'",
            "a'b",
            "a:b",
            &"a".repeat(64),
        ] {
            assert!(RoleName::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_value::<RoleName>(serde_json::json!(bad)).is_err());
        }
        assert_eq!(
            RoleName::parse("hapair_replication").unwrap().as_str(),
            "hapair_replication"
        );
        assert_eq!(
            conninfo(&[("user", "a b"), ("passfile", "/x/it's\\")]),
            "user='a b' passfile='/x/it\\'s\\\\'"
        );
        assert_eq!(conf_quote("host='a' x\\").unwrap(), "'host=''a'' x\\\\'");
        assert!(conf_quote("a\nrestore_command='x'").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
