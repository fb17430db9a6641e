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
        if !output.success() {
            let status = match output.code {
                Some(code) => format!("exited with {code}"),
                None => "was killed by a signal".to_string(),
            };
            let said = last_lines(&output.stderr, 5);
            let said = if said.is_empty() {
                last_lines(&output.stdout, 5)
            } else {
                said
            };
            bail!("`{}` {status}: {said}", self.display());
        }
        Ok(output)
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

    /// The command line, for messages. Safe to show: secrets never are on it.
    pub fn display(&self) -> String {
        let mut words = vec![self.program.clone()];
        words.extend(self.args.iter().map(|a| quote(&a.to_string_lossy())));
        words.join(" ")
    }
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

fn quote(word: &str) -> String {
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
    fn stdin_is_closed_unless_given() {
        let out = Command::new("cat").run().unwrap();
        assert_eq!(out.stdout, "");
        let out = Command::new("cat").stdin("fed").run().unwrap();
        assert_eq!(out.stdout, "fed");
    }
}
