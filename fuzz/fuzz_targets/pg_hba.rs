//! pg_hba.conf's hapair block: an edit either refuses the file or applies;
//! applied twice it equals once; it never drops a line it doesn't own.
#![no_main]

use hapair_core::files::{config_lines, line_content};
use hapair_core::postgres::{
    default_replication_user, hba_with_replication_rule, HBA_BEGIN, HBA_END,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&last, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let role = default_replication_user();
    let secondary = std::net::Ipv4Addr::new(198, 18, 0, last);
    let Ok(once) = hba_with_replication_rule(text, &role, secondary) else {
        return;
    };
    assert_eq!(
        hba_with_replication_rule(&once, &role, secondary).expect("its own output is valid"),
        once
    );
    // Every line outside hapair's block is still there, in order.
    let mut inside = false;
    // hapair's block comes first; what follows it is the rest, in order.
    let mut kept = config_lines(&once)
        .skip_while(|line| line_content(line).trim_end() != HBA_END)
        .skip(1);
    for line in config_lines(text) {
        let marker = line_content(line).trim_end();
        if marker == HBA_BEGIN {
            inside = true;
        } else if marker == HBA_END {
            inside = false;
        } else if !inside {
            assert_eq!(kept.next(), Some(line), "a line was dropped or moved");
        }
    }
});
