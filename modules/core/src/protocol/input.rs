//! Reading a call: the command line, then the options from wherever they
//! come (args file, inline JSON, stdin, or the module's shorthand).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::Spec;

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    Help,
    Run(Call),
}

/// A call to run the module.
#[derive(Debug, Default, PartialEq)]
pub struct Call {
    pub source: Source,
    /// `--check` on the command line (Ansible says it in the args file).
    pub check: bool,
    /// `--diff` on the command line.
    pub diff: bool,
    /// `--json`: JSON on stdout even on a terminal.
    pub json: bool,
}

/// Where the options come from.
#[derive(Debug, Default, PartialEq)]
pub enum Source {
    /// A file of JSON: Ansible's `MODULE ARGS_FILE`, or `--args-file FILE`.
    File(PathBuf),
    /// JSON given as the argument itself.
    Inline(String),
    /// The module's shorthand words, e.g. `KEY -s VALUE`.
    Shorthand(Vec<String>),
    /// Nothing on the command line: stdin if it is piped, else no options.
    #[default]
    StdinOrNothing,
}

/// The command line as text: an argument that is not UTF-8 is an error of
/// the call, named by its position, not a panic.
pub fn utf8_argv(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Vec<String>, String> {
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            arg.into_string().map_err(|_| {
                format!(
                    "argument {} is not valid UTF-8: pass options as UTF-8 JSON, or put them \
                     in a file and pass --args-file FILE",
                    i + 1
                )
            })
        })
        .collect()
}

/// Parses the command line (without the program name).
pub fn parse_argv(argv: &[String]) -> Result<Invocation, String> {
    let mut call = Call::default();
    let mut args_file = None;
    let mut positional = Vec::new();
    let mut words = argv.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "--check" | "-C" => call.check = true,
            "--diff" | "-D" => call.diff = true,
            "--json" => call.json = true,
            "--args-file" => {
                let file = words.next().ok_or("--args-file needs a FILE")?;
                args_file = Some(PathBuf::from(file));
            }
            "--" => {
                positional.extend(words.by_ref().cloned());
            }
            other => match other.strip_prefix("--args-file=") {
                Some(file) => args_file = Some(PathBuf::from(file)),
                None => positional.push(other.to_string()),
            },
        }
    }
    call.source = match (args_file, positional.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(format!(
                "both --args-file and arguments ({}) were given; pass one",
                positional.join(" ")
            ))
        }
        (Some(file), []) => Source::File(file),
        (None, []) => Source::StdinOrNothing,
        (None, [one]) if one.trim_start().starts_with('{') => Source::Inline(one.clone()),
        // Ansible's form. A lone word that names a file is an args file.
        (None, [one]) if Path::new(one).is_file() => Source::File(PathBuf::from(one)),
        (None, words) => Source::Shorthand(words.to_vec()),
    };
    Ok(Invocation::Run(call))
}

/// Reads the options of `call` as a JSON object.
pub fn read_options(
    spec: &Spec,
    call: &Call,
    stdin_is_terminal: bool,
) -> Result<Map<String, Value>, String> {
    let (text, origin) = match &call.source {
        Source::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("can't read the args file {}: {e}", path.display()))?;
            (text, format!("the args file {}", path.display()))
        }
        Source::Inline(text) => (text.clone(), "the JSON argument".to_string()),
        Source::Shorthand(words) => {
            return match spec.shorthand {
                Some(shorthand) => shorthand(words),
                None => Err(format!(
                    "unexpected arguments: {}. Pass the options as a JSON object, \
                     e.g. {} '{{...}}', or see {} --help",
                    words.join(" "),
                    spec.name,
                    spec.name
                )),
            };
        }
        // On a terminal nobody is piping JSON in: run with no options.
        Source::StdinOrNothing if stdin_is_terminal => return Ok(Map::new()),
        Source::StdinOrNothing => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("can't read the options from stdin: {e}"))?;
            (text, "stdin".to_string())
        }
    };
    parse_object(&text, &origin)
}

/// Parses `text` as the JSON object of options; `origin` names it in errors.
pub fn parse_object(text: &str, origin: &str) -> Result<Map<String, Value>, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "{origin} is empty: expected a JSON object of options, e.g. '{{}}'"
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "{origin} holds {}, but the options must be a JSON object, e.g. '{{\"key\": \"value\"}}'",
            kind_of(&other)
        )),
        Err(e) => Err(format!("{origin} is not valid JSON: {e}")),
    }
}

/// "a string", "an array" ...: the JSON type of `value`, for messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `--help`: how to call any module, then this module's documentation.
pub fn help_text(spec: &Spec) -> String {
    let name = spec.name;
    let shorthand = if spec.shorthand.is_some() {
        format!("       {name} SHORTHAND...        (see EXAMPLES below)\n")
    } else {
        String::new()
    };
    format!(
        "Usage: {name} [--check] [--diff] [--json] '{{\"option\": value, ...}}'\n\
         \x20      {name} [--check] [--diff] [--json] --args-file FILE\n\
         \x20      {name} ARGS_FILE               (as Ansible calls it)\n\
         \x20      echo '{{...}}' | {name}\n\
         {shorthand}\n\
         On a terminal it prints the answer for a person: the value, the table, the summary.\n\
         Piped, called by Ansible or with --json, it prints one JSON object on stdout.\n\
         Exit status: 0 ok, 1 failed, 2 bad arguments.\n\
         \n\
         {}",
        spec.doc
    )
}
