//! What a module answers: [`Outcome`] and its JSON form.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::Context;

/// Keys the protocol owns; a module's return values can't use them.
const RESERVED: &[&str] = &["changed", "failed", "msg", "diff", "warnings", "skipped"];

/// The result of a module run: whether it changed the host, what to tell
/// the operator, and the module's return values.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changed: bool,
    pub failed: bool,
    pub msg: String,
    /// One diff per file changed.
    pub diffs: Vec<Diff>,
    values: Map<String, Value>,
    /// A report for a person at a terminal (a table, say), printed before
    /// the summary; never part of the JSON.
    pub report: Option<String>,
    /// The answer itself for a person (a value read): printed alone, in
    /// place of the summary. The JSON carries it as a return value too.
    pub answer: Option<String>,
}

/// Before and after, as Ansible's `--diff` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub before: String,
    pub after: String,
    pub before_header: String,
    pub after_header: String,
}

impl Outcome {
    /// A result that did or didn't change the host.
    pub fn new(changed: bool, msg: impl Into<String>) -> Outcome {
        Outcome {
            changed,
            msg: msg.into(),
            ..Outcome::default()
        }
    }

    /// The host was (or, in check mode, would be) changed.
    pub fn changed(msg: impl Into<String>) -> Outcome {
        Outcome::new(true, msg)
    }

    /// The host already was as asked.
    pub fn unchanged(msg: impl Into<String>) -> Outcome {
        Outcome::new(false, msg)
    }

    /// The module failed, but has return values worth giving (a report,
    /// say). For plain errors, return `Err` instead.
    pub fn failed(msg: impl Into<String>) -> Outcome {
        Outcome {
            failed: true,
            ..Outcome::new(false, msg)
        }
    }

    /// Adds a return value.
    ///
    /// # Panics
    /// When `key` is one the protocol owns (`changed`, `msg` ...): that is a
    /// bug in the module, caught by its tests.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Outcome {
        assert!(!RESERVED.contains(&key), "return value {key} is reserved");
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.values.insert(key.to_string(), value);
        self
    }

    /// Adds a report for a person at a terminal.
    pub fn with_report(mut self, report: impl Into<String>) -> Outcome {
        self.report = Some(report.into());
        self
    }

    /// Sets what a person at a terminal sees instead of the summary, as
    /// `instance_conf KEY` prints just the value.
    pub fn with_answer(mut self, answer: impl Into<String>) -> Outcome {
        self.answer = Some(answer.into());
        self
    }

    /// Adds the diff of one file; several make a list, as Ansible allows.
    pub fn with_diff(mut self, diff: Diff) -> Outcome {
        self.diffs.push(diff);
        self
    }

    pub(super) fn into_json(self, ctx: &Context) -> Value {
        let mut object = Map::new();
        object.insert("changed".into(), Value::Bool(self.changed));
        object.insert("failed".into(), Value::Bool(self.failed));
        object.insert("msg".into(), Value::String(bounded(self.msg)));
        object.extend(self.values);
        if ctx.diff && self.changed {
            match self.diffs.len() {
                0 => {}
                1 => {
                    object.insert("diff".into(), json!(self.diffs[0]));
                }
                _ => {
                    object.insert("diff".into(), json!(self.diffs));
                }
            }
        }
        if !ctx.warnings.is_empty() {
            object.insert("warnings".into(), json!(ctx.warnings));
        }
        Value::Object(object)
    }
}

/// The JSON of a failure with nothing but a message (and any warnings).
pub fn failure_json(msg: &str, warnings: &[String]) -> Value {
    let mut object = json!({ "changed": false, "failed": true, "msg": bounded(msg.to_string()) });
    if !warnings.is_empty() {
        object["warnings"] = json!(warnings);
    }
    object
}

/// The most a message may hold: an error that quotes the input (a 16 MiB
/// address, say) is cut, not echoed whole.
pub const MAX_MSG: usize = 4096;

/// `msg`, cut to [`MAX_MSG`] bytes (on a character boundary) with a note
/// of how much was left out.
pub fn bounded(mut msg: String) -> String {
    if msg.len() <= MAX_MSG {
        return msg;
    }
    let mut end = MAX_MSG;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let cut = msg.len() - end;
    msg.truncate(end);
    msg.push_str(&format!("... ({cut} more bytes not shown)"));
    msg
}

/// At most the first 200 characters of `text`, for quoting input in an
/// error without echoing all of it.
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(200) {
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}

/// A few lines for a person at a terminal, e.g.
/// `instance_conf: changed: cluster.protected_instance set to false`.
pub fn human_summary(module: &str, reply: &Value) -> String {
    let mut text = if reply["failed"] == true {
        format!("{module}: FAILED: ")
    } else if reply["changed"] == true {
        format!("{module}: changed: ")
    } else {
        format!("{module}: ok: ")
    };
    text.push_str(reply["msg"].as_str().unwrap_or(""));
    text.push('\n');
    text.push_str(&warning_lines(reply));
    text
}

/// What a person at a terminal reads of a reply: the module's answer alone
/// when it has one, else its report (if any) and the summary.
pub fn for_person(
    module: &str,
    reply: &Value,
    report: Option<&str>,
    answer: Option<&str>,
) -> String {
    match answer {
        Some(answer) if reply["failed"] != true => {
            format!("{}\n{}", answer.trim_end(), warning_lines(reply))
        }
        _ => format!("{}{}", report.unwrap_or(""), human_summary(module, reply)),
    }
}

fn warning_lines(reply: &Value) -> String {
    let mut text = String::new();
    if let Some(warnings) = reply["warnings"].as_array() {
        for warning in warnings {
            text.push_str(&format!("  warning: {}\n", warning.as_str().unwrap_or("")));
        }
    }
    text
}
