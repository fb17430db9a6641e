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
        self.query("SELECT pg_reload_conf()")?;
        // The postmaster re-reads asynchronously: give it a moment, then ask.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let pending =
            self.query("SELECT name FROM pg_settings WHERE pending_restart ORDER BY name")?;
        Ok(pending.lines().map(String::from).collect())
    }

    /// When the server started: changes on every restart.
    pub fn start_time(&self) -> Result<String> {
        self.query("SELECT pg_postmaster_start_time()")
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

/// Refuses passwords that PostgreSQL would put through SASLprep before
/// hashing: printable ASCII stays as it is, so our verifier is the server's.
pub fn check_password(password: &Secret) -> Result<()> {
    let text = password.expose();
    if text.len() < 12 {
        bail!("the password is too short: use at least 12 characters");
    }
    if !text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        bail!("use printable ASCII characters for the password (letters, digits, punctuation, spaces)");
    }
    Ok(())
}

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
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn passwords_are_long_printable_ascii() {
        assert!(check_password(&Secret::new("short")).is_err());
        assert!(check_password(&Secret::new("ünïcödé password")).is_err());
        assert!(check_password(&Secret::new("a good long pass-word!")).is_ok());
    }
}
