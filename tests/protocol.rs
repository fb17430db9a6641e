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

/// Runs `module` with `args` on a pty, as a person at a terminal would
/// (`script`, from util-linux, gives it one), and returns what it printed.
fn on_terminal(module: &str, args: &[&str]) -> (String, Option<i32>) {
    let mut words = vec![module_binary(module).unwrap().display().to_string()];
    words.extend(args.iter().map(|a| a.to_string()));
    let line = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("`script` (util-linux) runs the module on a pty");
    let text = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
    (text, output.status.code())
}

#[test]
fn a_person_at_a_terminal_reads_the_answer_not_json() {
    let dir = std::env::temp_dir().join(format!("hapair-protocol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("instance.json");
    let options = |more: Value| {
        let mut options = json!({"key": "cluster.hosts", "path": path});
        options
            .as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        options.to_string()
    };
    // A read prints the value alone, as the seed's `alation_conf KEY` does.
    let set = options(json!({"value": ["198.18.0.11", "198.18.0.12"]}));
    let (text, code) = on_terminal("instance_conf", &[&set]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with("instance_conf: changed: set cluster.hosts"),
        "{text}"
    );
    let (text, _) = on_terminal("instance_conf", &[&options(json!({}))]);
    assert_eq!(text, "[\"198.18.0.11\",\"198.18.0.12\"]\n");
    // --json, or a pipe, gets the one JSON object.
    let (text, _) = on_terminal("instance_conf", &["--json", &options(json!({}))]);
    let json: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(json["value"], json!(["198.18.0.11", "198.18.0.12"]));
    let piped = run(
        "instance_conf",
        &[OsStr::new(&options(json!({})))],
        Stdio::piped(),
    );
    assert_eq!(
        reply(&piped)["value"],
        json!(["198.18.0.11", "198.18.0.12"])
    );
    // A failure is a sentence with the module's name, and exits non-zero.
    let (text, code) = on_terminal("instance_conf", &[r#"{"key": "cluster.no_such_key"}"#]);
    assert_eq!(code, Some(1));
    assert!(
        text.starts_with("instance_conf: FAILED: unknown key"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
