//! Fifty pods for one node that can hold ten, all asked about at once: at
//! most ten may be approved, whichever way the calls arrive.

use std::sync::{Arc, Barrier};
use std::thread;

use csi_scheduler::extender::Extender;
use csi_scheduler::http::router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lvmlocal_proto::MediaClass::Nvme;
use lvmlocal_proto::extender::ExtenderFilterResult;

use crate::support::*;

const PODS: usize = 50;
const FITS: usize = 10;

fn crowded() -> (Extender, Vec<k8s_openapi::api::core::v1::Pod>) {
    let extender = extender(policy());
    let mut cluster = Cluster {
        storages: vec![storage("node-a", &[(Nvme, FITS as u64 * 10 * GI)])],
        classes: classes(),
        ..Cluster::default()
    };
    let pods = (0..PODS)
        .map(|i| {
            let name = format!("data-{i}");
            cluster.claims.push(claim("db", &name, "nvme", 10 * GI));
            pod("db", &format!("db-{i}"), &format!("uid-{i}"), &[&name])
        })
        .collect();
    apply_all(&mut extender.inventory(), &cluster);
    (extender, pods)
}

fn approved(results: &[ExtenderFilterResult]) -> usize {
    for result in results {
        assert_eq!(result.error, "");
        let failed = result.failed_nodes.as_ref().unwrap();
        if let Some(reason) = failed.get("node-a") {
            assert_eq!(reason, "nvme: needs 10Gi, 0 free");
        } else {
            assert_eq!(result.node_names.as_deref(), Some(&["node-a".into()][..]));
        }
    }
    results
        .iter()
        .filter(|result| result.failed_nodes.as_ref().unwrap().is_empty())
        .count()
}

#[test]
fn concurrent_filters_in_process_never_overcommit() {
    let (extender, pods) = crowded();
    let extender = Arc::new(extender);
    let start = Arc::new(Barrier::new(PODS));
    let callers: Vec<_> = pods
        .into_iter()
        .map(|pod| {
            let extender = extender.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                extender.filter(names_args(&pod, &["node-a"]))
            })
        })
        .collect();
    let results: Vec<_> = callers
        .into_iter()
        .map(|caller| caller.join().unwrap())
        .collect();
    assert_eq!(approved(&results), FITS);
    assert_eq!(extender.inventory().reservations().len(), FITS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_filters_over_http_never_overcommit() {
    let (extender, pods) = crowded();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = router(Arc::new(extender), "/lvmlocal", 1 << 20);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<axum::body::Bytes>>();
    let calls: Vec<_> = pods
        .iter()
        .map(|pod| {
            let body = serde_json::to_vec(&names_args(pod, &["node-a"])).unwrap();
            let request = axum::http::Request::post(format!("http://{address}/lvmlocal/filter"))
                .header("content-type", "application/json")
                .body(Full::new(body.into()))
                .unwrap();
            let client = client.clone();
            tokio::spawn(async move {
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                serde_json::from_slice::<ExtenderFilterResult>(&body).unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert_eq!(approved(&results), FITS);
    server.abort();
}
