//! Making this host stop following the other, for all four services: what
//! breaking the pair (`cluster_enter_standalone_mode`) and a failover
//! (`cluster_failover`) share.
//!
//! - files: the sync timer is removed;
//! - event bus: MirrorMaker's unit and configuration are removed;
//! - KV store: a replica stops replicating (`REPLICAOF NO ONE`) and keeps
//!   every key, writable; hapair's include loses `replicaof`;
//! - PostgreSQL: a standby is promoted (writable, on a timeline of its own)
//!   and its drop-in loses the connection to the other host; its passfile
//!   goes.
//!
//! Each part is planned only when it is still there.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::files::{self, FilePlan};
use crate::postgres::Cluster;
use crate::redis::{self, Server};
use crate::services::{self, Unit};
use crate::{kafka, rsync, Action};

/// A standby's settings in its drop-in, and a replica's in Redis's
/// include: what makes each follow the other host.
const STANDBY_SETTINGS: [&str; 2] = ["primary_conninfo", "primary_slot_name"];
const REPLICA_SETTINGS: [&str; 2] = ["replicaof", "replica-read-only"];

/// This host's services, as a follower of the other host.
pub struct Follower<'a> {
    pub cluster: &'a Cluster,
    pub redis: &'a Server,
    pub redis_config: &'a Path,
}

/// One part of stopping to follow, besides the files.
#[derive(Debug, Clone, PartialEq)]
pub enum Detach {
    RemoveTimer,
    RemoveMirrorMaker,
    StopReplica,
    Promote,
    RemovePassfile(PathBuf),
}

impl Action for Detach {
    fn describe(&self) -> String {
        match self {
            Detach::RemoveTimer => format!("stop and remove {}.timer", rsync::SYNC_UNIT),
            Detach::RemoveMirrorMaker => format!("stop and remove {}", kafka::MIRRORMAKER_UNIT),
            Detach::StopReplica => "make Redis stop replicating (REPLICAOF NO ONE)".into(),
            Detach::Promote => "promote PostgreSQL (pg_promote): it takes writes".into(),
            Detach::RemovePassfile(path) => format!("remove {}", path.display()),
        }
    }
}

fn sync_timer() -> Unit {
    Unit::new(format!("{}.timer", rsync::SYNC_UNIT))
}

impl Follower<'_> {
    /// What still follows the other host: the actions, in the order they
    /// apply, and the files' edits added to `files`. Files and the bus
    /// come first: nothing is mirrored into a host about to take writes.
    pub fn plan(&self, files: &mut FilePlan) -> Result<Vec<Detach>> {
        let mut actions = Vec::new();
        if files::state(&sync_timer().file())?.is_some() {
            actions.push(Detach::RemoveTimer);
        }
        if files::state(&Unit::new(kafka::MIRRORMAKER_UNIT).file())?.is_some() {
            actions.push(Detach::RemoveMirrorMaker);
        }
        if self.redis_role()?.as_deref() == Some("slave") {
            actions.push(Detach::StopReplica);
        }
        edit_existing(
            files,
            &redis::dropin_path(self.redis_config),
            &REPLICA_SETTINGS,
        )?;
        if self.cluster.in_recovery()? {
            actions.push(Detach::Promote);
        }
        edit_existing(files, &self.cluster.standby_dropin(), &STANDBY_SETTINGS)?;
        let passfile = files::parent_of(&self.cluster.data_dir).join("hapair.pgpass");
        if files::state(&passfile)?.is_some() {
            actions.push(Detach::RemovePassfile(passfile));
        }
        Ok(actions)
    }

    /// Redis's role: `master` or `slave`.
    pub fn redis_role(&self) -> Result<Option<String>> {
        Ok(self.redis.info("replication")?.get("role").cloned())
    }

    /// Applies one action. The files are applied after every action, by
    /// [`Follower::apply_files`].
    pub fn apply(&self, action: &Detach) -> Result<()> {
        match action {
            Detach::RemoveTimer => services::remove_unit(
                &sync_timer(),
                &[
                    Unit::new(format!("{}.service", rsync::SYNC_UNIT)).file(),
                    PathBuf::from(rsync::SYNC_ARGS),
                ],
            ),
            Detach::RemoveMirrorMaker => services::remove_unit(
                &Unit::new(kafka::MIRRORMAKER_UNIT),
                &[PathBuf::from(kafka::MIRRORMAKER_CONFIG)],
            ),
            Detach::StopReplica => self.redis.command(&["REPLICAOF", "NO", "ONE"]).map(drop),
            Detach::Promote => {
                // Waits for the promotion to end: PostgreSQL answers t.
                let promoted = self.cluster.query("SELECT pg_promote(true, 60)")?;
                if promoted != "t" {
                    bail!("PostgreSQL was not promoted within 60 s (pg_promote said {promoted:?}); see its log");
                }
                Ok(())
            }
            // Removed before the drop-in is read again, with the same reload.
            Detach::RemovePassfile(path) => {
                let (dir, name) = files::Dir::of(path)?;
                dir.remove_all(&name)
            }
        }
    }

    /// Writes the planned files (Redis's include and PostgreSQL's drop-in
    /// without the settings that followed the other host, and whatever else
    /// the module planned) and has PostgreSQL read them again. Returns a
    /// note when a setting waits for a restart.
    pub fn apply_files(&self, files: &FilePlan) -> Result<Vec<String>> {
        files.apply()?;
        if files.changes.is_empty() {
            return Ok(Vec::new());
        }
        let restart = self.cluster.reload()?;
        Ok(match restart.is_empty() {
            true => Vec::new(),
            false => vec![format!(
                "PostgreSQL applies {} at its next restart",
                restart.join(", ")
            )],
        })
    }
}

/// Plans `path` without the lines setting `keys`, when the file is there,
/// with its own mode and owner.
fn edit_existing(files: &mut FilePlan, path: &Path, keys: &[&str]) -> Result<()> {
    let Some(state) = files::state(path)? else {
        return Ok(());
    };
    files.file(
        path,
        |text| files::without_settings(text, keys),
        state.config_mode(),
        Some(state.owner),
    )
}
