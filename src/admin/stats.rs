//! `GET /stats`: the dashboard's numbers as one JSON object, built from the same exposition `/metrics` renders
//! (so the two never disagree, and a metric added to `/metrics` by any module can be shown without touching
//! this file). Sans-IO: text in, JSON out.
//!
//! It owns parsing the Prometheus text format (version 0.0.4, only the subset `metrics::render` and the other
//! modules write: `name{label="value",...} number`) and the shape of the JSON. It does not read atomics,
//! compute rates (the page divides differences of successive samples by the time between them: counters only
//! grow) or decide what is counted.

use serde_json::{json, Map, Value};

/// One sample line: metric name, labels in order, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// `(label, value)` pairs as written.
    pub labels: Vec<(String, String)>,
    /// The sample value.
    pub value: f64,
}

/// The sample lines of an exposition; comments, blank and unparsable lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y"`. Label values written by densepush never contain quotes or commas (reasons, target kinds,
/// reactor numbers, class names), so no escape handling is needed; anything else is rejected.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let value = value.strip_prefix('"')?.strip_suffix('"')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Sum of every sample of `name`, or `None` when it has none.
fn total(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let sum = samples
        .iter()
        .filter(|s| s.name == name)
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(sum)
}

/// `{label value: sample value}` for the samples of `name`, keyed by `label`.
fn by_label(samples: &[Sample], name: &str, label: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
            let entry = out.entry(v.clone()).or_insert(json!(0.0));
            *entry = json!(entry.as_f64().unwrap_or(0.0) + s.value);
        }
    }
    out
}

/// Per-reactor values of `name`, in reactor order.
fn per_reactor(samples: &[Sample], name: &str) -> Vec<f64> {
    let mut rows: Vec<(u64, f64)> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| {
            let (_, r) = s.labels.iter().find(|(k, _)| k == "reactor")?;
            Some((r.parse().ok()?, s.value))
        })
        .collect();
    rows.sort_by_key(|(r, _)| *r);
    rows.into_iter().map(|(_, v)| v).collect()
}

/// What the cluster adds to `/stats`; `None` for a single node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterState {
    /// The Redis link is up.
    pub link_up: bool,
    /// Nodes with a live alive marker, when it could be asked.
    pub nodes: Option<u64>,
}

/// The `/stats` document. `now_ms` is the wall clock (Unix milliseconds) the page labels samples with.
pub fn document(metrics_text: &str, cluster: Option<ClusterState>, now_ms: u64) -> Value {
    let samples = parse(metrics_text);
    let get = |name: &str| total(&samples, name).unwrap_or(0.0);
    let open = get("densepush_connections_open");
    let rss = total(&samples, "densepush_process_resident_bytes");
    let history = total(&samples, "densepush_history_bytes").map(|bytes| {
        json!({
            "bytes": bytes,
            "max_bytes": get("densepush_history_max_bytes"),
            "messages": get("densepush_history_messages"),
            "streams": get("densepush_history_streams"),
        })
    });
    json!({
        "time_ms": now_ms,
        "connections": {
            "open": open,
            "per_reactor": per_reactor(&samples, "densepush_connections_open"),
            "handshaking": get("densepush_connections_handshaking"),
            "buffers_live": get("densepush_buffers_live"),
        },
        "handshakes": {
            "accepted": get("densepush_handshakes_accepted_total"),
            "rejected": by_label(&samples, "densepush_handshakes_rejected_total", "reason"),
        },
        "published": by_label(&samples, "densepush_messages_published_total", "target"),
        "frames_delivered": get("densepush_frames_delivered_total"),
        "bytes_written": get("densepush_bytes_written_total"),
        "closes": {
            "slow_consumer": get("densepush_slow_consumer_closes_total"),
            "protocol_error": get("densepush_protocol_error_closes_total"),
            "pong_timeout": get("densepush_pong_timeouts_total"),
            "kicked": get("densepush_kicked_total"),
            "client": get("densepush_client_closes_total"),
            "abrupt": get("densepush_abrupt_closes_total"),
        },
        "rss_bytes": rss,
        // The whole process divided over its connections: an upper bound on what one connection costs.
        "bytes_per_connection": rss.filter(|_| open > 0.0).map(|r| (r / open).round()),
        "history": history,
        "cluster": cluster.map(|c| json!({ "link_up": c.link_up, "nodes": c.nodes })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{self, AdminMetrics, ReactorMetrics, RejectKind, TargetKind};
    use std::sync::atomic::Ordering::Relaxed;

    fn rendered() -> String {
        let a = ReactorMetrics::default();
        let b = ReactorMetrics::default();
        a.connections_open.store(3, Relaxed);
        b.connections_open.store(5, Relaxed);
        a.frames_delivered.store(10, Relaxed);
        b.frames_delivered.store(7, Relaxed);
        a.reject(RejectKind::Unauthorized);
        b.reject(RejectKind::Unauthorized);
        let admin = AdminMetrics::default();
        admin.published[TargetKind::All as usize].store(4, Relaxed);
        metrics::render(&[&a, &b], &admin, Some(8000))
    }

    #[test]
    fn parses_names_labels_and_values() {
        let samples = parse("# HELP x y\nx{a=\"1\",b=\"two\"} 3\ny 4.5\n");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "x");
        assert_eq!(
            samples[0].labels,
            vec![("a".into(), "1".into()), ("b".into(), "two".into())]
        );
        assert_eq!(samples[1].value, 4.5);
    }

    #[test]
    fn unparsable_lines_are_skipped() {
        assert!(parse("x{a=1} 3\nnovalue\nz{a=\"1\"} nan-ish\n").is_empty());
    }

    #[test]
    fn connections_are_summed_and_listed_per_reactor() {
        let doc = document(&rendered(), None, 1);
        assert_eq!(doc["connections"]["open"], 8.0);
        assert_eq!(doc["connections"]["per_reactor"], json!([3.0, 5.0]));
        assert_eq!(doc["frames_delivered"], 17.0);
    }

    #[test]
    fn rejections_and_publishes_are_keyed_by_label() {
        let doc = document(&rendered(), None, 1);
        assert_eq!(doc["handshakes"]["rejected"]["unauthorized"], 2.0);
        assert_eq!(doc["handshakes"]["rejected"]["timeout"], 0.0);
        assert_eq!(doc["published"]["all"], 4.0);
    }

    #[test]
    fn bytes_per_connection_divides_rss_by_open_connections() {
        let doc = document(&rendered(), None, 1);
        assert_eq!(doc["rss_bytes"], 8000.0);
        assert_eq!(doc["bytes_per_connection"], 1000.0);
    }

    #[test]
    fn no_connections_means_no_bytes_per_connection() {
        let text = metrics::render(
            &[&ReactorMetrics::default()],
            &AdminMetrics::default(),
            Some(1),
        );
        assert!(document(&text, None, 1)["bytes_per_connection"].is_null());
    }

    #[test]
    fn history_and_cluster_appear_only_when_present() {
        let doc = document(&rendered(), None, 1);
        assert!(doc["history"].is_null() && doc["cluster"].is_null());
        let text = format!("{}densepush_history_bytes 42\n", rendered());
        let cluster = ClusterState {
            link_up: true,
            nodes: Some(3),
        };
        let doc = document(&text, Some(cluster), 1);
        assert_eq!(doc["history"]["bytes"], 42.0);
        assert_eq!(doc["cluster"], json!({"link_up": true, "nodes": 3}));
    }
}
