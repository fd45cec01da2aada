//! The HTTP face of the extender: the two verbs kube-scheduler posts to under
//! the configured prefix, plus `/healthz` and `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lvmlocal_proto::extender::{ExtenderArgs, priorities_json};
use tracing::Instrument;

use crate::extender::Extender;
use crate::inventory::Source;
use crate::metrics::RequestLabels;

/// Routes for `extender`, the verbs under `prefix` (empty or `/something`).
pub fn router(extender: Arc<Extender>, prefix: &str, max_body_bytes: usize) -> Router {
    Router::new()
        .route(&format!("{prefix}/filter"), post(filter))
        .route(&format!("{prefix}/prioritize"), post(prioritize))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        // With nodeCacheCapable: false every request carries whole Node
        // objects, megabytes for a large cluster.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(extender)
}

async fn filter(State(extender): State<Arc<Extender>>, body: Bytes) -> Response {
    serve("filter", &extender, &body, |args| {
        let result = extender.filter(args);
        let outcome = if result.error.is_empty() {
            "ok"
        } else {
            tracing::warn!(error = %result.error, "filter failed");
            "error"
        };
        (outcome, json(result.to_json()))
    })
    .await
}

async fn prioritize(State(extender): State<Arc<Extender>>, body: Bytes) -> Response {
    serve("prioritize", &extender, &body, |args| {
        match extender.prioritize(args) {
            Ok(list) => ("ok", json(priorities_json(&list))),
            // kube-scheduler ignores a failed prioritize and scores
            // without this extender.
            Err(err) => {
                tracing::warn!(error = %err, "prioritize failed");
                (
                    "error",
                    (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
                )
            }
        }
    })
    .await
}

/// Parses the body, brings what the pod needs into the inventory, runs
/// `answer` inside a span naming the pod, and records the call's outcome and
/// duration.
async fn serve(
    verb: &'static str,
    extender: &Extender,
    body: &[u8],
    answer: impl FnOnce(ExtenderArgs) -> (&'static str, Response),
) -> Response {
    let started = Instant::now();
    let span = tracing::info_span!(
        "extender",
        verb,
        pod = tracing::field::Empty,
        nodes = tracing::field::Empty
    );
    let parsed = span.in_scope(|| serde_json::from_slice::<ExtenderArgs>(body));
    let (outcome, response) = match parsed {
        Ok(args) => {
            if let Some(pod) = &args.pod {
                span.record(
                    "pod",
                    tracing::field::display(format_args!(
                        "{}/{}",
                        pod.metadata.namespace.as_deref().unwrap_or_default(),
                        pod.metadata.name.as_deref().unwrap_or_default()
                    )),
                );
                extender.catch_up(pod).instrument(span.clone()).await;
            }
            let nodes = match (&args.node_names, &args.nodes) {
                (Some(names), _) => names.len(),
                (None, Some(nodes)) => nodes.items.len(),
                (None, None) => 0,
            };
            span.record("nodes", nodes);
            span.in_scope(|| answer(args))
        }
        Err(err) => {
            span.in_scope(|| tracing::warn!(error = %err, "unreadable extender request"));
            (
                "bad_request",
                (
                    StatusCode::BAD_REQUEST,
                    format!("cannot read ExtenderArgs: {err}"),
                )
                    .into_response(),
            )
        }
    };
    extender
        .metrics()
        .request(RequestLabels { verb, outcome }, started.elapsed());
    response
}

fn json(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Healthy once every cache has been listed: before that the extender can
/// only answer with errors.
async fn healthz(State(extender): State<Arc<Extender>>) -> Response {
    let unsynced = extender.inventory().unsynced();
    if unsynced.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let names: Vec<&str> = unsynced.into_iter().map(Source::as_str).collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for the first listing of {}\n", names.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(extender): State<Arc<Extender>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        extender.metrics().encode(),
    )
        .into_response()
}
