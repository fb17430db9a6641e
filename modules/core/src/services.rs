//! systemd units, as the modules manage them on a production host.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::command::Command;

/// A systemd unit, e.g. `redis-server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit(pub String);

impl Unit {
    pub fn new(name: impl Into<String>) -> Unit {
        Unit(name.into())
    }

    pub fn is_active(&self) -> Result<bool> {
        let out = Command::new("systemctl")
            .args(["is-active", "--quiet", &self.0])
            .output()?;
        Ok(out.success())
    }

    pub fn start(&self) -> Result<()> {
        Command::new("systemctl").args(["start", &self.0]).run()?;
        Ok(())
    }

    pub fn stop(&self) -> Result<()> {
        Command::new("systemctl").args(["stop", &self.0]).run()?;
        Ok(())
    }

    pub fn restart(&self) -> Result<()> {
        Command::new("systemctl").args(["restart", &self.0]).run()?;
        Ok(())
    }

    /// Waits until a (re)started service accepts connections on
    /// `address:port`.
    pub fn wait_for_port(&self, address: Ipv4Addr, port: u16) -> Result<()> {
        let timeout = Duration::from_secs(90);
        let open = crate::wait::until(timeout, Duration::from_millis(250), || {
            crate::net::probe(address, port, Duration::from_secs(1)).open
        });
        if !open {
            bail!(
                "{self} was restarted but does not accept connections on {address}:{port} after \
                 {} s; see journalctl -u {self}",
                timeout.as_secs()
            );
        }
        Ok(())
    }

    /// Starts the unit at boot from now on.
    pub fn enable(&self) -> Result<()> {
        Command::new("systemctl")
            .args(["enable", "--quiet", &self.0])
            .run()?;
        Ok(())
    }

    /// Whether the unit starts at boot.
    pub fn is_enabled(&self) -> Result<bool> {
        let out = Command::new("systemctl")
            .args(["is-enabled", "--quiet", &self.0])
            .output()?;
        Ok(out.success())
    }

    /// Where a unit hapair owns is defined: a name without a suffix is a
    /// service (`hapair-mirrormaker`), else the suffix says the kind
    /// (`hapair-files-sync.timer`).
    pub fn file(&self) -> std::path::PathBuf {
        let name = match self.0.contains('.') {
            true => self.0.clone(),
            false => format!("{}.service", self.0),
        };
        std::path::Path::new(UNIT_DIR).join(name)
    }
}

/// Where the units hapair writes go.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// Has systemd read the unit files again (after one was written).
pub fn daemon_reload() -> Result<()> {
    Command::new("systemctl").arg("daemon-reload").run()?;
    Ok(())
}

impl Unit {
    /// The time the unit last entered the active state (a restart moves
    /// it), as systemd reports it.
    pub fn active_since(&self) -> Result<String> {
        let out = Command::new("systemctl")
            .args([
                "show",
                "-p",
                "ActiveEnterTimestampMonotonic",
                "--value",
                &self.0,
            ])
            .run()?;
        Ok(out.stdout.trim().to_string())
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a unit a module manages should be there (`present`) or not
/// (`absent`); a module's option left unset leaves it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Present,
    Absent,
}

/// Where a module installs a copy of itself, for a unit of its own to run
/// (the file sync's timer, the monitor), in root's directory.
#[derive(Debug, Clone, Copy)]
pub struct InstalledSelf(pub &'static str);

impl InstalledSelf {
    /// Whether the installed copy is this very program.
    pub fn is_current(&self) -> Result<bool> {
        let own = std::fs::read("/proc/self/exe").context("can't read this program")?;
        match std::fs::read(self.0) {
            Ok(installed) => Ok(installed == own),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("can't read {}", self.0)),
        }
    }

    /// Copies this program there, making the directories it needs.
    pub fn install(&self) -> Result<()> {
        let own = std::fs::read("/proc/self/exe").context("can't read this program")?;
        let path = std::path::Path::new(self.0);
        let mut missing: Vec<&std::path::Path> = path
            .ancestors()
            .skip(1)
            .take_while(|d| !d.exists())
            .collect();
        missing.reverse();
        for dir in missing {
            crate::files::ensure_dir(dir, 0o755, None)?;
        }
        crate::files::write_atomic(path, &own, 0o755, None)
    }
}

/// Stops and disables `unit`, then removes its file and the others given
/// (the units it runs, its options), and has systemd forget them.
pub fn remove_unit(unit: &Unit, others: &[std::path::PathBuf]) -> Result<()> {
    let _ = unit.stop();
    let _ = Command::new("systemctl")
        .args(["disable", "--quiet", &unit.0])
        .output();
    for path in std::iter::once(unit.file()).chain(others.iter().cloned()) {
        if crate::files::state(&path)?.is_some() {
            let (dir, name) = crate::files::Dir::of(&path)?;
            dir.remove_all(&name)?;
        }
    }
    daemon_reload()
}
