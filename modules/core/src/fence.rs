//! The fence of an old primary: its writes stopped before a planned
//! failover (or when it comes back after an unplanned one), and kept
//! stopped until `cluster_rejoin` makes it the other host's secondary.
//!
//! - PostgreSQL and Redis are stopped, and a systemd drop-in on each unit
//!   keeps them from starting again, at a reboot too, while the fence's
//!   record exists (`ConditionPathExists=!record`);
//! - Kafka keeps running, so that the other host's MirrorMaker can read
//!   what it has, but takes no record at all: `message.max.bytes=0` as the
//!   brokers' default, applied at once (every producer gets
//!   RecordTooLargeException, and nothing it sends is acknowledged);
//! - the record (`fence.json` beside the instance config) keeps where the
//!   writes ended, for the failover to check the other host against.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::files;
use crate::services::UNIT_DIR;

/// The drop-in's name in each fenced unit's drop-in directory.
pub const DROPIN: &str = "hapair-fence.conf";

/// The broker setting that fences Kafka, and its fenced value.
pub const KAFKA_SETTING: &str = "message.max.bytes";
pub const KAFKA_FENCED: &str = "0";

/// Where the writes ended on the fenced host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the fence went up (seconds since the epoch).
    pub fenced_at: u64,
    /// PostgreSQL's shutdown checkpoint: the end of its WAL.
    pub final_lsn: Option<String>,
    /// Redis's replication offset once its writes were paused.
    pub redis_offset: Option<u64>,
}

/// The fence's record beside `instance_config`.
pub fn record_path(instance_config: &Path) -> PathBuf {
    files::parent_of(instance_config).join("fence.json")
}

impl Record {
    pub fn load(path: &Path) -> Result<Option<Record>> {
        match files::read_optional(path)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not a fence record", path.display())),
        }
    }

    /// Root's file, mode 0644: it holds positions, no secret.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        files::write_atomic(path, format!("{text}\n").as_bytes(), 0o644, None)
    }
}

/// The fence's drop-in for `unit`.
pub fn dropin_path(unit: &str) -> PathBuf {
    let name = match unit.contains('.') {
        true => unit.to_string(),
        false => format!("{unit}.service"),
    };
    Path::new(UNIT_DIR).join(format!("{name}.d")).join(DROPIN)
}

/// The drop-in: the unit does not start while `record` exists. systemd
/// reads the path as it is (no quoting, `%` starts a specifier), so a path
/// with anything but plain characters is refused.
pub fn dropin_text(record: &Path) -> Result<String> {
    let text = record
        .to_str()
        .context("the fence record's path is not UTF-8")?;
    if !text.starts_with('/')
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
    {
        bail!("the fence record's path {text:?} has characters a systemd condition can't hold");
    }
    Ok(format!(
        "# Written by hapair's cluster_fence: this host was the primary before a failover.\n\
         # It must not serve until cluster_rejoin makes it the other host's secondary\n\
         # (which removes this file and {text}).\n\
         [Unit]\n\
         ConditionPathExists=!{text}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropin_names_the_record_and_refuses_odd_paths() {
        let text = dropin_text(Path::new("/etc/hapair/fence.json")).unwrap();
        assert!(text.contains("\nConditionPathExists=!/etc/hapair/fence.json\n"));
        assert!(dropin_text(Path::new("/etc/ha pair/fence.json")).is_err());
        assert!(dropin_text(Path::new("/etc/%h/fence.json")).is_err());
        assert!(dropin_text(Path::new("fence.json")).is_err());
        assert_eq!(
            dropin_path("postgresql@15-main"),
            Path::new("/etc/systemd/system/postgresql@15-main.service.d/hapair-fence.conf")
        );
        assert_eq!(
            record_path(Path::new("/etc/hapair/instance.json")),
            Path::new("/etc/hapair/fence.json")
        );
    }
}
