//! `/`: the status page for a person: each service's state and role, and
//! its lag over the last hour, drawn as inline SVG from the samples the
//! daemon keeps. No script and nothing loaded from anywhere: the page is
//! one document, and its Content-Security-Policy says so.

use std::fmt::Write as _;

use serde_json::Value;

use super::{Sample, Snapshot, HISTORY};
use crate::status::SECTIONS;

/// Nothing but the page itself and its inline style.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

const TITLES: [&str; SECTIONS.len()] = [
    "PostgreSQL",
    "KV store (Redis)",
    "Event bus (Kafka, MirrorMaker 2)",
    "Files",
];

/// Text made safe for HTML, in an element or an attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(snapshot: &Snapshot, history: &[Sample]) -> String {
    let mut page = String::new();
    let health = if snapshot.healthy {
        "healthy: every service replicates"
    } else {
        "not healthy: a service is unknown or failing"
    };
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>hapair: replication</title><style>{STYLE}</style></head><body>\
         <h1>hapair: the pair's replication</h1>\
         <p class=\"{}\" id=\"health\">{health}</p>",
        if snapshot.healthy { "ok" } else { "bad" }
    );
    if let Some(two) = snapshot
        .report
        .get("two_primaries")
        .filter(|t| t.is_object())
    {
        let _ = write!(
            page,
            "<p class=\"bad\" id=\"two-primaries\">Two primaries: {}. To fix: {}.</p>",
            escape(two["problem"].as_str().unwrap_or("")),
            escape(two["fix"].as_str().unwrap_or(""))
        );
    }
    for (index, section) in SECTIONS.iter().enumerate() {
        let value = &snapshot.report[*section];
        let status = value["status"].as_str().unwrap_or("?");
        let role = value["role"].as_str().unwrap_or("");
        let _ = write!(
            page,
            "<section id=\"{section}\"><h2>{}</h2><p><span class=\"{}\">{}</span>{}</p>",
            TITLES[index],
            if status == "ok" { "ok" } else { "bad" },
            escape(status),
            if role.is_empty() {
                String::new()
            } else {
                format!(" &middot; role: {}", escape(role))
            }
        );
        if let Some(reason) = value["reason"].as_str() {
            let _ = write!(page, "<p class=\"reason\">{}</p>", escape(reason));
        }
        page.push_str(&plot(index, history, snapshot.time));
        page.push_str("</section>");
    }
    let _ = writeln!(
        page,
        "<p class=\"foot\">Samples of the last hour, kept in memory by hapair-monitor; \
         the page reloads every 10 s. JSON: <a href=\"/monitor/replication\">/monitor/replication</a>, \
         Prometheus: <a href=\"/metrics\">/metrics</a>.</p>\
         <details><summary>The report</summary><pre>{}</pre></details></body></html>",
        escape(&raw_report(&snapshot.report))
    );
    page
}

/// The report itself, folded away under the plots.
fn raw_report(report: &serde_json::Map<String, Value>) -> String {
    serde_json::to_string_pretty(report).unwrap_or_default()
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 120.0;

/// One section's lag over the last hour, as an SVG line; a gap where the
/// section was not measured.
fn plot(index: usize, history: &[Sample], now: u64) -> String {
    let points: Vec<(u64, Option<f64>)> = history
        .iter()
        .map(|s| (s.time, s.lags[index].map(|l| l.value)))
        .collect();
    let unit = history
        .iter()
        .rev()
        .find_map(|s| s.lags[index].map(|l| l.unit))
        .unwrap_or("");
    let top = points
        .iter()
        .filter_map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let start = now.saturating_sub(HISTORY.as_secs());
    let x = |time: u64| (time.saturating_sub(start) as f64 / HISTORY.as_secs_f64()) * WIDTH;
    // Zero sits above the frame's edge, the top below the labels.
    let y = |value: f64| (HEIGHT - 16.0) - (value / top) * (HEIGHT - 34.0);
    let mut lines = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for (time, value) in points {
        match value {
            Some(v) => current.push(format!("{:.1},{:.1}", x(time), y(v))),
            None if !current.is_empty() => lines.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    let last = history
        .last()
        .and_then(|s| s.lags[index])
        .map_or("not measured".to_string(), |l| {
            format!("now {}", human(l.value, l.unit))
        });
    let mut svg = format!(
        "<svg class=\"plot\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{} over the last hour\">\
         <rect width=\"{WIDTH}\" height=\"{HEIGHT}\" class=\"frame\"/>\
         <line class=\"axis\" x1=\"0\" x2=\"{WIDTH}\" y1=\"{zero}\" y2=\"{zero}\"/>\
         <text x=\"4\" y=\"12\">{}</text><text x=\"{right}\" y=\"12\" text-anchor=\"end\">{}</text>\
         <text x=\"4\" y=\"{bottom}\">an hour ago</text>\
         <text x=\"{right}\" y=\"{bottom}\" text-anchor=\"end\">now</text>",
        escape(unit),
        escape(&human(top, unit)),
        escape(&last),
        zero = y(0.0),
        right = WIDTH - 4.0,
        bottom = HEIGHT - 3.0,
    );
    for line in lines {
        let _ = write!(
            svg,
            "<polyline class=\"lag\" points=\"{}\"/>",
            line.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A figure as a person reads it: bytes in KiB, MiB or GiB.
fn human(value: f64, unit: &str) -> String {
    if unit == "bytes" {
        let mut scaled = value;
        for prefix in ["B", "KiB", "MiB", "GiB"] {
            if scaled < 1024.0 || prefix == "GiB" {
                return match prefix {
                    "B" => format!("{scaled:.0} B"),
                    _ => format!("{scaled:.1} {prefix}"),
                };
            }
            scaled /= 1024.0;
        }
    }
    format!("{} {unit}", (value * 10.0).round() / 10.0)
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:50em;color:#222}\
    h1{font-size:1.4em}h2{font-size:1.1em;margin:1.2em 0 .3em}\
    .ok{color:#176d2c;font-weight:bold}.bad{color:#b3261e;font-weight:bold}\
    .reason{color:#555;margin:.2em 0}.foot{color:#555;font-size:.9em;margin-top:2em}\
    svg.plot{display:block;background:#fafafa}svg .frame{fill:none;stroke:#ccc}\
    svg text{font-size:10px;fill:#555}svg .axis{stroke:#ddd}svg .lag{fill:none;stroke:#1a5fb4;stroke-width:1.5}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Lag;
    use serde_json::{json, Map};

    #[test]
    fn figures_read_as_a_person_reads_them() {
        assert_eq!(human(512.0, "bytes"), "512 B");
        assert_eq!(human(3.0 * 1024.0 * 1024.0, "bytes"), "3.0 MiB");
        assert_eq!(human(7.0, "records"), "7 records");
        assert_eq!(human(1.25, "seconds"), "1.3 seconds");
    }

    #[test]
    fn every_section_has_its_plot_and_no_text_is_markup() {
        let mut report = Map::new();
        for section in SECTIONS {
            report.insert(section.into(), json!({"status": "ok", "role": "primary"}));
        }
        report.insert(
            "files".into(),
            json!({"status": "unknown", "reason": "<script>alert(1)</script>"}),
        );
        let snapshot = Snapshot {
            report,
            healthy: false,
            time: 10_000,
        };
        let lag = Some(Lag {
            value: 5.0,
            unit: "bytes",
        });
        let history = vec![
            Sample {
                time: 9_000,
                lags: [lag, lag, None, None],
            },
            Sample {
                time: 9_990,
                lags: [lag, None, None, None],
            },
        ];
        let page = render(&snapshot, &history);
        assert!(!page.contains("<script"));
        assert!(page.contains("&lt;script&gt;"));
        assert_eq!(page.matches("<svg").count(), SECTIONS.len());
        assert_eq!(page.matches("<polyline").count(), 2);
        for section in SECTIONS {
            assert!(page.contains(&format!("<section id=\"{section}\">")));
        }
    }
}
