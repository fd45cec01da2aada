use std::collections::HashMap;

use lvmlocal_proto::csi::v1::{
    CapacityRange, CreateVolumeRequest, Topology, TopologyRequirement, VolumeCapability,
    controller_server, identity_server, node_server, volume_capability,
};
use lvmlocal_proto::{MediaClass, TOPOLOGY_KEY};
use prost::Message;

#[test]
fn create_volume_request_survives_the_wire() {
    let node = Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), "worker-1".to_owned())]),
    };
    let request = CreateVolumeRequest {
        name: "pvc-0b7c".to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: 10 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: "xfs".to_owned(),
                    mount_flags: vec!["noatime".to_owned()],
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        parameters: HashMap::from([("lvmlocal.io/media".to_owned(), MediaClass::Nvme.to_string())]),
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![node.clone()],
            preferred: vec![node],
        }),
        ..Default::default()
    };

    let bytes = request.encode_to_vec();
    let decoded = CreateVolumeRequest::decode(bytes.as_slice()).unwrap();

    assert_eq!(decoded, request);
    assert_eq!(decoded.capacity_range.unwrap().required_bytes, 10 << 30);
    assert_eq!(decoded.parameters["lvmlocal.io/media"], "nvme");
}

#[test]
fn services_use_the_csi_v1_names() {
    // kubelet and the sidecars dial these exact service names.
    assert_eq!(identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(controller_server::SERVICE_NAME, "csi.v1.Controller");
    assert_eq!(node_server::SERVICE_NAME, "csi.v1.Node");
}
