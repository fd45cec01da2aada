//! The CSI services of a standalone agent, over its real unix socket, in the
//! VM: whole volume lives with every call sent twice, bad input refused with
//! the right code and no change, and a create cut short by a crash.

use std::path::Path;
use std::time::Duration;

use std::os::fd::AsRawFd;
use std::time::Instant;

use lvmlocal_proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, NodeGetCapabilitiesRequest,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodeStageVolumeRequest,
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

/// How often the agent ran `program` successfully, from its metrics.
fn runs_of(program: &str) -> u64 {
    let metrics = http_get("127.0.0.1:9808", "/metrics");
    let counter = format!(
        r#"lvmlocal_agent_command_duration_seconds_count{{program="{program}",outcome="ok"}} "#
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&counter))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// Mounts a FUSE filesystem at `target` whose server never answers: every
/// call that reaches it waits, as on a dead device or a stuck network
/// mount. The returned device stays open as long as the hang should last.
fn hang_at(target: &str) -> std::fs::File {
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("/dev/fuse (the fuse module)");
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        fuse.as_raw_fd()
    );
    nix::mount::mount(
        Some("hung"),
        target,
        Some("fuse.hung"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .expect("mounting the hung filesystem");
    fuse
}

vm_test!(
    node_calls_cost_no_lvm_serialize_per_volume_and_survive_a_hung_path,
    Vm::new().nvme("nvme-a", 5, 8 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            // Only this test's calls change LVM: no periodic rescan.
            std::fs::write("/run/lvmlocal-quiet.toml", "rescan_interval_secs = 3600\n").unwrap();
            std::fs::create_dir_all("/run/lvmlocal").unwrap();
            let (_agent, csi) = Agent::start_with_env(
                &workspace_binary("csi-agent"),
                Path::new(SOCKET),
                "nvme",
                &[("LVMLOCAL_CONFIG", "/run/lvmlocal-quiet.toml")],
            )
            .await
            .unwrap();
            let mut controller = csi.controller.clone();
            let mut node = csi.node.clone();
            let create = |name: &str| create_request(name, "nvme", Some("ext4"), GIB);
            let staging = |id: &str| {
                format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/{id}/globalmount")
            };
            let target =
                |id: &str| format!("{KUBELET_DIR}/pods/p/volumes/kubernetes.io~csi/{id}/mount");
            let stage = |id: &str| NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging(id),
                volume_capability: Some(capability(Some("ext4"))),
                ..NodeStageVolumeRequest::default()
            };
            let publish = |id: &str| NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging(id),
                target_path: target(id),
                volume_capability: Some(capability(Some("ext4"))),
                ..NodePublishVolumeRequest::default()
            };
            let stats = |id: &str| NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: target(id),
                ..NodeGetVolumeStatsRequest::default()
            };
            for id in ["used", "hung"] {
                controller.create_volume(create(id)).await.unwrap();
            }

            // Concurrent stages of one volume: one runs, the others are
            // told an operation is in progress; one format, one mount.
            let mkfs_before = runs_of("mkfs.ext4");
            let calls = (0..4).map(|_| {
                let mut node = node.clone();
                let request = stage("used");
                async move { node.node_stage_volume(request).await }
            });
            let answers = futures::future::join_all(calls).await;
            let aborted: Vec<_> = answers
                .iter()
                .filter_map(|answer| answer.as_ref().err())
                .inspect(|status| {
                    assert_eq!(status.code(), Code::Aborted, "{status:?}");
                    assert!(status.message().contains("in progress"), "{status:?}");
                })
                .collect();
            assert!(!aborted.is_empty() && aborted.len() < 4, "{answers:?}");
            assert_eq!(runs_of("mkfs.ext4"), mkfs_before + 1);
            node.node_stage_volume(stage("used")).await.unwrap();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert_eq!(mounts.matches(&staging("used")).count(), 1, "{mounts}");
            for id in ["used", "hung"] {
                node.node_stage_volume(stage(id)).await.unwrap();
                node.node_publish_volume(publish(id)).await.unwrap();
            }

            // Stats while volumes are created: answered from the index,
            // no LVM command, and nothing the creates need re-read.
            let lvm = || (runs_of("lvs"), runs_of("vgs"));
            let before = lvm();
            let creates = (0..3).map(|n| {
                let mut controller = controller.clone();
                let request = create(&format!("new-{n}"));
                async move { controller.create_volume(request).await }
            });
            let polls = (0..30).map(|_| {
                let mut node = node.clone();
                let request = stats("used");
                async move { node.node_get_volume_stats(request).await }
            });
            let (created, polled) = tokio::join!(
                futures::future::join_all(creates),
                futures::future::join_all(polls)
            );
            for answer in created {
                answer.unwrap();
            }
            for answer in polled {
                let answer: NodeGetVolumeStatsResponse = answer.unwrap().into_inner();
                assert!(answer.usage[0].total > 0, "{answer:?}");
                let condition = answer.volume_condition.unwrap();
                assert!(!condition.abnormal, "{condition:?}");
            }
            assert_eq!(lvm(), before, "stats or creates read LVM again");

            // A hung filesystem over one volume's path (mounted on its
            // directory, so even the lookup of the path waits): its stats
            // answer an abnormal condition at the deadline, the agent goes on.
            let hung_dir = Path::new(&target("hung")).parent().unwrap().to_owned();
            let _hang = hang_at(hung_dir.to_str().unwrap());
            let started = Instant::now();
            let hung = tokio::time::timeout(
                Duration::from_secs(60),
                node.node_get_volume_stats(stats("hung")),
            )
            .await
            .expect("the stats call on a hung path answers")
            .unwrap()
            .into_inner();
            let took = started.elapsed();
            println!("stats on a hung path answered in {took:?}");
            let condition = hung.volume_condition.unwrap();
            assert!(condition.abnormal, "{condition:?}");
            assert!(
                condition.message.contains("did not answer within"),
                "{condition:?}"
            );
            let again = node
                .node_get_volume_stats(stats("hung"))
                .await
                .unwrap()
                .into_inner();
            let condition = again.volume_condition.unwrap();
            assert!(
                condition.message.contains("has not answered"),
                "{condition:?}"
            );
            node.node_get_capabilities(NodeGetCapabilitiesRequest {})
                .await
                .unwrap();
            let healthy = node
                .node_get_volume_stats(stats("used"))
                .await
                .unwrap()
                .into_inner();
            assert!(!healthy.volume_condition.unwrap().abnormal);
            assert!(http_get("127.0.0.1:9808", "/healthz").starts_with("HTTP/1.1 200"));
        });
    }
);

vm_test!(
    filesystem_errors_the_kernel_logs_make_a_volume_abnormal,
    Vm::new().nvme("nvme-a", 5, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            let mut controller = csi.controller.clone();
            let mut node = csi.node.clone();
            let staging = |id: &str| {
                format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/{id}/globalmount")
            };
            let stats = |id: &str| NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: staging(id),
                ..NodeGetVolumeStatsRequest::default()
            };
            let volumes = [
                ("broken-ext4", "ext4"),
                ("broken-xfs", "xfs"),
                ("sound", "ext4"),
            ];
            for (id, fs) in volumes {
                controller
                    .create_volume(create_request(id, "nvme", Some(fs), GIB))
                    .await
                    .unwrap();
                node.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: id.into(),
                    staging_target_path: staging(id),
                    volume_capability: Some(capability(Some(fs))),
                    ..NodeStageVolumeRequest::default()
                })
                .await
                .unwrap();
                let condition = node
                    .node_get_volume_stats(stats(id))
                    .await
                    .unwrap()
                    .into_inner()
                    .volume_condition
                    .unwrap();
                assert!(!condition.abnormal, "{id}: {condition:?}");
            }

            // A real error in the kernel's ext4, and a real XFS shutdown.
            let minor = run(
                "lvs",
                &[
                    "--noheadings",
                    "-o",
                    "lv_kernel_minor",
                    "lvmlocal-nvme/broken-ext4",
                ],
            );
            let dm = format!("dm-{}", minor.trim());
            std::fs::write(
                format!("/sys/fs/ext4/{dm}/trigger_fs_error"),
                "injected by the test",
            )
            .unwrap();
            run("xfs_io", &["-x", "-c", "shutdown", &staging("broken-xfs")]);

            for (id, said) in [
                ("broken-ext4", "injected by the test"),
                ("broken-xfs", "Shutting down filesystem"),
            ] {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let condition = node
                        .node_get_volume_stats(stats(id))
                        .await
                        .unwrap()
                        .into_inner()
                        .volume_condition
                        .unwrap();
                    if condition.abnormal && condition.message.contains(said) {
                        assert!(
                            condition.message.contains("filesystem or I/O error"),
                            "{id}: {condition:?}"
                        );
                        break;
                    }
                    assert!(Instant::now() < deadline, "{id}: {condition:?}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            let condition = node
                .node_get_volume_stats(stats("sound"))
                .await
                .unwrap()
                .into_inner()
                .volume_condition
                .unwrap();
            assert!(
                !condition.abnormal,
                "another volume's errors are not its: {condition:?}"
            );
        });
    }
);
