//! What every CSI call goes through at the service edge: a tracing span,
//! the conversion of its error into a `tonic::Status`, and the counts and
//! latencies by method and gRPC code served on `/metrics`.

use std::future::Future;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tonic::{Code, Response, Status};
use tracing::Instrument;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: String,
}

/// Counts and latencies of CSI calls. Cheap to clone; clones share values.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<CallLabels, Histogram, fn() -> Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            seconds: Family::new_with_constructor(|| {
                // 1 ms .. ~65 s: a cached answer up to a slow lvcreate.
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        }
    }
}

impl RpcMetrics {
    /// Adds the metrics to `registry` as `csi_operations_total` and
    /// `csi_operation_duration_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "csi_operations",
            "CSI calls by method and gRPC code",
            self.calls.clone(),
        );
        registry.register(
            "csi_operation_duration_seconds",
            "Time to answer CSI calls, by method and gRPC code",
            self.seconds.clone(),
        );
    }

    /// Runs one CSI call inside a span named for `method`, records its
    /// outcome, and logs failures. Fields the span declares (`volume`) are
    /// filled in by the call with `Span::current().record`.
    pub async fn observe<T, E, F>(
        &self,
        method: &'static str,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<Status>,
    {
        let span = tracing::info_span!("csi", method, volume = tracing::field::Empty);
        async {
            let started = Instant::now();
            let result = call.await.map_err(Into::into);
            let elapsed = started.elapsed();
            let code = match &result {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            let labels = CallLabels {
                method,
                code: format!("{code:?}"),
            };
            self.calls.get_or_create(&labels).inc();
            self.seconds
                .get_or_create(&labels)
                .observe(elapsed.as_secs_f64());
            match result {
                Ok(answer) => {
                    tracing::debug!(?elapsed, "answered");
                    Ok(Response::new(answer))
                }
                Err(status) => {
                    tracing::warn!(?elapsed, ?code, message = status.message(), "refused");
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[tokio::test]
    async fn counts_and_times_by_method_and_code() {
        let metrics = RpcMetrics::default();
        let mut registry = Registry::with_prefix("lvmlocal");
        metrics.register(&mut registry);

        let ok = metrics
            .observe("CreateVolume", async { Ok::<_, Status>(7) })
            .await
            .unwrap();
        assert_eq!(ok.into_inner(), 7);
        for _ in 0..2 {
            let err = metrics
                .observe("DeleteVolume", async {
                    Err::<(), _>(Status::invalid_argument("volume id is missing"))
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }

        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"lvmlocal_csi_operations_total{method="CreateVolume",code="Ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lvmlocal_csi_operations_total{method="DeleteVolume",code="InvalidArgument"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lvmlocal_csi_operation_duration_seconds_count{method="DeleteVolume",code="InvalidArgument"} 2"#
            ),
            "{text}"
        );
    }
}
