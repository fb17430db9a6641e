//! The files on a real pair, as the seed's `cluster_replicate_files`: the
//! primary's directories pulled to the secondary with rsync over SSH as
//! the cluster account. Assertions are on the secondary's files: content,
//! modes, owners, link counts, ACLs and xattrs.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{set_protected, trust};
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, ModuleRun, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "files_every_kind_of_file_arrives_identical_and_a_rerun_changes_nothing",
        every_kind_of_file,
    ),
    (
        "files_a_deletion_on_the_primary_is_made_here_but_never_past_max_delete",
        deletions,
    ),
    (
        "files_check_mode_lists_the_change_and_changes_nothing",
        check_mode,
    ),
    (
        "files_this_hosts_keys_and_config_are_never_overwritten",
        own_state_kept,
    ),
    (
        "files_a_protected_secondary_is_refused_and_its_files_stay",
        protected,
    ),
    (
        "files_the_timer_brings_a_new_file_within_its_interval",
        timer,
    ),
    (
        "files_by_hand_on_a_terminal_the_sync_shows_its_progress",
        progress_on_a_terminal,
    ),
];

fn main() -> ExitCode {
    suite("files", 2, 9, TESTS)
}

const DIR: &str = "/srv/app";

/// Keys and trust (steps 2, 3), and an unprotected secondary.
fn ready(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    trust(primary, secondary)?;
    set_protected(secondary, false)?;
    secondary.sh(&format!("mkdir -p {DIR}"))?;
    Ok(())
}

fn sync(secondary: &Host, primary: &Host, extra: Value) -> Result<ModuleRun> {
    let mut args = json!({"primary_address": primary.ip, "directories": [DIR],
                          "_ansible_diff": true});
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    secondary.run_module("cluster_replicate_files", &args)
}

/// Everything a copy must keep, for each file under `DIR`: type, mode,
/// owner, size, link count, symlink target, content hash, ACL and xattrs.
fn manifest(host: &Host) -> Result<String> {
    host.write(
        "/tmp/manifest.sh",
        &format!(
            "cd {DIR} && find . -mindepth 1 -print0 | LC_ALL=C sort -z |\n\
             while IFS= read -r -d '' f; do\n\
               printf '%s|%s|' \"$f\" \"$(stat -c '%F %a %u:%g %s %h' \"$f\")\"\n\
               if [ -L \"$f\" ]; then readlink \"$f\"\n\
               elif [ -f \"$f\" ]; then sha256sum < \"$f\" | cut -c1-16; else echo; fi\n\
               getfacl -cp \"$f\" 2>/dev/null | grep -v '^$' | tr '\\n' ' '\n\
               getfattr -h -d -m - --absolute-names \"$f\" 2>/dev/null | grep -v '^#' | grep -v '^$' | tr '\\n' ' '\n\
               echo\n\
             done\n"
        ),
    )?;
    host.sh("bash /tmp/manifest.sh")
}

fn every_kind_of_file(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!(
        "rm -rf {DIR} && mkdir -p {DIR}/nested/deeper && cd {DIR} && \
         echo config > app.conf && chown 1234:2345 app.conf && chmod 640 app.conf && \
         chmod o+r app.conf && \
         echo deep > nested/deeper/file && \
         ln app.conf hardlink.conf && ln -s nested/deeper/file link && \
         truncate -s 64M sparse.img && printf 'end' >> sparse.img && \
         : > empty && \
         echo spaces > 'name with spaces' && \
         echo newline > \"$(printf 'new\\nline')\" && \
         echo unicode > 'café ü 日本' && \
         setfacl -m u:1234:rw app.conf && \
         setfattr -n user.note -v 'kept by rsync' nested/deeper/file"
    ))?;
    let run = sync(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(run.changed(), true);
    let (theirs, ours) = (manifest(primary)?, manifest(secondary)?);
    if theirs != ours {
        bail!("the secondary's files differ from the primary's:\n--- primary\n{theirs}\n--- secondary\n{ours}");
    }
    for expected in [
        "user::rw-",
        "user:1234:rw-",
        "user.note=\"kept by rsync\"",
        "1234:2345",
        " 2|",
    ] {
        if !ours.contains(expected) {
            bail!("{expected:?} is not in the secondary's manifest:\n{ours}");
        }
    }
    // A hard link stays one file; a sparse file stays sparse.
    ensure_eq!(
        secondary
            .sh(&format!(
                "stat -c %i {DIR}/app.conf {DIR}/hardlink.conf | uniq | wc -l"
            ))?
            .trim(),
        "1"
    );
    let allocated: u64 = secondary
        .sh(&format!("du -B1 {DIR}/sparse.img | cut -f1"))?
        .trim()
        .parse()?;
    if allocated > 4 << 20 {
        bail!("the sparse file takes {allocated} bytes on the secondary");
    }
    ensure_eq!(
        run.json["files_transferred"].as_u64().unwrap_or(0) >= 7,
        true
    );
    let record: Value = serde_json::from_str(&secondary.sh("cat /run/hapair/files-sync.json")?)?;
    ensure_eq!(record["ok"], true);

    // A second run changes nothing.
    let again = sync(secondary, primary, json!({}))?.ok()?;
    ensure_eq!(again.changed(), false);
    ensure_eq!(manifest(secondary)?, ours);
    Ok(())
}

fn deletions(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!(
        "rm -rf {DIR} && mkdir -p {DIR} && cd {DIR} && for i in $(seq 1 20); do echo $i > f$i; done"
    ))?;
    sync(secondary, primary, json!({}))?.ok()?;
    primary.sh(&format!("rm {DIR}/f1"))?;
    let deleted = sync(secondary, primary, json!({"max_delete": 5}))?.ok()?;
    ensure_eq!(deleted.json["files_deleted"], 1);
    ensure_eq!(secondary.succeeds(&format!("test -e {DIR}/f1"))?, false);

    // The primary's directory emptied (an unmounted disk, say): more
    // deletions than max_delete, and the secondary keeps every file.
    primary.sh(&format!("rm -f {DIR}/*"))?;
    let before = secondary.snapshot(&[DIR])?;
    let refused = sync(secondary, primary, json!({"max_delete": 5}))?;
    if !refused.failed() || !refused.msg().contains("max_delete") {
        bail!("an emptied primary was synced: {}", refused.stdout);
    }
    before.ensure_unchanged(&secondary.snapshot(&[DIR])?)?;
    ensure_eq!(secondary.sh(&format!("ls {DIR} | wc -l"))?.trim(), "19");
    let record: Value = serde_json::from_str(&secondary.sh("cat /run/hapair/files-sync.json")?)?;
    ensure_eq!(record["ok"], false);
    Ok(())
}

fn check_mode(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!("mkdir -p {DIR} && echo one > {DIR}/settled"))?;
    sync(secondary, primary, json!({}))?.ok()?;
    primary.sh(&format!("echo new > {DIR}/arrives-later"))?;
    let before = secondary.snapshot(&[DIR, "/etc/hapair"])?;
    let check = sync(secondary, primary, json!({"_ansible_check_mode": true}))?.ok()?;
    ensure_eq!(check.changed(), true);
    if !check.json["diff"].to_string().contains("arrives-later") {
        bail!(
            "the check-mode diff does not list the new file: {}",
            check.json["diff"]
        );
    }
    before.ensure_unchanged(&secondary.snapshot(&[DIR, "/etc/hapair"])?)?;
    Ok(())
}

fn own_state_kept(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    // The cluster account's home holds its keys: a sync of it brings the
    // primary's other files, never the primary's keys.
    primary
        .sh("echo from-the-primary > /var/lib/hapair/notes && chmod 644 /var/lib/hapair/notes")?;
    let keys = secondary.snapshot(&["/var/lib/hapair/.ssh", "/etc/hapair/instance.json"])?;
    sync(
        secondary,
        primary,
        json!({"directories": ["/var/lib/hapair"]}),
    )?
    .ok()?;
    ensure_eq!(
        secondary.sh("cat /var/lib/hapair/notes")?.trim(),
        "from-the-primary"
    );
    keys.ensure_unchanged(
        &secondary.snapshot(&["/var/lib/hapair/.ssh", "/etc/hapair/instance.json"])?,
    )?;
    // The instance config's own directory is never a directory to pull.
    let refused = sync(secondary, primary, json!({"directories": ["/etc/hapair"]}))?;
    if !refused.failed() || !refused.msg().contains("own state") {
        bail!("/etc/hapair was synced: {}", refused.stdout);
    }
    Ok(())
}

fn protected(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!(
        "mkdir -p {DIR} && echo new > {DIR}/while-protected"
    ))?;
    set_protected(secondary, true)?;
    let before = secondary.snapshot(&[DIR])?;
    let refused = sync(secondary, primary, json!({}));
    set_protected(secondary, false)?;
    let refused = refused?;
    if !refused.failed() || !refused.msg().contains("protected instance") {
        bail!("a protected secondary was synced: {}", refused.stdout);
    }
    before.ensure_unchanged(&secondary.snapshot(&[DIR])?)?;
    Ok(())
}

fn timer(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!("mkdir -p {DIR}"))?;
    let installed = sync(
        secondary,
        primary,
        json!({"timer": "present", "interval": 5}),
    )?
    .ok()?;
    ensure_eq!(installed.changed(), true);
    ensure_eq!(
        secondary
            .sh("systemctl is-active hapair-files-sync.timer")?
            .trim(),
        "active"
    );
    let again = sync(
        secondary,
        primary,
        json!({"timer": "present", "interval": 5}),
    )?
    .ok()?;
    ensure_eq!(again.changed(), false);
    primary.sh(&format!("echo by-the-timer > {DIR}/timed"))?;
    wait_for(
        "the timer to bring the new file",
        Duration::from_secs(60),
        || secondary.succeeds(&format!("grep -q by-the-timer {DIR}/timed")),
    )?;
    let removed = sync(secondary, primary, json!({"timer": "absent"}))?.ok()?;
    ensure_eq!(removed.changed(), true);
    ensure_eq!(
        secondary.succeeds("test -e /etc/systemd/system/hapair-files-sync.timer")?,
        false
    );
    ensure_eq!(
        sync(secondary, primary, json!({"timer": "absent"}))?
            .ok()?
            .changed(),
        false
    );
    Ok(())
}

/// Run by hand on a terminal (`script` gives it one), the module shows
/// rsync's progress and the files it pulls as they come, then its summary;
/// the files arrive as from Ansible.
fn progress_on_a_terminal(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    ready(fleet)?;
    primary.sh(&format!(
        "mkdir -p {DIR}/by-hand && head -c 8M /dev/urandom > {DIR}/by-hand/big && \
         echo small > {DIR}/by-hand/small"
    ))?;
    secondary.write(
        "/tmp/by-hand.json",
        &json!({"primary_address": primary.ip, "directories": [DIR]}).to_string(),
    )?;
    let shown = secondary.sh(
        "script -qec '/usr/local/lib/hapair-test/cluster_replicate_files /tmp/by-hand.json' \
         /dev/null",
    )?;
    for expected in [
        "to-chk=",
        "by-hand/big",
        &format!("pulling {DIR} from {}", primary.ip),
    ] {
        if !shown.contains(expected) {
            bail!("the terminal does not show {expected:?}:\n{shown}");
        }
    }
    ensure_eq!(
        secondary.sh(&format!("cat {DIR}/by-hand/small"))?.trim(),
        "small"
    );
    ensure_eq!(
        secondary
            .sh(&format!("stat -c %s {DIR}/by-hand/big"))?
            .trim(),
        "8388608"
    );
    Ok(())
}
