//! Every module's options through the protocol: the first byte picks the
//! module, the rest is the JSON text of its options. Whatever they are,
//! the module prints one JSON object with `changed`, `failed` and a
//! bounded `msg`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each module's own `Args`, as its binary parses them.
macro_rules! modules {
    ($($name:ident => $path:literal),* $(,)?) => {
        $(
            #[allow(dead_code, unused_imports)]
            #[path = $path]
            mod $name;
        )*
        const REPLIES: &[fn(&str) -> serde_json::Value] = &[
            $(hapair_core::protocol::reply_without_module::<$name::Args>,)*
        ];
    };
}

modules!(
    cluster_add_secondary => "../../modules/cluster_add_secondary/src/main.rs",
    cluster_enter_primary_mode => "../../modules/cluster_enter_primary_mode/src/main.rs",
    cluster_enter_standalone_mode => "../../modules/cluster_enter_standalone_mode/src/main.rs",
    cluster_failover => "../../modules/cluster_failover/src/main.rs",
    cluster_fence => "../../modules/cluster_fence/src/main.rs",
    cluster_generate_keys => "../../modules/cluster_generate_keys/src/main.rs",
    cluster_kvstore_copy => "../../modules/cluster_kvstore_copy/src/main.rs",
    cluster_preflight => "../../modules/cluster_preflight/src/main.rs",
    cluster_rejoin => "../../modules/cluster_rejoin/src/main.rs",
    cluster_replicate_files => "../../modules/cluster_replicate_files/src/main.rs",
    cluster_replicate_postgres => "../../modules/cluster_replicate_postgres/src/main.rs",
    cluster_start_kafka_sync => "../../modules/cluster_start_kafka_sync/src/main.rs",
    instance_conf => "../../modules/instance_conf/src/main.rs",
    replication_helper => "../../modules/replication_helper/src/main.rs",
    replication_port_check => "../../modules/replication_port_check/src/main.rs",
    replication_status => "../../modules/replication_status/src/main.rs",
);

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let reply = REPLIES[which as usize % REPLIES.len()](text);
    let printed = reply.to_string();
    assert!(!printed.contains('\n'), "one line: {printed}");
    let back: serde_json::Value = serde_json::from_str(&printed).expect("the reply is JSON");
    let object = back.as_object().expect("the reply is an object");
    assert!(object["changed"].is_boolean() && object["failed"].is_boolean());
    let msg = object["msg"].as_str().expect("a msg");
    assert!(msg.len() <= 4096 + 64, "a msg of {} bytes", msg.len());
    if object["failed"] == true {
        assert!(!msg.is_empty());
    } else {
        assert_eq!(msg, "parsed");
    }
});
