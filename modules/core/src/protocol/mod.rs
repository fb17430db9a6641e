//! The module protocol: how a hapair module is called and what it answers.
//!
//! A module is called in one of these ways:
//!
//! - **By Ansible**: `MODULE ARGS_FILE`. The file holds the task's options
//!   plus Ansible's internal `_ansible_*` keys. Over SSH, Ansible gives the
//!   module a pty that never ends, so stdin is never read in this form.
//! - **By hand**: `MODULE '{"key": ...}'`, `MODULE --args-file FILE`, JSON
//!   piped on stdin, or a module's own shorthand (`instance_conf KEY -s V`).
//!   `--check` and `--diff` do what Ansible's flags do; `--help` prints the
//!   module's documentation.
//!
//! For a program (Ansible, a pipe, or `--json`) the module prints exactly
//! one JSON object on stdout: `changed`, `failed`, `msg`, the module's own
//! return values, `diff` when diff mode is on and something changed, and
//! `warnings`. A failure is `"failed": true` with a message that says what
//! to do, and a non-zero exit code ([`EXIT_FAILED`], or [`EXIT_BAD_ARGS`]
//! when the call itself was wrong). A panic is reported the same way.
//!
//! For a person at a terminal it prints what the seed's commands print
//! instead: the value read, the module's table, a one-line summary (on
//! stderr when it failed). With stdout piped and stderr a terminal, the JSON
//! goes to the pipe and the summary to the person.

mod args;
mod input;
mod output;

use std::io::{IsTerminal, Write};
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use args::{ansible_bool, ansible_bool_value, field_names, Seconds};
pub use output::{excerpt, Diff, Outcome};

pub use input::{parse_argv, parse_object, utf8_argv, Call, Invocation, Source};

/// Exit code of a module that ran and failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the call itself was wrong: bad JSON, unknown or mistyped
/// options, an unreadable args file.
pub const EXIT_BAD_ARGS: u8 = 2;

/// What the core needs to know about a module besides its argument type.
pub struct Spec {
    /// The module's name, as Ansible and the README call it.
    pub name: &'static str,
    /// The sidecar documentation (`<name>.yml`), shown by `--help`.
    pub doc: &'static str,
    /// Turns a module's own command-line shorthand into its options, for
    /// modules that have one (e.g. `instance_conf KEY -s VALUE`).
    pub shorthand: Option<Shorthand>,
}

/// Turns command-line words into options, or says what is wrong with them.
pub type Shorthand = fn(&[String]) -> Result<Map<String, Value>, String>;

/// What a module sees of the call besides its options.
#[derive(Debug, Default)]
pub struct Context {
    /// Compute and report what would change, but change nothing.
    pub check_mode: bool,
    /// Return a `diff` of what changed.
    pub diff: bool,
    /// Ansible's `-v` count.
    pub verbosity: u8,
    /// A person is watching stderr: progress may be shown there.
    pub interactive: bool,
    /// A person can also answer questions on stdin (see [`Context::prompt`]).
    pub can_prompt: bool,
    warnings: Vec<String>,
}

impl Context {
    /// Adds a warning to the result; Ansible shows it in yellow.
    pub fn warn(&mut self, warning: impl Into<String>) {
        self.warnings.push(warning.into());
    }

    /// Asks the person at the terminal a question (on stderr) and returns
    /// the line they answer (from stdin), trimmed.
    pub fn prompt(&self, question: &str) -> anyhow::Result<String> {
        if !self.can_prompt {
            anyhow::bail!(
                "can't ask {question:?}: no person at a terminal; pass the options instead"
            );
        }
        eprint!("{question}");
        let mut answer = String::new();
        let read = std::io::stdin().read_line(&mut answer)?;
        if read == 0 {
            anyhow::bail!("no answer to {question:?} (end of input)");
        }
        Ok(answer.trim().to_string())
    }
}

/// Runs a module: reads the call, parses the options into `A`, calls
/// `module`, prints the result, and returns the exit code for `main`.
pub fn run<A, F>(spec: &Spec, module: F) -> ExitCode
where
    A: DeserializeOwned,
    F: FnOnce(A, &mut Context) -> anyhow::Result<Outcome>,
{
    let terminal = Terminal {
        stdout: std::io::stdout().is_terminal(),
        stderr: std::io::stderr().is_terminal(),
        stdin: std::io::stdin().is_terminal(),
    };
    let argv = match input::utf8_argv(std::env::args_os().skip(1)) {
        Ok(argv) => argv,
        Err(msg) => return finish(spec, Reply::bad_args(msg, terminal.audience(false))),
    };
    let invocation = match input::parse_argv(&argv) {
        Ok(Invocation::Help) => {
            let mut stdout = std::io::stdout().lock();
            let written = stdout
                .write_all(input::help_text(spec).as_bytes())
                .and_then(|()| stdout.flush());
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(EXIT_FAILED),
            };
        }
        Ok(Invocation::Run(call)) => call,
        Err(msg) => return finish(spec, Reply::bad_args(msg, terminal.audience(false))),
    };
    let reply = match input::read_options(spec, &invocation, terminal.stdin) {
        Ok(options) => execute(options, &invocation, terminal, module),
        Err(msg) => Reply::bad_args(msg, terminal.audience(invocation.json)),
    };
    finish(spec, reply)
}

/// Which of stdout, stderr and stdin are a terminal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Terminal {
    pub stdout: bool,
    pub stderr: bool,
    pub stdin: bool,
}

impl Terminal {
    /// Who reads the reply of a call that is not Ansible's; `json` is the
    /// `--json` flag.
    pub fn audience(self, json: bool) -> Audience {
        match (json, self.stdout, self.stderr) {
            (true, _, _) => Audience::Program,
            (false, true, _) => Audience::Person,
            (false, false, true) => Audience::ProgramAndPerson,
            (false, false, false) => Audience::Program,
        }
    }
}

/// Who reads what a module prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Ansible, a pipe or `--json`: the JSON on stdout, nothing else.
    Program,
    /// A program reads stdout, a person stderr: the JSON, and the summary
    /// on stderr.
    ProgramAndPerson,
    /// A person reads both: the value, the table, the summary; no JSON.
    Person,
}

/// The finished result of one call, before it is printed.
#[derive(Debug)]
pub struct Reply {
    pub json: Value,
    pub exit: u8,
    pub audience: Audience,
    /// The module's report for a person, if it has one.
    pub report: Option<String>,
    /// The module's answer for a person, if it has one.
    pub answer: Option<String>,
}

impl Reply {
    fn bad_args(msg: String, audience: Audience) -> Reply {
        Reply {
            json: output::failure_json(&msg, &[]),
            exit: EXIT_BAD_ARGS,
            audience,
            report: None,
            answer: None,
        }
    }
}

/// Parses `options` and runs `module` on them, catching panics. Separate
/// from [`run`] so that it can be tested without a process.
pub fn execute<A, F>(
    options: Map<String, Value>,
    invocation: &Call,
    terminal: Terminal,
    module: F,
) -> Reply
where
    A: DeserializeOwned,
    F: FnOnce(A, &mut Context) -> anyhow::Result<Outcome>,
{
    // Over SSH Ansible runs modules on a pty: stdout and stderr look like a
    // terminal but are merged, and read as JSON. Its calls carry _ansible_*
    // keys.
    let from_ansible = options.keys().any(|k| k.starts_with("_ansible_"));
    let audience = if from_ansible {
        Audience::Program
    } else {
        terminal.audience(invocation.json)
    };
    let interactive = audience != Audience::Program;
    let parsed = match args::parse::<A>(options) {
        Ok(parsed) => parsed,
        Err(msg) => return Reply::bad_args(msg, audience),
    };
    let mut ctx = Context {
        check_mode: parsed.internal.check_mode || invocation.check,
        diff: parsed.internal.diff || invocation.diff,
        verbosity: parsed.internal.verbosity,
        interactive,
        can_prompt: interactive && terminal.stdin,
        warnings: parsed.warnings,
    };
    let result = catch_panic(|| module(parsed.args, &mut ctx));
    let (mut report, mut answer) = (None, None);
    let (json, exit) = match result {
        Ok(Ok(mut outcome)) => {
            // Its services have taken what it wrote; a failed run leaves
            // the records for the next run to finish the job.
            if !outcome.failed {
                if let Err(e) = crate::unsettled::settle_written() {
                    ctx.warnings.push(format!("{e:#}"));
                }
            }
            let exit = if outcome.failed { EXIT_FAILED } else { 0 };
            report = outcome.report.take();
            answer = outcome.answer.take();
            (outcome.into_json(&ctx), exit)
        }
        // `{:#}` prints the whole chain of context: "what failed: why".
        Ok(Err(error)) => (
            output::failure_json(&format!("{error:#}"), &ctx.warnings),
            EXIT_FAILED,
        ),
        Err(panic_msg) => (
            output::failure_json(
                &format!(
                    "internal error: {panic_msg}. This is a bug in hapair; \
                     please report it with the arguments you passed"
                ),
                &ctx.warnings,
            ),
            EXIT_FAILED,
        ),
    };
    Reply {
        json,
        exit,
        audience,
        report,
        answer,
    }
}

/// What the protocol alone makes of `text` as a call's options: the JSON a
/// call prints when its module does nothing with them (`"parsed"`), or the
/// failure. For the fuzzers of every module's argument parsing.
pub fn reply_without_module<A: DeserializeOwned>(text: &str) -> Value {
    let mut reply = match input::parse_object(text, "the options") {
        Ok(options) => execute(
            options,
            &Call::default(),
            Terminal::default(),
            |_: A, _: &mut Context| Ok(Outcome::unchanged("parsed")),
        ),
        Err(msg) => Reply::bad_args(msg, Audience::Program),
    };
    crate::secret::scrub_value(&mut reply.json);
    reply.json
}

thread_local! {
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PANIC_MESSAGE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, turning a panic into an `Err` with its message and location.
/// The default hook would print a raw backtrace; while we capture, the hook
/// records the message instead. Panics elsewhere (e.g. other tests) still
/// reach the previous hook.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(|c| c.get()) {
                let payload = info.payload();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_string());
                let place = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{text}{place}")));
            } else {
                previous(info);
            }
        }));
    });
    CAPTURING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        PANIC_MESSAGE
            .with(|m| m.borrow_mut().take())
            .unwrap_or_else(|| "panic".to_string())
    })
}

/// Prints the reply for its audience (secrets scrubbed from the JSON's
/// values before it is serialized, and from the text for a person). A
/// result that could not be written is a failure.
fn finish(spec: &Spec, mut reply: Reply) -> ExitCode {
    crate::secret::scrub_value(&mut reply.json);
    let person = || {
        crate::secret::scrub(&output::for_person(
            spec.name,
            &reply.json,
            reply.report.as_deref(),
            reply.answer.as_deref(),
        ))
    };
    let mut stdout = std::io::stdout().lock();
    let written = match reply.audience {
        Audience::Person if reply.exit == 0 => stdout.write_all(person().as_bytes()),
        Audience::Person => {
            let _ = std::io::stderr().write_all(person().as_bytes());
            Ok(())
        }
        Audience::ProgramAndPerson => {
            let _ = std::io::stderr().write_all(person().as_bytes());
            writeln!(stdout, "{}", reply.json)
        }
        Audience::Program => writeln!(stdout, "{}", reply.json),
    }
    .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::from(reply.exit),
        Err(_) => ExitCode::from(reply.exit.max(EXIT_FAILED)),
    }
}

#[cfg(test)]
mod tests;
