//! Running external programs, all through one place.
//!
//! Output is captured, stdin is closed unless given (Ansible runs modules on
//! a pty that never ends, so a child that reads stdin would hang), and a
//! failure says which command ran, its exit status and the end of its
//! stderr. Secrets go to a child through the environment or stdin, never its
//! command line, so the command line can always be shown.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::secret::Secret;

/// A program to run, built up with [`Command::arg`] and friends.
#[derive(Debug, Clone)]
pub struct Command {
    program: String,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    secret_env: Vec<(String, Secret)>,
    stdin: Option<Vec<u8>>,
    /// Let stderr through to ours (a person watching progress) instead of
    /// capturing it.
    show_stderr: bool,
}

/// What a finished program printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl Command {
    pub fn new(program: impl Into<String>) -> Command {
        Command {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            secret_env: Vec::new(),
            stdin: None,
            show_stderr: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Command {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Command {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Command {
        self.env.push((name.to_string(), value.into()));
        self
    }

    /// Passes a secret in the child's environment (e.g. `PGPASSWORD`).
    pub fn secret_env(mut self, name: &str, value: &Secret) -> Command {
        self.secret_env.push((name.to_string(), value.clone()));
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Command {
        self.stdin = Some(bytes.into());
        self
    }

    /// Shows the program's stderr (its progress) when `show` is true; its
    /// errors are then on the terminal, not in the result.
    pub fn show_stderr(mut self, show: bool) -> Command {
        self.show_stderr = show;
        self
    }

    /// Runs the program and fails unless it exits 0.
    pub fn run(&self) -> Result<Output> {
        let output = self.output()?;
        self.succeeded(output)
    }

    /// Runs the program and returns what it printed, whatever its status.
    pub fn output(&self) -> Result<Output> {
        let program = resolve(&self.program)?;
        let mut expression = duct::cmd(program, &self.args).stdout_capture().unchecked();
        if !self.show_stderr {
            expression = expression.stderr_capture();
        }
        expression = match &self.stdin {
            Some(bytes) => expression.stdin_bytes(bytes.clone()),
            None => expression.stdin_null(),
        };
        for (name, value) in &self.env {
            expression = expression.env(name, value);
        }
        for (name, value) in &self.secret_env {
            expression = expression.env(name, value.expose());
        }
        let output = expression
            .run()
            .with_context(|| format!("can't run `{}`", self.display()))?;
        Ok(Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Like [`Command::output`], and what the program prints on stdout is
    /// also copied to `echo` as it comes (rsync's progress, for a person at
    /// a terminal). Still captured whole, for the caller to read.
    pub fn output_echoing(&self, echo: &mut dyn std::io::Write) -> Result<Output> {
        use std::io::Read;
        let mut child = self.spawn(|command| {
            command.stderr(std::process::Stdio::piped());
        })?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                let _ = pipe.read_to_end(&mut text);
                String::from_utf8_lossy(&text).into_owned()
            })
        });
        let mut stdout = Vec::new();
        if let Some(mut pipe) = child.stdout.take() {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        stdout.extend_from_slice(&chunk[..n]);
                        // A person who stops watching must not stop the program.
                        let _ = echo.write_all(&chunk[..n]).and_then(|_| echo.flush());
                    }
                }
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("can't wait for `{}`", self.display()))?;
        Ok(Output {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: stderr.and_then(|t| t.join().ok()).unwrap_or_default(),
        })
    }

    /// Starts the program with stdin closed and stdout piped, its
    /// environment and secrets set; `shape` sets the rest (stderr, group).
    fn spawn(&self, shape: impl FnOnce(&mut std::process::Command)) -> Result<std::process::Child> {
        let mut command = std::process::Command::new(resolve(&self.program)?);
        command
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        for (name, value) in &self.secret_env {
            command.env(name, value.expose());
        }
        shape(&mut command);
        command
            .spawn()
            .with_context(|| format!("can't run `{}`", self.display()))
    }

    /// Runs the program in a process group of its own and fails unless it
    /// exits 0. `started` gets the group's id as soon as it runs (to be
    /// recorded: a later run can then end what a killed one left).
    ///
    /// When the program ends, whatever it left running in its group is ended
    /// too: pg_basebackup's WAL streamer, say, which would otherwise hold a
    /// replication slot, and the program's output pipe, with no end.
    pub fn run_in_own_group(&self, started: impl FnOnce(u32)) -> Result<Output> {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        let mut child = self.spawn(|command| {
            command.process_group(0).stderr(if self.show_stderr {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            });
        })?;
        started(child.id());
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut text);
                }
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let stdout = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let status = child.wait();
        end_group(child.id());
        let status = status.with_context(|| format!("can't wait for `{}`", self.display()))?;
        let output = Output {
            code: status.code(),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        self.succeeded(output)
    }

    /// `output`, or an error naming the command, its status and what it
    /// said, unless it exited 0.
    fn succeeded(&self, output: Output) -> Result<Output> {
        if !output.success() {
            bail!(
                "`{}` {}: {}",
                self.display(),
                describe(&output),
                said(&output)
            );
        }
        Ok(output)
    }

    /// The command line, for messages. Safe to show: secrets never are on it.
    pub fn display(&self) -> String {
        let mut words = vec![self.program.clone()];
        words.extend(self.args.iter().map(|a| shell_quote(&a.to_string_lossy())));
        words.join(" ")
    }
}

fn describe(output: &Output) -> String {
    match output.code {
        Some(code) => format!("exited with {code}"),
        None => "was killed by a signal".to_string(),
    }
}

/// The end of what a failed program said: its stderr, else its stdout.
fn said(output: &Output) -> String {
    let said = last_lines(&output.stderr, 5);
    if said.is_empty() {
        last_lines(&output.stdout, 5)
    } else {
        said
    }
}

/// Ends every process of the group `pgid`: SIGTERM, then SIGKILL for what
/// is still there after 10 s. Returns once none is left (or after 20 s).
pub fn end_group(pgid: u32) {
    use rustix::process::{kill_process_group, test_kill_process_group, Pid, Signal};
    let Some(group) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let alive = || test_kill_process_group(group).is_ok();
    let _ = kill_process_group(group, Signal::TERM);
    for step in 0..200 {
        if !alive() {
            return;
        }
        if step == 100 {
            let _ = kill_process_group(group, Signal::KILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Whether any process of the group `pgid` is still running.
pub fn group_is_alive(pgid: u32) -> bool {
    use rustix::process::{test_kill_process_group, Pid};
    i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|group| test_kill_process_group(group).is_ok())
}

/// Finds `program` on PATH, or in the sbin directories a non-login PATH may
/// lack, and says plainly when it is not installed.
fn resolve(program: &str) -> Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    which::which(program)
        .or_else(|_| which::which_in(program, Some("/usr/sbin:/sbin"), "/"))
        .with_context(|| format!("`{program}` is not installed on this host (not found on PATH)"))
}

/// `word` quoted for a POSIX shell: as it is when it holds only safe
/// characters, else in single quotes (a `'` inside closed, escaped and
/// reopened).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(count)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_status_and_stderr() {
        let err = Command::new("sh")
            .args(["-c", "echo doomed >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "`sh -c 'echo doomed >&2; exit 3'` exited with 3: doomed"
        );
    }

    #[test]
    fn missing_program_says_not_installed() {
        let err = Command::new("hapair-no-such-program").run().unwrap_err();
        assert!(format!("{err:#}").contains("is not installed"), "{err:#}");
    }

    #[test]
    fn secret_env_reaches_the_child_but_not_the_command_line() {
        let secret = Secret::new("s3cret-env");
        let command = Command::new("sh")
            .args(["-c", "printf %s \"$PW\""])
            .secret_env("PW", &secret);
        assert_eq!(command.run().unwrap().stdout, "s3cret-env");
        assert!(!command.display().contains("s3cret"));
        assert!(!format!("{command:?}").contains("s3cret"));
    }

    #[test]
    fn a_program_in_its_own_group_leaves_nothing_running() {
        // The shell ends at once, leaving a child that holds its stderr.
        let mut group = 0;
        let started = std::time::Instant::now();
        let out = Command::new("sh")
            .args(["-c", "sleep 300 & echo started"])
            .run_in_own_group(|pgid| group = pgid)
            .unwrap();
        assert_eq!(out.stdout.trim(), "started");
        assert!(!group_is_alive(group), "the sleep outlived its group");
        assert!(started.elapsed() < std::time::Duration::from_secs(15));
        let err = Command::new("sh")
            .args(["-c", "echo no >&2; exit 4"])
            .run_in_own_group(|_| {})
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`sh -c 'echo no >&2; exit 4'` exited with 4: no"
        );
    }

    #[test]
    fn echoed_output_is_shown_and_still_captured() {
        let mut shown = Vec::new();
        let out = Command::new("sh")
            .args(["-c", "printf 'a\\rb\\n'; echo said >&2; exit 3"])
            .output_echoing(&mut shown)
            .unwrap();
        assert_eq!(shown, b"a\rb\n");
        assert_eq!(out.stdout, "a\rb\n");
        assert_eq!(out.stderr.trim(), "said");
        assert_eq!(out.code, Some(3));
    }

    #[test]
    fn stdin_is_closed_unless_given() {
        let out = Command::new("cat").run().unwrap();
        assert_eq!(out.stdout, "");
        let out = Command::new("cat").stdin("fed").run().unwrap();
        assert_eq!(out.stdout, "fed");
    }
}
