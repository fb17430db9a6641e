//! `instance_conf`: get, set or unset one key of the instance config.
//!
//! The seed's `alation_conf KEY -s VALUE`. Seed steps 5 and 6 go through it:
//! turning instance protection off on the secondary, and setting the
//! override IP on both hosts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use hapair_core::files::FilePlan;
use hapair_core::instance::{self, InstanceConfig, Key};
use hapair_core::protocol;
use hapair_core::{Context, Outcome, Plan, Spec};
use serde::Deserialize;
use serde_json::{Map, Value};

const SPEC: Spec = Spec {
    name: "instance_conf",
    doc: include_str!("../instance_conf.yml"),
    shorthand: Some(shorthand),
};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct Args {
    /// Dotted key, e.g. `cluster.protected_instance`.
    key: String,
    /// The value to set; without it (and with state=present) the key is read.
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    state: State,
    #[serde(default = "instance::default_path")]
    path: PathBuf,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
enum State {
    #[default]
    Present,
    Absent,
}

/// What the call asks of the key.
enum Request {
    Read,
    Set(Value),
    Unset,
}

fn main() -> ExitCode {
    protocol::run(&SPEC, instance_conf)
}

fn instance_conf(args: Args, ctx: &mut Context) -> Result<Outcome> {
    let key = Key::parse(&args.key)?;
    let request = match (args.state, args.value) {
        (State::Present, None) => Request::Read,
        (State::Present, Some(value)) => {
            let value = key.coerce(value)?;
            instance::check_on_this_host(&key, &value)?;
            Request::Set(value)
        }
        (State::Absent, None) => Request::Unset,
        (State::Absent, Some(_)) => {
            bail!(
                "value can't go with state=absent: drop value to unset {}",
                key.name
            )
        }
    };

    // Writers hold the lock from read to rename, so that two concurrent runs
    // can't lose each other's change.
    let _lock = match request {
        Request::Set(_) | Request::Unset if !ctx.check_mode => {
            Some(InstanceConfig::lock(&args.path)?)
        }
        _ => None,
    };
    let existed = args.path.exists();
    let before = InstanceConfig::load(&args.path)?;
    let mut after = before.clone();
    match &request {
        Request::Read => {}
        Request::Set(value) => after.set(key.name, value.clone())?,
        Request::Unset => {
            after.remove(key.name);
        }
    }
    if key.name == instance::PROTECTED && before.is_protected() && !after.is_protected() {
        ctx.warn(
            "cluster.protected_instance is now false: the pair set-up may delete this host's \
             PostgreSQL, Redis, Kafka and file data to replace it with the primary's. Back it up \
             first. To protect it again: \
             instance_conf '{\"key\": \"cluster.protected_instance\", \"value\": true}'",
        );
    }

    let shown = |config: &InstanceConfig| {
        config
            .value(&key)
            .map_or_else(|| "unset".to_string(), |v| v.to_string())
    };
    let mut files = FilePlan::default();
    if after != before {
        let action = match &request {
            Request::Unset => format!(
                "remove {} (was {}, now {})",
                key.name,
                shown(&before),
                shown(&after)
            ),
            _ => format!(
                "set {} to {} (was {})",
                key.name,
                shown(&after),
                shown(&before)
            ),
        };
        files
            .changes
            .push(after.rewrite_of(&before, existed, action));
    }
    let unchanged = match &request {
        Request::Read => format!("{} is {}", key.name, shown(&after)),
        Request::Set(_) => format!("{} is already {}", key.name, shown(&after)),
        Request::Unset => format!("{} is not set", key.name),
    };
    let outcome = Plan::<String>::new(files).run(ctx, unchanged, |plan, _| {
        plan.files.apply()?;
        Ok(Vec::new())
    })?;
    // Read by hand, the value alone, as the seed's `alation_conf KEY`
    // prints it: a string bare, anything else as JSON.
    let outcome = match (&request, after.value(&key)) {
        (Request::Read, Some(Value::String(text))) => outcome.with_answer(text),
        (Request::Read, Some(value)) => outcome.with_answer(value.to_string()),
        _ => outcome,
    };
    Ok(outcome
        .with("key", key.name)
        .with("value", after.value(&key))
        .with("previous", before.value(&key))
        .with("is_default", after.stored(key.name).is_none())
        .with("safety_relevant", key.safety_relevant())
        .with("path", &args.path))
}

/// The seed's way of calling it, for runs by hand:
///
/// - `instance_conf KEY` reads a key;
/// - `instance_conf KEY -s VALUE` sets it (VALUE is JSON if it parses as
///   JSON, else a string; `True`/`False` work for booleans, as in the seed);
/// - `instance_conf KEY --unset` removes it;
/// - `--path FILE` anywhere names another config file.
pub(crate) fn shorthand(words: &[String]) -> Result<Map<String, Value>, String> {
    let mut options = Map::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "-s" | "--set" => {
                let value = words.next().ok_or("-s needs a VALUE")?;
                let value = serde_json::from_str(value).unwrap_or(Value::String(value.clone()));
                options.insert("value".into(), value);
            }
            "--unset" => {
                options.insert("state".into(), Value::String("absent".into()));
            }
            "--path" => {
                let path = words.next().ok_or("--path needs a FILE")?;
                options.insert("path".into(), Value::String(path.clone()));
            }
            key if !key.starts_with('-') && !options.contains_key("key") => {
                options.insert("key".into(), Value::String(key.to_string()));
            }
            other => {
                return Err(format!(
                "unexpected {other:?}; usage: instance_conf KEY [-s VALUE | --unset] [--path FILE]"
            ))
            }
        }
    }
    if !options.contains_key("key") {
        return Err("usage: instance_conf KEY [-s VALUE | --unset] [--path FILE]".into());
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    hapair_core::doc_test!(Args, json!({"key": "a.b"}));

    #[test]
    fn shorthand_reads_like_the_seed() {
        assert_eq!(
            Value::Object(shorthand(&words("cluster.protected_instance -s False")).unwrap()),
            json!({"key": "cluster.protected_instance", "value": "False"})
        );
        assert_eq!(
            Value::Object(shorthand(&words("cluster.hosts -s [\"10.0.0.1\"]")).unwrap()),
            json!({"key": "cluster.hosts", "value": ["10.0.0.1"]})
        );
        assert_eq!(
            Value::Object(shorthand(&words("app.version --unset --path /tmp/i.json")).unwrap()),
            json!({"key": "app.version", "state": "absent", "path": "/tmp/i.json"})
        );
        assert!(shorthand(&words("-s x")).is_err());
        assert!(shorthand(&words("a.b -s")).is_err());
        assert!(shorthand(&words("a.b c.d")).is_err());
    }
}
