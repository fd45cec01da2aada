//! Prometheus metrics of the extender, served at `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `filter` or `prioritize`.
    pub verb: &'static str,
    /// `ok`, `error` (answered with an error), or `bad_request`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerbLabels {
    verb: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    resource: &'static str,
}

type HistogramFamily = Family<VerbLabels, Histogram, fn() -> Histogram>;

/// Cheap to clone; every clone updates the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    filtered: Family<ReasonLabels, Counter>,
    reservations: Gauge,
    watch_errors: Family<SourceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lvmlocal_scheduler");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Extender calls by verb and outcome",
            requests.clone(),
        );
        // 25 µs to about 0.8 s.
        let duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(25e-6, 2.0, 16)));
        registry.register(
            "request_duration_seconds",
            "Time to answer an extender call, body parsing included",
            duration.clone(),
        );
        let filtered = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "filtered_nodes",
            "Nodes turned away by filter, by reason; a node refused for two reasons counts under both",
            filtered.clone(),
        );
        let reservations = Gauge::default();
        registry.register(
            "reservations",
            "Pods holding a reservation",
            reservations.clone(),
        );
        let watch_errors = Family::<SourceLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Failed list or watch calls, by resource",
            watch_errors.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            duration,
            filtered,
            reservations,
            watch_errors,
        }
    }

    pub fn request(&self, labels: RequestLabels, took: Duration) {
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&VerbLabels { verb: labels.verb })
            .observe(took.as_secs_f64());
    }

    pub fn filtered(&self, reason: &'static str, nodes: u64) {
        self.filtered
            .get_or_create(&ReasonLabels { reason })
            .inc_by(nodes);
    }

    pub fn reservations(&self, live: usize) {
        self.reservations
            .set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&SourceLabels { resource })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
