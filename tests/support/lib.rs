//! Support for hapair's tests against real hosts.
//!
//! A [`Fleet`] is a set of test hosts (containers with systemd, sshd,
//! PostgreSQL, Redis and Kafka), each with its own address in
//! 198.18.0.0/15, started by `tests/fleet/fleet`. A test binary is a
//! [`suite`]: it brings its fleet up once, runs its tests one at a time (they
//! share the hosts), and removes the fleet when done, whether the tests
//! passed or not. Each suite has its own fleet name and subnet, so suites
//! never share hosts.
//!
//! A fleet test never skips: without Docker or the image it fails and says
//! how to get them.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub mod crash;
pub mod pair;
pub mod playbook;
use serde_json::Value;

/// Where module binaries are put on a test host.
pub const MODULE_DIR: &str = "/usr/local/lib/hapair-test";

/// A test of a suite: a name and a function of the fleet.
pub type Test = (&'static str, fn(&Fleet) -> Result<()>);

/// Runs `tests` against a fleet of `hosts` hosts named `name` on
/// 198.18.`net`.0/24, with the module binaries copied in. Call it from a
/// test binary's `main` (`harness = false`).
pub fn suite(name: &str, hosts: usize, net: u8, tests: &[Test]) -> ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    // The tests of a suite share its hosts: one at a time.
    args.test_threads = Some(1);
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|(test, _)| args.filter.as_deref().is_none_or(|f| test.contains(f)))
        .collect();
    if selected.is_empty() || args.list {
        let trials = tests
            .iter()
            .map(|(test, _)| libtest_mimic::Trial::test(*test, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let fleet = match Fleet::up(name, hosts, net) {
        Ok(fleet) => Arc::new(fleet),
        Err(e) => {
            eprintln!("\nfleet {name} could not start: {e:#}\n");
            println!("0 passed, {} failed", selected.len());
            return ExitCode::FAILURE;
        }
    };
    let trials = tests
        .iter()
        .map(|&(test, function)| {
            let fleet = Arc::clone(&fleet);
            libtest_mimic::Trial::test(test, move || {
                function(&fleet).map_err(|e| format!("{e:#}").into())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(fleet); // removes the hosts
    conclusion.exit_code()
}

/// The `main` of a benchmark (`make bench`): runs it, and turns an error
/// into a message and a failing exit.
pub fn bench_main(bench: fn() -> Result<()>) -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The release build of a module. The tests use what ships.
pub fn module_binary(module: &str) -> Result<PathBuf> {
    let path = repo_root().join("target/release").join(module);
    if !path.is_file() {
        bail!(
            "{} is missing: run `make build` (or `cargo build --release`) first",
            path.display()
        );
    }
    Ok(path)
}

/// The hapair.ha collection as `make stage` lays it out; ansible.cfg's
/// collections_path is its `ansible_collections` directory's parent.
pub fn staged_collection() -> PathBuf {
    repo_root().join("target/collection/ansible_collections/hapair/ha")
}

/// A module of the staged collection: the build the playbooks use.
pub fn staged_module(module: &str) -> PathBuf {
    staged_collection().join("plugins/modules").join(module)
}

/// The modules this repository builds: each directory of modules/ but core.
pub fn module_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("modules"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().join("Cargo.toml").is_file() && name != "core" {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A running fleet. Dropping it removes its hosts and network.
pub struct Fleet {
    pub name: String,
    pub hosts: Vec<Host>,
}

/// One test host.
#[derive(Debug, Clone)]
pub struct Host {
    pub fleet: String,
    pub name: String,
    pub ip: String,
}

/// What a module printed and how it exited.
#[derive(Debug)]
pub struct ModuleRun {
    pub json: Value,
    pub exit: i32,
    pub stdout: String,
}

impl ModuleRun {
    pub fn changed(&self) -> bool {
        self.json["changed"] == true
    }

    pub fn failed(&self) -> bool {
        self.json["failed"] == true
    }

    pub fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or("")
    }

    /// Fails unless the module succeeded.
    pub fn ok(self) -> Result<ModuleRun> {
        if self.failed() || self.exit != 0 {
            bail!("module failed (exit {}): {}", self.exit, self.stdout);
        }
        Ok(self)
    }
}

fn fleet_script() -> PathBuf {
    repo_root().join("tests/fleet/fleet")
}

impl Fleet {
    /// Starts the fleet, after removing any stale one of the same name, and
    /// copies every module binary into each host.
    pub fn up(name: &str, hosts: usize, net: u8) -> Result<Fleet> {
        let started = Instant::now();
        let output = Command::new(fleet_script())
            .args(["up", name, &hosts.to_string(), &net.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("can't run tests/fleet/fleet")?;
        if !output.status.success() {
            bail!("`tests/fleet/fleet up {name}` failed (its messages are above)");
        }
        let hosts = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(host, ip)| Host {
                fleet: name.to_string(),
                name: host.to_string(),
                ip: ip.to_string(),
            })
            .collect();
        let fleet = Fleet {
            name: name.to_string(),
            hosts,
        };
        for module in module_names()? {
            let binary = module_binary(&module)?;
            for host in &fleet.hosts {
                host.copy_in(&binary, &format!("{MODULE_DIR}/{module}"))?;
            }
        }
        eprintln!(
            "fleet {name}: {} hosts ready in {:.1}s",
            fleet.hosts.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(fleet)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("fleet {} has no host {name}", self.name))
    }

    /// The directory with the fleet's SSH key, known_hosts and inventory.
    pub fn dir(&self) -> PathBuf {
        repo_root().join("target/fleet").join(&self.name)
    }

    /// A variable of the fleet's inventory (`[all:vars]`), such as the
    /// pair's passwords it was made with.
    pub fn inventory_var(&self, name: &str) -> Result<String> {
        let text = std::fs::read_to_string(self.inventory())?;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
            .with_context(|| format!("the fleet's inventory sets no {name}"))
    }

    pub fn inventory(&self) -> PathBuf {
        repo_root()
            .join("inventory")
            .join(format!("fleet-{}.ini", self.name))
    }

    /// Runs `ssh` from the control node to `host`, with the fleet's pinned
    /// known_hosts and strict host key checking.
    pub fn ssh(&self, host: &Host, command: &str) -> Result<Output> {
        Command::new("ssh")
            .arg("-F")
            .arg(self.dir().join("ssh_config"))
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"])
            .arg(&host.ip)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .context("can't run ssh")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = Command::new(fleet_script())
            .args(["down", &self.name])
            .status();
    }
}

impl Host {
    fn container(&self) -> String {
        format!("hapair-{}-{}", self.fleet, self.name)
    }

    /// Runs a shell script on the host as root; returns its output whatever
    /// its status.
    pub fn sh_output(&self, script: &str) -> Result<Output> {
        Command::new("docker")
            .args(["exec", &self.container(), "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .context("can't run docker exec")
    }

    /// Runs a shell script on the host as root; fails unless it exits 0.
    /// Returns its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        let output = self.sh_output(script)?;
        if !output.status.success() {
            bail!(
                "on {}: `{script}` exited with {:?}: {}{}",
                self.name,
                output.status.code(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts a shell script (bash) on the host as root and returns at once,
    /// its stdout piped: for writers that run beside a test's steps. The
    /// script ends itself (a stop file, say): killing `docker exec` would
    /// leave it running on the host.
    pub fn spawn_sh(&self, script: &str) -> Result<std::process::Child> {
        Command::new("docker")
            .args(["exec", &self.container(), "bash", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("can't run docker exec")
    }

    /// Whether a shell script exits 0 on the host.
    pub fn succeeds(&self, script: &str) -> Result<bool> {
        Ok(self.sh_output(script)?.status.success())
    }

    /// Writes `contents` to `path` on the host.
    pub fn write(&self, path: &str, contents: &str) -> Result<()> {
        let mut child = Command::new("docker")
            .args([
                "exec",
                "-i",
                &self.container(),
                "sh",
                "-c",
                "cat > \"$1\"",
                "sh",
                path,
            ])
            .stdin(Stdio::piped())
            .spawn()
            .context("can't run docker exec")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(contents.as_bytes())?;
        if !child.wait()?.success() {
            bail!("can't write {path} on {}", self.name);
        }
        Ok(())
    }

    pub fn copy_in(&self, local: &Path, remote: &str) -> Result<()> {
        let dir = Path::new(remote).parent().expect("an absolute path");
        self.sh(&format!("mkdir -p {}", dir.display()))?;
        let status = Command::new("docker")
            .arg("cp")
            .arg(local)
            .arg(format!("{}:{remote}", self.container()))
            .status()?;
        if !status.success() {
            bail!(
                "docker cp {} to {}:{remote} failed",
                local.display(),
                self.name
            );
        }
        Ok(())
    }

    /// Runs a module the way Ansible does: its options, plus Ansible's
    /// internal keys, in an args file whose path is the only argument.
    pub fn run_module(&self, module: &str, args: &Value) -> Result<ModuleRun> {
        let file = format!("/tmp/hapair-args-{module}.json");
        self.write(&file, &args.to_string())?;
        self.run_module_raw(&format!("{MODULE_DIR}/{module} {file}"))
    }

    /// Runs a module command line as given (for by-hand forms).
    pub fn run_module_raw(&self, command_line: &str) -> Result<ModuleRun> {
        let output = self.sh_output(command_line)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let json = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "`{command_line}` on {} did not print one JSON object: {stdout}{}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        Ok(ModuleRun {
            json,
            exit: output.status.code().unwrap_or(-1),
            stdout,
        })
    }

    /// A listing of `paths` (recursively): type, mode, owner, size and a
    /// content hash of each file, for "nothing changed" assertions.
    pub fn snapshot(&self, paths: &[&str]) -> Result<Snapshot> {
        let paths = paths.join(" ");
        self.sh(&format!(
            "for p in {paths}; do [ -e \"$p\" ] || echo \"absent $p\"; done; \
             find {paths} -xdev 2>/dev/null | LC_ALL=C sort | while read -r f; do \
               printf '%s %s ' \"$(stat -c '%F %a %U:%G %s' \"$f\")\" \"$f\"; \
               if [ -f \"$f\" ]; then sha256sum < \"$f\" | cut -c1-16; else echo; fi; \
             done"
        ))
        .map(Snapshot)
    }

    pub fn stop(&self) -> Result<()> {
        self.fleet_command("stop")
    }

    pub fn start(&self) -> Result<()> {
        self.fleet_command("start")
    }

    /// Takes the host off the fleet network.
    pub fn cut(&self) -> Result<()> {
        self.fleet_command("cut")
    }

    /// Puts the host back on the fleet network, at its address.
    pub fn join(&self) -> Result<()> {
        self.fleet_command("join")
    }

    fn fleet_command(&self, verb: &str) -> Result<()> {
        let status = Command::new(fleet_script())
            .args([verb, &self.fleet, &self.name])
            .status()?;
        if !status.success() {
            bail!("fleet {verb} {} failed", self.name);
        }
        Ok(())
    }
}

/// Seed steps 2 and 3 between `a` and `b`, as the playbook does them:
/// keys on both hosts, then the helper on each with the other's key,
/// address and host key (from its preflight facts).
pub fn exchange_keys(a: &Host, b: &Host) -> Result<[ModuleRun; 2]> {
    let key = |h: &Host| -> Result<Value> {
        Ok(
            h.run_module("cluster_generate_keys", &serde_json::json!({}))?
                .ok()?
                .json["public_key"]
                .clone(),
        )
    };
    let host_key = |h: &Host| -> Result<Value> {
        Ok(h.run_module("cluster_preflight", &serde_json::json!({}))?
            .ok()?
            .json["facts"]["ssh_host_key"]
            .clone())
    };
    let (key_a, key_b) = (key(a)?, key(b)?);
    let (host_key_a, host_key_b) = (host_key(a)?, host_key(b)?);
    let helper = |h: &Host, peer: &Host, peer_key: &Value, peer_host_key: &Value| {
        h.run_module(
            "replication_helper",
            &serde_json::json!({
                "peer_public_key": peer_key, "peer_address": peer.ip, "peer_host_key": peer_host_key,
            }),
        )?
        .ok()
    };
    Ok([
        helper(a, b, &key_b, &host_key_b)?,
        helper(b, a, &key_a, &host_key_a)?,
    ])
}

/// What [`Host::snapshot`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(pub String);

impl Snapshot {
    /// Fails, listing what differs, unless `after` is the same as `self`.
    pub fn ensure_unchanged(&self, after: &Snapshot) -> Result<()> {
        if self == after {
            return Ok(());
        }
        let before: Vec<&str> = self.0.lines().collect();
        let now: Vec<&str> = after.0.lines().collect();
        let mut diff = String::new();
        for line in before.iter().filter(|l| !now.contains(l)) {
            diff.push_str(&format!("\n  - {line}"));
        }
        for line in now.iter().filter(|l| !before.contains(l)) {
            diff.push_str(&format!("\n  + {line}"));
        }
        bail!("the host changed:{diff}");
    }
}

/// Waits until `check` holds, or fails after `timeout` with `what`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Asserts, with a message naming both sides.
#[macro_export]
macro_rules! ensure_eq {
    // `match` keeps temporaries alive for the comparison, as assert_eq! does.
    ($left:expr, $right:expr $(,)?) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    anyhow::bail!(
                        "{} != {}\n  left: {:?}\n right: {:?}",
                        stringify!($left),
                        stringify!($right),
                        left,
                        right
                    );
                }
            }
        }
    };
}

/// An HTTP answer: its status and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` from `address` (`198.18.0.11:8080`, or loopback), over
/// HTTP/1.0: enough for the monitor and Prometheus, with no client crate.
pub fn http_get(address: &str, path: &str) -> Result<HttpAnswer> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(10);
    let socket: std::net::SocketAddr = address.parse()?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, timeout)
        .with_context(|| format!("can't connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("no answer from {address}{path}"))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{address}{path} answered {answer:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{address}{path} answered {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    Ok(HttpAnswer {
        status,
        content_type,
        body: body.to_string(),
    })
}
