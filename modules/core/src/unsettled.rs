//! Files written for a service that the service has not taken yet.
//!
//! A module that rewrites a service's settings then reloads or restarts the
//! service, because the file changed. Killed in between (SIGKILL, a lost
//! controller), it leaves the new file in place and the service on the old
//! settings; the next run finds the file as it should be and would do
//! nothing, for good. So before a [`crate::files::FilePlan`] writes its
//! files, each is recorded here as unsettled, and a later plan counts an
//! unsettled file as a change even when its text is right, so the module
//! makes its service take it. The records of a run are removed when the
//! module ends without failing ([`settle_written`], called by the protocol).
//!
//! The records are root's, under [`crate::lock::LOCK_DIR`] on a tmpfs: a
//! reboot starts every service on the files on disk, and clears them too.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::files;

/// The records' directory.
const DIR: &str = "/run/hapair/unsettled";

/// The files this process recorded, to settle when it ends well.
static WRITTEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The record of `path`: named by its hash, holding the path itself (so a
/// hash collision can't settle or unsettle another file).
fn record_of(path: &Path) -> PathBuf {
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(DIR).join(name)
}

/// Whether a run wrote `path` and ended before settling it.
pub fn is_unsettled(path: &Path) -> Result<bool> {
    Ok(
        files::read_optional(&record_of(path))?
            .is_some_and(|recorded| Path::new(&recorded) == path),
    )
}

/// Records `paths` as unsettled, before they are written.
pub fn record(paths: &[&Path]) -> Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    files::ensure_dir(Path::new(crate::lock::LOCK_DIR), 0o755, None)?;
    files::ensure_dir(Path::new(DIR), 0o700, None)?;
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    for path in paths {
        files::write_atomic(
            &record_of(path),
            path.as_os_str().as_encoded_bytes(),
            0o600,
            None,
        )?;
        written.push(path.to_path_buf());
    }
    Ok(())
}

/// Removes the records of this process's files: the module ended without
/// failing, so its services have taken them.
pub fn settle_written() -> Result<()> {
    let written = std::mem::take(&mut *WRITTEN.lock().unwrap_or_else(|e| e.into_inner()));
    for path in written {
        match std::fs::remove_file(record_of(&path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::new(e).context(format!(
                    "can't remove the record of {} in {DIR}",
                    path.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_has_its_own_record_in_root_s_directory() {
        let a = record_of(Path::new("/etc/redis/redis.conf"));
        let b = record_of(Path::new("/etc/redis/redis.conf.d"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new(DIR)));
        assert_eq!(a.file_name().unwrap().len(), 32);
    }
}
