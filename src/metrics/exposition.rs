//! The one writer of the Prometheus text exposition format (version 0.0.4): a `# HELP` and a `# TYPE`
//! line per metric family, then its samples, one per line.
//!
//! It owns the format only (line layout, label quoting); it knows no metric names and reads no numbers.
//! `metrics::render`, `History::render_metrics` and `Cluster::render_metrics` all append through it, so
//! `/metrics` has one spelling of every line that `admin::stats` and the tests parse.

use std::fmt::{self, Write as _};

/// The type of a metric family, written on its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only grows (until the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl MetricType {
    /// The word the exposition format uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        }
    }
}

/// Appends metric families to a text exposition held in a borrowed `String`, so parts that each own
/// some numbers can add theirs to the same page.
#[derive(Debug)]
pub struct Exposition<'a> {
    out: &'a mut String,
}

impl<'a> Exposition<'a> {
    /// Appends to `out`, after whatever it already holds.
    pub fn new(out: &'a mut String) -> Self {
        Exposition { out }
    }

    /// A counter with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.single(name, help, MetricType::Counter, value);
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.single(name, help, MetricType::Gauge, value);
    }

    fn single(&mut self, name: &str, help: &str, kind: MetricType, value: u64) {
        self.header(name, help, kind);
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A family with one sample per `(label value, sample value)` in `samples`, each labelled `label`
    /// (e.g. `reactor`, `reason`), in the order given.
    pub fn family<V, I>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        label: &str,
        samples: I,
    ) where
        V: fmt::Display,
        I: IntoIterator<Item = (V, u64)>,
    {
        self.header(name, help, kind);
        for (label_value, value) in samples {
            let _ = write!(self.out, "{name}{{{label}=\"");
            let _ = write!(LabelValue(self.out), "{label_value}");
            let _ = writeln!(self.out, "\"}} {value}");
        }
    }

    fn header(&mut self, name: &str, help: &str, kind: MetricType) {
        // A backslash or newline in HELP text would need escaping; ours are fixed strings without them.
        debug_assert!(!help.contains(['\\', '\n']), "{name}: {help:?}");
        let kind = kind.as_str();
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// Writes a label value with the escapes the format requires inside its double quotes: backslash,
/// double quote and line feed.
struct LabelValue<'a>(&'a mut String);

impl fmt::Write for LabelValue<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '"' => self.0.push_str("\\\""),
                '\n' => self.0.push_str("\\n"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_help_type_and_samples_in_the_exact_format() {
        let mut text = String::from("# earlier text is kept\n");
        let mut out = Exposition::new(&mut text);
        out.counter("a_total", "Things counted.", 3);
        out.gauge("b", "A level.", 0);
        out.single("c", "Another level.", MetricType::Gauge, u64::MAX);
        out.family(
            "d_total",
            "By reason.",
            MetricType::Counter,
            "reason",
            [("x", 1), ("y", 2)],
        );
        out.family(
            "e",
            "Per reactor.",
            MetricType::Gauge,
            "reactor",
            (0..2).map(|i| (i, 10 + i as u64)),
        );
        assert_eq!(
            text,
            "# earlier text is kept\n\
             # HELP a_total Things counted.\n# TYPE a_total counter\na_total 3\n\
             # HELP b A level.\n# TYPE b gauge\nb 0\n\
             # HELP c Another level.\n# TYPE c gauge\nc 18446744073709551615\n\
             # HELP d_total By reason.\n# TYPE d_total counter\n\
             d_total{reason=\"x\"} 1\nd_total{reason=\"y\"} 2\n\
             # HELP e Per reactor.\n# TYPE e gauge\ne{reactor=\"0\"} 10\ne{reactor=\"1\"} 11\n"
        );
    }

    #[test]
    fn a_family_without_samples_is_only_its_header() {
        let mut text = String::new();
        Exposition::new(&mut text).family(
            "f",
            "None yet.",
            MetricType::Counter,
            "reactor",
            std::iter::empty::<(usize, u64)>(),
        );
        assert_eq!(text, "# HELP f None yet.\n# TYPE f counter\n");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut text = String::new();
        Exposition::new(&mut text).family(
            "g",
            "Escapes.",
            MetricType::Gauge,
            "v",
            [("a\\b\"c\nd", 1)],
        );
        assert!(text.ends_with("g{v=\"a\\\\b\\\"c\\nd\"} 1\n"), "{text}");
    }
}
