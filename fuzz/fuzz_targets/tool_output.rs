//! What hapair reads from tools' output: rsync's itemized changes and
//! --stats, MirrorMaker's committed offsets, Redis's
//! INFO. Never a panic; deletions are among the changes; a topic's sum is at
//! least each of its partitions; no topic is more behind than it has records.
#![no_main]

use hapair_core::kafka::{not_yet_mirrored, parse_mirrored_offsets, topic_sums};
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
    // MirrorMaker's offsets, of two clusters of the same text: a topic's
    // sum is at least each of its partitions' offsets (it saturates), and
    // never more is behind than there are records.
    let mirrored = parse_mirrored_offsets(text, "primary");
    let source = parse_mirrored_offsets(text, "other");
    let sums = topic_sums(&source);
    for ((topic, _), offset) in &source {
        assert!(sums[topic] >= *offset, "{topic}: {} < {offset}", sums[topic]);
    }
    for (records, behind) in not_yet_mirrored(&source, &mirrored).values() {
        assert!(behind <= records, "{behind} > {records}");
    }
});
