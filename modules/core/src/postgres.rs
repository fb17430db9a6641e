//! PostgreSQL: the one place that knows how to talk to it.
//!
//! Queries run as the `postgres` OS user over the local socket, with the SQL
//! on stdin (never on a command line). hapair's settings go in a drop-in
//! under the cluster's `conf.d`, which Debian's `postgresql.conf` includes;
//! the distribution's files are not edited. Role passwords are set as
//! SCRAM-SHA-256 verifiers computed here, so the password itself never
//! reaches the server or its logs.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::command::Command;
use crate::secret::Secret;
use crate::services::Unit;

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
    "/usr/lib/postgresql/15/bin".into()
}
pub fn default_port() -> u16 {
    5432
}
pub fn default_unit() -> String {
    "postgresql@15-main".into()
}
pub fn default_replication_user() -> String {
    format!("{}_replication", crate::account::DEFAULT_NAME)
}

/// A PostgreSQL cluster laid out as Debian's postgresql-common does.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub config_dir: PathBuf,
    pub port: u16,
    pub unit: Unit,
}

impl Cluster {
    /// The cluster whose configuration is in `config_dir` (e.g.
    /// `/etc/postgresql/15/main`), run by `unit`.
    pub fn new(config_dir: impl Into<PathBuf>, port: u16, unit: &str) -> Cluster {
        Cluster {
            config_dir: config_dir.into(),
            port,
            unit: Unit::new(unit),
        }
    }

    /// hapair's drop-in: the last word on the settings it holds.
    pub fn dropin(&self) -> PathBuf {
        self.config_dir.join("conf.d").join("hapair.conf")
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while loaded(self)? == before {
            if std::time::Instant::now() > deadline {
                bail!("PostgreSQL did not re-read its configuration within 30 s of a reload");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let pending =
            self.query("SELECT name FROM pg_settings WHERE pending_restart ORDER BY name")?;
        Ok(pending.lines().map(String::from).collect())
    }

    /// The stored password verifier of `role`: `None` when there is no such
    /// role, `Some(None)` when it has no password.
    pub fn role_password(&self, role: &str) -> Result<Option<Option<String>>> {
        let row = self.query(&format!(
            "SELECT CASE WHEN rolreplication AND rolcanlogin THEN 'usable' ELSE 'unusable' END \
                    || '|' || coalesce(rolpassword, '') \
             FROM pg_authid WHERE rolname = {}",
            quote_literal(role)
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
        role: &str,
        password: &Secret,
        exists: bool,
    ) -> Result<()> {
        let verifier = scram_verifier(password, &random_salt()?, SCRAM_ITERATIONS)?;
        let verb = if exists { "ALTER" } else { "CREATE" };
        self.query(&format!(
            "{verb} ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
            quote_ident(role),
            quote_literal(&verifier)
        ))?;
        Ok(())
    }
}

/// A connection to a primary for replication, authenticated by password.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: std::net::Ipv4Addr,
    pub port: u16,
    pub user: String,
    pub password: Secret,
}

impl Upstream {
    /// Runs a replication-protocol command (IDENTIFY_SYSTEM, SHOW ...,
    /// READ_REPLICATION_SLOT) on the primary. The password travels in the
    /// environment, never on a command line.
    pub fn command(&self, command: &str) -> Result<String> {
        let conninfo = format!(
            "host={} port={} user={} replication=true dbname=replication connect_timeout=10",
            self.host, self.port, self.user
        );
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

const HBA_BEGIN: &str = "# BEGIN hapair: replication from the secondary (cluster_add_secondary)";
const HBA_END: &str = "# END hapair";

/// `pg_hba.conf` text with hapair's block holding exactly one rule: `role`
/// may replicate from `secondary`/32, with scram-sha-256. The block goes
/// first (the first matching rule wins) and replaces any earlier block.
pub fn hba_with_replication_rule(text: &str, role: &str, secondary: std::net::Ipv4Addr) -> String {
    let block = format!(
        "{HBA_BEGIN}\nhost    replication     {}    {secondary}/32    scram-sha-256\n{HBA_END}\n",
        quote_ident(role)
    );
    let mut rest = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line == HBA_BEGIN {
            inside = true;
        } else if inside && line == HBA_END {
            inside = false;
        } else if !inside {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    format!("{block}{rest}")
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
    fn the_hba_block_is_first_holds_one_rule_and_replaces_an_old_one() {
        let debian = "local   all   postgres   peer\nhost all all 127.0.0.1/32 scram-sha-256\n";
        let a = std::net::Ipv4Addr::new(10, 0, 0, 2);
        let once = hba_with_replication_rule(debian, "hapair_replication", a);
        assert_eq!(
            once,
            format!("{HBA_BEGIN}\nhost    replication     \"hapair_replication\"    10.0.0.2/32    scram-sha-256\n{HBA_END}\n{debian}")
        );
        assert_eq!(
            hba_with_replication_rule(&once, "hapair_replication", a),
            once
        );
        let moved = hba_with_replication_rule(
            &once,
            "hapair_replication",
            std::net::Ipv4Addr::new(10, 0, 0, 3),
        );
        assert!(
            moved.contains("10.0.0.3/32") && !moved.contains("10.0.0.2/32"),
            "{moved}"
        );
        assert_eq!(slot_name_for(a), "hapair_10_0_0_2");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
