//! The Controller service over `KubeStore`, with kube's client talking to a
//! mocked API server: the exact requests it sends and how it reads the
//! answers, including a controller restarted between "object created" and
//! "answer sent".

#[path = "support/fake_api.rs"]
mod fake_api;

use std::collections::HashMap;
use std::time::Duration;

use csi_controller::caches;
use csi_controller::kube_store::KubeStore;
use fake_api::{
    ApiHandle, LV_PATH, client, logical_volume, next, node, node_storage, ready, respond,
    serve_watches, status,
};
use http::{Method, StatusCode};
use lvmlocal_proto::TOPOLOGY_KEY;
use lvmlocal_proto::controller::{ControllerService, ControllerSettings};
use lvmlocal_proto::csi::v1::controller_server::Controller;
use lvmlocal_proto::csi::v1::volume_capability::access_mode::Mode;
use lvmlocal_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use lvmlocal_proto::csi::v1::*;
use lvmlocal_proto::io_limits::READ_IOPS;
use lvmlocal_proto::params::MEDIA_PARAM;
use lvmlocal_proto::rpc::RpcMetrics;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tonic::{Code, Request};

const GIB: u64 = 1 << 30;
const NAME: &str = "pvc-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10";

struct Cluster {
    service: ControllerService<KubeStore>,
    api: ApiHandle,
    events: UnboundedSender<Value>,
}

/// A controller whose caches start from `volumes`, with node-a holding a
/// 100 GiB NVMe group.
async fn controller(volumes: Vec<Value>) -> Cluster {
    let (watch_client, watch_handle) = client();
    let events = serve_watches(
        watch_handle,
        volumes,
        vec![node_storage("node-a", 100 * GIB)],
        vec![node("node-a")],
    );
    let (caches, feed) = caches::caches();
    tokio::spawn(feed.run(watch_client, "lvmlocal".to_owned()));
    tokio::time::timeout(Duration::from_secs(5), caches.synced())
        .await
        .expect("caches sync");
    let (crud_client, api) = client();
    let settings = ControllerSettings {
        default_size_bytes: GIB,
        wait: Duration::from_secs(5),
    };
    let service = ControllerService::new(
        KubeStore::new(crud_client, caches),
        settings,
        RpcMetrics::default(),
    );
    Cluster {
        service,
        api,
        events,
    }
}

fn create_req() -> CreateVolumeRequest {
    let segment = Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), "node-a".to_owned())]),
    };
    CreateVolumeRequest {
        name: NAME.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 10 * GIB as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        parameters: HashMap::from([
            (MEDIA_PARAM.to_owned(), "nvme".to_owned()),
            (
                "csi.storage.k8s.io/pvc/name".to_owned(),
                "data-0".to_owned(),
            ),
            (
                "csi.storage.k8s.io/pvc/namespace".to_owned(),
                "db".to_owned(),
            ),
        ]),
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![segment.clone()],
            preferred: vec![segment],
        }),
        ..Default::default()
    }
}

fn lv_url() -> String {
    format!("{LV_PATH}/{NAME}")
}

fn modified(object: Value) -> Value {
    json!({"type": "MODIFIED", "object": object})
}

/// Answers the GET every CreateVolume starts with.
async fn expect_get(api: &mut ApiHandle, answer: Option<Value>) {
    let (request, send) = next(api).await;
    assert_eq!(request.method(), Method::GET);
    assert_eq!(request.uri().path(), lv_url());
    match answer {
        Some(object) => respond(send, StatusCode::OK, &object),
        None => respond(send, StatusCode::NOT_FOUND, &status(404, "NotFound", NAME)),
    }
}

async fn expect_no_more(api: &mut ApiHandle) {
    // `None`: the client is gone with the finished call, so nothing more came.
    let more = tokio::time::timeout(Duration::from_millis(100), api.next_request()).await;
    if let Ok(Some((request, _))) = more {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

#[tokio::test]
async fn create_posts_the_object_and_waits_for_ready_through_the_watch() {
    let Cluster {
        service,
        mut api,
        events,
    } = controller(vec![]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });

    expect_get(&mut api, None).await;
    let (request, send) = next(&mut api).await;
    assert_eq!(request.method(), Method::POST);
    assert_eq!(request.uri().path(), LV_PATH);
    assert!(
        request
            .uri()
            .query()
            .unwrap()
            .contains("fieldManager=lvmlocal-controller"),
        "{}",
        request.uri()
    );
    assert_eq!(
        request.body(),
        &json!({
            "apiVersion": "lvmlocal.io/v1alpha1",
            "kind": "LogicalVolume",
            "metadata": {"name": NAME, "finalizers": ["lvmlocal.io/logical-volume"]},
            "spec": {
                "nodeName": "node-a",
                "media": "nvme",
                "sizeBytes": 10 * GIB,
                "fsType": "ext4",
                "pvc": {"namespace": "db", "name": "data-0"}
            }
        })
    );
    let created = logical_volume(NAME, "node-a", 10 * GIB, 1, None);
    respond(send, StatusCode::CREATED, &created);
    // The agent makes the LV and reports it.
    events
        .send(json!({"type": "ADDED", "object": created}))
        .unwrap();
    events
        .send(modified(logical_volume(
            NAME,
            "node-a",
            10 * GIB,
            1,
            ready(10 * GIB, 1),
        )))
        .unwrap();

    let volume = call.await.unwrap().unwrap().into_inner().volume.unwrap();
    assert_eq!(volume.volume_id, NAME);
    assert_eq!(volume.capacity_bytes, 10 * GIB as i64);
    assert_eq!(
        volume.accessible_topology[0].segments[TOPOLOGY_KEY],
        "node-a"
    );
    expect_no_more(&mut api).await;
}

#[tokio::test]
async fn conflict_on_create_reads_the_existing_object() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });

    expect_get(&mut api, None).await;
    let (request, send) = next(&mut api).await;
    assert_eq!(request.method(), Method::POST);
    respond(
        send,
        StatusCode::CONFLICT,
        &status(409, "AlreadyExists", NAME),
    );
    // Another call made it, and the agent already has it ready.
    expect_get(
        &mut api,
        Some(logical_volume(
            NAME,
            "node-a",
            10 * GIB,
            1,
            ready(10 * GIB, 1),
        )),
    )
    .await;
    let volume = call.await.unwrap().unwrap().into_inner().volume.unwrap();
    assert_eq!(volume.capacity_bytes, 10 * GIB as i64);
    expect_no_more(&mut api).await;
}

#[tokio::test]
async fn restart_between_created_and_answered_finds_the_same_volume() {
    // First life: the object is created, then the process dies waiting.
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });
    expect_get(&mut api, None).await;
    let (request, send) = next(&mut api).await;
    assert_eq!(request.method(), Method::POST);
    let created = logical_volume(NAME, "node-a", 10 * GIB, 1, None);
    respond(send, StatusCode::CREATED, &created);
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());

    // Second life: the provisioner retries; the object is still pending.
    let Cluster {
        service,
        mut api,
        events,
    } = controller(vec![created.clone()]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });
    expect_get(&mut api, Some(created)).await;
    events
        .send(modified(logical_volume(
            NAME,
            "node-a",
            10 * GIB,
            1,
            ready(10 * GIB, 1),
        )))
        .unwrap();
    let volume = call.await.unwrap().unwrap().into_inner().volume.unwrap();
    assert_eq!(volume.volume_id, NAME);
    assert_eq!(volume.capacity_bytes, 10 * GIB as i64);
    // No second object was made.
    expect_no_more(&mut api).await;
}

#[tokio::test]
async fn agent_failure_is_resource_exhausted_and_the_object_is_removed() {
    let Cluster {
        service,
        mut api,
        events,
    } = controller(vec![]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });
    expect_get(&mut api, None).await;
    let (_, send) = next(&mut api).await;
    respond(
        send,
        StatusCode::CREATED,
        &logical_volume(NAME, "node-a", 10 * GIB, 1, None),
    );
    let failed = json!({
        "phase": "Failed",
        "message": "volume group lvmlocal-nvme has 2147483648 bytes free; 10737418240 needed",
        "observedGeneration": 1
    });
    events
        .send(modified(logical_volume(
            NAME,
            "node-a",
            10 * GIB,
            1,
            Some(failed),
        )))
        .unwrap();

    expect_deletion(
        &mut api,
        logical_volume(NAME, "node-a", 10 * GIB, 1, None),
        &[],
    )
    .await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("2147483648 bytes free"), "{err:?}");
}

/// DeleteVolume of NAME, running while the test answers its requests.
fn delete_call(
    service: ControllerService<KubeStore>,
) -> tokio::task::JoinHandle<Result<tonic::Response<DeleteVolumeResponse>, tonic::Status>> {
    tokio::spawn(async move {
        service
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: NAME.into(),
                ..Default::default()
            }))
            .await
    })
}

#[tokio::test]
async fn delete_of_a_missing_object_is_success() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = delete_call(service);
    expect_get(&mut api, None).await;
    call.await.unwrap().unwrap();
    expect_no_more(&mut api).await;
}

/// A PersistentVolume of lvmlocal for volume `handle`.
fn persistent_volume(name: &str, handle: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {"csi": {"driver": "lvmlocal.io", "volumeHandle": handle}}
    })
}

/// Answers the requests of a deletion of `lv`: read it, list the PVs
/// (`pvs`), record the intent naming those of this volume, delete exactly
/// the object the intent was recorded on.
async fn expect_deletion(api: &mut ApiHandle, lv: Value, pvs: &[Value]) -> Value {
    expect_get(api, Some(lv.clone())).await;

    let (request, send) = next(api).await;
    assert_eq!(request.method(), Method::GET);
    assert_eq!(request.uri().path(), "/api/v1/persistentvolumes");
    let list = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeList",
        "metadata": {"resourceVersion": "7"},
        "items": pvs,
    });
    respond(send, StatusCode::OK, &list);

    let (request, send) = next(api).await;
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(request.uri().path(), lv_url());
    let metadata = &request.body()["metadata"];
    // Written only on the object as read: a change since is a conflict.
    assert_eq!(
        metadata["resourceVersion"],
        lv["metadata"]["resourceVersion"]
    );
    let intent = metadata["annotations"]["lvmlocal.io/delete-intent"]
        .as_str()
        .expect("an intent")
        .to_owned();
    let mut annotated = lv.clone();
    annotated["metadata"]["annotations"] = json!({"lvmlocal.io/delete-intent": intent});
    annotated["metadata"]["resourceVersion"] = json!("900");
    respond(send, StatusCode::OK, &annotated);

    let (request, send) = next(api).await;
    assert_eq!(request.method(), Method::DELETE);
    assert_eq!(request.uri().path(), lv_url());
    assert_eq!(
        request.body()["preconditions"],
        json!({"uid": lv["metadata"]["uid"], "resourceVersion": "900"})
    );
    respond(send, StatusCode::OK, &annotated);
    json!(intent)
}

#[tokio::test]
async fn delete_records_who_asked_and_for_which_pv_before_deleting() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = delete_call(service);
    let pvs = [
        persistent_volume("pv-other", "pvc-another-volume"),
        persistent_volume(NAME, NAME),
    ];
    let lv = logical_volume(NAME, "node-a", 10 * GIB, 1, ready(10 * GIB, 1));
    // Whether it is a snapshot, which DeleteVolume leaves.
    expect_get(&mut api, Some(lv.clone())).await;
    let intent = expect_deletion(&mut api, lv, &pvs).await;
    // DeleteVolume waits for it to be gone.
    expect_get(&mut api, None).await;
    let intent = intent.as_str().unwrap();
    assert!(intent.contains("DeleteVolume"), "{intent}");
    assert!(
        intent.contains(&format!("PersistentVolume {NAME}")),
        "{intent}"
    );
    assert!(!intent.contains("pv-other"), "{intent}");
    call.await.unwrap().unwrap();
    expect_no_more(&mut api).await;
}

/// An object changed under DeleteVolume (its agent wrote the status) is
/// read and judged again; one that keeps changing is left to the caller's
/// retry, with nothing deleted.
#[tokio::test]
async fn delete_refused_by_a_conflict_deletes_nothing_and_is_retried() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = delete_call(service);
    expect_get(
        &mut api,
        Some(logical_volume(NAME, "node-a", 10 * GIB, 1, None)),
    )
    .await;
    for _ in 0..3 {
        expect_get(
            &mut api,
            Some(logical_volume(NAME, "node-a", 10 * GIB, 1, None)),
        )
        .await;
        let (_, send) = next(&mut api).await;
        let empty = json!({"apiVersion": "v1", "kind": "PersistentVolumeList", "metadata": {}, "items": []});
        respond(send, StatusCode::OK, &empty);
        let (request, send) = next(&mut api).await;
        assert_eq!(request.method(), Method::PATCH);
        respond(send, StatusCode::CONFLICT, &status(409, "Conflict", NAME));
    }
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    expect_no_more(&mut api).await;

    // Once the object holds still, the deletion goes through.
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = delete_call(service);
    let lv = logical_volume(NAME, "node-a", 10 * GIB, 1, None);
    expect_get(&mut api, Some(lv.clone())).await;
    expect_get(&mut api, Some(lv.clone())).await;
    let (_, send) = next(&mut api).await;
    let empty =
        json!({"apiVersion": "v1", "kind": "PersistentVolumeList", "metadata": {}, "items": []});
    respond(send, StatusCode::OK, &empty);
    let (_, send) = next(&mut api).await;
    respond(send, StatusCode::CONFLICT, &status(409, "Conflict", NAME));
    expect_deletion(&mut api, lv, &[]).await;
    expect_get(&mut api, None).await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn api_outage_is_unavailable() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![]).await;
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });
    let (_, send) = next(&mut api).await;
    respond(
        send,
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcdserver: leader changed", "reason": "ServiceUnavailable", "code": 503}),
    );
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("leader changed"), "{err:?}");
}

#[tokio::test]
async fn expand_patches_the_size_and_waits_for_the_new_generation() {
    let existing = logical_volume(NAME, "node-a", 10 * GIB, 1, ready(10 * GIB, 1));
    let Cluster {
        service,
        mut api,
        events,
    } = controller(vec![existing.clone()]).await;
    let call = tokio::spawn(async move {
        service
            .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
                volume_id: NAME.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 20 * GIB as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .await
    });
    expect_get(&mut api, Some(existing)).await;
    let (request, send) = next(&mut api).await;
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(request.uri().path(), lv_url());
    assert_eq!(
        request.headers()["content-type"],
        "application/merge-patch+json"
    );
    assert_eq!(request.body(), &json!({"spec": {"sizeBytes": 20 * GIB}}));
    // The patched object still carries the status of generation 1.
    respond(
        send,
        StatusCode::OK,
        &logical_volume(NAME, "node-a", 20 * GIB, 2, ready(10 * GIB, 1)),
    );
    events
        .send(modified(logical_volume(
            NAME,
            "node-a",
            20 * GIB,
            2,
            ready(20 * GIB, 2),
        )))
        .unwrap();
    let resp = call.await.unwrap().unwrap().into_inner();
    assert_eq!(resp.capacity_bytes, 20 * GIB as i64);
    assert!(resp.node_expansion_required);
}

/// A modify names every limit, absent ones as null: a merge patch would
/// otherwise keep the limits the new class no longer sets.
#[tokio::test]
async fn modify_patches_exactly_the_new_limits() {
    let mut existing = logical_volume(NAME, "node-a", 10 * GIB, 1, ready(10 * GIB, 1));
    existing["spec"]["ioLimits"] = json!({"writeIops": 50, "writeBps": 1024});
    for (parameters, patch) in [
        (
            HashMap::from([(READ_IOPS.to_owned(), "80".to_owned())]),
            json!({"readIops": 80, "writeIops": null, "readBps": null, "writeBps": null}),
        ),
        (HashMap::new(), Value::Null),
    ] {
        let Cluster {
            service, mut api, ..
        } = controller(vec![existing.clone()]).await;
        let call = tokio::spawn(async move {
            service
                .controller_modify_volume(Request::new(ControllerModifyVolumeRequest {
                    volume_id: NAME.into(),
                    mutable_parameters: parameters,
                    ..Default::default()
                }))
                .await
        });
        expect_get(&mut api, Some(existing.clone())).await;
        let (request, send) = next(&mut api).await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), lv_url());
        assert_eq!(
            request.headers()["content-type"],
            "application/merge-patch+json"
        );
        assert_eq!(request.body(), &json!({"spec": {"ioLimits": patch}}));
        respond(send, StatusCode::OK, &existing);
        call.await.unwrap().unwrap();
        expect_no_more(&mut api).await;
    }
}

#[tokio::test]
async fn slow_agent_is_deadline_exceeded() {
    let pending = logical_volume(NAME, "node-a", 10 * GIB, 1, None);
    let (watch_client, watch_handle) = client();
    let _events = serve_watches(
        watch_handle,
        vec![pending.clone()],
        vec![node_storage("node-a", 100 * GIB)],
        vec![node("node-a")],
    );
    let (caches, feed) = caches::caches();
    tokio::spawn(feed.run(watch_client, "lvmlocal".to_owned()));
    caches.synced().await;
    let (crud_client, mut api) = client();
    let settings = ControllerSettings {
        default_size_bytes: GIB,
        wait: Duration::from_millis(100),
    };
    let service = ControllerService::new(
        KubeStore::new(crud_client, caches),
        settings,
        RpcMetrics::default(),
    );
    let call = tokio::spawn(async move { service.create_volume(Request::new(create_req())).await });
    expect_get(&mut api, Some(pending)).await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("retry"), "{err:?}");
}

#[tokio::test]
async fn list_and_capacity_come_from_the_caches() {
    let Cluster {
        service, mut api, ..
    } = controller(vec![
        logical_volume("pvc-b", "node-a", 30 * GIB, 1, ready(30 * GIB, 1)),
        logical_volume("pvc-a", "node-a", 10 * GIB, 1, None),
    ])
    .await;
    let listed = service
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.as_str())
        .collect();
    assert_eq!(ids, ["pvc-a", "pvc-b"]);
    let capacity = service
        .get_capacity(Request::new(GetCapacityRequest {
            parameters: HashMap::from([(MEDIA_PARAM.to_owned(), "nvme".to_owned())]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capacity.available_capacity, 60 * GIB as i64);
    expect_no_more(&mut api).await;
}
