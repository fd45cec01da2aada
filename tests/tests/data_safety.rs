//! What NodeStage, NodePublish and NodeUnstage refuse, on real LVM, real
//! mkfs and real mounts in the VM: a damaged filesystem is sent to fsck and
//! repaired, never formatted; a partition table is not a blank; a staging
//! mount with a live bind is not unmounted.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use lvmlocal_proto::csi::v1::{
    DeleteVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest,
};
use lvmlocal_tests::csi::{Agent, Csi, KUBELET_DIR, capability, create_request};
use lvmlocal_tests::guest::{http_get, run, workspace_binary};
use lvmlocal_tests::{GIB, Vm, vm_test};
use tonic::Code;

const SOCKET: &str = "/run/lvmlocal/csi.sock";

async fn start_agent() -> (Agent, Csi) {
    fs::create_dir_all("/run/lvmlocal").unwrap();
    Agent::start(&workspace_binary("csi-agent"), Path::new(SOCKET), "nvme")
        .await
        .unwrap()
}

/// Creates an ext4 volume `name` on NVMe and returns its device path.
async fn create(csi: &Csi, name: &str) -> String {
    let volume = csi
        .controller
        .clone()
        .create_volume(create_request(name, "nvme", Some("ext4"), GIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.volume_id, name);
    let device = format!("/dev/lvmlocal-nvme/{name}");
    assert!(Path::new(&device).exists(), "{device}");
    device
}

async fn delete(csi: &Csi, name: &str) {
    csi.controller
        .clone()
        .delete_volume(DeleteVolumeRequest {
            volume_id: name.into(),
            ..DeleteVolumeRequest::default()
        })
        .await
        .unwrap();
}

fn staging(name: &str) -> String {
    format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/{name}/globalmount")
}

fn stage_request(name: &str, path: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: name.into(),
        staging_target_path: path.into(),
        volume_capability: Some(capability(Some("ext4"))),
        ..NodeStageVolumeRequest::default()
    }
}

fn unstage_request(name: &str, path: &str) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: name.into(),
        staging_target_path: path.into(),
    }
}

/// The mount points in this mount namespace, as mountinfo spells them.
fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
        .collect()
}

fn mounted(path: &str) -> bool {
    mount_points().iter().any(|point| point == path)
}

fn tags(name: &str) -> String {
    run(
        "lvs",
        &[
            "--noheadings",
            "-o",
            "lv_tags",
            &format!("lvmlocal-nvme/{name}"),
        ],
    )
}

fn metrics() -> String {
    http_get("127.0.0.1:9808", "/metrics")
}

/// How many mkfs.ext4 runs succeeded, by the agent's own command metrics.
fn mkfs_runs() -> u32 {
    let line =
        r#"lvmlocal_agent_command_duration_seconds_count{program="mkfs.ext4",outcome="ok"} "#;
    metrics()
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .map_or(0, |count| count.trim().parse().unwrap())
}

fn read_at(device: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut file = fs::File::open(device).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut bytes = vec![0; len];
    file.read_exact(&mut bytes).unwrap();
    bytes
}

vm_test!(
    a_damaged_superblock_is_sent_to_fsck_and_never_formatted,
    Vm::new().nvme("nvme-a", 5, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            let mut node = csi.node.clone();
            let device = create(&csi, "damaged").await;
            let staging = staging("damaged");
            let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();

            node.node_stage_volume(stage_request("damaged", &staging))
                .await
                .unwrap();
            assert_eq!(mkfs_runs(), 1);
            assert!(
                tags("damaged").contains("lvmlocal.io/formatted=ext4"),
                "{}",
                tags("damaged")
            );
            fs::write(format!("{staging}/data"), &payload).unwrap();
            node.node_unstage_volume(unstage_request("damaged", &staging))
                .await
                .unwrap();
            assert!(!mounted(&staging));

            // The primary superblock: bytes 1024..2047.
            run(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={device}"),
                    "bs=1024",
                    "seek=1",
                    "count=1",
                    "conv=notrunc,fsync",
                ],
            );
            let wipefs = run("wipefs", &["--no-act", "--noheadings", &device]);
            assert_eq!(wipefs.trim(), "", "blkid still sees a filesystem");

            let refused = node
                .node_stage_volume(stage_request("damaged", &staging))
                .await
                .expect_err("a recorded filesystem that is gone must be refused");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            for said in ["damaged", "e2fsck", "will not be formatted"] {
                assert!(refused.message().contains(said), "{refused:?}");
            }
            assert!(!mounted(&staging), "a refused stage mounted");
            assert_eq!(mkfs_runs(), 1, "the damaged volume was formatted");
            assert_eq!(
                read_at(&device, 1024, 1024),
                vec![0; 1024],
                "something wrote a new superblock"
            );

            let fsck = Command::new("e2fsck")
                .args(["-fy", "-b", "32768", &device])
                .output()
                .unwrap();
            // 1: errors were found and corrected.
            assert!(
                matches!(fsck.status.code(), Some(0 | 1)),
                "e2fsck: {:?}\n{}",
                fsck.status,
                String::from_utf8_lossy(&fsck.stdout)
            );
            node.node_stage_volume(stage_request("damaged", &staging))
                .await
                .unwrap();
            assert!(mounted(&staging));
            assert_eq!(
                fs::read(format!("{staging}/data")).unwrap(),
                payload,
                "the file did not survive"
            );
            assert_eq!(mkfs_runs(), 1);
            node.node_unstage_volume(unstage_request("damaged", &staging))
                .await
                .unwrap();
            delete(&csi, "damaged").await;
        });
    }
);

vm_test!(
    a_partition_table_is_not_a_blank_volume,
    Vm::new().nvme("nvme-a", 5, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            let device = create(&csi, "parted").await;
            let staging = staging("parted");
            let sfdisk = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "printf 'label: dos\\n,,L\\n' | sfdisk -q --no-reread --no-tell-kernel {device}"
                    ),
                ])
                .status()
                .unwrap();
            assert!(sfdisk.success(), "sfdisk: {sfdisk}");
            let before = run("wipefs", &["--no-act", "--noheadings", &device]);
            assert!(before.contains("dos"), "{before}");

            let refused = csi
                .node
                .clone()
                .node_stage_volume(stage_request("parted", &staging))
                .await
                .expect_err("a partition table must be refused");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(
                refused.message().contains("partition-table"),
                "{refused:?}"
            );
            assert!(!mounted(&staging));
            assert_eq!(mkfs_runs(), 0, "formatted over a partition table");
            assert_eq!(
                run("wipefs", &["--no-act", "--noheadings", &device]),
                before,
                "the signatures changed"
            );
            assert!(!tags("parted").contains("formatted"), "{}", tags("parted"));
            delete(&csi, "parted").await;
        });
    }
);

vm_test!(
    mounts_in_use_are_neither_unstaged_nor_staged_twice,
    Vm::new().nvme("nvme-a", 5, 4 * GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent().await;
            let mut node = csi.node.clone();
            create(&csi, "bound").await;
            let staging = staging("bound");
            let target = format!("{KUBELET_DIR}/pods/p/volumes/kubernetes.io~csi/bound/mount");
            node.node_stage_volume(stage_request("bound", &staging))
                .await
                .unwrap();
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id: "bound".into(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(capability(Some("ext4"))),
                ..NodePublishVolumeRequest::default()
            })
            .await
            .unwrap();

            let refused = node
                .node_unstage_volume(unstage_request("bound", &staging))
                .await
                .expect_err("unstaging under a live bind must be refused");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains(&target), "{refused:?}");
            assert!(
                mounted(&staging) && mounted(&target),
                "something was unmounted"
            );

            let second = staging.replace("/bound/", "/bound-again/");
            let refused = node
                .node_stage_volume(stage_request("bound", &second))
                .await
                .expect_err("a device mounted elsewhere must not be staged again");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains(&staging), "{refused:?}");
            assert!(!mounted(&second));

            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: "bound".into(),
                target_path: target.clone(),
            })
            .await
            .unwrap();
            node.node_unstage_volume(unstage_request("bound", &staging))
                .await
                .unwrap();
            assert!(!mounted(&staging) && !mounted(&target));
            delete(&csi, "bound").await;
        });
    }
);
