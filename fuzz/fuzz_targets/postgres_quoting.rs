//! Quoting for PostgreSQL: a connection string and a postgresql.conf value
//! read back, by each format's own rules, as exactly what went in; a role
//! name that parses needs no quoting anywhere.
#![no_main]

use hapair_core::postgres::{conf_quote, conninfo, RoleName};
use libfuzzer_sys::fuzz_target;

/// libpq's reading of a connection string (conninfo_parse).
fn read_conninfo(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            return pairs;
        }
        assert_eq!(chars.next(), Some('\''), "a quoted value");
        let mut value = String::new();
        loop {
            match chars.next().expect("a closing quote") {
                '\\' => value.push(chars.next().expect("an escaped char")),
                '\'' => break,
                c => value.push(c),
            }
        }
        pairs.push((key, value));
    }
}

/// postgresql.conf's reading of a quoted value (GUC_scanstr, for what
/// conf_quote writes: '' and \\).
fn read_conf(text: &str) -> String {
    let inner = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap();
    let mut value = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                assert_eq!(chars.next(), Some('\''), "a lone quote ends the value");
                value.push('\'');
            }
            '\\' => value.push(chars.next().expect("an escaped char")),
            c => value.push(c),
        }
    }
    value
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_at(
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i),
    );
    let info = conninfo(&[("user", a), ("passfile", b)]);
    assert_eq!(
        read_conninfo(&info),
        vec![
            ("user".to_string(), a.to_string()),
            ("passfile".to_string(), b.to_string())
        ]
    );
    match conf_quote(&info) {
        Ok(quoted) => {
            assert!(!quoted.contains('\n'));
            assert_eq!(read_conf(&quoted), info);
        }
        Err(_) => assert!(info.chars().any(char::is_control)),
    }
    if let Ok(role) = RoleName::parse(text) {
        assert!(role
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }
});
