//! The pieces of Prometheus' text format that `/metrics` builds with: families of float
//! counters and gauges keyed by label pairs, and the pairs' values escaped.

pub(super) type Labels = Vec<(String, String)>;
pub(super) type FloatCounter =
    prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;
pub(super) type FloatGauge =
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;
pub(super) type Family<M> = prometheus_client::metrics::family::Family<Labels, M>;

/// Label pairs, the values escaped as the text format asks (prometheus-client writes them as
/// given: a `"` in a process's name or a run's command would end the value early).
pub(super) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), escape(v)))
        .collect()
}

/// A label value in the text format: backslash, double quote and line feed escaped.
pub(super) fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}
