//! What hapair reads from tools' output: rsync's itemized changes and
//! --stats, Kafka's end offsets and MirrorMaker's committed ones, Redis's
//! INFO. Never a panic; deletions are among the changes; what the per-topic
//! sums count, the total counts; no topic is more behind than it has records.
#![no_main]

use hapair_core::kafka::{
    not_yet_mirrored, parse_end_offsets, parse_mirrored_offsets, parse_partition_offsets,
    parse_topic_offsets,
};
use hapair_core::redis::parse_info;
use hapair_core::rsync::{parse_itemized, parse_stats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let preview = parse_itemized(text);
    assert!(preview.deletions <= preview.changes.len());
    let _ = parse_stats(text);
    let _ = parse_info(text);
    // Every line a topic's sum counts, the total counts too (both saturate).
    let per_topic: u128 = parse_topic_offsets(text).values().map(|&v| v as u128).sum();
    let total = parse_end_offsets(text);
    assert!(per_topic.min(u64::MAX as u128) <= total as u128, "{per_topic} > {total}");
    // MirrorMaker's offsets: never more behind than there are records.
    let mirrored = parse_mirrored_offsets(text, "primary");
    for (records, behind) in not_yet_mirrored(&parse_partition_offsets(text), &mirrored).values() {
        assert!(behind <= records, "{behind} > {records}");
    }
});
