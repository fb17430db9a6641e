//! Several pairs from one inventory: three pairs (six hosts) set up by one
//! run of ha_setup.yml, each host told its pair by `hapair_pair`. Each pair
//! replicates only within itself: rows, keys and messages reach the pair's
//! secondary and no other host; each host trusts, and each replication
//! link points at, its own peer alone.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use hapair_tests::pair::{redis_cli, regroup_into_pairs, sql, THREE_PAIRS as PAIRS};
use hapair_tests::playbook::playbook_with_env;
use hapair_tests::{ensure_eq, suite, wait_for, Fleet, Host, Test};

const TESTS: &[Test] = &[(
    "three_pairs_are_set_up_by_one_run_and_each_replicates_only_within_itself",
    three_pairs,
)];

fn main() -> ExitCode {
    suite("pairs", 6, 21, TESTS)
}

fn three_pairs(fleet: &Fleet) -> Result<()> {
    regroup_into_pairs(fleet, &PAIRS)?;
    let run = playbook_with_env(
        fleet,
        "ha_setup.yml",
        &["-e", "hapair_confirm_unsafe_steps=true"],
        &[],
    )?;
    if !run.succeeded || run.recap.len() != 6 || run.recap.iter().any(|(_, _, failed)| *failed > 0)
    {
        bail!(
            "ha_setup.yml did not set up the three pairs:\n{}",
            run.output
        );
    }
    println!("three pairs set up by one run in {:.1} s", run.seconds);

    for (pair, primary, secondary) in PAIRS {
        let (primary, secondary) = (fleet.host(primary), fleet.host(secondary));
        let others: Vec<&Host> = fleet
            .hosts
            .iter()
            .filter(|h| h.name != primary.name && h.name != secondary.name)
            .collect();
        // PostgreSQL: the primary streams to its secondary alone.
        ensure_eq!(
            sql(
                primary,
                "select string_agg(host(client_addr), ',') from pg_stat_replication"
            )?,
            secondary.ip
        );
        sql(
            primary,
            &format!("create table pair_{pair} (n int); insert into pair_{pair} values (1)"),
        )?;
        // Redis: one replica, the secondary.
        let info = redis_cli(fleet, primary, "INFO replication")?;
        if !info.contains("connected_slaves:1") || !info.contains(&format!("ip={},", secondary.ip))
        {
            bail!("{pair}: Redis replicates elsewhere: {info}");
        }
        ensure_eq!(
            redis_cli(fleet, primary, &format!("SET pair:{pair} yes"))?,
            "OK"
        );
        // Kafka: MirrorMaker on the secondary reads the pair's primary.
        let mm2 = secondary.sh("cat /etc/hapair/mirrormaker.properties")?;
        if !mm2.contains(&format!("bootstrap.servers = {}:", primary.ip))
            || others.iter().any(|o| mm2.contains(&format!("{}:", o.ip)))
        {
            bail!("{pair}: MirrorMaker does not read its own primary alone:\n{mm2}");
        }
        // SSH: each host lets in its peer alone.
        for (host, peer) in [(primary, secondary), (secondary, primary)] {
            let keys = host.sh("cat ~hapair/.ssh/authorized_keys")?;
            if !keys.contains(&format!("from=\"{}\"", peer.ip))
                || others.iter().any(|o| keys.contains(&o.ip))
            {
                bail!("{pair}: {} trusts more than its peer:\n{keys}", host.name);
            }
        }
        // What the primary wrote reaches its secondary, and no other host.
        wait_for(
            "the pair's row and key on its secondary",
            Duration::from_secs(60),
            || {
                Ok(
                    sql(secondary, &format!("select count(*) from pair_{pair}"))? == "1"
                        && redis_cli(fleet, secondary, &format!("GET pair:{pair}"))? == "yes",
                )
            },
        )?;
        for other in &others {
            ensure_eq!(
                sql(other, &format!("select to_regclass('pair_{pair}') is null"))?,
                "t"
            );
            ensure_eq!(
                redis_cli(fleet, other, &format!("EXISTS pair:{pair}"))?,
                "0"
            );
        }
    }
    Ok(())
}
