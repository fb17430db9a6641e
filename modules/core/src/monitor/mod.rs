//! `hapair-monitor`: the pair's replication over HTTP, for people, load
//! balancers and Prometheus (the seed's `/monitor/replication`, and more).
//!
//! Each section of the report (see [`crate::status`]) is measured by a
//! thread of its own, over and over; requests are answered from the last
//! measures, so an answer never waits on a service. A section whose measure
//! has run past the timeout is reported as hung, and that thread is the only
//! one waiting on it: a hung service costs one thread, not one per request.
//! A history of each section's lag over the last hour, kept in memory,
//! feeds the status page's plots.
//!
//! - `GET /monitor/replication`: the report (JSON).
//! - `GET /monitor/i_am_alive`: liveness; touches no service.
//! - `GET /primary`, `GET /replica?lag=16MB`, `GET /health`: 200 or 503,
//!   as Patroni's endpoints, for load balancers and scripts.
//! - `GET /metrics`: Prometheus text format 0.0.4 ([`metrics`]).
//! - `GET /`: the status page ([`page`]).

pub mod metrics;
pub mod page;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

use crate::files::unix_time;
use crate::instance::InstanceConfig;
use crate::status::{self, Lag, Sources, SECTIONS};

/// What the daemon measures, where it listens and how often it measures.
#[derive(Debug, Clone)]
pub struct Options {
    pub sources: Sources,
    pub listen: Vec<SocketAddr>,
    /// Between two measures of PostgreSQL, Redis and the files.
    pub interval: Duration,
    /// Between two measures of the event bus: each one runs Kafka's Java
    /// tools, which cost a few seconds of CPU.
    pub event_bus_interval: Duration,
}

/// How long the status page's plots reach back.
pub const HISTORY: Duration = Duration::from_secs(3600);

/// Threads answering requests, per address: a slow client holds one.
const WORKERS: usize = 4;

/// One section's last measure, and the one under way.
#[derive(Debug, Clone, Default)]
struct Measure {
    value: Option<Value>,
    /// Unix time of the last measure's end.
    at: u64,
    /// Since when a measure is under way.
    running_since: Option<Instant>,
    /// The last measure that was `ok`, and its time: what an unplanned
    /// failover may lose is the lag when the primary was last seen.
    last_ok: Option<(Value, u64)>,
}

/// A point of the history: each section's lag at one time.
#[derive(Debug, Clone)]
pub struct Sample {
    pub time: u64,
    pub lags: [Option<Lag>; SECTIONS.len()],
}

/// The report as it stands, as every endpoint serves it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub report: Map<String, Value>,
    pub healthy: bool,
    pub time: u64,
}

pub struct Monitor {
    options: Options,
    measures: Mutex<[Measure; SECTIONS.len()]>,
    history: Mutex<VecDeque<Sample>>,
    pair: Mutex<PairView>,
}

/// This host's role as its instance config says, and the other host's
/// report as its monitor last served it: enough to see two primaries.
#[derive(Debug, Clone, Default)]
struct PairView {
    role: Option<String>,
    peer: Option<Value>,
}

/// Locks `mutex`, even one a panicking thread held: what it guards is
/// plain data, whole at every step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Monitor {
    pub fn new(options: Options) -> Monitor {
        Monitor {
            options,
            measures: Mutex::new(Default::default()),
            history: Mutex::new(VecDeque::new()),
            pair: Mutex::new(PairView::default()),
        }
    }

    /// Binds every address (failing at once if one can't be), then
    /// measures and answers until the process is stopped.
    pub fn serve(options: Options) -> Result<std::convert::Infallible> {
        let servers = options
            .listen
            .iter()
            .map(|address| {
                tiny_http::Server::http(address)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("can't listen on {address}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let monitor = Arc::new(Monitor::new(options));
        for (index, _) in SECTIONS.iter().enumerate() {
            let monitor = Arc::clone(&monitor);
            std::thread::spawn(move || monitor.measure_forever(index));
        }
        let interval = monitor.options.interval;
        every(&monitor, interval, Monitor::record_sample);
        every(&monitor, interval, Monitor::look_at_the_pair);
        eprintln!(
            "hapair-monitor: listening on {}",
            monitor
                .options
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut workers = Vec::new();
        for server in servers {
            let server = Arc::new(server);
            for _ in 0..WORKERS {
                let (server, monitor) = (Arc::clone(&server), Arc::clone(&monitor));
                workers.push(std::thread::spawn(move || {
                    for request in server.incoming_requests() {
                        monitor.answer(request);
                    }
                }));
            }
        }
        for worker in workers {
            let _ = worker.join();
        }
        anyhow::bail!("hapair-monitor: every listener closed")
    }

    fn measure_forever(&self, index: usize) {
        let section = SECTIONS[index];
        let every = match section {
            "event_bus" => self.options.event_bus_interval,
            _ => self.options.interval,
        };
        loop {
            lock(&self.measures)[index].running_since = Some(Instant::now());
            let value = status::measure(section, &self.options.sources);
            {
                let mut measures = lock(&self.measures);
                let at = unix_time();
                let last_ok = match value["status"] == "ok" {
                    true => Some((value.clone(), at)),
                    false => measures[index].last_ok.take(),
                };
                measures[index] = Measure {
                    value: Some(value),
                    at,
                    running_since: None,
                    last_ok,
                };
            }
            std::thread::sleep(every);
        }
    }

    /// The report from the last measures: a section still being measured
    /// past the timeout is hung, whatever it said before.
    pub fn snapshot(&self) -> Snapshot {
        let measures = lock(&self.measures).clone();
        let mut report = Map::new();
        for (section, measure) in SECTIONS.iter().zip(measures) {
            let timeout = status::deadline(section, self.options.sources.timeout);
            let hung = measure
                .running_since
                .is_some_and(|since| since.elapsed() > timeout);
            let mut value = match (&measure.value, hung) {
                (_, true) => status::hung(timeout),
                (Some(value), false) => value.clone(),
                (None, false) => status::not_yet_measured(),
            };
            if let (Some(object), false) = (value.as_object_mut(), hung) {
                if measure.at > 0 {
                    object.insert("measured_at".into(), json!(measure.at));
                }
            }
            if let (Some(object), Some((mut last, at))) = (value.as_object_mut(), measure.last_ok) {
                if object.get("status") != Some(&json!("ok")) {
                    last["measured_at"] = json!(at);
                    object.insert("last_ok".into(), last);
                }
            }
            report.insert(section.to_string(), value);
        }
        let pair = lock(&self.pair).clone();
        let two = two_primaries(&pair, &report);
        report.insert("role".into(), json!(pair.role));
        report.insert("two_primaries".into(), two.clone());
        let healthy = status::healthy(&report) && two == false;
        Snapshot {
            report,
            healthy,
            time: unix_time(),
        }
    }

    /// This host's role, from its instance config, and the other host's
    /// report, from its monitor (none when it does not answer).
    fn look_at_the_pair(&self) {
        let sources = &self.options.sources;
        let role = InstanceConfig::load(&sources.instance_config)
            .ok()
            .map(|c| c.replication_mode().as_str().to_string());
        let peer = sources
            .peer_monitor
            .and_then(|address| fetch_report(address, sources.timeout).ok());
        *lock(&self.pair) = PairView { role, peer };
    }

    fn record_sample(&self) {
        let snapshot = self.snapshot();
        let lags = SECTIONS.map(|section| status::lag(section, &snapshot.report[section]));
        let mut history = lock(&self.history);
        history.push_back(Sample {
            time: snapshot.time,
            lags,
        });
        let oldest = snapshot.time.saturating_sub(HISTORY.as_secs());
        while history.front().is_some_and(|s| s.time < oldest) {
            history.pop_front();
        }
    }

    pub fn history(&self) -> Vec<Sample> {
        lock(&self.history).iter().cloned().collect()
    }

    fn answer(&self, request: tiny_http::Request) {
        let response = self.route(request.method(), request.url());
        let mut reply = tiny_http::Response::from_data(response.body)
            .with_status_code(response.status)
            .with_header(header("Content-Type", response.content_type))
            .with_header(header("Cache-Control", "no-store"))
            .with_header(header("X-Content-Type-Options", "nosniff"));
        if response.content_type.starts_with("text/html") {
            reply = reply.with_header(header("Content-Security-Policy", page::CSP));
        }
        let _ = request.respond(reply);
    }

    /// The answer to `method url`.
    pub fn route(&self, method: &tiny_http::Method, url: &str) -> Response {
        use tiny_http::Method;
        if !matches!(method, Method::Get | Method::Head) {
            return Response::json(405, &json!({"error": "only GET and HEAD"}));
        }
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        match path {
            "/monitor/i_am_alive" => Response::json(200, &json!({"alive": true})),
            "/monitor/replication" => {
                let snapshot = self.snapshot();
                let mut body = snapshot.report;
                body.insert("healthy".into(), json!(snapshot.healthy));
                body.insert("time".into(), json!(snapshot.time));
                Response::json(200, &Value::Object(body))
            }
            "/health" => {
                let snapshot = self.snapshot();
                let status = if snapshot.healthy { 200 } else { 503 };
                Response::json(status, &json!({"healthy": snapshot.healthy}))
            }
            "/primary" | "/replica" => {
                let gate = match path {
                    "/primary" => Ok(Gate::Primary),
                    _ => query_value(query, "lag")
                        .map(parse_size)
                        .transpose()
                        .map(|max_lag| Gate::Replica { max_lag }),
                };
                match gate {
                    Err(e) => Response::json(400, &json!({"error": e})),
                    Ok(gate) => {
                        let (open, why) = gate.check(&self.snapshot().report);
                        Response::json(
                            if open { 200 } else { 503 },
                            &json!({"ok": open, "why": why}),
                        )
                    }
                }
            }
            "/metrics" => Response {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                body: metrics::render(&self.snapshot()).into_bytes(),
            },
            "/" => Response {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: page::render(&self.snapshot(), &self.history()).into_bytes(),
            },
            _ => Response::json(
                404,
                &json!({"error": "no such page", "pages": [
                "/", "/monitor/replication", "/monitor/i_am_alive", "/metrics",
                "/health", "/primary", "/replica?lag=16MB"]}),
            ),
        }
    }
}

/// Runs `task` every `interval`, for ever, in a thread of its own.
fn every(monitor: &Arc<Monitor>, interval: Duration, task: fn(&Monitor)) {
    let monitor = Arc::clone(monitor);
    std::thread::spawn(move || loop {
        task(&monitor);
        std::thread::sleep(interval);
    });
}

/// The other host's report, from its monitor's `/monitor/replication`
/// (plain HTTP/1.0 on the pair's network; the report holds no secret).
pub fn fetch_report(address: SocketAddr, timeout: Duration) -> Result<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /monitor/replication HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    // A report is a few kilobytes; a peer that sends more is not a monitor.
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("an answer that is not HTTP")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        anyhow::bail!("it answered HTTP {status}");
    }
    serde_json::from_str(body).context("its answer is not a report")
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a fixed, valid header")
}

/// An answer: its status, type and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: (value.to_string() + "\n").into_bytes(),
        }
    }
}

/// The health gates, as Patroni's: open (200) only when this host is in
/// the role named, both for PostgreSQL and Redis, and within the lag given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    Primary,
    /// `max_lag`: bytes of WAL received but not replayed.
    Replica {
        max_lag: Option<u64>,
    },
}

impl Gate {
    /// Whether the gate is open, and why (or why not).
    pub fn check(self, report: &Map<String, Value>) -> (bool, String) {
        let postgres = &report["postgres"];
        let redis = &report["kvstore"];
        match self {
            Gate::Primary if report.get("two_primaries").is_some_and(|t| t != false) => (
                false,
                "both hosts are primaries: see two_primaries in /monitor/replication".into(),
            ),
            Gate::Primary => match (postgres["role"].as_str(), redis["role"].as_str()) {
                (Some("primary"), Some("primary")) => {
                    (true, "PostgreSQL and Redis are primaries".into())
                }
                (pg, kv) => (
                    false,
                    format!("PostgreSQL is {}, Redis is {}", role_of(pg), role_of(kv)),
                ),
            },
            Gate::Replica { max_lag } => {
                if postgres["role"] != "standby" || redis["role"] != "replica" {
                    let (pg, kv) = (postgres["role"].as_str(), redis["role"].as_str());
                    return (
                        false,
                        format!("PostgreSQL is {}, Redis is {}", role_of(pg), role_of(kv)),
                    );
                }
                let receiver = &postgres["receiver"];
                if receiver["status"] != "streaming" {
                    return (
                        false,
                        format!("PostgreSQL's WAL receiver is {}", receiver["status"]),
                    );
                }
                if redis["link"] != "up" {
                    return (
                        false,
                        format!("Redis's link to its primary is {}", redis["link"]),
                    );
                }
                let lag = receiver["lag_bytes"].as_u64().unwrap_or(u64::MAX);
                match max_lag {
                    Some(max) if lag > max => (
                        false,
                        format!("PostgreSQL is {lag} bytes behind, more than {max}"),
                    ),
                    _ => (true, format!("streaming, {lag} bytes behind")),
                }
            }
        }
    }
}

/// Whether both hosts are primaries: each one's instance config says so and
/// each one's PostgreSQL takes writes (an old primary back after an
/// unplanned failover, or a standby promoted by hand). Both then take
/// writes and their data part ways: loud, and with the way out.
fn two_primaries(pair: &PairView, report: &Map<String, Value>) -> Value {
    let Some(peer) = &pair.peer else {
        return json!(false);
    };
    let primary =
        |role: &Value, postgres: &Value| role == "primary" && postgres["role"] == "primary";
    if !(pair.role.as_deref() == Some("primary")
        && report["postgres"]["role"] == "primary"
        && primary(&peer["role"], &peer["postgres"]))
    {
        return json!(false);
    }
    json!({
        "problem": "both hosts are primaries and take writes: their data part ways",
        "fix": crate::instance::TWO_PRIMARIES_FIX,
    })
}

fn role_of(role: Option<&str>) -> String {
    role.map_or("not measured".into(), |r| format!("a {r}"))
}

/// `name`'s value in a query string (`lag=16MB&x=1`), undecoded: the
/// values the gates take need no escapes.
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// A size as Patroni and PostgreSQL write them: bytes, or a number with
/// `B`, `kB`, `MB`, `GB` or `TB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("lag={text:?} is not a size: give bytes, or 16kB, 16MB, 1GB"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => {
            return Err(format!(
                "lag={text:?}: the unit is one of B, kB, MB, GB, TB"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("lag={text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_patroni_writes_them() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("16kB"), Ok(16 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1 << 20));
        assert!(parse_size("16 MB").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    fn report(postgres: Value, kvstore: Value) -> Map<String, Value> {
        let mut report = Map::new();
        report.insert("postgres".into(), postgres);
        report.insert("kvstore".into(), kvstore);
        report
    }

    #[test]
    fn the_replica_gate_opens_only_on_a_streaming_replica_within_the_lag() {
        let standby = json!({"status": "ok", "role": "standby",
            "receiver": {"status": "streaming", "lag_bytes": 2048}});
        let replica = json!({"status": "ok", "role": "replica", "link": "up"});
        let open = |gate: Gate, r: &Map<String, Value>| gate.check(r).0;
        let healthy = report(standby.clone(), replica.clone());
        assert!(open(Gate::Replica { max_lag: None }, &healthy));
        assert!(open(
            Gate::Replica {
                max_lag: Some(4096)
            },
            &healthy
        ));
        assert!(!open(
            Gate::Replica {
                max_lag: Some(1024)
            },
            &healthy
        ));
        assert!(!open(Gate::Primary, &healthy));
        let link_down = report(standby, json!({"role": "replica", "link": "down"}));
        assert!(!open(Gate::Replica { max_lag: None }, &link_down));
        let primary = report(
            json!({"status": "ok", "role": "primary"}),
            json!({"status": "ok", "role": "primary"}),
        );
        assert!(open(Gate::Primary, &primary));
        assert!(!open(Gate::Replica { max_lag: None }, &primary));
        let (_, why) = Gate::Primary.check(&report(status::unknown("down"), replica));
        assert_eq!(why, "PostgreSQL is not measured, Redis is a replica");
    }

    #[test]
    fn two_primaries_are_both_configs_and_both_postgresqls_saying_primary() {
        let report = |pg_role: &str| {
            let mut r = Map::new();
            r.insert("postgres".into(), json!({"role": pg_role}));
            r
        };
        let peer = |role: &str, pg_role: &str| json!({"role": role, "postgres": {"role": pg_role}});
        let view = |role: &str, peer: Option<Value>| PairView {
            role: Some(role.into()),
            peer,
        };
        let two = two_primaries(
            &view("primary", Some(peer("primary", "primary"))),
            &report("primary"),
        );
        assert!(two["fix"].as_str().unwrap().contains("cluster_rejoin"));
        // A broken pair: both standalone, both writable, as meant.
        let broken = view("standalone", Some(peer("standalone", "primary")));
        assert_eq!(two_primaries(&broken, &report("primary")), json!(false));
        // A healthy pair, and a peer that does not answer.
        let healthy = view("primary", Some(peer("secondary", "standby")));
        assert_eq!(two_primaries(&healthy, &report("primary")), json!(false));
        assert_eq!(
            two_primaries(&view("primary", None), &report("primary")),
            json!(false)
        );
        let mut gated = report("primary");
        gated.insert("kvstore".into(), json!({"role": "primary"}));
        gated.insert("two_primaries".into(), two);
        assert!(!Gate::Primary.check(&gated).0);
    }

    #[test]
    fn a_query_value_is_found_by_its_exact_name() {
        assert_eq!(query_value("lag=16MB", "lag"), Some("16MB"));
        assert_eq!(query_value("x=1&lag=0", "lag"), Some("0"));
        assert_eq!(query_value("lagging=1", "lag"), None);
    }
}
