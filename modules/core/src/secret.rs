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

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
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

/// Replaces every known secret in `text` with [`MASK`]. `text` may be JSON:
/// a secret is also replaced in its JSON-escaped form.
pub fn scrub(text: &str) -> String {
    let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = text.to_string();
    for secret in known.iter() {
        text = text.replace(secret.as_str(), MASK);
        let escaped = serde_json::to_string(secret).unwrap_or_default();
        let escaped = &escaped[1..escaped.len().saturating_sub(1)];
        if !escaped.is_empty() {
            text = text.replace(escaped, MASK);
        }
    }
    text
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
    fn scrub_removes_secrets_parsed_from_options_also_in_json_escaped_form() {
        let secret: Secret = serde_json::from_str(r#""pa\"ss\\word""#).unwrap();
        let json =
            serde_json::json!({ "msg": format!("psql said: bad password {}", secret.expose()) });
        let text = scrub(&json.to_string());
        assert!(!text.contains("pa\\\"ss"), "{text}");
        assert!(text.contains(MASK), "{text}");
        let plain = scrub(&format!("stderr: {}", secret.expose()));
        assert_eq!(plain, format!("stderr: {MASK}"));
    }
}
