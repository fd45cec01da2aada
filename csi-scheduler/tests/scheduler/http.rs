//! The extender over HTTP, with request bodies as kube-scheduler's
//! HTTPExtender encodes them: `ExtenderArgs` with Go field names, the Pod and
//! NodeList as the API server serves them, and `null` for the unused field.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use csi_scheduler::extender::Extender;
use csi_scheduler::http::router;
use csi_scheduler::metrics::Metrics;
use kube::runtime::watcher::Event;
use lvmlocal_proto::MediaClass::{Hdd, Nvme, Ssd};
use lvmlocal_proto::crd::NodeLoad;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::*;

const POD: &str = include_str!("../fixtures/pod-with-claims.json");
const POD_WITHOUT_CLAIMS: &str = include_str!("../fixtures/pod-without-claims.json");
const NODES: &str = include_str!("../fixtures/nodelist.json");

/// The cluster the fixture pod is scheduled into. The pod asks for 200Gi of
/// NVMe (`data`), 1Ti of HDD spread out (`logs`), and 50Gi of SSD through an
/// ephemeral volume whose claim does not exist yet (`scratch`).
fn cluster() -> Cluster {
    Cluster {
        storages: vec![
            storage(
                "node-a",
                &[(Nvme, 500 * GI), (Ssd, 100 * GI), (Hdd, 4096 * GI)],
            ),
            storage(
                "node-b",
                &[(Nvme, 320 * GI), (Ssd, 100 * GI), (Hdd, 4096 * GI)],
            ),
            storage("node-c", &[(Nvme, 500 * GI), (Ssd, 100 * GI)]),
            storage(
                "node-e",
                &[(Nvme, 1000 * GI), (Ssd, 1000 * GI), (Hdd, 10240 * GI)],
            ),
        ],
        volumes: vec![volume("pvc-old", "node-b", Nvme, 200 * GI, None)],
        claims: vec![
            claim("analytics", "data-clickhouse-0", "nvme", 200 * GI),
            claim("analytics", "logs-clickhouse-0", "hdd-spread", 1024 * GI),
        ],
        classes: vec![
            class("nvme", Nvme, None),
            class("ssd", Ssd, None),
            class(
                "hdd-spread",
                Hdd,
                Some(lvmlocal_proto::params::Placement::Spread),
            ),
        ],
    }
}

fn app_with(prefix: &str, synced: bool) -> (Router, Arc<Extender>) {
    let extender = Arc::new(Extender::new(policy(), Metrics::new()));
    if synced {
        let mut inventory = extender.inventory();
        crate::support::synced(&mut inventory);
        apply_all(&mut inventory, &cluster());
    }
    (router(extender.clone(), prefix, 64 << 20), extender)
}

fn app() -> Router {
    app_with("", true).0
}

async fn call(app: &Router, method: &str, path: &str, body: String) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post_json(app: &Router, path: &str, body: String) -> Value {
    let (status, text) = call(app, "POST", path, body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// `ExtenderArgs` for nodeCacheCapable: true.
fn with_names(pod: &str, names: &[&str]) -> String {
    format!(
        r#"{{"Pod":{},"Nodes":null,"NodeNames":{}}}"#,
        pod.trim(),
        serde_json::to_string(names).unwrap()
    )
}

/// `ExtenderArgs` for nodeCacheCapable: false.
fn with_nodes(pod: &str, nodes: &str) -> String {
    format!(
        r#"{{"Pod":{},"Nodes":{},"NodeNames":null}}"#,
        pod.trim(),
        nodes.trim()
    )
}

#[tokio::test]
async fn filter_by_names() {
    let result = post_json(
        &app(),
        "/filter",
        with_names(POD, &["node-a", "node-b", "node-c", "node-d"]),
    )
    .await;
    assert_eq!(
        result,
        json!({
            "Nodes": null,
            "NodeNames": ["node-a"],
            "FailedNodes": {"node-b": "nvme: needs 200Gi, 120Gi free"},
            "FailedAndUnresolvableNodes": {
                "node-c": "hdd: no volume group on this node",
                "node-d": "no lvmlocal storage on this node"
            },
            "Error": ""
        })
    );
}

#[tokio::test]
async fn filter_whole_nodes_returns_them_whole() {
    let result = post_json(&app(), "/filter", with_nodes(POD, NODES)).await;
    assert_eq!(result["NodeNames"], Value::Null);
    assert_eq!(result["Error"], "");
    assert_eq!(
        result["FailedNodes"],
        json!({"node-b": "nvme: needs 200Gi, 120Gi free"})
    );
    assert_eq!(
        result["FailedAndUnresolvableNodes"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["node-c", "node-d"]
    );
    let sent: Value = serde_json::from_str(NODES).unwrap();
    let items = result["Nodes"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let mut returned = items[0].clone();
    // The Go decoder ignores type metadata on list items.
    let object = returned.as_object_mut().unwrap();
    assert_eq!(object.remove("kind"), Some(json!("Node")));
    assert_eq!(object.remove("apiVersion"), Some(json!("v1")));
    assert_eq!(returned, sent["items"][0]);
}

#[tokio::test]
async fn a_pod_without_claims_passes_untouched_even_before_the_caches_are_listed() {
    let (app, _) = app_with("", false);
    let names = ["node-a", "node-x", "node-y"];
    let result = post_json(&app, "/filter", with_names(POD_WITHOUT_CLAIMS, &names)).await;
    assert_eq!(
        result,
        json!({
            "Nodes": null,
            "NodeNames": names,
            "FailedNodes": {},
            "FailedAndUnresolvableNodes": {},
            "Error": ""
        })
    );
    let result = post_json(&app, "/filter", with_nodes(POD_WITHOUT_CLAIMS, NODES)).await;
    let sent: Value = serde_json::from_str(NODES).unwrap();
    let returned: Vec<&str> = result["Nodes"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(returned, ["node-a", "node-b", "node-c", "node-d"]);
    assert_eq!(
        result["Nodes"]["items"][3]["status"]["nodeInfo"],
        sent["items"][3]["status"]["nodeInfo"]
    );
    let scores = post_json(&app, "/prioritize", with_names(POD_WITHOUT_CLAIMS, &names)).await;
    assert_eq!(
        scores,
        json!([
            {"Host": "node-a", "Score": 0},
            {"Host": "node-x", "Score": 0},
            {"Host": "node-y", "Score": 0}
        ])
    );
}

#[tokio::test]
async fn before_the_caches_are_listed_the_extender_asks_to_retry() {
    let (app, extender) = app_with("", false);
    let (status, text) = call(&app, "GET", "/healthz", String::new()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        text,
        "waiting for the first listing of nodelocalstorages, logicalvolumes, persistentvolumeclaims, storageclasses, leases\n"
    );
    let result = post_json(&app, "/filter", with_names(POD, &["node-a", "node-b"])).await;
    assert_eq!(result["Error"], "");
    assert_eq!(result["NodeNames"], json!([]));
    let waiting = "waiting for the first listing of nodelocalstorages, logicalvolumes, persistentvolumeclaims, storageclasses, leases";
    assert_eq!(
        result["FailedNodes"],
        json!({"node-a": waiting, "node-b": waiting})
    );
    assert_eq!(result["FailedAndUnresolvableNodes"], json!({}));
    let (status, _) = call(&app, "POST", "/prioritize", with_names(POD, &["node-a"])).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    synced(&mut extender.inventory());
    let (status, text) = call(&app, "GET", "/healthz", String::new()).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok\n"));
}

#[tokio::test]
async fn prioritize_weighs_each_class_by_its_bytes() {
    let app = app();
    // node-a is left fuller than node-e in every class. Binpack (default) on
    // nvme and ssd favours node-a, spread on hdd favours node-e:
    //   node-a: (200·10 + 50·10 + 1024·0) / 1274 = 1.96 → 2
    //   node-e: (200·0  + 50·0  + 1024·10) / 1274 = 8.04 → 8
    let scores = post_json(&app, "/prioritize", with_names(POD, &["node-a", "node-e"])).await;
    assert_eq!(
        scores,
        json!([{"Host": "node-a", "Score": 2}, {"Host": "node-e", "Score": 8}])
    );
    // Nodes that cannot take the pod score 0; every node sent is scored once.
    let scores = post_json(
        &app,
        "/prioritize",
        with_names(POD, &["node-d", "node-a", "node-b"]),
    )
    .await;
    assert_eq!(
        scores,
        json!([
            {"Host": "node-d", "Score": 0},
            {"Host": "node-a", "Score": 10},
            {"Host": "node-b", "Score": 0}
        ])
    );
    let whole_nodes: Value = serde_json::from_str(NODES).unwrap();
    let scores = post_json(&app, "/prioritize", with_nodes(POD, NODES)).await;
    let hosts: Vec<&str> = scores
        .as_array()
        .unwrap()
        .iter()
        .map(|score| score["Host"].as_str().unwrap())
        .collect();
    let sent: Vec<&str> = whole_nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, sent);
}

#[tokio::test]
async fn balanced_prefers_the_node_whose_disks_of_the_class_are_least_busy() {
    let extender = Arc::new(Extender::new(
        csi_scheduler::extender::Policy {
            default_placement: lvmlocal_proto::params::Placement::Balanced,
            ..policy()
        },
        Metrics::new(),
    ));
    let app = router(extender.clone(), "", 64 << 20);
    let loaded = |node: &str, nvme: u32, ssd: u32| {
        let mut nls = cluster()
            .storages
            .into_iter()
            .find(|nls| nls.metadata.name.as_deref() == Some(node))
            .unwrap();
        let status = nls.status.as_mut().unwrap();
        status.load = Some(NodeLoad {
            nvme: Some(lvmlocal_proto::load::measure(
                Nvme,
                f64::from(nvme) / 100.0,
                32.0 * f64::from(nvme) / 100.0,
            )),
            ssd: Some(lvmlocal_proto::load::measure(
                Ssd,
                f64::from(ssd) / 100.0,
                8.0 * f64::from(ssd) / 100.0,
            )),
            hdd: None,
        });
        nls
    };
    {
        let mut inventory = extender.inventory();
        synced(&mut inventory);
        apply_all(&mut inventory, &cluster());
        inventory.apply_storage(Event::Apply(loaded("node-a", 90, 50)));
    }
    // nvme and ssd by load (the default here), hdd spread by its class:
    //   node-a: (200·1 + 50·5 + 1024·0) / 1274 = 0.35 → 0
    //   node-e: (200·10 + 50·10 + 1024·10) / 1274 → 10
    let scores = post_json(&app, "/prioritize", with_names(POD, &["node-a", "node-e"])).await;
    assert_eq!(
        scores,
        json!([{"Host": "node-a", "Score": 0}, {"Host": "node-e", "Score": 10}])
    );
    // The load moves: so does the preference, on the next report.
    {
        let mut inventory = extender.inventory();
        inventory.apply_storage(Event::Apply(loaded("node-a", 0, 0)));
        inventory.apply_storage(Event::Apply(loaded("node-e", 100, 100)));
    }
    //   node-a: (200·10 + 50·10 + 1024·0) / 1274 = 1.96 → 2
    //   node-e: (200·0 + 50·0 + 1024·10) / 1274 = 8.04 → 8
    let scores = post_json(&app, "/prioritize", with_names(POD, &["node-a", "node-e"])).await;
    assert_eq!(
        scores,
        json!([{"Host": "node-a", "Score": 2}, {"Host": "node-e", "Score": 8}])
    );
}

#[tokio::test]
async fn filter_then_prioritize_holds_space_only_where_the_pod_may_go() {
    let (app, extender) = app_with("", true);
    post_json(&app, "/filter", with_names(POD, &["node-a", "node-e"])).await;
    let held = |node: &str| {
        let inventory = extender.inventory();
        let id = inventory.node_id(node).unwrap();
        inventory.reservations().on(id)
    };
    assert_eq!(held("node-a")[Nvme], 200 * GI);
    assert_eq!(held("node-e")[Nvme], 200 * GI);
    // kube-scheduler's own plugins ruled out node-a after filtering.
    post_json(&app, "/prioritize", with_names(POD, &["node-e"])).await;
    assert_eq!(held("node-a")[Nvme], 0);
    assert_eq!(
        [
            held("node-e")[Nvme],
            held("node-e")[Ssd],
            held("node-e")[Hdd]
        ],
        [200 * GI, 50 * GI, 1024 * GI]
    );
}

#[tokio::test]
async fn the_verbs_live_under_the_prefix() {
    let (app, _) = app_with("/lvmlocal", true);
    let result = post_json(&app, "/lvmlocal/filter", with_names(POD, &["node-a"])).await;
    assert_eq!(result["NodeNames"], json!(["node-a"]));
    post_json(&app, "/lvmlocal/prioritize", with_names(POD, &["node-a"])).await;
    let (status, _) = call(&app, "POST", "/filter", with_names(POD, &["node-a"])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&app, "GET", "/healthz", String::new()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_requests() {
    let app = app();
    let (status, text) = call(&app, "POST", "/filter", "{\"Pod\": 7}".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.starts_with("cannot read ExtenderArgs: "), "{text}");

    let result = post_json(
        &app,
        "/filter",
        r#"{"Pod":null,"Nodes":null,"NodeNames":["node-a"]}"#.into(),
    )
    .await;
    assert_eq!(result["Error"], "the request has no Pod");
    let result = post_json(
        &app,
        "/filter",
        format!(r#"{{"Pod":{POD},"Nodes":null,"NodeNames":null}}"#),
    )
    .await;
    assert_eq!(
        result["Error"],
        "the request has neither Nodes nor NodeNames"
    );
    let (status, text) = call(
        &app,
        "POST",
        "/prioritize",
        r#"{"Pod":null,"Nodes":null,"NodeNames":[]}"#.into(),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "the request has no Pod")
    );

    let (status, _) = call(&app, "GET", "/filter", String::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_claim_the_cache_has_not_seen_fails_every_node_for_a_retry() {
    let (app, extender) = app_with("", true);
    extender
        .inventory()
        .apply_claim(kube::runtime::watcher::Event::Delete(claim(
            "analytics",
            "logs-clickhouse-0",
            "hdd-spread",
            1024 * GI,
        )));
    let result = post_json(&app, "/filter", with_names(POD, &["node-a"])).await;
    // Failed, to be retried: an Error would make kube-scheduler skip the
    // extender and place the pod unchecked.
    assert_eq!(result["Error"], "");
    assert_eq!(result["NodeNames"], json!([]));
    assert_eq!(
        result["FailedNodes"],
        json!({"node-a": "claim analytics/logs-clickhouse-0 is not in the extender's cache yet"})
    );
    assert_eq!(result["FailedAndUnresolvableNodes"], json!({}));
}

#[tokio::test]
async fn metrics_count_calls_and_reasons() {
    let app = app();
    post_json(
        &app,
        "/filter",
        with_names(POD, &["node-a", "node-b", "node-c", "node-d"]),
    )
    .await;
    post_json(&app, "/prioritize", with_names(POD, &["node-a"])).await;
    call(&app, "POST", "/filter", "not json".into()).await;
    let (status, text) = call(&app, "GET", "/metrics", String::new()).await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"lvmlocal_scheduler_requests_total{verb="filter",outcome="ok"} 1"#,
        r#"lvmlocal_scheduler_requests_total{verb="filter",outcome="bad_request"} 1"#,
        r#"lvmlocal_scheduler_requests_total{verb="prioritize",outcome="ok"} 1"#,
        r#"lvmlocal_scheduler_request_duration_seconds_count{verb="filter"} 2"#,
        r#"lvmlocal_scheduler_filtered_nodes_total{reason="insufficient_space"} 1"#,
        r#"lvmlocal_scheduler_filtered_nodes_total{reason="no_volume_group"} 1"#,
        r#"lvmlocal_scheduler_filtered_nodes_total{reason="no_node_storage"} 1"#,
        "lvmlocal_scheduler_reservations 1",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn an_unusable_class_fails_every_node_for_good_with_its_reason() {
    let (app, extender) = app_with("", true);
    let mut typo = class("nvme", Nvme, None);
    let parameters = typo.parameters.get_or_insert_default();
    parameters.remove("lvmlocal.io/media");
    parameters.insert("lvmlocal.io/medai".into(), "nvme".into());
    extender
        .inventory()
        .apply_class(kube::runtime::watcher::Event::Apply(typo));
    let result = post_json(&app, "/filter", with_names(POD, &["node-a", "node-b"])).await;
    // Not in Error, which would make kube-scheduler skip the extender.
    assert_eq!(result["Error"], "");
    assert_eq!(result["NodeNames"], json!([]));
    assert_eq!(result["FailedNodes"], json!({}));
    let failed = result["FailedAndUnresolvableNodes"].as_object().unwrap();
    assert_eq!(failed.len(), 2, "{result}");
    let reason = failed["node-a"].as_str().unwrap();
    assert!(reason.contains("storage class nvme"), "{reason}");
    assert_eq!(failed["node-b"], failed["node-a"]);
}

#[tokio::test]
async fn a_node_whose_agent_is_silent_fails_for_good_with_the_reason() {
    let (app, extender) = app_with("", true);
    {
        let mut inventory = extender.inventory();
        // node-e's agent has no heartbeat Lease; node-c's last renewal was
        // seen a minute ago (node-c also lacks an HDD group).
        inventory.apply_lease(Event::Delete(heartbeat("node-e", 1)), Instant::now());
        let a_minute_ago = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .expect("the clock has run for a minute");
        inventory.apply_lease(Event::Apply(heartbeat("node-c", 2)), a_minute_ago);
    }
    let result = post_json(
        &app,
        "/filter",
        with_names(POD, &["node-a", "node-c", "node-d", "node-e"]),
    )
    .await;
    assert_eq!(result["NodeNames"], json!(["node-a"]));
    assert_eq!(result["FailedNodes"], json!({}));
    let unresolvable = &result["FailedAndUnresolvableNodes"];
    assert_eq!(
        unresolvable["node-c"],
        "the lvmlocal agent has not renewed its heartbeat for 60s; hdd: no volume group on this node"
    );
    assert_eq!(
        unresolvable["node-e"],
        "the lvmlocal agent has no heartbeat"
    );
    // Without storage, no heartbeat is expected.
    assert_eq!(unresolvable["node-d"], "no lvmlocal storage on this node");

    let scores = post_json(&app, "/prioritize", with_names(POD, &["node-a", "node-e"])).await;
    assert_eq!(
        scores,
        json!([{"Host": "node-a", "Score": 10}, {"Host": "node-e", "Score": 0}])
    );
    let (_, text) = call(&app, "GET", "/metrics", String::new()).await;
    let line = r#"lvmlocal_scheduler_filtered_nodes_total{reason="agent_silent"} 2"#;
    assert!(text.contains(line), "no {line:?} in\n{text}");
}
