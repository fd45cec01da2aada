//! Controller figures against a mocked API server:
//! - RSS with 10,000 `LogicalVolume`s in the watch cache;
//! - CreateVolume latency over the CSI unix socket when the agent answers
//!   at once, i.e. the controller's own overhead on top of the agent's work.
//!
//! `cargo run --release -p csi-controller --example bench`

// Shared with the tests; the bench uses only the object builders.
#[path = "../tests/support/fake_api.rs"]
#[allow(dead_code)]
mod fake_api;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use csi_controller::caches;
use csi_controller::kube_store::KubeStore;
use fake_api::{
    ApiHandle, LV_PATH, client, heartbeat, logical_volume, node, node_storage, ready, respond,
    status, watch_events,
};
use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use kube::client::Body;
use lvmlocal_proto::TOPOLOGY_KEY;
use lvmlocal_proto::controller::{ControllerService, ControllerSettings};
use lvmlocal_proto::csi::v1::controller_client::ControllerClient;
use lvmlocal_proto::csi::v1::controller_server::ControllerServer;
use lvmlocal_proto::csi::v1::volume_capability::access_mode::Mode;
use lvmlocal_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use lvmlocal_proto::csi::v1::*;
use lvmlocal_proto::params::MEDIA_PARAM;
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::server;
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::transport::{Endpoint, Server};
use tower::service_fn;

const VOLUMES: usize = 10_000;
const NODES: usize = 100;
const CALLS: usize = 1_000;
const GIB: u64 = 1 << 30;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn node_name(i: usize) -> String {
    format!("node-{:03}", i % NODES)
}

/// One page of the LogicalVolume list, made on demand so the mocked API
/// server holds no copy of the 10,000 objects.
fn volume_page(start: usize, limit: usize) -> Value {
    let end = (start + limit).min(VOLUMES);
    let items: Vec<Value> = (start..end)
        .map(|i| {
            let mut lv = logical_volume(
                &format!("pvc-{i:08}-9d3b-4c1e-8a7f-6b5d4c3b2a10"),
                &node_name(i),
                GIB,
                1,
                ready(GIB, 1),
            );
            lv["spec"]["pvc"] = json!({"namespace": "bench", "name": format!("data-{i}")});
            lv
        })
        .collect();
    let mut metadata = json!({"resourceVersion": "1000"});
    if end < VOLUMES {
        metadata["continue"] = json!(end.to_string());
    }
    json!({"kind": "LogicalVolumeList", "apiVersion": "lvmlocal.io/v1alpha1", "metadata": metadata, "items": items})
}

fn query(request: &http::Request<Body>, key: &str) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Serves the caches: paged lists, and LogicalVolume watches that deliver
/// the events sent on the returned channel.
fn serve_watches(mut handle: ApiHandle) -> mpsc::UnboundedSender<Value> {
    let (events_tx, watches_tx) = watch_events();
    tokio::spawn(async move {
        let mut quiet = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let watch = query(&request, "watch").is_some();
            let list = |kind: &str, api: &str, items: Vec<Value>| json!({"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": "1000"}, "items": items});
            match (request.uri().path(), watch) {
                (LV_PATH, true) => {
                    let _ = watches_tx.send(send);
                }
                (_, true) => quiet.push(send),
                (LV_PATH, false) => {
                    let start = query(&request, "continue").map_or(0, |c| c.parse().unwrap());
                    let limit = query(&request, "limit").map_or(VOLUMES, |l| l.parse().unwrap());
                    respond(send, StatusCode::OK, &volume_page(start, limit));
                }
                ("/apis/lvmlocal.io/v1alpha1/nodelocalstorages", false) => {
                    let items = (0..NODES)
                        .map(|i| node_storage(&node_name(i), 10_000 * GIB))
                        .collect();
                    respond(
                        send,
                        StatusCode::OK,
                        &list("NodeLocalStorageList", "lvmlocal.io/v1alpha1", items),
                    );
                }
                ("/apis/coordination.k8s.io/v1/namespaces/lvmlocal/leases", false) => {
                    let items = (0..NODES).map(|i| heartbeat(&node_name(i))).collect();
                    respond(
                        send,
                        StatusCode::OK,
                        &list("LeaseList", "coordination.k8s.io/v1", items),
                    );
                }
                ("/api/v1/nodes", false) => {
                    let items = (0..NODES).map(|i| node(&node_name(i))).collect();
                    respond(
                        send,
                        StatusCode::OK,
                        &list("PartialObjectMetadataList", "meta.k8s.io/v1", items),
                    );
                }
                (other, _) => panic!("unexpected request for {other}"),
            }
        }
    });
    events_tx
}

/// Answers reads and writes as at once as an API server can, with the
/// agent making every LV the moment its object exists.
fn serve_objects(mut handle: ApiHandle, events: mpsc::UnboundedSender<Value>) {
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            match parts.method {
                Method::GET => {
                    let name = parts.uri.path().rsplit('/').next().unwrap().to_owned();
                    respond(send, StatusCode::NOT_FOUND, &status(404, "NotFound", &name));
                }
                Method::POST => {
                    let bytes = body.collect_bytes().await.unwrap();
                    let posted: Value = serde_json::from_slice(&bytes).unwrap();
                    let name = posted["metadata"]["name"].as_str().unwrap();
                    let node = posted["spec"]["nodeName"].as_str().unwrap();
                    let size = posted["spec"]["sizeBytes"].as_u64().unwrap();
                    respond(
                        send,
                        StatusCode::CREATED,
                        &logical_volume(name, node, size, 1, None),
                    );
                    let made = logical_volume(name, node, size, 1, ready(size, 1));
                    let _ = events.send(json!({"type": "MODIFIED", "object": made}));
                }
                other => panic!("unexpected {other}"),
            }
        }
    });
}

fn create_req(i: usize) -> CreateVolumeRequest {
    let segment = Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node_name(i))]),
    };
    CreateVolumeRequest {
        name: format!("pvc-bench-{i:06}"),
        capacity_range: Some(CapacityRange {
            required_bytes: GIB as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        parameters: HashMap::from([(MEDIA_PARAM.to_owned(), "nvme".to_owned())]),
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![segment.clone()],
            preferred: vec![segment],
        }),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let before = rss_mib();

    let (watch_client, watch_handle) = client();
    let events = serve_watches(watch_handle);
    let (caches, feed) = caches::caches();
    tokio::spawn(feed.run(watch_client, "lvmlocal".to_owned()));
    let started = Instant::now();
    caches.synced().await;
    let synced_in = started.elapsed();
    let cached = caches.volumes().len();
    // Let the allocator settle before reading RSS.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_cache = rss_mib();

    let (crud_client, crud_handle) = client();
    serve_objects(crud_handle, events);
    let controller = ControllerService::new(
        KubeStore::new(crud_client, caches),
        ControllerSettings::default(),
        RpcMetrics::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let listener = server::bind(&socket).unwrap();
    let router = Server::builder().add_service(ControllerServer::new(controller));
    let serve_path = socket.clone();
    tokio::spawn(async move {
        server::serve(router, listener, &serve_path, std::future::pending()).await
    });
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let mut csi = ControllerClient::new(channel);

    let mut latencies = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let started = Instant::now();
        let volume = csi.create_volume(create_req(i)).await.unwrap().into_inner();
        latencies.push(started.elapsed());
        assert_eq!(volume.volume.unwrap().capacity_bytes, GIB as i64);
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / CALLS as u32;
    let after = rss_mib();

    println!("LogicalVolumes cached        {cached}");
    println!("cache sync (list of {VOLUMES})  {synced_in:.1?}");
    println!("RSS before caches            {before:.1} MiB");
    println!("RSS with caches filled       {with_cache:.1} MiB");
    println!("RSS after {CALLS} CreateVolume  {after:.1} MiB");
    println!(
        "CreateVolume over the socket, agent instant ({CALLS} calls): p50 {:.2?}  p99 {:.2?}  max {:.2?}  mean {mean:.2?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[CALLS - 1],
    );
}
