//! systemd units, as the modules manage them on a production host.

use anyhow::Result;

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
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
