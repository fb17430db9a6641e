//! From a JSON object to a module's typed options.
//!
//! Ansible's internal keys (`_ansible_*`) are taken out first: the ones we
//! use are read, the rest accepted and ignored, since they change between
//! Ansible versions. The remaining keys are the user's options: each is
//! deserialized into the module's type, an unknown one is named in the
//! error (unless Ansible says to ignore unknown options), and a type error
//! names the option it is about.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};

/// Ansible's internal keys that change what the module does.
#[derive(Debug, Default)]
pub struct Internal {
    pub check_mode: bool,
    pub diff: bool,
    pub verbosity: u8,
    pub ignore_unknown_opts: bool,
}

/// The options, parsed.
pub struct Parsed<A> {
    pub args: A,
    pub internal: Internal,
    pub warnings: Vec<String>,
}

pub fn parse<A: DeserializeOwned>(mut options: Map<String, Value>) -> Result<Parsed<A>, String> {
    let internal_keys: Vec<String> = options
        .keys()
        .filter(|k| k.starts_with("_ansible_"))
        .cloned()
        .collect();
    let mut internal = Internal::default();
    for key in internal_keys {
        let value = options.remove(&key).unwrap_or(Value::Null);
        let flag = || {
            ansible_bool_value(&value).ok_or_else(|| {
                format!("Ansible's internal key {key} should be a boolean, got {value}")
            })
        };
        match key.as_str() {
            "_ansible_check_mode" => internal.check_mode = flag()?,
            "_ansible_diff" => internal.diff = flag()?,
            "_ansible_ignore_unknown_opts" => internal.ignore_unknown_opts = flag()?,
            "_ansible_verbosity" => {
                internal.verbosity = value.as_u64().map_or(0, |v| v.min(u8::MAX as u64) as u8)
            }
            _ => {} // accepted, unused
        }
    }

    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path| unknown.push(path.to_string());
    let deserializer = serde_ignored::Deserializer::new(Value::Object(options), &mut note_unknown);
    let parsed: Result<A, _> = serde_path_to_error::deserialize(deserializer);
    let mut warnings = Vec::new();
    // Unknown options first: a misspelt option often shows up as a missing
    // required one too, and the misspelling is the thing to fix.
    if !unknown.is_empty() {
        let known = field_names::<A>();
        if internal.ignore_unknown_opts {
            warnings.push(format!("ignored unknown options: {}", unknown.join(", ")));
        } else {
            return Err(format!(
                "unsupported option{} {}; supported options are: {}",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", "),
                known.join(", ")
            ));
        }
    }
    let args = parsed.map_err(|e| describe_error(&e))?;
    Ok(Parsed {
        args,
        internal,
        warnings,
    })
}

/// Words an option error the way a person reads it: which option, what was
/// wrong.
fn describe_error(error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner().to_string();
    let path = error.path().to_string();
    if let Some(field) = inner
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let at = if path == "." {
            String::new()
        } else {
            format!(" in {path}")
        };
        return format!("missing required option {field}{at}");
    }
    if path == "." {
        format!("bad options: {inner}")
    } else {
        format!("option {path}: {inner}")
    }
}

/// Ansible's booleans: true/false, and the strings and numbers its `bool`
/// type accepts (yes/no, on/off, 1/0 ...), since templated values arrive as
/// strings.
pub fn ansible_bool_value(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => ansible_bool_str(s),
        _ => None,
    }
}

fn ansible_bool_str(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "yes" | "on" | "1" | "true" | "y" | "t" => Some(true),
        "no" | "off" | "0" | "false" | "n" | "f" => Some(false),
        _ => None,
    }
}

/// `#[serde(deserialize_with = "ansible_bool")]` for a boolean option.
pub fn ansible_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let value = Value::deserialize(deserializer)?;
    ansible_bool_value(&value).ok_or_else(|| {
        de::Error::custom(format!(
            "expected a boolean (true/false, yes/no), got {}",
            value
        ))
    })
}

use serde::Deserialize;

/// A duration option, in whole seconds: at least 1, at most a week. Every
/// deadline computed from it fits, so no arithmetic on it can overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Seconds(u64);

impl Seconds {
    pub const MAX: u64 = 7 * 24 * 3600;

    /// `seconds`, which must be within the bounds (for defaults).
    pub const fn new(seconds: u64) -> Seconds {
        assert!(seconds >= 1 && seconds <= Self::MAX);
        Seconds(seconds)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Seconds, D::Error> {
        let value = Value::deserialize(deserializer)?;
        // Templated values arrive as strings.
        let number = match &value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match number {
            Some(n) if (1..=Seconds::MAX).contains(&n) => Ok(Seconds(n)),
            _ => Err(de::Error::custom(format!(
                "expected a whole number of seconds from 1 to {} (a week), got {}",
                Seconds::MAX,
                crate::protocol::excerpt(&value.to_string())
            ))),
        }
    }
}

/// The option names of `A`, as serde sees them: the field list serde passes
/// to `deserialize_struct`, caught by a deserializer that does nothing else.
pub fn field_names<A: DeserializeOwned>() -> &'static [&'static str] {
    struct Catcher<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Catcher<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("caught"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = A::deserialize(Catcher(&mut fields));
    fields
}
