//! hapair-monitor on a real pair: installed by `replication_status
//! monitor=present` on both hosts, read from the control node over the
//! pair's network as a person, a load balancer and Prometheus read it.
//! Assertions compare what it serves with the services' own answers, with
//! promtool and a real Prometheus, and with the page as Chromium draws it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use hapair_tests::pair::{
    all_replicating, install_monitor, monitor_report, produce, replay_lag_bytes, sql, streaming,
    KAFKA_PASSWORD, MONITOR_PORT, REDIS_PASSWORD,
};
use hapair_tests::{ensure_eq, http_get, repo_root, suite, wait_for, Fleet, Host, Test};
use serde_json::{json, Value};

const TESTS: &[Test] = &[
    (
        "monitor_installs_once_and_check_mode_changes_nothing",
        installs,
    ),
    (
        "monitor_a_replicating_pair_has_numbers_and_gates_on_both_hosts",
        replicating,
    ),
    (
        "monitor_the_byte_lag_agrees_with_pg_stat_replication_under_pgbench",
        lag_under_load,
    ),
    (
        "monitor_a_stopped_standby_redis_or_mirrormaker_is_named",
        stopped,
    ),
    ("monitor_a_hung_backend_does_not_stall_it", hung),
    (
        "monitor_metrics_pass_promtool_and_prometheus_scrapes_both_hosts",
        prometheus,
    ),
    (
        "monitor_the_status_page_in_chromium_shows_each_service_and_its_plot",
        status_page,
    ),
];

const SUBNET: u8 = 13;

fn main() -> ExitCode {
    suite("monitor", 2, SUBNET, TESTS)
}

const MONITOR_FILES: &[&str] = &[
    "/etc/systemd/system/hapair-monitor.service",
    "/etc/hapair/monitor.args.json",
    "/usr/local/libexec/hapair/replication_status",
];

fn address(host: &Host) -> String {
    format!("{}:{MONITOR_PORT}", host.ip)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Both monitors installed on a pair with all four services replicating.
fn monitored_pair(fleet: &Fleet) -> Result<(&Host, &Host)> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    all_replicating(primary, secondary)?;
    install_monitor(primary, json!({}))?;
    install_monitor(secondary, json!({}))?;
    Ok((primary, secondary))
}

/// Waits for a report from `host`'s monitor that `accept` takes.
fn report_where(
    host: &Host,
    what: &str,
    timeout: Duration,
    accept: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    let found = wait_for(what, timeout, || {
        last = monitor_report(host)?;
        Ok(accept(&last))
    });
    found.with_context(|| format!("the last report of {}: {last}", host.name))?;
    Ok(last)
}

fn installs(fleet: &Fleet) -> Result<()> {
    let host = fleet.host("secondary");
    host.run_module(
        "replication_status",
        &json!({"redis_password": REDIS_PASSWORD, "monitor": "absent"}),
    )?
    .ok()?;
    let before = host.snapshot(MONITOR_FILES)?;
    let check = install_monitor(host, json!({"_ansible_check_mode": true}))?;
    ensure_eq!(check.changed(), true);
    if !check.msg().starts_with("would ") {
        bail!("check mode says {:?}", check.msg());
    }
    before.ensure_unchanged(&host.snapshot(MONITOR_FILES)?)?;

    let first = install_monitor(host, json!({}))?;
    ensure_eq!(first.changed(), true);
    for secret in [REDIS_PASSWORD, KAFKA_PASSWORD] {
        if first.stdout.contains(secret) {
            bail!("the module printed a password: {}", first.stdout);
        }
    }
    ensure_eq!(
        host.sh("stat -c '%a %U' /etc/hapair/monitor.args.json")?
            .trim(),
        "600 root"
    );
    ensure_eq!(
        host.sh("systemctl is-active hapair-monitor")?.trim(),
        "active"
    );
    ensure_eq!(
        host.sh("systemctl is-enabled hapair-monitor")?.trim(),
        "enabled"
    );
    // Loopback and the pair address; not every address.
    let listening = host.sh(&format!("ss -Hltn 'sport = :{MONITOR_PORT}'"))?;
    for expected in ["127.0.0.1", host.ip.as_str()] {
        if !listening.contains(&format!("{expected}:{MONITOR_PORT}")) {
            bail!("the monitor does not listen on {expected}: {listening}");
        }
    }
    if listening.contains(&format!("0.0.0.0:{MONITOR_PORT}")) || listening.contains("*:") {
        bail!("the monitor listens on every address: {listening}");
    }
    let alive = http_get(&address(host), "/monitor/i_am_alive")?;
    ensure_eq!(alive.status, 200);

    let again = install_monitor(host, json!({}))?;
    ensure_eq!(again.changed(), false);
    ensure_eq!(again.json["postgres"]["status"].is_string(), true);
    // report=false, as the set-up runs it: the same monitor, no measure.
    let unmeasured = install_monitor(host, json!({"report": false}))?;
    ensure_eq!(unmeasured.changed(), false);
    ensure_eq!(unmeasured.json.get("postgres"), None);
    ensure_eq!(unmeasured.json.get("healthy"), None);
    let since =
        host.sh("systemctl show -p ActiveEnterTimestampMonotonic --value hapair-monitor")?;
    // A changed option restarts it; the old listener is gone, the new
    // interval is in force.
    let changed = install_monitor(host, json!({"interval": 2}))?;
    ensure_eq!(changed.changed(), true);
    let after =
        host.sh("systemctl show -p ActiveEnterTimestampMonotonic --value hapair-monitor")?;
    if since == after {
        bail!("a changed option did not restart the monitor");
    }
    let options: Value = serde_json::from_str(&host.sh("cat /etc/hapair/monitor.args.json")?)?;
    ensure_eq!(options["interval"], 2);
    ensure_eq!(options["serve"], true);

    let removed = host
        .run_module(
            "replication_status",
            &json!({"redis_password": REDIS_PASSWORD, "monitor": "absent"}),
        )?
        .ok()?;
    ensure_eq!(removed.changed(), true);
    for path in &MONITOR_FILES[..2] {
        if host.succeeds(&format!("test -e {path}"))? {
            bail!("{path} is left after monitor=absent");
        }
    }
    if http_get(&address(host), "/monitor/i_am_alive").is_ok() {
        bail!("the monitor still answers after monitor=absent");
    }
    let again = host
        .run_module(
            "replication_status",
            &json!({"redis_password": REDIS_PASSWORD, "monitor": "absent"}),
        )?
        .ok()?;
    ensure_eq!(again.changed(), false);
    Ok(())
}

fn replicating(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = monitored_pair(fleet)?;
    // The primary sees everything, the files and MirrorMaker through the
    // secondary's monitor.
    let report = report_where(primary, "a healthy report", Duration::from_secs(60), |r| {
        r["healthy"] == true
    })?;
    let standby = &report["postgres"]["standbys"][0];
    ensure_eq!(standby["client_addr"], json!(secondary.ip));
    if !standby["lag_bytes"].is_i64() || !standby["replay_lag_seconds"].is_number() {
        bail!("no numeric PostgreSQL lag: {}", report["postgres"]);
    }
    if !report["kvstore"]["replicas"][0]["lag_bytes"].is_i64() {
        bail!("no numeric Redis lag: {}", report["kvstore"]);
    }
    if !report["event_bus"]["topics"]["heartbeats"]["behind"].is_u64() {
        bail!("no numeric bus lag: {}", report["event_bus"]);
    }
    ensure_eq!(report["files"]["status"], "ok");
    ensure_eq!(report["files"]["measured_by"], json!(address(secondary)));
    let on_secondary = report_where(
        secondary,
        "a healthy report",
        Duration::from_secs(60),
        |r| r["healthy"] == true,
    )?;
    if !on_secondary["postgres"]["receiver"]["lag_bytes"].is_i64() {
        bail!("no numeric standby lag: {}", on_secondary["postgres"]);
    }
    ensure_eq!(on_secondary["event_bus"]["mirrormaker"], "running");

    // The bus's figure is exact: 300 records produced on the primary are
    // counted, and once mirrored none is behind, on either monitor.
    produce(primary, "monitored", 3, 1, 300)?;
    let mirrored = json!({"primary_end": 300, "behind": 0});
    report_where(
        secondary,
        "300 records mirrored and counted",
        Duration::from_secs(120),
        |r| r["event_bus"]["topics"]["monitored"] == mirrored,
    )?;
    let relayed = report_where(
        primary,
        "the secondary's figure relayed",
        Duration::from_secs(60),
        |r| r["event_bus"]["topics"]["monitored"] == mirrored,
    )?;
    ensure_eq!(relayed["event_bus"]["exact"], true);

    // The gates, as a load balancer asks them.
    let gate =
        |host: &Host, path: &str| -> Result<u16> { Ok(http_get(&address(host), path)?.status) };
    ensure_eq!(gate(primary, "/primary")?, 200);
    ensure_eq!(gate(primary, "/replica")?, 503);
    ensure_eq!(gate(secondary, "/primary")?, 503);
    ensure_eq!(gate(secondary, "/replica?lag=16MB")?, 200);
    ensure_eq!(gate(secondary, "/replica?lag=sixteen")?, 400);
    ensure_eq!(gate(primary, "/health")?, 200);
    ensure_eq!(gate(primary, "/nowhere")?, 404);
    // Replay paused with WAL waiting: past a small lag the gate closes.
    sql(secondary, "select pg_wal_replay_pause()")?;
    let closed = (|| -> Result<()> {
        sql(primary, "create table if not exists gate (n int); insert into gate select generate_series(1, 100000)")?;
        wait_for(
            "the replica gate to close at lag=1kB",
            Duration::from_secs(30),
            || Ok(gate(secondary, "/replica?lag=1kB")? == 503),
        )?;
        ensure_eq!(gate(secondary, "/replica")?, 200);
        Ok(())
    })();
    sql(secondary, "select pg_wal_replay_resume()")?;
    closed?;

    // No password in anything served.
    for host in [primary, secondary] {
        for path in ["/monitor/replication", "/metrics", "/"] {
            let body = http_get(&address(host), path)?.body;
            for secret in [REDIS_PASSWORD, KAFKA_PASSWORD] {
                if body.contains(secret) {
                    bail!("{path} on {} shows a password", host.name);
                }
            }
        }
    }
    Ok(())
}

/// pgbench writes on the primary while the standby's replay is paused, so
/// the lag only grows: the monitor's figure lies between two direct
/// `pg_stat_replication` readings taken around its measure.
fn lag_under_load(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    streaming(primary, secondary)?;
    install_monitor(primary, json!({}))?;
    primary.sh("runuser -u postgres -- /usr/lib/postgresql/15/bin/pgbench -q -i -s 5 postgres >/dev/null 2>&1")?;
    sql(secondary, "select pg_wal_replay_pause()")?;
    primary.sh(
        "runuser -u postgres -- /usr/lib/postgresql/15/bin/pgbench -c 4 -T 30 postgres \
         >/tmp/pgbench.log 2>&1 &",
    )?;
    let result = (|| -> Result<()> {
        let direct = || replay_lag_bytes(primary);
        std::thread::sleep(Duration::from_secs(3));
        let before = direct()?;
        let start = unix_now();
        // A measure that ended two seconds later began after `before`.
        let report = report_where(
            primary,
            "a measure after the reading",
            Duration::from_secs(20),
            |r| r["postgres"]["measured_at"].as_u64().unwrap_or(0) >= start + 2,
        )?;
        let after = direct()?;
        let reported = report["postgres"]["standbys"][0]["lag_bytes"]
            .as_i64()
            .unwrap_or(-1);
        if before < 1 << 20 {
            bail!("the paused standby is only {before} bytes behind under pgbench");
        }
        if reported < before || reported > after + 64 * 1024 {
            bail!(
                "the monitor says {reported} bytes behind; direct readings {before} then {after}"
            );
        }
        eprintln!("lag under pgbench: direct {before}, monitor {reported}, direct {after}");
        Ok(())
    })();
    primary.sh("pkill -x pgbench; true")?;
    sql(secondary, "select pg_wal_replay_resume()")?;
    result
}

fn stopped(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = monitored_pair(fleet)?;
    report_where(primary, "a healthy report", Duration::from_secs(60), |r| {
        r["healthy"] == true
    })?;

    secondary.sh("systemctl stop postgresql@15-main")?;
    let gone = report_where(primary, "the standby gone", Duration::from_secs(15), |r| {
        r["postgres"]["standbys"] == json!([])
    });
    let gate = wait_for("the replica gate to close", Duration::from_secs(15), || {
        Ok(http_get(&address(secondary), "/replica")?.status == 503)
    });
    secondary.sh("systemctl start postgresql@15-main")?;
    let gone = gone?;
    ensure_eq!(gone["postgres"]["slots"][0]["active"], false);
    ensure_eq!(gone["healthy"], false);
    gate?;

    secondary.sh("systemctl stop redis-server hapair-mirrormaker")?;
    let named = (|| -> Result<()> {
        let report = report_where(
            secondary,
            "Redis and MirrorMaker named",
            Duration::from_secs(40),
            |r| {
                r["kvstore"]["status"] == "unknown"
                    && r["event_bus"]["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("not running")
            },
        )?;
        ensure_eq!(report["healthy"], false);
        report_where(
            primary,
            "the primary to relay MirrorMaker's state",
            Duration::from_secs(40),
            |r| {
                r["event_bus"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("on the secondary")
            },
        )?;
        Ok(())
    })();
    secondary.sh("systemctl start redis-server hapair-mirrormaker")?;
    named
}

/// Redis stopped but listening (SIGSTOP): its section is reported as hung,
/// the others go on being measured, and every request is answered.
fn hung(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = (fleet.host("primary"), fleet.host("secondary"));
    streaming(primary, secondary)?;
    install_monitor(secondary, json!({}))?;
    secondary.sh("pkill -STOP -x redis-server")?;
    let result = (|| -> Result<()> {
        let first = report_where(
            secondary,
            "Redis reported as hung",
            Duration::from_secs(20),
            |r| {
                r["kvstore"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("hangs")
            },
        )?;
        let measured = first["postgres"]["measured_at"].as_u64().unwrap_or(0);
        let later = report_where(
            secondary,
            "PostgreSQL measured again",
            Duration::from_secs(20),
            |r| r["postgres"]["measured_at"].as_u64().unwrap_or(0) > measured,
        )?;
        ensure_eq!(later["postgres"]["receiver"]["status"], "streaming");
        ensure_eq!(later["kvstore"]["status"], "unknown");
        ensure_eq!(http_get(&address(secondary), "/metrics")?.status, 200);
        ensure_eq!(http_get(&address(secondary), "/")?.status, 200);
        Ok(())
    })();
    secondary.sh("pkill -CONT -x redis-server")?;
    result?;
    report_where(
        secondary,
        "Redis measured again",
        Duration::from_secs(20),
        |r| r["kvstore"]["status"] != "unknown",
    )?;
    Ok(())
}

/// A program the test runs on this machine, or how to get it.
fn tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = Path::new("/usr/bin").join(name);
    if !path.exists() {
        bail!("{name} is not installed on this machine: apt-get install {package} (.ci/run does)");
    }
    Ok(path)
}

/// A child process ended when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus(fleet: &Fleet) -> Result<()> {
    let (primary, secondary) = monitored_pair(fleet)?;
    report_where(primary, "a healthy report", Duration::from_secs(60), |r| {
        r["healthy"] == true
    })?;
    report_where(
        secondary,
        "a healthy report",
        Duration::from_secs(60),
        |r| r["healthy"] == true,
    )?;
    let promtool = tool("promtool", "prometheus")?;
    for host in [primary, secondary] {
        let metrics = http_get(&address(host), "/metrics")?;
        ensure_eq!(
            metrics.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        check
            .stdin
            .take()
            .context("promtool's stdin")?
            .write_all(metrics.body.as_bytes())?;
        let checked = check.wait_with_output()?;
        if !checked.status.success() {
            bail!(
                "promtool check metrics refuses {}'s metrics: {}{}\n{}",
                host.name,
                String::from_utf8_lossy(&checked.stdout),
                String::from_utf8_lossy(&checked.stderr),
                metrics.body
            );
        }
    }

    // A real Prometheus on this machine's loopback, scraping both hosts.
    let dir = repo_root().join("target/fleet/monitor-prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: hapair\n    static_configs:\n\
             \x20     - targets: ['{}', '{}']\n",
            address(primary),
            address(secondary)
        ),
    )?;
    let listen = format!("127.0.0.1:{}", 19000 + SUBNET as u16);
    let _prometheus = Child(
        Command::new(tool("prometheus", "prometheus")?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .spawn()?,
    );
    let query = |promql: &str| -> Result<Vec<Value>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = http_get(&listen, &format!("/api/v1/query?query={encoded}"))?;
        let value: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
        Ok(value["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let mut lag = Vec::new();
    wait_for(
        "Prometheus to scrape both hosts",
        Duration::from_secs(60),
        || {
            let up = query("up == 1").unwrap_or_default();
            lag = query("pg_stat_replication_pg_wal_lsn_diff").unwrap_or_default();
            Ok(up.len() == 2 && !lag.is_empty())
        },
    )
    .with_context(|| std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default())?;
    ensure_eq!(lag[0]["metric"]["client_addr"], json!(secondary.ip));
    ensure_eq!(lag[0]["metric"]["instance"], json!(address(primary)));
    let link = query("redis_master_link_up")?;
    ensure_eq!(link.len(), 1);
    ensure_eq!(link[0]["metric"]["instance"], json!(address(secondary)));
    ensure_eq!(link[0]["value"][1], "1");
    Ok(())
}

fn status_page(fleet: &Fleet) -> Result<()> {
    let (primary, _) = monitored_pair(fleet)?;
    report_where(primary, "a healthy report", Duration::from_secs(60), |r| {
        r["healthy"] == true
    })?;
    // A few samples, so each plot has a line.
    std::thread::sleep(Duration::from_secs(4));
    let page = http_get(&address(primary), "/")?;
    ensure_eq!(page.status, 200);
    ensure_eq!(page.content_type, "text/html; charset=utf-8");
    let chromium = tool("chromium", "chromium")?;
    let url = format!("http://{}/", address(primary));
    // Only the test host is reached: no name resolves, no address but the
    // host's, and Chromium's own background traffic is off.
    let resolver = format!(
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {}",
        primary.ip
    );
    let headless = |extra: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                &resolver,
                "--window-size=1000,1300",
            ])
            .args(extra)
            .arg(&url)
            .output()?)
    };
    let dom = headless(&["--dump-dom"])?;
    let dom = String::from_utf8_lossy(&dom.stdout);
    for section in ["postgres", "kvstore", "event_bus", "files"] {
        if !dom.contains(&format!("<section id=\"{section}\">")) {
            bail!("the page as Chromium built it has no {section} section:\n{dom}");
        }
    }
    ensure_eq!(dom.matches("<svg").count(), 4);
    if dom.matches("<polyline").count() < 4 {
        bail!("a plot has no line:\n{dom}");
    }
    let shot = repo_root().join("target/fleet/monitor-status-page.png");
    let _ = std::fs::remove_file(&shot);
    let taken = headless(&[&format!("--screenshot={}", shot.display())])?;
    let size = std::fs::metadata(&shot)
        .with_context(|| {
            format!(
                "Chromium took no screenshot: {}",
                String::from_utf8_lossy(&taken.stderr)
            )
        })?
        .len();
    let png = std::fs::read(&shot)?;
    if !png.starts_with(b"\x89PNG") || size < 10_000 {
        bail!("the screenshot is not a page: {size} bytes");
    }
    eprintln!("status page screenshot: {}", shot.display());
    Ok(())
}
