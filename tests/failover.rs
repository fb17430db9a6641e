//! Failover, on real hosts, through the playbooks an operator runs: a
//! planned switchover under load and back, an unplanned failover with the
//! primary cut off, its return as a second primary and its rejoin by
//! pg_rewind, and a rejoin that has to copy anew. Assertions are on the
//! services: every acknowledged row, key and message on the new primary,
//! who takes writes, what replicates from where.
//!
//! The tests run in order on one pair: each starts from the roles the one
//! before left.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hapair_tests::pair::{redis_cli, sql};
use hapair_tests::playbook::{playbook, PlaybookRun};
use hapair_tests::{ensure_eq, http_get, suite, wait_for, Fleet, Host, ModuleRun, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "1_switchover_under_load_loses_no_acknowledged_write",
        switchover,
    ),
    ("2_switching_back_restores_the_roles", switch_back),
    (
        "3_unplanned_failover_then_two_primaries_then_rejoin_by_rewind",
        unplanned_then_rejoin,
    ),
    (
        "4_rejoin_copies_anew_when_the_wal_to_rewind_is_gone",
        rejoin_by_copy,
    ),
];

fn main() -> ExitCode {
    suite("failover", 2, 16, TESTS)
}

const CONFIRM: &str = "hapair_confirm_unsafe_steps=true";
/// The application's files, pulled by the secondary; MirrorMaker looks for
/// new topics every 5 s, the monitor measures the bus every 10 s (the
/// verification after each rejoin waits for its measure).
const EXTRA: &str = r#"{"hapair_file_directories": ["/srv/app"], "hapair_kafka_refresh_interval": 5,
    "hapair_monitor_event_bus_interval": 10}"#;
const MONITOR_PORT: u16 = 8080;

fn run(fleet: &Fleet, book: &str, extra: &[&str]) -> Result<PlaybookRun> {
    let mut args = vec!["-e", EXTRA];
    args.extend(extra);
    playbook(fleet, book, &args)
}

/// The host that says primary in its instance config, and the other.
fn roles(fleet: &Fleet) -> Result<(&Host, &Host)> {
    let (a, b) = (fleet.host("primary"), fleet.host("secondary"));
    let mode = |host: &Host| -> Result<String> {
        let config: Value = serde_json::from_str(&host.sh("cat /etc/hapair/instance.json")?)?;
        Ok(config["cluster"]["replication_mode"]
            .as_str()
            .unwrap_or("")
            .to_string())
    };
    match (mode(a)?.as_str(), mode(b)?.as_str()) {
        ("primary", "secondary") => Ok((a, b)),
        ("secondary", "primary") => Ok((b, a)),
        other => bail!("the pair's roles are {other:?}"),
    }
}

/// The pair set up by ha_setup.yml, with the application's files, once.
fn ensure_set_up(fleet: &Fleet) -> Result<()> {
    let primary = fleet.host("primary");
    if primary.succeeds("grep -q '\"primary\"' /etc/hapair/instance.json")? {
        return Ok(());
    }
    primary.sh("mkdir -p /srv/app && echo 'from the first primary' > /srv/app/app.ini")?;
    primary.sh(
        "KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin/kafka-topics.sh --bootstrap-server \
         127.0.0.1:9092 --create --if-not-exists --topic writes --partitions 1 >/dev/null",
    )?;
    run(fleet, "ha_setup.yml", &["-e", CONFIRM])?.ok()?;
    Ok(())
}

/// What a writer had acknowledged: numbered rows and keys, with the time
/// of each acknowledgement (ms since the epoch), and Kafka's messages.
#[derive(Debug, Default)]
struct Acked {
    rows: Vec<(u64, u64)>,
    keys: Vec<(u64, u64)>,
    messages: Vec<(String, u64)>,
    /// When the bus here stopped being a mirror (a writer on the secondary).
    bus_open_at: Option<u64>,
}

/// A writer on one host: numbered rows to PostgreSQL, keys to Redis and
/// (on the primary) messages to Kafka with acks=all, each recorded once
/// acknowledged. On the secondary it writes as the application would try
/// to once the host is promoted.
struct Writer {
    host: String,
    stop_file: String,
    child: std::process::Child,
    reader: JoinHandle<()>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Writer {
    fn start(fleet: &Fleet, host: &Host, first: u64, kafka_prefix: Option<u32>) -> Result<Writer> {
        let password = fleet.inventory_var("hapair_redis_password")?;
        let stop_file = format!("/tmp/hapair-writer-{first}.stop");
        let kafka = match kafka_prefix {
            Some(prefix) => format!(
                "runuser -u kafka -- env KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin/kafka-run-class.sh \
                 org.apache.kafka.tools.VerifiableProducer --bootstrap-server 127.0.0.1:9092 \
                 --topic writes --acks -1 --throughput 20 --value-prefix {prefix} 2>/dev/null \
                 | while read -r line; do echo \"kafka $line\"; \
                     case $line in *producer_send_error*) pkill -f VerifiableProducer;; esac; done &"
            ),
            None => String::new(),
        };
        let script = format!(
            "rm -f {stop_file}; {kafka}
             n={first}; open=''
             while [ ! -e {stop_file} ]; do
               n=$((n+1))
               if runuser -u postgres -- psql -XAtq -c \"insert into writes (n, host) values ($n, '{host}')\" >/dev/null 2>&1; then
                 echo \"pg $n $(date +%s%3N)\"; fi
               if [ \"$(REDISCLI_AUTH='{password}' timeout 2 redis-cli --no-auth-warning SET w:$n $n 2>/dev/null)\" = OK ]; then
                 echo \"redis $n $(date +%s%3N)\"; fi
               if [ -z \"$open\" ] && ! systemctl is-active --quiet hapair-mirrormaker; then
                 open=1; echo \"bus-open 0 $(date +%s%3N)\"; fi
               sleep 0.05
             done
             pkill -f VerifiableProducer; wait",
            host = host.name
        );
        let mut child = host.spawn_sh(&script)?;
        let stdout = child.stdout.take().context("the writer's output")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Writer {
            host: host.name.clone(),
            stop_file,
            child,
            reader,
            lines,
        })
    }

    fn stop(mut self, fleet: &Fleet) -> Result<Acked> {
        fleet
            .host(&self.host)
            .sh(&format!("touch {}", self.stop_file))?;
        self.child.wait()?;
        let _ = self.reader.join();
        let mut acked = Acked::default();
        for line in self.lines.lock().unwrap().iter() {
            if let Some(json) = line.strip_prefix("kafka ") {
                let event: Value = serde_json::from_str(json).unwrap_or_default();
                if event["name"] == "producer_send_success" {
                    acked.messages.push((
                        event["value"].as_str().unwrap_or("").to_string(),
                        event["timestamp"].as_u64().unwrap_or(0),
                    ));
                }
                continue;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            let [kind, n, at] = fields.as_slice() else {
                continue;
            };
            let (n, at) = (n.parse().unwrap_or(0), at.parse().unwrap_or(0));
            match *kind {
                "pg" => acked.rows.push((n, at)),
                "redis" => acked.keys.push((n, at)),
                "bus-open" => acked.bus_open_at = Some(at),
                _ => {}
            }
        }
        Ok(acked)
    }
}

/// Every write `acked` on `from` is on `host`: rows, keys and messages.
fn holds_every_write(fleet: &Fleet, host: &Host, from: &str, acked: &Acked) -> Result<()> {
    let rows: BTreeSet<u64> = sql(host, &format!("select n from writes where host = '{from}'"))?
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let missing: Vec<u64> = acked
        .rows
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !rows.contains(n))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks acknowledged rows of {from}: {missing:?}",
            host.name
        );
    }
    let keys: BTreeSet<String> = redis_cli(fleet, host, "--scan --pattern 'w:*'")?
        .lines()
        .map(str::to_string)
        .collect();
    let missing: Vec<u64> = acked
        .keys
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !keys.contains(&format!("w:{n}")))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks acknowledged keys of {from}: {missing:?}",
            host.name
        );
    }
    let messages: BTreeSet<String> = host
        .sh(
            "KAFKA_HEAP_OPTS=-Xmx128m /opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server \
             127.0.0.1:9092 --topic writes --partition 0 --offset earliest --timeout-ms 8000 \
             2>/dev/null || true",
        )?
        .lines()
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = acked
        .messages
        .iter()
        .map(|(value, _)| value)
        .filter(|value| !messages.contains(*value))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks {} acknowledged messages of {from}, first {:?}",
            host.name,
            missing.len(),
            missing.first()
        );
    }
    if acked.rows.is_empty() || acked.keys.is_empty() || acked.messages.is_empty() {
        bail!("the writer on {from} had nothing acknowledged: {acked:?}");
    }
    Ok(())
}

/// `host` follows `primary` for all four services.
fn follows(fleet: &Fleet, host: &Host, primary: &Host) -> Result<()> {
    ensure_eq!(sql(host, "select pg_is_in_recovery()")?, "t");
    ensure_eq!(
        sql(
            host,
            "select status || ' ' || sender_host from pg_stat_wal_receiver"
        )?,
        format!("streaming {}", primary.ip)
    );
    ensure_eq!(
        redis_cli(
            fleet,
            host,
            "INFO replication | grep -E '^(role|master_host):'"
        )?
        .replace('\r', ""),
        format!("role:slave\nmaster_host:{}", primary.ip)
    );
    if !host.succeeds("systemctl is-active --quiet hapair-mirrormaker")?
        || !host.succeeds(&format!(
            "grep -q '^primary.bootstrap.servers = {}:' /etc/hapair/mirrormaker.properties",
            primary.ip
        ))?
    {
        bail!(
            "MirrorMaker on {} does not mirror {}",
            host.name,
            primary.ip
        );
    }
    if !host.succeeds("systemctl is-active --quiet hapair-files-sync.timer")?
        || !host.succeeds(&format!(
            "grep -q '{}' /etc/hapair/files-sync.args.json",
            primary.ip
        ))?
    {
        bail!(
            "the file sync on {} does not pull from {}",
            host.name,
            primary.ip
        );
    }
    ensure_eq!(sql(primary, "select pg_is_in_recovery()")?, "f");
    ensure_eq!(
        redis_cli(fleet, primary, "INFO replication | grep ^role:")?,
        "role:master"
    );
    for unit in ["hapair-mirrormaker.service", "hapair-files-sync.timer"] {
        if primary.succeeds(&format!("test -e /etc/systemd/system/{unit}"))? {
            bail!("{unit} is left on the primary {}", primary.name);
        }
    }
    Ok(())
}

/// The last acknowledgement before `at`, and the first after, in ms.
fn outage(before: &[(u64, u64)], after: &[(u64, u64)]) -> Option<u64> {
    let last = before.iter().map(|(_, at)| *at).max()?;
    let first = after
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > last)
        .min()?;
    Some(first - last)
}

fn module(fleet: &Fleet, host: &Host, name: &str, args: Value) -> Result<ModuleRun> {
    let mut args = args;
    for (key, var) in [
        ("redis_password", "hapair_redis_password"),
        ("replication_password", "hapair_replication_password"),
        ("kafka_password", "hapair_kafka_password"),
    ] {
        if args.get(key).is_some() {
            args[key] = json!(fleet.inventory_var(var)?);
        }
    }
    host.run_module(name, &args)
}

/// A planned switchover under a writer on each host, and what it must
/// leave: every acknowledged write on the new primary, writes taken there,
/// the old primary rejoined by rewind and following it.
fn switchover_once(fleet: &Fleet, round: u32) -> Result<()> {
    ensure_set_up(fleet)?;
    let (primary, secondary) = roles(fleet)?;
    sql(
        primary,
        "create table if not exists writes (n bigint primary key, host text)",
    )?;
    wait_for(
        "the writes table on the secondary",
        Duration::from_secs(30),
        || Ok(sql(secondary, "select count(*) from writes").is_ok()),
    )?;
    let base = u64::from(round) * 10_000_000;
    let on_primary = Writer::start(fleet, primary, base, Some(round))?;
    let on_secondary = Writer::start(fleet, secondary, base + 5_000_000, None)?;
    std::thread::sleep(Duration::from_secs(8));

    let started = Instant::now();
    let switched = run(fleet, "switchover.yml", &["-v", "-e", CONFIRM])?;
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let old = on_primary.stop(fleet)?;
    let new = on_secondary.stop(fleet)?;
    let switched = switched.ok()?;

    // Every acknowledged write of the old primary is on the new one, and
    // the new one took writes of its own.
    holds_every_write(fleet, secondary, &primary.name, &old)?;
    if new.rows.is_empty() || new.keys.is_empty() {
        bail!("the new primary took no write: {new:?}");
    }
    follows(fleet, primary, secondary)?;
    if !switched.output.contains("PostgreSQL was rewound") {
        bail!("the old primary was not rewound:\n{}", switched.output);
    }
    // The new primary's rows reach the old one.
    let last_new = new.rows.iter().map(|(n, _)| *n).max().unwrap_or(0);
    wait_for(
        "the new primary's rows on the old one",
        Duration::from_secs(30),
        || {
            Ok(sql(
                primary,
                &format!("select count(*) from writes where n = {last_new}"),
            )? == "1")
        },
    )?;
    // Kafka takes records on the new primary.
    hapair_tests::pair::produce(secondary, "after-switchover", 1, 1, 3)?;
    // The monitor says the pair is whole again, the other way round.
    let report = monitor_report(secondary)?;
    ensure_eq!(report["healthy"], true);

    println!(
        "switchover {round}: {} -> {}: playbook {seconds:.1} s; cluster_failover: every write \
         here after {} s, writable after {} s; write outage: PostgreSQL {:?} ms, Redis {:?} ms, \
         Kafka {:?} ms; acknowledged on the old primary: {} rows, {} keys, {} messages",
        primary.name,
        secondary.name,
        figure(&switched.output, "\"catch_up_seconds\": "),
        figure(&switched.output, "\"writable_after_seconds\": "),
        outage(&old.rows, &new.rows),
        outage(&old.keys, &new.keys),
        old.messages
            .iter()
            .map(|(_, at)| *at)
            .max()
            .zip(new.bus_open_at)
            .map(|(last, open)| open.saturating_sub(last)),
        old.rows.len(),
        old.keys.len(),
        old.messages.len()
    );

    // Each module again: nothing to do.
    let again = module(
        fleet,
        secondary,
        "cluster_failover",
        json!({"mode": "unplanned", "redis_password": ""}),
    )?
    .ok()?;
    ensure_eq!(again.changed(), false);
    let again = module(
        fleet,
        primary,
        "cluster_rejoin",
        json!({"primary_address": secondary.ip, "replication_password": "",
               "kafka_password": ""}),
    )?
    .ok()?;
    ensure_eq!(again.changed(), false);
    Ok(())
}

/// The number after `key` in a verbose run's output, as printed.
fn figure(output: &str, key: &str) -> String {
    output
        .split(key)
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .take(6)
                .collect()
        })
        .unwrap_or_else(|| "?".into())
}

fn monitor_report(host: &Host) -> Result<Value> {
    let answer = http_get(
        &format!("{}:{MONITOR_PORT}", host.ip),
        "/monitor/replication",
    )?;
    Ok(serde_json::from_str(&answer.body)?)
}

fn switchover(fleet: &Fleet) -> Result<()> {
    switchover_once(fleet, 1)
}

fn switch_back(fleet: &Fleet) -> Result<()> {
    ensure_set_up(fleet)?;
    let (before, _) = roles(fleet)?;
    switchover_once(fleet, 2)?;
    let (_, after) = roles(fleet)?;
    ensure_eq!(before.name, after.name);
    Ok(())
}

/// Takes `primary` off the network, and waits until `secondary` sees it
/// gone.
fn cut_off(primary: &Host, secondary: &Host) -> Result<()> {
    primary.cut()?;
    wait_for(
        "the secondary to lose its primary",
        Duration::from_secs(60),
        || {
            Ok(sql(
                secondary,
                "select count(*) from pg_stat_wal_receiver where status = 'streaming'",
            )? == "0")
        },
    )
}

/// The primary cut off; the secondary fails over; the old primary takes
/// writes of its own meanwhile and comes back: two primaries, loudly; then
/// it rejoins by rewind, its writes of the cut reported and gone.
fn unplanned_then_rejoin(fleet: &Fleet) -> Result<()> {
    ensure_set_up(fleet)?;
    let (primary, secondary) = roles(fleet)?;
    sql(
        primary,
        "create table if not exists writes (n bigint primary key, host text); \
         insert into writes select g, 'before-the-cut' from generate_series(30000001, 30000100) g",
    )?;
    wait_for("the rows on the secondary", Duration::from_secs(30), || {
        Ok(sql(
            secondary,
            "select count(*) from writes where host = 'before-the-cut'",
        )? == "100")
    })?;

    // While the primary still streams, an unplanned failover is refused.
    let refused = run(fleet, "failover.yml", &["-e", CONFIRM])?;
    if refused.succeeded || !refused.output.contains("still streams from the primary") {
        bail!(
            "failover.yml ran while the primary was there:\n{}",
            refused.output
        );
    }

    cut_off(primary, secondary)?;
    // Check mode: the plan, and nothing changes.
    let check = run(fleet, "failover.yml", &["--check", "-v"])?;
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "t");
    if !check.output.contains("\"msg\": \"would ") || !check.output.contains("promote PostgreSQL") {
        bail!("failover.yml --check shows no plan:\n{}", check.output);
    }
    // The old primary, cut off, takes writes no one else sees.
    sql(
        primary,
        "insert into writes select g, 'during-the-cut' from generate_series(30000101, 30000200) g",
    )?;
    let started = Instant::now();
    let failed_over = run(fleet, "failover.yml", &["-e", CONFIRM])?;
    let seconds = started.elapsed().as_secs_f64();
    if !failed_over.output.contains("replayed_lsn") || !failed_over.output.contains("\"behind\"") {
        bail!(
            "failover.yml reported no loss window:\n{}",
            failed_over.output
        );
    }
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "f");
    sql(
        secondary,
        "insert into writes select g, 'after-the-failover' from generate_series(30000201, 30000300) g",
    )?;
    ensure_eq!(redis_cli(fleet, secondary, "SET after-failover yes")?, "OK");
    println!("unplanned failover: failover.yml took {seconds:.1} s");

    // The old primary comes back: two primaries, on both monitors.
    primary.join()?;
    for host in [primary, secondary] {
        let mut report = Value::Null;
        wait_for("two primaries reported", Duration::from_secs(60), || {
            report = monitor_report(host).unwrap_or_default();
            Ok(report["two_primaries"].is_object())
        })?;
        if !report["two_primaries"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains("rejoin.yml")
        {
            bail!("the report names no way out: {report}");
        }
        let address = format!("{}:{MONITOR_PORT}", host.ip);
        ensure_eq!(http_get(&address, "/health")?.status, 503);
    }
    // ha_setup.yml refuses; rejoin.yml names the host that gives way.
    let refused = run(fleet, "ha_setup.yml", &["-e", CONFIRM])?;
    if refused.succeeded || !refused.output.contains("Two primaries") {
        bail!(
            "ha_setup.yml did not refuse two primaries:\n{}",
            refused.output
        );
    }
    let rejoin = format!("hapair_rejoin={}-{}", primary.fleet, primary.name);
    let started = Instant::now();
    let rejoined = run(fleet, "rejoin.yml", &["-e", CONFIRM, "-e", &rejoin])?.ok()?;
    let seconds = started.elapsed().as_secs_f64();
    if !rejoined.output.contains("PostgreSQL was rewound") || rejoined.output.contains("copied in")
    {
        bail!("the old primary was not rewound:\n{}", rejoined.output);
    }
    // The debug line is JSON inside JSON: its quotes come escaped.
    let discarded = rejoined
        .output
        .lines()
        .find(|l| l.contains("WAL discarded"))
        .unwrap_or("")
        .replace("\\\"", "\"");
    if discarded.contains("\"bytes\": 0") || !discarded.contains("\"from\"") {
        bail!("no discarded range was reported: {discarded}");
    }
    println!("rejoin by rewind: rejoin.yml took {seconds:.1} s; {discarded}");
    follows(fleet, primary, secondary)?;
    ensure_eq!(
        sql(
            primary,
            "select host, count(*) from writes where n > 30000000 group by host order by host"
        )?,
        "after-the-failover|100\nbefore-the-cut|100"
    );
    wait_for(
        "the key on the old primary",
        Duration::from_secs(30),
        || Ok(redis_cli(fleet, primary, "GET after-failover")? == "yes"),
    )?;
    Ok(())
}

/// The old primary's WAL back to the fork is gone: the rewind can't be
/// done, so step 8 copies the new primary anew, keeping the old data aside
/// until the copy streams.
fn rejoin_by_copy(fleet: &Fleet) -> Result<()> {
    ensure_set_up(fleet)?;
    let (primary, secondary) = roles(fleet)?;
    cut_off(primary, secondary)?;
    sql(
        primary,
        "insert into writes select g, 'lost' from generate_series(40000001, 40000100) g; \
         select pg_switch_wal(); checkpoint",
    )?;
    // The cut-off primary is unreachable: the run says so in its exit
    // status; the promotion is what counts.
    run(fleet, "failover.yml", &["-e", CONFIRM])?;
    ensure_eq!(sql(secondary, "select pg_is_in_recovery()")?, "f");
    primary.join()?;
    // Fenced by hand, twice: the second run changes nothing. Then the WAL
    // back to the fork goes, as on a host that recycled it.
    let fence = json!({"redis_password": ""});
    let first = module(fleet, primary, "cluster_fence", fence.clone())?.ok()?;
    ensure_eq!(first.changed(), true);
    let second = module(fleet, primary, "cluster_fence", fence)?.ok()?;
    ensure_eq!(second.changed(), false);
    ensure_eq!(second.json["final_lsn"], first.json["final_lsn"]);
    primary.sh(
        "cd /var/lib/postgresql/15/main/pg_wal && \
         redo=$(runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_controldata .. | \
                sed -n 's/^Latest checkpoint.s REDO WAL file: *//p') && \
         for f in 0000000*; do [ \"$f\" \\< \"$redo\" ] && [ ${#f} -eq 24 ] && rm -f \"$f\"; done; true",
    )?;
    let rejoin = format!("hapair_rejoin={}-{}", primary.fleet, primary.name);
    let rejoined = run(fleet, "rejoin.yml", &["-e", CONFIRM, "-e", &rejoin])?.ok()?;
    if !rejoined.output.contains("copied anew by step 8") {
        bail!(
            "the rejoin did not fall back to a copy:\n{}",
            rejoined.output
        );
    }
    follows(fleet, primary, secondary)?;
    ensure_eq!(
        sql(primary, "select count(*) from writes where host = 'lost'")?,
        "0"
    );
    Ok(())
}
