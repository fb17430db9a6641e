//! The hapair.ha collection as a user gets it: built into its file by
//! ansible-galaxy from the staged tree (as `make collection` does),
//! installed from that file into an empty collections path, and used from
//! there by fully qualified names, with nothing of the repository's on
//! Ansible's paths. On this machine only: the example's hosts are not ours
//! to reach (installed_modules runs the installed collection on a host).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hapair_tests::playbook::venv_bin;
use hapair_tests::{module_names, repo_root, staged_collection};
use serde_json::Value;

/// Runs an Ansible tool with only `collections` on its collections path,
/// from an empty directory (no ansible.cfg of ours); its stdout.
fn ansible(collections: &Path, tool: &str, args: &[&str]) -> String {
    let output = Command::new(venv_bin(tool).unwrap())
        .args(args)
        .env("ANSIBLE_COLLECTIONS_PATH", collections)
        .env_remove("ANSIBLE_CONFIG")
        .env_remove("ANSIBLE_LIBRARY")
        .current_dir(collections)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The collection built from the staged tree and installed from its file,
/// once for the tests here: the collections path it is installed in.
fn installed() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let staged = staged_collection();
        assert!(
            staged.join("galaxy.yml").is_file(),
            "{} is missing: run `make stage`",
            staged.display()
        );
        let work = repo_root().join("target/collection-test");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join("collections")).unwrap();
        let built = ansible(
            &work,
            "ansible-galaxy",
            &[
                "collection",
                "build",
                staged.to_str().unwrap(),
                "--output-path",
                work.to_str().unwrap(),
            ],
        );
        let file = built
            .split_whitespace()
            .find(|word| word.ends_with(".tar.gz"))
            .unwrap_or_else(|| panic!("ansible-galaxy built no file: {built}"))
            .to_string();
        let collections = work.join("collections");
        ansible(
            &collections,
            "ansible-galaxy",
            &[
                "collection",
                "install",
                &file,
                "-p",
                collections.to_str().unwrap(),
            ],
        );
        collections
    })
}

fn installed_tree() -> PathBuf {
    installed().join("ansible_collections/hapair/ha")
}

#[test]
fn ansible_doc_shows_each_module_of_the_installed_collection() {
    for module in module_names().unwrap() {
        let name = format!("hapair.ha.{module}");
        let doc: Value =
            serde_json::from_str(&ansible(installed(), "ansible-doc", &["--json", &name])).unwrap();
        let entry = &doc[&name];
        for section in ["doc", "examples", "return"] {
            assert!(
                !entry[section].is_null(),
                "ansible-doc {name} has no {section}"
            );
        }
        assert!(
            entry["doc"]["options"]
                .as_object()
                .is_some_and(|o| !o.is_empty()),
            "ansible-doc {name} shows no options"
        );
    }
}

#[test]
fn every_module_is_installed_executable_with_the_action_as_its_handler() {
    let tree = installed_tree();
    let runtime = std::fs::read_to_string(tree.join("meta/runtime.yml")).unwrap();
    for module in module_names().unwrap() {
        let binary = tree.join("plugins/modules").join(&module);
        let mode = std::fs::metadata(&binary).unwrap().permissions();
        assert!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
            "{} is not executable",
            binary.display()
        );
        assert!(
            runtime.contains(&format!(
                "    {module}:\n      action_plugin: hapair.ha.hapair_module\n"
            )),
            "meta/runtime.yml routes {module} to no action:\n{runtime}"
        );
    }
    assert!(tree.join("plugins/action/hapair_module.py").is_file());
}

#[test]
fn the_playbooks_run_by_fully_qualified_name_on_the_installed_example_inventory() {
    let tree = installed_tree();
    let example = tree.join("inventory/example");
    let vault = example.join("vault-password.example");
    let common = [
        "-i",
        example.to_str().unwrap(),
        "--vault-password-file",
        vault.to_str().unwrap(),
    ];
    for playbook in [
        "ha_setup",
        "verify",
        "switchover",
        "failover",
        "rejoin",
        "break",
    ] {
        let name = format!("hapair.ha.{playbook}");
        let mut args = common.to_vec();
        args.extend([name.as_str(), "--syntax-check"]);
        ansible(installed(), "ansible-playbook", &args);
    }
    let mut args = common.to_vec();
    args.extend(["hapair.ha.ha_setup", "--list-hosts"]);
    let hosts = ansible(installed(), "ansible-playbook", &args);
    for host in ["db-alpha-1", "db-alpha-2", "db-beta-1", "db-beta-2"] {
        assert!(hosts.contains(host), "--list-hosts lacks {host}:\n{hosts}");
    }
    // The example's defaults are the documented variables, one file.
    let defaults = std::fs::read_to_string(example.join("group_vars/all/defaults.yml")).unwrap();
    assert!(defaults.contains("hapair_confirm_unsafe_steps: false"));
}
