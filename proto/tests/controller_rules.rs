//! csi-sanity's rules for the Controller service, and the codes the CSI spec
//! names, checked against `ControllerService` over an in-memory store.

#[path = "support/memory.rs"]
mod memory;

use std::collections::HashMap;
use std::time::Duration;

use lvmlocal_proto::controller::{ControllerService, ControllerSettings};
use lvmlocal_proto::csi::v1::controller_server::Controller;
use lvmlocal_proto::csi::v1::controller_service_capability::{self, rpc};
use lvmlocal_proto::csi::v1::identity_server::Identity;
use lvmlocal_proto::csi::v1::plugin_capability;
use lvmlocal_proto::csi::v1::volume_capability::access_mode::Mode;
use lvmlocal_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use lvmlocal_proto::csi::v1::*;
use lvmlocal_proto::identity::IdentityService;
use lvmlocal_proto::io_limits::{IoLimits, READ_BPS, READ_IOPS, WRITE_IOPS};
use lvmlocal_proto::params::{FS_TYPE_PARAM, MEDIA_PARAM};
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::thin::{OVERPROVISION_PARAM, PROVISIONING_PARAM};
use lvmlocal_proto::{MediaClass, TOPOLOGY_KEY};
use memory::{Agent, Group, MemoryStore};
use tonic::{Code, Request, Status};

const GIB: u64 = 1 << 30;
/// csi-sanity's default volume size.
const SIZE: i64 = 10 << 30;

fn service(agent: Agent) -> ControllerService<MemoryStore> {
    let groups = vec![
        Group {
            node: "node-a",
            media: MediaClass::Nvme,
            total_bytes: 100 * GIB,
        },
        Group {
            node: "node-b",
            media: MediaClass::Nvme,
            total_bytes: 200 * GIB,
        },
        Group {
            node: "node-a",
            media: MediaClass::Hdd,
            total_bytes: 1000 * GIB,
        },
    ];
    let settings = ControllerSettings {
        default_size_bytes: GIB,
        wait: Duration::from_millis(200),
    };
    ControllerService::new(
        MemoryStore::new(agent, groups),
        settings,
        RpcMetrics::default(),
    )
}

fn mount(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..MountVolume::default()
        })),
    }
}

fn block() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn nvme() -> HashMap<String, String> {
    HashMap::from([(MEDIA_PARAM.to_owned(), "nvme".to_owned())])
}

fn create_req(name: &str, required: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount("")],
        parameters: nvme(),
        ..Default::default()
    }
}

fn on_node(node: &str) -> Option<TopologyRequirement> {
    let segment = Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())]),
    };
    Some(TopologyRequirement {
        requisite: vec![segment.clone()],
        preferred: vec![segment],
    })
}

async fn create(
    svc: &ControllerService<MemoryStore>,
    req: CreateVolumeRequest,
) -> Result<Volume, Status> {
    let resp = svc.create_volume(Request::new(req)).await?;
    Ok(resp.into_inner().volume.expect("a volume"))
}

fn node_of(volume: &Volume) -> &str {
    &volume.accessible_topology[0].segments[TOPOLOGY_KEY]
}

fn expand_req(id: &str, required: i64) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn capabilities_are_advertised() {
    let svc = service(Agent::Instant);
    let caps = svc
        .controller_get_capabilities(Request::new(ControllerGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let types: Vec<i32> = caps
        .iter()
        .map(|c| match c.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    for want in [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::ExpandVolume,
        rpc::Type::GetCapacity,
        rpc::Type::ListVolumes,
        rpc::Type::SingleNodeMultiWriter,
        rpc::Type::GetVolume,
        rpc::Type::VolumeCondition,
        rpc::Type::ModifyVolume,
        rpc::Type::CreateDeleteSnapshot,
        rpc::Type::ListSnapshots,
        rpc::Type::CloneVolume,
    ] {
        assert!(types.contains(&(want as i32)), "{want:?} missing");
    }
    assert!(!types.contains(&(rpc::Type::PublishUnpublishVolume as i32)));
}

#[tokio::test]
async fn nil_topology_takes_the_node_with_most_free_space() {
    let svc = service(Agent::Instant);
    let volume = create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    assert_eq!(node_of(&volume), "node-b");
    assert_eq!(volume.capacity_bytes, SIZE);
    assert_eq!(volume.volume_id, "pvc-1");
    assert_eq!(volume.volume_context[MEDIA_PARAM], "nvme");
}

#[tokio::test]
async fn topology_places_on_the_preferred_node() {
    let svc = service(Agent::Instant);
    let mut req = create_req("pvc-1", SIZE);
    req.accessibility_requirements = on_node("node-a");
    let volume = create(&svc, req).await.unwrap();
    assert_eq!(node_of(&volume), "node-a");

    let mut req = create_req("pvc-2", SIZE);
    req.accessibility_requirements = on_node("node-z");
    let err = create(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("node-z"), "{err:?}");
}

#[tokio::test]
async fn no_capacity_range_gets_the_default_size() {
    let svc = service(Agent::Instant);
    let mut req = create_req("pvc-1", 0);
    req.capacity_range = None;
    let volume = create(&svc, req).await.unwrap();
    assert_eq!(volume.capacity_bytes, GIB as i64);
}

#[tokio::test]
async fn sizes_round_up_to_extents() {
    let svc = service(Agent::Instant);
    let volume = create(&svc, create_req("pvc-1", 1)).await.unwrap();
    assert_eq!(volume.capacity_bytes, 4 << 20);

    let mut req = create_req("pvc-2", 5 << 20);
    req.capacity_range.as_mut().unwrap().limit_bytes = 6 << 20;
    let err = create(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

#[tokio::test]
async fn same_name_same_size_is_the_same_volume() {
    let svc = service(Agent::Instant);
    let first = create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    let second = create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    assert_eq!(first, second);
}

#[tokio::test]
async fn same_name_other_size_or_kind_already_exists() {
    let svc = service(Agent::Instant);
    create(&svc, create_req("pvc-1", SIZE)).await.unwrap();

    let err = create(&svc, create_req("pvc-1", 2 * SIZE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut as_block = create_req("pvc-1", SIZE);
    as_block.volume_capabilities = vec![block()];
    let err = create(&svc, as_block).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut as_xfs = create_req("pvc-1", SIZE);
    as_xfs.parameters.insert(FS_TYPE_PARAM.into(), "xfs".into());
    let err = create(&svc, as_xfs).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut on_hdd = create_req("pvc-1", SIZE);
    on_hdd.parameters.insert(MEDIA_PARAM.into(), "hdd".into());
    let err = create(&svc, on_hdd).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let mut elsewhere = create_req("pvc-1", SIZE);
    elsewhere.accessibility_requirements = on_node("node-a");
    let err = create(&svc, elsewhere).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

#[tokio::test]
async fn maximum_length_name_works_and_is_idempotent() {
    let svc = service(Agent::Instant);
    let name = "a".repeat(128);
    let first = create(&svc, create_req(&name, SIZE)).await.unwrap();
    let second = create(&svc, create_req(&name, SIZE)).await.unwrap();
    assert_eq!(first.volume_id, second.volume_id);
    assert!(first.volume_id.starts_with("vol-"), "{}", first.volume_id);
}

#[tokio::test]
async fn invalid_requests_change_nothing() {
    let svc = service(Agent::Instant);
    let mut bad_fs = create_req("pvc-1", SIZE);
    bad_fs.volume_capabilities = vec![mount("ext4; rm -rf /")];
    let mut no_media = create_req("pvc-1", SIZE);
    no_media.parameters.clear();
    let mut no_caps = create_req("pvc-1", SIZE);
    no_caps.volume_capabilities.clear();
    for req in [create_req("", SIZE), bad_fs, no_media, no_caps] {
        let err = create(&svc, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let listed = svc
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

#[tokio::test]
async fn node_without_space_is_resource_exhausted() {
    let svc = service(Agent::Instant);
    let mut req = create_req("pvc-1", 101 * GIB as i64);
    req.accessibility_requirements = on_node("node-a");
    let err = create(&svc, req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("node node-a has"), "{err:?}");
}

fn thin(mut req: CreateVolumeRequest, ratio: &str) -> CreateVolumeRequest {
    req.parameters
        .insert(PROVISIONING_PARAM.into(), "thin".into());
    req.parameters
        .insert(OVERPROVISION_PARAM.into(), ratio.into());
    req
}

#[tokio::test]
async fn thin_volumes_are_charged_their_size_over_the_ratio() {
    let svc = service(Agent::Instant);
    // 300 GiB on node-a's 100 GiB at a ratio of 4: charged 75 GiB.
    let mut req = thin(create_req("pvc-1", 300 * GIB as i64), "4");
    req.accessibility_requirements = on_node("node-a");
    let volume = create(&svc, req).await.unwrap();
    assert_eq!(volume.capacity_bytes, 300 * GIB as i64);
    // 25 GiB left: a thick 26 GiB does not fit, a thin 100 GiB at 4 does.
    let mut thick = create_req("pvc-2", 26 * GIB as i64);
    thick.accessibility_requirements = on_node("node-a");
    let err = create(&svc, thick).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut more = thin(create_req("pvc-3", 100 * GIB as i64), "4");
    more.accessibility_requirements = on_node("node-a");
    create(&svc, more).await.unwrap();
    // The same name thick is another volume.
    let mut again = create_req("pvc-1", 300 * GIB as i64);
    again.accessibility_requirements = on_node("node-a");
    let err = create(&svc, again).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("thin"), "{err:?}");
    // Growing by 40 GiB at 4 takes 10 GiB: there are none left.
    let err = svc
        .controller_expand_volume(Request::new(expand_req("pvc-3", 140 * GIB as i64)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("needs 10737418240 more"), "{err:?}");
    // GetCapacity for a thin class answers what its volumes may add up to.
    let mut query = GetCapacityRequest {
        parameters: thin(create_req("q", 1), "2.5").parameters,
        ..GetCapacityRequest::default()
    };
    assert_eq!(capacity(&svc, query.clone()).await, 500 * GIB as i64);
    query.parameters = nvme();
    assert_eq!(capacity(&svc, query).await, 200 * GIB as i64);
}

#[tokio::test]
async fn node_failure_is_resource_exhausted_and_a_retry_starts_over() {
    let svc = service(Agent::Instant);
    // The controller counts 100 GiB on node-a; the agent finds 50 GiB.
    let store = svc_store(&svc);
    store.hide(50 * GIB);
    let mut req = create_req("pvc-1", 60 * GIB as i64);
    req.accessibility_requirements = on_node("node-a");
    let err = create(&svc, req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("not enough free space"), "{err:?}");
    assert_eq!(
        store.volume("pvc-1"),
        None,
        "the failed attempt is forgotten"
    );

    store.hide(0);
    let volume = create(&svc, req).await.unwrap();
    assert_eq!(node_of(&volume), "node-a");
}

#[tokio::test]
async fn an_expansion_not_done_can_be_lowered_down_to_the_volume_size() {
    let svc = service(Agent::Instant);
    let store = svc_store(&svc);
    let mut req = create_req("pvc-1", SIZE);
    req.accessibility_requirements = on_node("node-a");
    create(&svc, req).await.unwrap();
    // The controller counts room for 90 GiB more on node-a; the agent
    // finds 60 GiB less.
    store.hide(60 * GIB);
    let err = svc
        .controller_expand_volume(Request::new(expand_req("pvc-1", 60 * GIB as i64)))
        .await
        .unwrap_err();
    assert!(err.message().contains("not enough free space"), "{err:?}");
    // Final, so that Kubernetes lets the claim ask for less.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let stuck = store.volume("pvc-1").unwrap();
    assert_eq!(stuck.size_bytes, 60 * GIB, "the expansion is asked");
    assert_eq!(stuck.actual_bytes, Some(SIZE as u64));

    // The user asks for less; it fits, and what is asked comes down.
    let resp = svc
        .controller_expand_volume(Request::new(expand_req("pvc-1", 2 * SIZE)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.capacity_bytes, 2 * SIZE);
    assert_eq!(store.volume("pvc-1").unwrap().size_bytes, 2 * SIZE as u64);

    // Back to the volume's own size: nothing is left asked beyond it. Below
    // it, nothing shrinks.
    store.hide(100 * GIB);
    let err = svc
        .controller_expand_volume(Request::new(expand_req("pvc-1", 3 * SIZE)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let resp = svc
        .controller_expand_volume(Request::new(expand_req("pvc-1", SIZE)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.capacity_bytes, 2 * SIZE, "an LV never shrinks");
    assert_eq!(store.volume("pvc-1").unwrap().size_bytes, 2 * SIZE as u64);
}

/// The store behind a service built by `service`.
fn svc_store(svc: &ControllerService<MemoryStore>) -> &MemoryStore {
    svc.store()
}

#[tokio::test]
async fn slow_node_is_deadline_exceeded_and_the_retry_succeeds() {
    let svc = service(Agent::Silent);
    let err = create(&svc, create_req("pvc-1", SIZE)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let err = create(&svc, create_req("pvc-1", SIZE)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "still waiting: {err:?}");

    svc_store(&svc).answer();
    let volume = create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    assert_eq!(volume.capacity_bytes, SIZE);
}

#[tokio::test]
async fn delete_is_idempotent_and_unknown_ids_are_fine() {
    let svc = service(Agent::Instant);
    create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    for id in ["pvc-1", "pvc-1", "reallyfakevolumeid"] {
        svc.delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    assert_eq!(svc_store(&svc).volume("pvc-1"), None);
    for bad in ["", "..", "a/b"] {
        let err = svc
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: bad.into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn expand_returns_the_exact_new_size() {
    let svc = service(Agent::Instant);
    create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    for _ in 0..2 {
        let resp = svc
            .controller_expand_volume(Request::new(expand_req("pvc-1", 2 * SIZE)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.capacity_bytes, 2 * SIZE);
        assert!(resp.node_expansion_required);
    }
    // Asking for less than it has is a no-op, not a shrink.
    let resp = svc
        .controller_expand_volume(Request::new(expand_req("pvc-1", SIZE)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.capacity_bytes, 2 * SIZE);

    let mut raw = create_req("pvc-2", SIZE);
    raw.volume_capabilities = vec![block()];
    create(&svc, raw).await.unwrap();
    let resp = svc
        .controller_expand_volume(Request::new(expand_req("pvc-2", 2 * SIZE)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !resp.node_expansion_required,
        "a block device has no filesystem"
    );
}

fn modify_req(id: &str, pairs: &[(&str, &str)]) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn io_limits_are_kept_from_creation_and_replaced_by_a_modify() {
    let svc = service(Agent::Instant);
    let mut req = create_req("pvc-1", SIZE);
    req.parameters.insert(WRITE_IOPS.into(), "100".into());
    req.mutable_parameters.insert(READ_BPS.into(), "1Mi".into());
    create(&svc, req).await.unwrap();
    let stored = |svc: &ControllerService<MemoryStore>| {
        svc.store().volume("pvc-1").expect("stored").io_limits
    };
    assert_eq!(
        stored(&svc),
        IoLimits {
            write_iops: Some(100),
            read_bps: Some(1 << 20),
            ..IoLimits::NONE
        }
    );

    svc.controller_modify_volume(Request::new(modify_req("pvc-1", &[(READ_IOPS, "7")])))
        .await
        .unwrap();
    assert_eq!(
        stored(&svc),
        IoLimits {
            read_iops: Some(7),
            ..IoLimits::NONE
        },
        "a modify says every limit"
    );

    // Refusals change nothing.
    let generation = svc.store().volume("pvc-1").unwrap().generation;
    for (req, code) in [
        (
            modify_req("pvc-1", &[(READ_IOPS, "0")]),
            Code::InvalidArgument,
        ),
        (
            modify_req("pvc-1", &[(MEDIA_PARAM, "hdd")]),
            Code::InvalidArgument,
        ),
        (
            modify_req("../pvc-1", &[(READ_IOPS, "1")]),
            Code::InvalidArgument,
        ),
        (modify_req("", &[(READ_IOPS, "1")]), Code::InvalidArgument),
        (modify_req("pvc-404", &[(READ_IOPS, "1")]), Code::NotFound),
    ] {
        let err = svc
            .controller_modify_volume(Request::new(req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }
    assert_eq!(svc.store().volume("pvc-1").unwrap().generation, generation);

    // The same limits again are no change at all.
    svc.controller_modify_volume(Request::new(modify_req("pvc-1", &[(READ_IOPS, "7")])))
        .await
        .unwrap();
    assert_eq!(svc.store().volume("pvc-1").unwrap().generation, generation);
}

#[tokio::test]
async fn expand_refusals() {
    let svc = service(Agent::Instant);
    let mut req = create_req("pvc-1", SIZE);
    req.accessibility_requirements = on_node("node-a");
    create(&svc, req).await.unwrap();

    let cases = [
        (expand_req("", SIZE), Code::InvalidArgument),
        (
            ControllerExpandVolumeRequest {
                volume_id: "pvc-1".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (expand_req("pvc-404", 2 * SIZE), Code::NotFound),
        // Final, so that Kubernetes lets the claim ask for less again.
        (expand_req("pvc-1", 101 * GIB as i64), Code::OutOfRange),
        (
            ControllerExpandVolumeRequest {
                volume_id: "pvc-1".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 0,
                    limit_bytes: GIB as i64,
                }),
                ..Default::default()
            },
            Code::OutOfRange,
        ),
    ];
    for (req, code) in cases {
        let err = svc
            .controller_expand_volume(Request::new(req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }
}

#[tokio::test]
async fn validate_capabilities() {
    let svc = service(Agent::Instant);
    create(&svc, create_req("pvc-1", SIZE)).await.unwrap();
    let check = |id: &str, caps: Vec<VolumeCapability>, params: HashMap<String, String>| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            parameters: params,
            ..Default::default()
        }
    };
    let ok = svc
        .validate_volume_capabilities(Request::new(check("pvc-1", vec![mount("")], nvme())))
        .await
        .unwrap()
        .into_inner();
    let confirmed = ok.confirmed.expect("confirmed");
    assert_eq!(confirmed.volume_capabilities, vec![mount("")]);

    let ext4 = svc
        .validate_volume_capabilities(Request::new(check(
            "pvc-1",
            vec![mount("ext4")],
            HashMap::new(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(ext4.confirmed.is_some(), "{}", ext4.message);

    let unconfirmed = [
        check("pvc-1", vec![block()], HashMap::new()),
        check("pvc-1", vec![mount("xfs")], HashMap::new()),
        check(
            "pvc-1",
            vec![mount("")],
            HashMap::from([(MEDIA_PARAM.to_owned(), "hdd".to_owned())]),
        ),
    ];
    for req in unconfirmed {
        let resp = svc
            .validate_volume_capabilities(Request::new(req))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.confirmed.is_none());
        assert!(!resp.message.is_empty());
    }

    let err = svc
        .validate_volume_capabilities(Request::new(check("some-vol-id", vec![mount("")], nvme())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = svc
        .validate_volume_capabilities(Request::new(check("pvc-1", vec![], nvme())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = svc
        .validate_volume_capabilities(Request::new(check("", vec![mount("")], nvme())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

async fn list_page(
    svc: &ControllerService<MemoryStore>,
    max: i32,
    token: &str,
) -> Result<ListVolumesResponse, Status> {
    svc.list_volumes(Request::new(ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    }))
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn list_volumes_pages_with_tokens() {
    let svc = service(Agent::Instant);
    for i in 0..5 {
        create(&svc, create_req(&format!("pvc-{i}"), GIB as i64))
            .await
            .unwrap();
    }
    let all = list_page(&svc, 0, "").await.unwrap();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());

    let first = list_page(&svc, 2, "").await.unwrap();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    // The last volume of a page goes away between pages: the token holds.
    let last = first.entries[1].volume.as_ref().unwrap().volume_id.clone();
    svc.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: last,
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut ids: Vec<String> = Vec::new();
    let mut token = first.next_token;
    while !token.is_empty() {
        let page = list_page(&svc, 2, &token).await.unwrap();
        ids.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        token = page.next_token;
    }
    assert_eq!(ids, ["pvc-2", "pvc-3", "pvc-4"]);

    for token in ["invalid-token", "7"] {
        let err = list_page(&svc, 0, token).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{token}: {err:?}");
    }
    let err = list_page(&svc, -1, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

async fn capacity(svc: &ControllerService<MemoryStore>, req: GetCapacityRequest) -> i64 {
    svc.get_capacity(Request::new(req))
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

#[tokio::test]
async fn capacity_per_segment_and_class() {
    let svc = service(Agent::Instant);
    // No optional values: the largest free space of any class anywhere.
    assert_eq!(
        capacity(&svc, GetCapacityRequest::default()).await,
        1000 * GIB as i64
    );
    let segment = |node: &str| {
        Some(Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())]),
        })
    };
    let query = |node: Option<Topology>| GetCapacityRequest {
        parameters: nvme(),
        accessible_topology: node,
        volume_capabilities: vec![mount("")],
    };
    assert_eq!(capacity(&svc, query(None)).await, 200 * GIB as i64);
    assert_eq!(
        capacity(&svc, query(segment("node-a"))).await,
        100 * GIB as i64
    );
    assert_eq!(capacity(&svc, query(segment("node-z"))).await, 0);

    let mut req = create_req("pvc-1", 30 * GIB as i64);
    req.accessibility_requirements = on_node("node-a");
    create(&svc, req).await.unwrap();
    assert_eq!(
        capacity(&svc, query(segment("node-a"))).await,
        70 * GIB as i64
    );
    let resp = svc
        .get_capacity(Request::new(query(segment("node-a"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.maximum_volume_size, Some(70 * GIB as i64));
}

fn snapshot_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        parameters: HashMap::from([
            (
                "csi.storage.k8s.io/volumesnapshot/name".to_owned(),
                "daily".to_owned(),
            ),
            (
                "csi.storage.k8s.io/volumesnapshot/namespace".to_owned(),
                "db".to_owned(),
            ),
            (
                "csi.storage.k8s.io/volumesnapshotcontent/name".to_owned(),
                "snapcontent-1".to_owned(),
            ),
        ]),
        ..CreateSnapshotRequest::default()
    }
}

fn from_source(
    mut req: CreateVolumeRequest,
    source: volume_content_source::Type,
) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn from_snapshot(name: &str, snapshot: &str) -> CreateVolumeRequest {
    from_source(
        thin(create_req(name, 10 * GIB as i64), "2"),
        volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: snapshot.into(),
        }),
    )
}

#[tokio::test]
async fn snapshots_of_thin_volumes_restore_and_clone_on_their_node() {
    let svc = service(Agent::Instant);
    let mut origin = thin(create_req("pvc-1", 10 * GIB as i64), "2");
    origin.accessibility_requirements = on_node("node-b");
    create(&svc, origin).await.unwrap();

    let snapshot = svc
        .create_snapshot(Request::new(snapshot_req("snapshot-1", "pvc-1")))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        snapshot.snapshot_id, "snap-1",
        "LVM refuses names beginning with snapshot"
    );
    assert_eq!(snapshot.source_volume_id, "pvc-1");
    assert_eq!(snapshot.size_bytes, 10 * GIB as i64);
    assert!(snapshot.ready_to_use);
    assert!(snapshot.creation_time.is_some());
    // The same again is the same snapshot; the same name of another volume
    // is not.
    let again = svc
        .create_snapshot(Request::new(snapshot_req("snapshot-1", "pvc-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.snapshot.unwrap().snapshot_id, "snap-1");
    create(&svc, thin(create_req("pvc-2", GIB as i64), "2"))
        .await
        .unwrap();
    let err = svc
        .create_snapshot(Request::new(snapshot_req("snapshot-1", "pvc-2")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Snapshots are not volumes, nor volumes snapshots.
    let listed = list_page(&svc, 0, "").await.unwrap();
    assert!(
        listed
            .entries
            .iter()
            .all(|e| e.volume.as_ref().unwrap().volume_id != "snap-1")
    );
    let all = svc
        .list_snapshots(Request::new(ListSnapshotsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 1);
    for (filter, count) in [
        (
            ListSnapshotsRequest {
                source_volume_id: "pvc-1".into(),
                ..Default::default()
            },
            1,
        ),
        (
            ListSnapshotsRequest {
                source_volume_id: "pvc-2".into(),
                ..Default::default()
            },
            0,
        ),
        (
            ListSnapshotsRequest {
                snapshot_id: "snap-1".into(),
                ..Default::default()
            },
            1,
        ),
        (
            ListSnapshotsRequest {
                snapshot_id: "pvc-1".into(),
                ..Default::default()
            },
            0,
        ),
        (
            ListSnapshotsRequest {
                snapshot_id: "no/such".into(),
                ..Default::default()
            },
            0,
        ),
    ] {
        let got = svc
            .list_snapshots(Request::new(filter.clone()))
            .await
            .unwrap();
        assert_eq!(got.into_inner().entries.len(), count, "{filter:?}");
    }

    // A restore lands on the snapshot's node, whatever the request prefers
    // among the nodes it allows, and echoes its source.
    let restored = create(&svc, from_snapshot("pvc-r", "snap-1"))
        .await
        .unwrap();
    assert_eq!(node_of(&restored), "node-b");
    assert!(restored.content_source.is_some());
    let mut elsewhere = from_snapshot("pvc-x", "snap-1");
    elsewhere.accessibility_requirements = on_node("node-a");
    let err = create(&svc, elsewhere).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("node node-b"), "{err:?}");
    // Smaller than the snapshot, unknown, into a thick class: refused.
    let mut small = from_snapshot("pvc-s", "snap-1");
    small.capacity_range = Some(CapacityRange {
        required_bytes: GIB as i64,
        limit_bytes: GIB as i64,
    });
    assert_eq!(
        create(&svc, small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let err = create(&svc, from_snapshot("pvc-u", "snap-9"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut thick = from_snapshot("pvc-t", "snap-1");
    thick.parameters = nvme();
    let err = create(&svc, thick).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("thin"), "{err:?}");
    // A snapshot id is not a volume to clone, nor a volume id a snapshot.
    let clone_of = |name: &str, volume: &str| {
        from_source(
            thin(create_req(name, 10 * GIB as i64), "2"),
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: volume.into(),
            }),
        )
    };
    assert_eq!(
        create(&svc, clone_of("pvc-c0", "snap-1"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        create(&svc, from_snapshot("pvc-c1", "pvc-1"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let clone = create(&svc, clone_of("pvc-c", "pvc-1")).await.unwrap();
    assert_eq!(node_of(&clone), "node-b");

    // Thick volumes have no snapshots.
    create(&svc, create_req("pvc-thick", GIB as i64))
        .await
        .unwrap();
    let err = svc
        .create_snapshot(Request::new(snapshot_req("snapshot-2", "pvc-thick")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = svc
        .create_snapshot(Request::new(snapshot_req("snapshot-3", "pvc-none")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // DeleteVolume does not take a snapshot; DeleteSnapshot does, and only
    // once; deleting the origin leaves the snapshot.
    svc.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: "snap-1".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(svc_store(&svc).volume("snap-1").is_some());
    svc.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: "pvc-1".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(svc_store(&svc).volume("snap-1").is_some());
    for _ in 0..2 {
        svc.delete_snapshot(Request::new(DeleteSnapshotRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    assert!(svc_store(&svc).volume("snap-1").is_none());
    let err = svc
        .delete_snapshot(Request::new(DeleteSnapshotRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn publish_is_unimplemented() {
    let svc = service(Agent::Instant);
    let err = svc
        .controller_publish_volume(Request::new(ControllerPublishVolumeRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn identity_names_the_driver() {
    let identity = IdentityService::new(true, RpcMetrics::default());
    let info = identity
        .get_plugin_info(Request::new(GetPluginInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "lvmlocal.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = identity
        .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let has = |want: &plugin_capability::Type| caps.iter().any(|c| c.r#type.as_ref() == Some(want));
    let service = |t: plugin_capability::service::Type| {
        plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })
    };
    assert!(has(&service(
        plugin_capability::service::Type::ControllerService
    )));
    assert!(has(&service(
        plugin_capability::service::Type::VolumeAccessibilityConstraints
    )));
    assert!(has(&plugin_capability::Type::VolumeExpansion(
        plugin_capability::VolumeExpansion {
            r#type: plugin_capability::volume_expansion::Type::Online as i32
        }
    )));

    let node_only = IdentityService::new(false, RpcMetrics::default())
        .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(!node_only.iter().any(|c| c.r#type
        == Some(service(plugin_capability::service::Type::ControllerService))));

    let probe = identity
        .probe(Request::new(ProbeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn get_volume_reports_the_volume_and_its_condition() {
    let svc = service(Agent::Instant);
    let made = create(&svc, create_req("pvc-get", GIB as i64))
        .await
        .unwrap();
    let got = svc
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: made.volume_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.as_ref(), Some(&made));
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");

    let unknown = svc
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: "pvc-none".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad = svc
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: "../etc".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let listed = svc
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let status = listed.entries[0].status.as_ref().unwrap();
    assert!(!status.volume_condition.as_ref().unwrap().abnormal);
}
