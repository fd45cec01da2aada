//! A Kubernetes API server in a `tower_test::mock` pair, answering with the
//! JSON a real one sends. Two clients: one whose requests a test scenario
//! answers in order (reads and writes), and one serving the watch caches,
//! whose `LogicalVolume` watch delivers the events a test sends.

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock::{self, Handle, SendResponse};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub const LV_PATH: &str = "/apis/lvmlocal.io/v1alpha1/logicalvolumes";

/// A client and the handle that answers its requests.
pub fn client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

pub fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

/// The next request, its body parsed if any.
pub async fn next(handle: &mut ApiHandle) -> (Request<Value>, SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (Request::from_parts(parts, body), send)
}

/// The `Status` object the API server sends with an error.
pub fn status(code: u16, reason: &str, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("logicalvolumes.lvmlocal.io \"{name}\" {}", reason.to_lowercase()),
        "reason": reason,
        "details": {"name": name, "group": "lvmlocal.io", "kind": "logicalvolumes"},
        "code": code
    })
}

pub fn logical_volume(
    name: &str,
    node: &str,
    size: u64,
    generation: i64,
    status: Option<Value>,
) -> Value {
    let mut lv = json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "LogicalVolume",
        "metadata": {
            "name": name,
            "uid": format!("uid-{name}"),
            "resourceVersion": format!("{}", 100 + generation),
            "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": ["lvmlocal.io/logical-volume"],
            "managedFields": [{"manager": "lvmlocal-controller", "operation": "Update", "apiVersion": "lvmlocal.io/v1alpha1"}]
        },
        "spec": {"nodeName": node, "media": "nvme", "sizeBytes": size, "fsType": "ext4"}
    });
    if let Some(status) = status {
        lv["status"] = status;
    }
    lv
}

pub fn ready(size: u64, observed: i64) -> Option<Value> {
    Some(json!({
        "phase": "Ready",
        "devicePath": "/dev/lvmlocal-nvme/lv",
        "sizeBytes": size,
        "observedGeneration": observed
    }))
}

pub fn node_storage(node: &str, total: u64) -> Value {
    json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "NodeLocalStorage",
        "metadata": {"name": node, "resourceVersion": "10"},
        "spec": {"nodeName": node},
        "status": {
            "nvme": {
                "vgName": "lvmlocal-nvme",
                "totalBytes": total,
                "freeBytes": total,
                "allocatedBytes": 0,
                "extentBytes": 4194304u64,
                "free": "100Gi"
            },
            "disks": []
        }
    })
}

pub fn node(name: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"name": name, "resourceVersion": "5"}
    })
}

/// The heartbeat Lease of `node`'s agent, as the agent writes it.
pub fn heartbeat(node: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": format!("lvmlocal-agent-{node}"),
            "namespace": "lvmlocal",
            "resourceVersion": "7",
            "labels": {"lvmlocal.io/heartbeat": "agent"}
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 40,
            "renewTime": "2026-01-01T00:00:00.000000Z"
        }
    })
}

fn list(kind: &str, api_version: &str, items: &[Value]) -> Value {
    json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": "1000"},
        "items": items
    })
}

/// Hands each event sent on the first channel to the next `LogicalVolume`
/// watch request sent on the second, as one line of a watch stream.
pub fn watch_events() -> (
    mpsc::UnboundedSender<Value>,
    mpsc::UnboundedSender<SendResponse<Response<Body>>>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<Value>();
    let (watches_tx, mut watches) = mpsc::unbounded_channel::<SendResponse<Response<Body>>>();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(send) = watches.recv().await else {
                return;
            };
            let mut line = serde_json::to_vec(&event).unwrap();
            line.push(b'\n');
            send.send_response(Response::builder().body(Body::from(line)).unwrap());
        }
    });
    (events_tx, watches_tx)
}

/// Serves the caches' list and watch requests: the given objects on
/// listing, and on the `LogicalVolume` watch each event sent on the
/// returned channel (`{"type": "MODIFIED", "object": ...}`). Every node
/// has a heartbeat. Other watches stay open and quiet.
pub fn serve_watches(
    mut handle: ApiHandle,
    volumes: Vec<Value>,
    storage: Vec<Value>,
    nodes: Vec<Value>,
) -> mpsc::UnboundedSender<Value> {
    let (events_tx, watches_tx) = watch_events();
    let leases: Vec<Value> = nodes
        .iter()
        .map(|node| heartbeat(node["metadata"]["name"].as_str().unwrap()))
        .collect();
    tokio::spawn(async move {
        let mut quiet = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let watch = request
                .uri()
                .query()
                .is_some_and(|q| q.contains("watch=true"));
            match (path.as_str(), watch) {
                (LV_PATH, true) => {
                    let _ = watches_tx.send(send);
                }
                (_, true) => quiet.push(send),
                (LV_PATH, false) => respond(
                    send,
                    StatusCode::OK,
                    &list("LogicalVolumeList", "lvmlocal.io/v1alpha1", &volumes),
                ),
                ("/apis/lvmlocal.io/v1alpha1/nodelocalstorages", false) => respond(
                    send,
                    StatusCode::OK,
                    &list("NodeLocalStorageList", "lvmlocal.io/v1alpha1", &storage),
                ),
                ("/apis/coordination.k8s.io/v1/namespaces/lvmlocal/leases", false) => {
                    let query = request.uri().query().unwrap_or_default();
                    assert!(
                        query.contains("labelSelector=lvmlocal.io%2Fheartbeat%3Dagent"),
                        "heartbeats are listed by their label: {query}"
                    );
                    respond(
                        send,
                        StatusCode::OK,
                        &list("LeaseList", "coordination.k8s.io/v1", &leases),
                    );
                }
                ("/api/v1/nodes", false) => respond(
                    send,
                    StatusCode::OK,
                    &list("PartialObjectMetadataList", "meta.k8s.io/v1", &nodes),
                ),
                (other, _) => panic!("unexpected request for {other}"),
            }
        }
    });
    events_tx
}
