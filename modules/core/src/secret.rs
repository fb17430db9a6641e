//! Secrets: values that must never reach an output, a log or an error.
//!
//! A [`Secret`] prints as `********` whichever way it is formatted, and
//! serializes as Ansible's no_log placeholder. Ansible does not mask a
//! binary module's return values, so this is the only line of defence: on
//! top of the type, every secret that was parsed from the options is
//! remembered, and [`scrub`] replaces it wherever it appears in the text the
//! module is about to print (an error message quoting a command's stderr,
//! say).

use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret looks like in any output.
pub const MASK: &str = "********";
/// Ansible's placeholder for a no_log value.
pub const NO_LOG_PLACEHOLDER: &str = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER";

static KNOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A password or other secret. Read it with [`Secret::expose`], only where
/// it is handed to the program that needs it (through an environment
/// variable, stdin or a 0600 file; never a command line).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        remember(&value);
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(NO_LOG_PLACEHOLDER)
    }
}

/// A secret option is a password, and one rule holds for every password
/// hapair takes: at least 12 characters of printable ASCII. PostgreSQL puts
/// other text through SASLprep before hashing, and our SCRAM verifier must
/// be the server's; Redis and Kafka take the same passwords. An error never
/// shows the value, not even a mistyped one.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        struct Password;
        impl<'de> serde::de::Visitor<'de> for Password {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a password, as a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secret, E> {
                // Remembered before it is checked: a rejected password is
                // still scrubbed from whatever is printed.
                let secret = Secret::new(text);
                check_password(&secret).map_err(E::custom)?;
                Ok(secret)
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(not_a_string("a boolean"))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Secret, E> {
                Err(not_a_string("null"))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Secret, E> {
                Err(not_a_string("null"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(not_a_string("a list"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(not_a_string("an object"))
            }
        }
        fn not_a_string<E: serde::de::Error>(what: &str) -> E {
            E::custom(format!(
                "expected a password as a string, got {what} (its value is not shown); \
                 quote it in YAML"
            ))
        }
        deserializer.deserialize_any(Password)
    }
}

/// The one password rule: at least 12 characters, printable ASCII (spaces
/// included). The message never holds the password.
pub fn check_password(password: &Secret) -> Result<(), String> {
    let text = password.expose();
    if text.chars().count() < 12 {
        return Err("the password is too short: use at least 12 characters".into());
    }
    if !text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(
            "use printable ASCII characters for the password (letters, digits, punctuation, \
             spaces)"
                .into(),
        );
    }
    Ok(())
}

fn remember(value: &str) {
    if value.is_empty() {
        return;
    }
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|k| k == value) {
        known.push(value.to_string());
    }
}

/// Replaces every known secret in `text` (plain text, never JSON: see
/// [`scrub_value`]) with [`MASK`].
pub fn scrub(text: &str) -> String {
    let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = text.to_string();
    for secret in known.iter() {
        text = text.replace(secret.as_str(), MASK);
    }
    text
}

/// Scrubs every string in a JSON value, keys included, before it is
/// serialized: the structure can't be broken, whatever a secret looks like.
pub fn scrub_value(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(text) => *text = scrub(text),
        Value::Array(items) => items.iter_mut().for_each(scrub_value),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut item) in entries {
                scrub_value(&mut item);
                map.insert(scrub(&key), item);
            }
        }
        _ => {}
    }
}

/// Names of settings whose value is a secret, in the configuration files
/// hapair edits (Redis, Kafka, PostgreSQL's conninfo, passfiles).
const SECRET_SETTINGS: &[&str] = &["requirepass", "masterauth", "password", "secret", "jaas"];

/// `text` (a configuration file, for a diff) with every line that holds a
/// secret masked: a line holding a known secret, and a line that sets a
/// secret-bearing setting, whatever its value (an old password included).
pub fn mask_secret_lines(text: &str) -> String {
    let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut masked = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let setting = line
            .trim_start()
            .split(|c: char| c.is_whitespace() || c == '=' || c == ':')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let secret_setting =
            !setting.starts_with('#') && SECRET_SETTINGS.iter().any(|s| setting.contains(s));
        let holds_known = known.iter().any(|k| line.contains(k.as_str()));
        if secret_setting || holds_known {
            let name = if setting.is_empty() || holds_known && !secret_setting {
                "(a line holding a secret)".to_string()
            } else {
                setting
            };
            masked.push_str(&format!("{name} {MASK}"));
            if line.ends_with('\n') {
                masked.push('\n');
            }
        } else {
            masked.push_str(line);
        }
    }
    masked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Secret::new("hunter2-format");
        assert_eq!(format!("{secret}"), MASK);
        assert_eq!(format!("{secret:?}"), MASK);
        assert_eq!(
            serde_json::to_string(&secret).unwrap(),
            format!("\"{NO_LOG_PLACEHOLDER}\"")
        );
        assert_eq!(secret.expose(), "hunter2-format");
    }

    #[test]
    fn scrub_removes_secrets_parsed_from_options_from_every_string() {
        let secret: Secret = serde_json::from_str(r#""pa\"ss\\word-long""#).unwrap();
        let mut json =
            serde_json::json!({ "msg": format!("psql said: bad password {}", secret.expose()) });
        scrub_value(&mut json);
        let text = json.to_string();
        assert!(!text.contains("pa\\\"ss"), "{text}");
        assert!(text.contains(MASK), "{text}");
        let plain = scrub(&format!("stderr: {}", secret.expose()));
        assert_eq!(plain, format!("stderr: {MASK}"));
    }

    #[test]
    fn a_password_that_is_a_word_of_the_output_cannot_break_it() {
        // Twelve characters that are all JSON syntax and key names.
        let secret = Secret::new("\"failed\":tru");
        let mut json = serde_json::json!({"changed": true, "failed": false, "msg": "ok"});
        scrub_value(&mut json);
        let parsed: serde_json::Value = serde_json::from_str(&json.to_string()).unwrap();
        assert_eq!(parsed["failed"], false);
        assert_eq!(parsed["changed"], true);
        drop(secret);
    }

    #[test]
    fn passwords_follow_one_rule_and_errors_never_show_them() {
        for (json, says) in [
            ("123456789012345", "got a number"),
            ("true", "got a boolean"),
            ("[\"long-enough-pass\"]", "got a list"),
            ("\"x\"", "too short"),
            ("\"ünïcödé password\"", "printable ASCII"),
        ] {
            let err = serde_json::from_str::<Secret>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{json}: {err}");
            assert!(
                !err.contains("123456789012345") && !err.contains("cödé"),
                "{err}"
            );
        }
        let good: Secret = serde_json::from_str("\"correct horse battery staple\"").unwrap();
        assert_eq!(good.expose(), "correct horse battery staple");
    }

    #[test]
    fn diffs_of_config_files_mask_secret_lines() {
        let secret = Secret::new("known-secret-value");
        let text = "bind 127.0.0.1\nrequirepass \"old one\"\nmasterauth x\n\
                    sasl.jaas.config=org.apache...password=\"p\";\n\
                    primary_conninfo = 'user=u known-secret-value'\n# requirepass in a comment\n";
        let masked = mask_secret_lines(text);
        assert_eq!(
            masked,
            format!(
                "bind 127.0.0.1\nrequirepass {MASK}\nmasterauth {MASK}\nsasl.jaas.config {MASK}\n\
                 (a line holding a secret) {MASK}\n# requirepass in a comment\n"
            )
        );
        drop(secret);
    }
}
