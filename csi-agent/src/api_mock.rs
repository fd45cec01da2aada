//! Helpers for tests that put a mocked API server behind `kube::Client`.

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;

pub async fn body(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub fn answer(send: tower_test::mock::SendResponse<Response<Body>>, object: &Value) {
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(object).unwrap(),
    )));
}

/// A server-side apply of `path` by the agent's field manager.
pub fn assert_apply(request: &Request<Body>, path: &str) {
    assert_apply_by(request, path, "lvmlocal-agent");
}

/// A server-side apply of `node`'s NodeLocalStorage status by `manager`.
pub fn assert_status_apply(request: &Request<Body>, node: &str, manager: &str) {
    let path = format!("/apis/lvmlocal.io/v1alpha1/nodelocalstorages/{node}/status");
    assert_apply_by(request, &path, manager);
}

fn assert_apply_by(request: &Request<Body>, path: &str, manager: &str) {
    assert_eq!(request.method(), http::Method::PATCH);
    assert_eq!(request.uri().path(), path);
    let query = request.uri().query().unwrap();
    let params: Vec<&str> = query.split('&').collect();
    assert!(
        params.contains(&format!("fieldManager={manager}").as_str())
            && params.contains(&"force=true"),
        "{query}"
    );
    assert_eq!(
        request.headers()["content-type"],
        "application/apply-patch+yaml"
    );
}
