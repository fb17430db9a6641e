//! Checks a module's sidecar documentation against its options, so that
//! `ansible-doc` and `--help` can't drift from the code. For tests only
//! (feature `doc-check`).

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::protocol::field_names;

/// Asserts that the sidecar `doc` and the options type `A` agree:
/// - the documented options are exactly `A`'s fields;
/// - a documented default is the default in the code;
/// - an option documented as required is required by the code;
/// - DOCUMENTATION, EXAMPLES and RETURN are all there, and EXAMPLES is YAML.
///
/// `minimal` holds a value for each required option.
pub fn assert_doc_matches<A: DeserializeOwned + Serialize>(doc: &str, minimal: Value) {
    let doc: Value = serde_norway::from_str(doc).expect("the sidecar doc is YAML");
    let options = doc["DOCUMENTATION"]["options"]
        .as_object()
        .expect("DOCUMENTATION.options is a mapping");
    let examples = doc["EXAMPLES"].as_str().expect("EXAMPLES is a string");
    serde_norway::from_str::<Value>(examples).expect("EXAMPLES is YAML");
    assert!(doc["RETURN"].is_object(), "RETURN is a mapping");
    assert!(
        doc["DOCUMENTATION"]["short_description"].is_string(),
        "short_description is there"
    );

    let documented: BTreeSet<&str> = options.keys().map(String::as_str).collect();
    let fields: BTreeSet<&str> = field_names::<A>().iter().copied().collect();
    assert_eq!(
        documented, fields,
        "documented options vs. the code's options"
    );

    let parsed: A = serde_json::from_value(minimal.clone()).expect("minimal options parse");
    let defaults = serde_json::to_value(parsed).expect("options serialize");
    for (name, option) in options {
        assert!(
            option["description"].is_string() || option["description"].is_array(),
            "option {name} has a description"
        );
        assert!(option["type"].is_string(), "option {name} has a type");
        let required = option["required"] == true;
        assert_eq!(
            required,
            minimal.get(name).is_some(),
            "option {name}: required in the doc, and in `minimal`, or neither"
        );
        if required {
            let mut without = minimal.clone();
            without.as_object_mut().unwrap().remove(name);
            assert!(
                serde_json::from_value::<A>(without).is_err(),
                "option {name} is documented as required but the code has a default"
            );
        } else {
            let documented = option.get("default").cloned().unwrap_or(Value::Null);
            assert_eq!(
                defaults[name], documented,
                "option {name}: the documented default differs from the code's"
            );
        }
    }
}

/// The test every module has: its sidecar docs match its options. Use it in
/// the module's `#[cfg(test)]` module, where `SPEC` and `Args` are in scope:
/// `hapair_core::doc_test!(Args, json!({"required_option": ...}));`
#[macro_export]
macro_rules! doc_test {
    ($args:ty, $minimal:expr) => {
        #[test]
        fn documentation_matches_the_options() {
            $crate::doc_check::assert_doc_matches::<$args>(SPEC.doc, $minimal);
        }
    };
}
