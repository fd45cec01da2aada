//! The CSI services of a standalone agent, over its real unix socket, in the
//! VM: whole volume lives with every call sent twice, bad input refused with
//! the right code and no change, and a create cut short by a crash.

use std::path::Path;
use std::time::Duration;

use lvmlocal_proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    volume_capability::{AccessType, MountVolume},
};
use lvmlocal_tests::csi::{Agent, Csi, KUBELET_DIR, Walk, capability, create_request, walk};
use lvmlocal_tests::guest::{http_get, run, workspace_binary};
use lvmlocal_tests::{GIB, Vm, vm_test};
use tonic::Code;

const SOCKET: &str = "/run/lvmlocal/csi.sock";

async fn start_agent() -> (Agent, Csi) {
    std::fs::create_dir_all("/run/lvmlocal").unwrap();
    Agent::start(&workspace_binary("csi-agent"), Path::new(SOCKET), "nvme")
        .await
        .unwrap()
}

fn lv_names() -> String {
    run(
        "lvs",
        &[
            "--noheadings",
            "-o",
            "vg_name,lv_name,lv_size",
            "--units",
            "b",
        ],
    )
}

/// The gRPC code of a call that must fail.
fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("the call must be refused").code()
}

fn print_step(name: &str, took: Duration, detail: String) {
    println!("{name:<24} {took:>9.1?}  {detail}");
}

vm_test!(
    whole_lives_with_every_call_sent_twice,
    Vm::new()
        .nvme("nvme-a", 5, 4 * GIB)
        .hdd("hdd-a", 0, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            for (name, media, fs) in [
                ("life-ext4", "nvme", Some("ext4")),
                ("life-xfs", "hdd", Some("xfs")),
                ("life-block", "nvme", None),
            ] {
                let plan = Walk {
                    name: name.into(),
                    media: media.into(),
                    fs: fs.map(str::to_owned),
                    size: GIB,
                    grown: 2 * GIB,
                    twice: true,
                };
                walk(&csi, &plan, &mut print_step)
                    .await
                    .unwrap_or_else(|err| panic!("{name}: {err:#}"));
            }
            assert_eq!(lv_names().trim(), "", "volumes left behind");
            let metrics = http_get("127.0.0.1:9808", "/metrics");
            for counted in [
                r#"lvmlocal_agent_csi_operations_total{method="CreateVolume",code="Ok"} 6"#,
                r#"lvmlocal_agent_csi_operations_total{method="NodeStageVolume",code="Ok"} 6"#,
                r#"lvmlocal_agent_command_duration_seconds_count{program="lvcreate",outcome="ok"} 3"#,
                r#"lvmlocal_agent_command_duration_seconds_count{program="lvremove",outcome="ok"} 3"#,
            ] {
                assert!(metrics.contains(counted), "no {counted} in\n{metrics}");
            }
        });
    }
);

vm_test!(
    bad_input_is_refused_with_the_right_code_and_changes_nothing,
    Vm::new().nvme("nvme-a", 5, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            let mut controller = csi.controller.clone();
            let mut node = csi.node.clone();
            let kept = controller
                .create_volume(create_request("kept", "nvme", Some("ext4"), GIB))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            let before = lv_names();

            let out_of_space = controller
                .create_volume(create_request("huge", "nvme", Some("ext4"), 100 * GIB))
                .await;
            assert_eq!(code(out_of_space), Code::ResourceExhausted);
            let unknown_class = controller
                .create_volume(create_request("floppy", "floppy", Some("ext4"), GIB))
                .await;
            assert_eq!(code(unknown_class), Code::InvalidArgument);
            let shell_fs = controller
                .create_volume(create_request("shell", "nvme", Some("ext4; rm -rf /"), GIB))
                .await;
            assert_eq!(code(shell_fs), Code::InvalidArgument);
            let zero = controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: kept.volume_id.clone(),
                    capacity_range: Some(CapacityRange::default()),
                    ..ControllerExpandVolumeRequest::default()
                })
                .await;
            assert_eq!(code(zero), Code::InvalidArgument);

            let staging =
                format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/kept/globalmount");
            let stage = |id: &str, path: &str, fs: &str| NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path.into(),
                volume_capability: Some(lvmlocal_proto::csi::v1::VolumeCapability {
                    access_type: Some(AccessType::Mount(MountVolume {
                        fs_type: fs.into(),
                        ..MountVolume::default()
                    })),
                    ..capability(Some("ext4"))
                }),
                ..NodeStageVolumeRequest::default()
            };
            for (request, want) in [
                (stage("../../etc", &staging, "ext4"), Code::InvalidArgument),
                (
                    stage("kept", "/etc/lvmlocal", "ext4"),
                    Code::InvalidArgument,
                ),
                (
                    stage("kept", &format!("{KUBELET_DIR}/../../etc"), "ext4"),
                    Code::InvalidArgument,
                ),
                (
                    stage("kept", &staging, "ext4; rm -rf /"),
                    Code::InvalidArgument,
                ),
                (stage("nope", &staging, "ext4"), Code::NotFound),
            ] {
                let answer = node.node_stage_volume(request.clone()).await;
                assert_eq!(code(answer), want, "{request:?}");
            }
            let publish = NodePublishVolumeRequest {
                volume_id: kept.volume_id.clone(),
                staging_target_path: staging.clone(),
                target_path: "/tmp/escape".into(),
                volume_capability: Some(capability(Some("ext4"))),
                ..NodePublishVolumeRequest::default()
            };
            assert_eq!(
                code(node.node_publish_volume(publish).await),
                Code::InvalidArgument
            );

            assert_eq!(lv_names(), before, "a refused call changed the volumes");
            assert!(!Path::new("/etc/lvmlocal").exists());
            assert!(
                !Path::new(&staging).exists(),
                "a refused stage made its directory"
            );
        });
    }
);

vm_test!(
    a_create_cut_short_by_a_crash_is_finished_by_the_retry,
    Vm::new().nvme("nvme-a", 5, 8 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (agent, csi) = start_agent().await;
            let request = create_request("crash-test", "nvme", Some("xfs"), 2 * GIB);
            let mut controller = csi.controller.clone();
            let call = tokio::spawn({
                let request = request.clone();
                async move { controller.create_volume(request).await }
            });
            // Kill the agent while the create is under way.
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.kill();
            let _ = call.await;

            let (_agent, csi) = start_agent().await;
            let volume = csi
                .controller
                .clone()
                .create_volume(request)
                .await
                .expect("the retried create succeeds")
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(volume.volume_id, "crash-test");
            assert_eq!(volume.capacity_bytes, 2 * GIB as i64);
            let lvs = lv_names();
            assert_eq!(lvs.matches("crash-test").count(), 1, "{lvs}");
            let tags = run(
                "lvs",
                &["--noheadings", "-o", "lv_tags", "lvmlocal-nvme/crash-test"],
            );
            assert!(tags.contains("lvmlocal.io/access=xfs"), "{tags}");
        });
    }
);
