//! Thin volumes in the VM on real LVM, through the agent's CSI services: the
//! thin pool made by the first thin volume and grown by the next, charged
//! by the overprovisioning ratio, zeroing every block before a volume sees
//! it, and failing writes at once when it is full.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use lvmlocal_proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
    GetCapacityRequest,
};
use lvmlocal_proto::thin::{OVERPROVISION_PARAM, PROVISIONING_PARAM};
use lvmlocal_tests::csi::{Agent, Csi, capacity_request, create_request};
use lvmlocal_tests::guest::{run, workspace_binary};
use lvmlocal_tests::{GIB, MIB, Vm, vm_test};
use tonic::Code;

const SOCKET: &str = "/run/lvmlocal/csi.sock";
const VG: &str = "lvmlocal-nvme";
const POOL: &str = "lvmlocal_thinpool";
/// 32 bytes no zeroing makes by chance.
const MARKER: &[u8; 32] = b"lvmlocal-thin-test-earlier-data!";

fn thin(mut req: CreateVolumeRequest, ratio: &str) -> CreateVolumeRequest {
    req.parameters
        .insert(PROVISIONING_PARAM.into(), "thin".into());
    req.parameters
        .insert(OVERPROVISION_PARAM.into(), ratio.into());
    req
}

fn thin_capacity(ratio: &str) -> GetCapacityRequest {
    let mut req = capacity_request("nvme");
    req.parameters
        .insert(PROVISIONING_PARAM.into(), "thin".into());
    req.parameters
        .insert(OVERPROVISION_PARAM.into(), ratio.into());
    req
}

async fn capacity(csi: &Csi, req: GetCapacityRequest) -> u64 {
    let answer = csi.controller.clone().get_capacity(req).await.unwrap();
    answer.into_inner().available_capacity as u64
}

fn lv_field(lv: &str, field: &str) -> String {
    run(
        "lvs",
        &[
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            field,
            &format!("{VG}/{lv}"),
        ],
    )
    .trim()
    .to_owned()
}

fn lv_exists(lv: &str) -> bool {
    run("lvs", &["--noheadings", "-o", "lv_name", VG])
        .lines()
        .any(|line| line.trim() == lv)
}

fn write_marker(device: &str, len: u64) {
    let mut file = fs::OpenOptions::new().write(true).open(device).unwrap();
    let chunk: Vec<u8> = MARKER.iter().copied().cycle().take(MIB as usize).collect();
    for _ in 0..len / MIB {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
}

/// Writes 4 KiB of 0xa5 at the start of every 64 KiB (the pool's chunk) of
/// the first `len` bytes of `device`, then drops the page cache so reads
/// come from the device; the bytes written.
fn write_sparse(device: &str, len: u64) -> usize {
    let mut file = fs::OpenOptions::new().write(true).open(device).unwrap();
    let block = [0xa5u8; 4096];
    let mut written = 0;
    for offset in (0..len).step_by(64 << 10) {
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&block).unwrap();
        written += block.len();
    }
    file.sync_all().unwrap();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    written
}

/// Markers and non-zero bytes in the first `len` bytes of `device`.
fn scan(device: &str, len: u64) -> (usize, usize) {
    let mut file = File::open(device).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut buffer = vec![0u8; MIB as usize];
    let (mut markers, mut nonzero) = (0, 0);
    for _ in 0..len / MIB {
        file.read_exact(&mut buffer).unwrap();
        markers += buffer
            .chunks_exact(MARKER.len())
            .filter(|chunk| *chunk == MARKER)
            .count();
        nonzero += buffer.iter().filter(|byte| **byte != 0).count();
    }
    (markers, nonzero)
}

vm_test!(
    thin_volumes_share_a_zeroing_pool_charged_by_the_ratio,
    Vm::new().nvme("nvme-a", 5, GIB),
    {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            fs::create_dir_all("/run/lvmlocal").unwrap();
            let (agent, _) = Agent::start_with_env(
                &workspace_binary("csi-agent"),
                Path::new(SOCKET),
                "nvme",
                &[],
            )
            .await
            .unwrap();

            // Free extents that hold somebody's data: without zeroing, a thin
            // volume on them would show it.
            run(
                "lvcreate",
                &["-n", "dirty", "-L", "300m", "-W", "n", "-Z", "n", VG],
            );
            write_marker(&format!("/dev/{VG}/dirty"), 300 * MIB);
            run("lvremove", &["--yes", &format!("{VG}/dirty")]);
            // Started again, it reads the group without the LV made behind
            // its back.
            agent.kill();
            let (agent, csi) = Agent::start_with_env(
                &workspace_binary("csi-agent"),
                Path::new(SOCKET),
                "nvme",
                &[],
            )
            .await
            .unwrap();

            let thick = capacity(&csi, capacity_request("nvme")).await;
            assert!(thick > 900 * MIB, "{thick}");
            assert_eq!(capacity(&csi, thin_capacity("4")).await, 4 * thick);
            assert_eq!(capacity(&csi, thin_capacity("1.5")).await, thick * 3 / 2);

            // At a ratio of 4, 1 GiB is charged 256 MiB.
            let created = csi
                .controller
                .clone()
                .create_volume(thin(create_request("thin-a", "nvme", None, GIB), "4"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(created.volume.unwrap().capacity_bytes as u64, GIB);
            assert!(lv_field("thin-a", "lv_attr").starts_with('V'), "not thin");
            assert_eq!(lv_field("thin-a", "pool_lv"), POOL);
            assert_eq!(lv_field("thin-a", "lv_size"), GIB.to_string());
            assert!(lv_field("thin-a", "lv_tags").contains("lvmlocal.io/thin=400"));
            assert_eq!(lv_field(POOL, "lv_size"), (256 * MIB).to_string());
            let pool_attr = lv_field(POOL, "lv_attr");
            assert!(pool_attr.starts_with('t'), "{pool_attr}");
            assert_eq!(lv_field(POOL, "zero"), "zero");

            // The pool's blocks were somebody's: a block written in part
            // shows only what was written, zeros around it.
            let device = format!("/dev/{VG}/thin-a");
            let written = write_sparse(&device, 16 * MIB);
            assert_eq!(scan(&device, 16 * MIB), (0, written));

            // What is left for thick volumes lost the pool's extents.
            let after = capacity(&csi, capacity_request("nvme")).await;
            assert!(after <= thick - 256 * MIB, "{after} of {thick}");

            // 3 GiB more would take 768 MiB more of the group: refused, and
            // nothing is made.
            let refused = csi
                .controller
                .clone()
                .create_volume(thin(create_request("thin-b", "nvme", None, 3 * GIB), "4"))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
            assert!(!lv_exists("thin-b"));

            // Writes beyond what the pool holds fail at once, and say so.
            let full = Command::new("dd")
                .args([
                    "if=/dev/zero",
                    &format!("of={device}"),
                    "bs=1M",
                    "count=300",
                    "oflag=direct",
                ])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&full.stderr);
            assert!(
                !full.status.success(),
                "300 MiB fit a 256 MiB pool: {stderr}"
            );
            assert!(
                stderr.contains("Input/output error") || stderr.contains("No space left"),
                "{stderr}"
            );
            assert_eq!(lv_field(POOL, "data_percent"), "100.00");

            // Its blocks go back to the pool, where the next thin volume
            // takes them without the pool growing, and reads zeros again.
            csi.controller
                .clone()
                .delete_volume(DeleteVolumeRequest {
                    volume_id: "thin-a".into(),
                    ..DeleteVolumeRequest::default()
                })
                .await
                .unwrap();
            assert!(!lv_exists("thin-a"));
            assert_eq!(lv_field(POOL, "data_percent"), "0.00");
            csi.controller
                .clone()
                .create_volume(thin(create_request("thin-b", "nvme", None, GIB), "4"))
                .await
                .unwrap();
            assert_eq!(lv_field(POOL, "lv_size"), (256 * MIB).to_string());
            let device = format!("/dev/{VG}/thin-b");
            let written = write_sparse(&device, 16 * MIB);
            assert_eq!(scan(&device, 16 * MIB), (0, written));

            // Growing a thin volume grows the pool by its charge.
            csi.controller
                .clone()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: "thin-b".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: (2 * GIB) as i64,
                        limit_bytes: 0,
                    }),
                    ..ControllerExpandVolumeRequest::default()
                })
                .await
                .unwrap();
            assert_eq!(lv_field("thin-b", "lv_size"), (2 * GIB).to_string());
            assert_eq!(lv_field(POOL, "lv_size"), (512 * MIB).to_string());

            // A restarted agent reads the ratio back from the LV's tags.
            agent.kill();
            let (_agent, csi) = Agent::start_with_env(
                &workspace_binary("csi-agent"),
                Path::new(SOCKET),
                "nvme",
                &[],
            )
            .await
            .unwrap();
            let left = capacity(&csi, capacity_request("nvme")).await;
            assert!(
                left <= 1024 * MIB - 512 * MIB,
                "the pool's extents are free again after a restart: {left}"
            );
        });
    }
);
