use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::input::{parse_argv, parse_object, read_options};
use super::*;

/// A module with one required and two optional options.
#[derive(Debug, Deserialize)]
struct Args {
    name: String,
    #[serde(default, deserialize_with = "ansible_bool")]
    force: bool,
    #[serde(default)]
    count: u32,
}

const SPEC: Spec = Spec {
    name: "probe",
    doc: "DOCUMENTATION:\n  module: probe\n",
    shorthand: None,
};

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

/// Runs the probe module on `options` and returns its reply.
fn call(options: Value, cli: &Call) -> Reply {
    call_on_terminal(options, cli, false)
}

/// Like [`call`], with stderr a terminal or not.
fn call_on_terminal(options: Value, cli: &Call, terminal: bool) -> Reply {
    let terminal = Terminal {
        stdout: terminal,
        stderr: terminal,
        stdin: terminal,
    };
    execute(
        object(options),
        cli,
        terminal,
        |args: Args, ctx: &mut Context| {
            if args.name == "boom" {
                panic!("kaboom {}", args.count);
            }
            if args.name == "fail" {
                anyhow::bail!("outer: inner cause");
            }
            let outcome = Outcome::changed(format!("would write {}", args.name))
                .with("force", args.force)
                .with("check_mode", ctx.check_mode)
                .with_diff(Diff {
                    before: "a\n".into(),
                    after: "b\n".into(),
                    before_header: "f".into(),
                    after_header: "f".into(),
                });
            ctx.warn("careful");
            Ok(outcome)
        },
    )
}

// --- The command line -------------------------------------------------------

#[test]
fn ansible_form_is_an_args_file_in_argv1() {
    let file = std::env::temp_dir().join(format!("hapair-args-{}", std::process::id()));
    std::fs::write(&file, r#"{"name": "x", "_ansible_check_mode": true}"#).unwrap();
    let Invocation::Run(call) = parse_argv(&words(&[file.to_str().unwrap()])).unwrap() else {
        panic!("expected a run")
    };
    assert_eq!(call.source, Source::File(file.clone()));
    // stdin_is_terminal=false: a file source must not touch stdin, which is
    // what would hang under Ansible's pty.
    let options = read_options(&SPEC, &call, false).unwrap();
    assert_eq!(options["name"], "x");
    std::fs::remove_file(file).unwrap();
}

#[test]
fn by_hand_forms_are_recognised() {
    let run = |argv: &[&str]| match parse_argv(&words(argv)).unwrap() {
        Invocation::Run(call) => call,
        Invocation::Help => panic!("unexpected help"),
    };
    assert_eq!(
        run(&[r#"{"name":"x"}"#]).source,
        Source::Inline(r#"{"name":"x"}"#.into())
    );
    assert_eq!(
        run(&["--args-file", "/a"]).source,
        Source::File("/a".into())
    );
    assert_eq!(run(&["--args-file=/a"]).source, Source::File("/a".into()));
    assert_eq!(run(&[]).source, Source::StdinOrNothing);
    let checked = run(&["--check", "--diff", "{}"]);
    assert!(checked.check && checked.diff);
    assert_eq!(
        run(&["KEY", "-s", "v"]).source,
        Source::Shorthand(words(&["KEY", "-s", "v"]))
    );
    assert_eq!(parse_argv(&words(&["--help"])).unwrap(), Invocation::Help);
    assert_eq!(parse_argv(&words(&["{}", "-h"])).unwrap(), Invocation::Help);
    assert!(parse_argv(&words(&["--args-file"])).is_err());
    assert!(parse_argv(&words(&["--args-file", "/a", "{}"])).is_err());
}

#[test]
fn no_options_on_a_terminal_means_defaults() {
    let call = Call::default();
    assert_eq!(read_options(&SPEC, &call, true).unwrap(), Map::new());
}

#[test]
fn shorthand_is_refused_by_a_module_without_one() {
    let call = Call {
        source: Source::Shorthand(words(&["name", "x"])),
        ..Call::default()
    };
    let err = read_options(&SPEC, &call, true).unwrap_err();
    assert!(err.contains("unexpected arguments: name x"), "{err}");
}

#[test]
fn help_shows_usage_and_the_module_doc() {
    let text = input::help_text(&SPEC);
    assert!(text.contains("Usage: probe"), "{text}");
    assert!(text.contains("module: probe"), "{text}");
}

// --- Reading the options ------------------------------------------------------

#[test]
fn malformed_json_and_empty_input_are_explained() {
    let err = parse_object("{\"name\": ", "the args file /x").unwrap_err();
    assert!(
        err.starts_with("the args file /x is not valid JSON"),
        "{err}"
    );
    let err = parse_object("  \n", "the args file /x").unwrap_err();
    assert!(err.contains("is empty: expected a JSON object"), "{err}");
    let err = parse_object("[1, 2]", "stdin").unwrap_err();
    assert!(err.contains("holds an array"), "{err}");
    let missing = Call {
        source: Source::File("/nonexistent/hapair-args".into()),
        ..Call::default()
    };
    let err = read_options(&SPEC, &missing, false).unwrap_err();
    assert!(
        err.contains("can't read the args file /nonexistent/hapair-args"),
        "{err}"
    );
}

#[test]
fn unknown_option_is_named_with_the_supported_ones() {
    let reply = call(json!({"name": "x", "froce": true}), &Call::default());
    assert_eq!(reply.exit, EXIT_BAD_ARGS);
    assert_eq!(reply.json["failed"], true);
    assert_eq!(
        reply.json["msg"],
        "unsupported option froce; supported options are: name, force, count"
    );
}

#[test]
fn unknown_options_are_ignored_when_ansible_says_so() {
    let reply = call(
        json!({"name": "x", "extra": 1, "_ansible_ignore_unknown_opts": true}),
        &Call::default(),
    );
    assert_eq!(reply.exit, 0, "{}", reply.json);
    assert_eq!(reply.json["warnings"][0], "ignored unknown options: extra");
}

#[test]
fn wrong_type_names_the_option() {
    let reply = call(json!({"name": "x", "count": "many"}), &Call::default());
    assert_eq!(reply.exit, EXIT_BAD_ARGS);
    let msg = reply.json["msg"].as_str().unwrap();
    assert!(
        msg.starts_with("option count: invalid type: string \"many\""),
        "{msg}"
    );
    let reply = call(json!({"name": "x", "force": [1]}), &Call::default());
    let msg = reply.json["msg"].as_str().unwrap();
    assert!(msg.starts_with("option force: expected a boolean"), "{msg}");
}

#[test]
fn missing_required_option_is_named() {
    let reply = call(json!({"force": true}), &Call::default());
    assert_eq!(reply.json["msg"], "missing required option name");
    assert_eq!(reply.exit, EXIT_BAD_ARGS);
}

#[test]
fn ansible_booleans_accept_the_strings_ansible_does() {
    for (given, expected) in [
        (json!("yes"), true),
        (json!("False"), false),
        (json!(1), true),
    ] {
        let reply = call(json!({"name": "x", "force": given}), &Call::default());
        assert_eq!(reply.json["force"], expected, "{given}");
    }
}

#[test]
fn internal_keys_are_accepted_and_the_useful_ones_honoured() {
    let reply = call(
        json!({
            "name": "x",
            "_ansible_check_mode": true,
            "_ansible_diff": true,
            "_ansible_verbosity": 3,
            "_ansible_no_log": false,
            "_ansible_module_name": "probe",
            "_ansible_tmpdir": "/tmp/x",
            "_ansible_remote_tmp": "~/.ansible/tmp",
            "_ansible_keep_remote_files": false,
            "_ansible_version": "2.19.4",
            "_ansible_some_future_key": {"a": 1},
        }),
        &Call::default(),
    );
    assert_eq!(reply.exit, 0, "{}", reply.json);
    assert_eq!(reply.json["check_mode"], true);
    assert_eq!(reply.json["diff"]["after"], "b\n");
    let reply = call(
        json!({"name": "x", "_ansible_check_mode": "maybe"}),
        &Call::default(),
    );
    assert_eq!(reply.exit, EXIT_BAD_ARGS);
}

// --- The reply ---------------------------------------------------------------

#[test]
fn check_mode_and_diff_come_from_the_command_line_too() {
    let plain = call(json!({"name": "x"}), &Call::default());
    assert_eq!(plain.json["check_mode"], false);
    assert!(plain.json.get("diff").is_none(), "no diff unless asked");
    let cli = Call {
        check: true,
        diff: true,
        ..Call::default()
    };
    let checked = call(json!({"name": "x"}), &cli);
    assert_eq!(checked.json["check_mode"], true);
    assert_eq!(checked.json["diff"]["before"], "a\n");
}

#[test]
fn success_has_the_standard_shape() {
    let reply = call(json!({"name": "x", "force": true}), &Call::default());
    assert_eq!(reply.exit, 0);
    assert_eq!(reply.json["changed"], true);
    assert_eq!(reply.json["failed"], false);
    assert_eq!(reply.json["msg"], "would write x");
    assert_eq!(reply.json["warnings"], json!(["careful"]));
}

#[test]
fn an_error_becomes_a_failure_with_its_whole_context() {
    let reply = call(json!({"name": "fail"}), &Call::default());
    assert_eq!(reply.exit, EXIT_FAILED);
    assert_eq!(reply.json["failed"], true);
    assert_eq!(reply.json["changed"], false);
    assert_eq!(reply.json["msg"], "outer: inner cause");
}

#[test]
fn a_panic_becomes_a_json_failure() {
    let reply = call(json!({"name": "boom", "count": 7}), &Call::default());
    assert_eq!(reply.exit, EXIT_FAILED);
    assert_eq!(reply.json["failed"], true);
    let msg = reply.json["msg"].as_str().unwrap();
    assert!(msg.starts_with("internal error: kaboom 7 at "), "{msg}");
    assert!(msg.contains("bug in hapair"), "{msg}");
}

#[test]
fn ansible_is_never_taken_for_a_person_even_on_its_pty() {
    // Over SSH Ansible runs modules on a pty, where stderr is a terminal and
    // is merged into stdout: a summary there would corrupt the JSON.
    let by_ansible = call_on_terminal(
        json!({"name": "x", "_ansible_verbosity": 0}),
        &Call::default(),
        true,
    );
    assert_eq!(by_ansible.audience, Audience::Program);
    let by_hand = call_on_terminal(json!({"name": "x"}), &Call::default(), true);
    assert_eq!(by_hand.audience, Audience::Person);
    let piped = call_on_terminal(json!({"name": "x"}), &Call::default(), false);
    assert_eq!(piped.audience, Audience::Program);
    let bad_by_ansible = call_on_terminal(
        json!({"nme": "x", "_ansible_diff": false}),
        &Call::default(),
        true,
    );
    assert_eq!(bad_by_ansible.exit, EXIT_BAD_ARGS);
    assert_eq!(bad_by_ansible.audience, Audience::Program);
}

#[test]
fn json_goes_wherever_a_program_reads() {
    let on = |stdout, stderr| Terminal {
        stdout,
        stderr,
        stdin: false,
    };
    assert_eq!(on(true, true).audience(false), Audience::Person);
    assert_eq!(on(true, false).audience(false), Audience::Person);
    // `MODULE | jq` on a terminal: the JSON to jq, the summary to the person.
    assert_eq!(on(false, true).audience(false), Audience::ProgramAndPerson);
    assert_eq!(on(false, false).audience(false), Audience::Program);
    // --json: the JSON alone, even on a terminal.
    assert_eq!(on(true, true).audience(true), Audience::Program);
    let Invocation::Run(call) = parse_argv(&words(&["--json", "{}"])).unwrap() else {
        panic!("not a run");
    };
    assert!(call.json);
}

#[test]
fn a_person_reads_the_answer_alone_or_the_report_and_summary() {
    let ok = json!({"changed": false, "failed": false, "msg": "cluster.hosts is [1]"});
    assert_eq!(
        output::for_person("instance_conf", &ok, None, Some("[1]")),
        "[1]\n"
    );
    assert_eq!(
        output::for_person("port_check", &ok, Some("TABLE\n"), None),
        "TABLE\nport_check: ok: cluster.hosts is [1]\n"
    );
    // A failure shows its message, never a stale answer.
    let failed = json!({"changed": false, "failed": true, "msg": "no such key"});
    assert_eq!(
        output::for_person("instance_conf", &failed, None, Some("[1]")),
        "instance_conf: FAILED: no such key\n"
    );
}

#[test]
fn field_names_come_from_serde() {
    assert_eq!(field_names::<Args>(), &["name", "force", "count"]);
}

#[test]
#[should_panic(expected = "reserved")]
fn return_values_cannot_shadow_the_protocol_keys() {
    let _ = Outcome::unchanged("x").with("changed", true);
}

#[test]
fn human_summary_reads_like_a_sentence() {
    let text = output::human_summary(
        "probe",
        &json!({"changed": true, "failed": false, "msg": "did it", "warnings": ["w"]}),
    );
    assert_eq!(text, "probe: changed: did it\n  warning: w\n");
}
