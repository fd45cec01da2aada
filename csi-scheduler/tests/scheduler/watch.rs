//! The watchers against a scripted API server: kube's client runs over a
//! mock transport that answers lists and watches with the JSON the API
//! server sends, and the test checks what the extender decides as events
//! arrive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body as ApiBody, Bytes};
use axum::http::{Method, Request, Response};
use csi_scheduler::extender::Extender;
use csi_scheduler::metrics::Metrics;
use csi_scheduler::watch::follow_cluster;
use futures::StreamExt;
use futures::channel::mpsc;
use kube::client::Body;
use lvmlocal_proto::MediaClass::Nvme;
use lvmlocal_proto::extender::ExtenderFilterResult;
use serde_json::{Value, json};

use crate::support::*;

const NLS: &str = "/apis/lvmlocal.io/v1alpha1/nodelocalstorages";
const LV: &str = "/apis/lvmlocal.io/v1alpha1/logicalvolumes";
const PVC: &str = "/api/v1/persistentvolumeclaims";
const SC: &str = "/apis/storage.k8s.io/v1/storageclasses";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/lvmlocal/leases";

/// What the scripted API server serves: the list of each path, and the open
/// watch stream of each path to push events into.
#[derive(Default)]
struct ApiServer {
    lists: HashMap<&'static str, Value>,
    watches: HashMap<String, mpsc::UnboundedSender<Bytes>>,
    requests: Vec<String>,
}

impl ApiServer {
    fn set_list(&mut self, path: &'static str, kind: &str, api_version: &str, items: Vec<Value>) {
        self.lists.insert(
            path,
            json!({
                "kind": kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": "1000"},
                "items": items,
            }),
        );
    }

    fn push(&self, path: &str, event: &str, object: Value) {
        let line = format!("{}\n", json!({"type": event, "object": object}));
        self.watches[path]
            .unbounded_send(Bytes::from(line))
            .expect("the watch is open");
    }
}

/// Answers every request the client sends, as the API server would.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<ApiBody>>,
    server: Arc<Mutex<ApiServer>>,
) {
    while let Some((request, respond)) = handle.next_request().await {
        assert_eq!(request.method(), Method::GET);
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let mut server = server.lock().unwrap();
        server.requests.push(format!("{path}?{query}"));
        let body = if query.contains("watch=true") {
            let (events, stream) = mpsc::unbounded::<Bytes>();
            server.watches.insert(path.clone(), events);
            ApiBody::from_stream(stream.map(Ok::<_, std::convert::Infallible>))
        } else {
            let list = server
                .lists
                .get(path.as_str())
                .unwrap_or_else(|| panic!("unexpected list of {path}"));
            ApiBody::from(list.to_string())
        };
        respond.send_response(Response::builder().status(200).body(body).unwrap());
    }
}

fn value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

/// Polls `check` until it holds; the deadline only keeps a broken watcher
/// from hanging the test.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn filter(extender: &Extender) -> ExtenderFilterResult<'static> {
    let pod = pod("db", "db-0", "uid-db", &["data"]);
    extender.filter(names_args(&pod, &["node-a", "node-b"]))
}

fn passing(extender: &Extender) -> Vec<String> {
    filter(extender)
        .node_names
        .unwrap_or_default()
        .into_iter()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn events_from_the_api_server_move_the_extenders_decisions() {
    let server = Arc::new(Mutex::new(ApiServer::default()));
    {
        let mut server = server.lock().unwrap();
        server.set_list(
            NLS,
            "NodeLocalStorageList",
            "lvmlocal.io/v1alpha1",
            vec![
                value(&storage("node-a", &[(Nvme, 100 * GI)])),
                value(&storage("node-b", &[(Nvme, 100 * GI)])),
            ],
        );
        server.set_list(
            LV,
            "LogicalVolumeList",
            "lvmlocal.io/v1alpha1",
            vec![value(&volume("pvc-old", "node-a", Nvme, 50 * GI, None))],
        );
        server.set_list(
            PVC,
            "PersistentVolumeClaimList",
            "v1",
            vec![value(&claim("db", "data", "nvme", 30 * GI))],
        );
        server.set_list(
            SC,
            "StorageClassList",
            "storage.k8s.io/v1",
            classes().iter().map(value).collect(),
        );
        server.set_list(
            LEASES,
            "LeaseList",
            "coordination.k8s.io/v1",
            vec![
                value(&heartbeat("node-a", 1)),
                value(&heartbeat("node-b", 1)),
            ],
        );
    }
    let (transport, handle) = tower_test::mock::pair::<Request<Body>, Response<ApiBody>>();
    let api = tokio::spawn(serve(handle, server.clone()));
    let client = kube::Client::new(transport, "default");
    let extender = Arc::new(Extender::new(policy(), Metrics::new()));
    let watching = tokio::spawn(follow_cluster(client, "lvmlocal".into(), extender.clone()));

    eventually("the first listings", || {
        extender.inventory().unsynced().is_empty()
    })
    .await;
    eventually("all five watches", || {
        server.lock().unwrap().watches.len() == 5
    })
    .await;
    {
        let server = server.lock().unwrap();
        // Of Leases, only the heartbeats in the driver's namespace.
        let heartbeats = "&labelSelector=lvmlocal.io%2Fheartbeat%3Dagent";
        for (path, selector) in [
            (NLS, ""),
            (LV, ""),
            (PVC, ""),
            (SC, ""),
            (LEASES, heartbeats),
        ] {
            assert!(
                server
                    .requests
                    .contains(&format!("{path}?{selector}&limit=500")),
                "{:?}",
                server.requests
            );
            assert!(
                server
                    .requests
                    .iter()
                    .any(|request| request.starts_with(path)
                        && request.contains(selector)
                        && request.contains("watch=true")
                        && request.contains("resourceVersion=1000")),
                "{:?}",
                server.requests
            );
        }
    }
    assert_eq!(passing(&extender), ["node-a", "node-b"]);

    // Another volume lands on node-a.
    server.lock().unwrap().push(
        LV,
        "ADDED",
        value(&volume("pvc-new", "node-a", Nvme, 40 * GI, None)),
    );
    eventually("node-a fills up", || passing(&extender) == ["node-b"]).await;
    assert_eq!(
        filter(&extender).failed_nodes.unwrap()["node-a"],
        "nvme: needs 30Gi, 10Gi free"
    );

    // kube-scheduler sends another pod's 80Gi claim to node-b.
    server.lock().unwrap().push(
        PVC,
        "ADDED",
        value(&selected(claim("db", "other", "nvme", 80 * GI), "node-b")),
    );
    eventually("node-b is spoken for", || passing(&extender).is_empty()).await;

    // That claim's volume is created, then its claim is bound: still 80Gi.
    server.lock().unwrap().push(
        LV,
        "ADDED",
        value(&volume(
            "pvc-other",
            "node-b",
            Nvme,
            80 * GI,
            Some(("db", "other")),
        )),
    );
    server.lock().unwrap().push(
        PVC,
        "MODIFIED",
        value(&bound(
            selected(claim("db", "other", "nvme", 80 * GI), "node-b"),
            "pvc-other",
        )),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(passing(&extender).is_empty());

    // The first volume on node-a goes away.
    server.lock().unwrap().push(
        LV,
        "DELETED",
        value(&volume("pvc-old", "node-a", Nvme, 50 * GI, None)),
    );
    eventually("node-a has room again", || passing(&extender) == ["node-a"]).await;

    // The watch expires; the relist shows node-b's volume gone as well.
    {
        let mut server = server.lock().unwrap();
        server.set_list(
            LV,
            "LogicalVolumeList",
            "lvmlocal.io/v1alpha1",
            vec![value(&volume("pvc-new", "node-a", Nvme, 40 * GI, None))],
        );
        server.push(
            LV,
            "ERROR",
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1000 (1200)",
                "reason": "Expired",
                "code": 410
            }),
        );
    }
    eventually("the relist frees node-b", || {
        passing(&extender) == ["node-a", "node-b"]
    })
    .await;
    let metrics = extender.metrics().encode();
    assert!(
        metrics.contains(r#"lvmlocal_scheduler_watch_errors_total{resource="logicalvolumes"} 1"#),
        "{metrics}"
    );

    // node-b's heartbeat Lease goes away, then comes back.
    server
        .lock()
        .unwrap()
        .push(LEASES, "DELETED", value(&heartbeat("node-b", 1)));
    eventually("node-b's agent is silent", || {
        passing(&extender) == ["node-a"]
    })
    .await;
    assert_eq!(
        filter(&extender).failed_and_unresolvable_nodes.unwrap()["node-b"],
        "the lvmlocal agent has no heartbeat"
    );
    server
        .lock()
        .unwrap()
        .push(LEASES, "ADDED", value(&heartbeat("node-b", 2)));
    eventually("node-b's agent beats again", || {
        passing(&extender) == ["node-a", "node-b"]
    })
    .await;

    watching.abort();
    api.abort();
}

/// A restarted API server refuses (403) until its RBAC cache is loaded: a
/// claim the watch has not delivered yet is read again until it is given,
/// and the pod is judged with it.
#[tokio::test]
async fn a_missing_claim_is_read_again_while_the_api_server_refuses() {
    let (transport, handle) = tower_test::mock::pair::<Request<Body>, Response<ApiBody>>();
    let extender = extender(policy()).with_client(kube::Client::new(transport, "default"));
    apply_all(
        &mut extender.inventory(),
        &Cluster {
            storages: vec![storage("node-a", &[(Nvme, 100 * GI)])],
            classes: classes(),
            ..Cluster::default()
        },
    );
    let api = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let path = "/api/v1/namespaces/db/persistentvolumeclaims/data";
        let (request, send) = handle.next_request().await.expect("the claim read");
        assert_eq!(request.uri().path(), path);
        let forbidden = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
            "code": 403, "message": "persistentvolumeclaims \"data\" is forbidden",
        });
        send.send_response(
            Response::builder()
                .status(403)
                .body(ApiBody::from(forbidden.to_string()))
                .unwrap(),
        );
        let (request, send) = handle.next_request().await.expect("the claim read again");
        assert_eq!(request.uri().path(), path);
        send.send_response(Response::new(ApiBody::from(
            value(&claim("db", "data", "nvme", 10 * GI)).to_string(),
        )));
    });
    let db = pod("db", "db-0", "uid-db", &["data"]);
    extender.catch_up(&db).await;
    tokio::time::timeout(Duration::from_secs(5), api)
        .await
        .expect("the claim read again")
        .unwrap();
    let result = extender.filter(names_args(&db, &["node-a"]));
    assert_eq!(result.node_names, Some(vec!["node-a".into()]), "{result:?}");
    assert_eq!(result.failed_nodes, Some(Default::default()));
}
