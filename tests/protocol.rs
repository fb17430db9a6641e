//! The module protocol at its edges, against the release binaries: argv
//! that is not UTF-8, a stdout that can't be written, huge input, secrets
//! of awkward types and shapes. Every call fails before the module looks at
//! the host, so these run on this machine, not on the fleet.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

use hapair_tests::{module_binary, module_names};
use serde_json::{json, Value};

fn run(module: &str, args: &[&OsStr], stdout: Stdio) -> Output {
    Command::new(module_binary(module).unwrap())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// The one JSON object a call printed.
fn reply(output: &Output) -> Value {
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 1, "one line of JSON: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn no_panic(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(output.status.code(), Some(101), "{stderr}");
}

#[test]
fn argv_that_is_not_utf8_is_a_bad_call_in_every_module() {
    for module in module_names().unwrap() {
        let output = run(&module, &[OsStr::from_bytes(b"\xff\xfe")], Stdio::piped());
        no_panic(&output);
        assert_eq!(output.status.code(), Some(2), "{module}");
        let json = reply(&output);
        assert_eq!(json["failed"], true, "{module}");
        assert!(
            json["msg"].as_str().unwrap().contains("not valid UTF-8"),
            "{json}"
        );
    }
}

#[test]
fn a_result_or_help_that_cannot_be_written_is_a_failure_in_every_module() {
    for module in module_names().unwrap() {
        let full = || {
            std::fs::File::options()
                .write(true)
                .open("/dev/full")
                .unwrap()
        };
        let output = run(
            &module,
            &[OsStr::new("{\"no_such\": 1}")],
            Stdio::from(full()),
        );
        no_panic(&output);
        assert_ne!(output.status.code(), Some(0), "{module}");
        let output = run(&module, &[OsStr::new("--help")], Stdio::from(full()));
        no_panic(&output);
        assert_ne!(output.status.code(), Some(0), "{module}: --help");
    }
}

#[test]
fn a_huge_input_gives_a_bounded_message() {
    let address = "1".repeat(16 << 20);
    let options = json!({ "secondary_address": address }).to_string();
    // Too large for a command line: on stdin, as a person may pipe it.
    let mut child = Command::new(module_binary("cluster_add_secondary").unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(options.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    no_panic(&output);
    let json = reply(&output);
    assert_eq!(json["failed"], true);
    let msg = json["msg"].as_str().unwrap();
    assert!(msg.len() < 8192, "a message of {} bytes", msg.len());
    assert!(msg.contains("more bytes not shown"), "{msg}");
}

#[test]
fn a_password_of_the_wrong_type_or_shape_is_never_echoed() {
    let cases = [
        (json!(123456789012345u64), "123456789012345"),
        (json!("x"), "\"x\""),
        (json!("\"failed\": true,"), "\"failed\": true,"),
        (json!("true true true"), "true true true"),
    ];
    for (password, shown) in cases {
        let options = json!({
            "address": "198.18.255.1",
            "replication_password": password,
            "redis_password": "another long password",
            "kafka_password": "a third long password",
        })
        .to_string();
        let output = run(
            "cluster_enter_primary_mode",
            &[OsStr::new(&options)],
            Stdio::piped(),
        );
        no_panic(&output);
        let json = reply(&output);
        assert_eq!(json["failed"], true, "{json}");
        assert_eq!(json["changed"], false, "{json}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!text.contains(shown), "{shown} shown in {text}");
    }
}
