//! What one tenant leaves on the disk never reaches the next, in the VM on
//! real LVM: a deleted volume's blocks are zeroed before its extents are
//! free, and a create cut short (the agent's processes killed at each step,
//! or the VM's power cut) leaves an LV marked `creating` that is erased and
//! completed before anyone is handed it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lvmlocal_proto::csi::v1::{DeleteVolumeRequest, ListVolumesRequest};
use lvmlocal_tests::csi::{Agent, Csi, create_request};
use lvmlocal_tests::guest::{self, run, workspace_binary};
use lvmlocal_tests::{GIB, MIB, Vm, vm_test};

const SOCKET: &str = "/run/lvmlocal/csi.sock";
/// 32 bytes no zeroing or wiping makes by chance.
const MARKER: &[u8; 32] = b"lvmlocal-test-marker-tenant-A-01";
/// Where the commands the agent runs are slowed down (see `Shim`).
const SHIM: &str = "/tmp/lvmlocal-shim";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

async fn start_agent(env: &[(&str, &str)]) -> (Agent, Csi) {
    fs::create_dir_all("/run/lvmlocal").unwrap();
    Agent::start_with_env(
        &workspace_binary("csi-agent"),
        Path::new(SOCKET),
        "nvme",
        env,
    )
    .await
    .unwrap()
}

fn lvs(field: &str, lv: &str) -> String {
    run("lvs", &["--noheadings", "-o", field, lv])
        .trim()
        .to_owned()
}

fn lv_count(vg: &str) -> usize {
    run("lvs", &["--noheadings", "-o", "lv_name", vg])
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count()
}

fn fill_with_marker(device: &str, offset: u64, len: u64) {
    let mut file = OpenOptions::new().write(true).open(device).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let chunk: Vec<u8> = MARKER.iter().copied().cycle().take(MIB as usize).collect();
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        file.write_all(&chunk[..n as usize]).unwrap();
        left -= n;
    }
    file.sync_all().unwrap();
}

/// Markers and non-zero bytes in `len` bytes of `device` from `offset`.
/// Extents are whole MiBs, so a marker left on them sits 32-byte aligned.
fn scan(device: &str, offset: u64, len: u64) -> (usize, usize) {
    let mut file = File::open(device).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buffer = vec![0u8; MIB as usize];
    let (mut markers, mut nonzero) = (0, 0);
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        file.read_exact(&mut buffer[..n]).unwrap();
        markers += buffer[..n]
            .chunks_exact(MARKER.len())
            .filter(|chunk| *chunk == MARKER)
            .count();
        nonzero += buffer[..n].iter().filter(|byte| **byte != 0).count();
        left -= n as u64;
    }
    (markers, nonzero)
}

fn size_of(device: &str) -> u64 {
    run("blockdev", &["--getsize64", device])
        .trim()
        .parse()
        .unwrap()
}

async fn create(csi: &Csi, name: &str, media: &str, fs: Option<&str>, bytes: u64) {
    csi.controller
        .clone()
        .create_volume(create_request(name, media, fs, bytes))
        .await
        .unwrap_or_else(|err| panic!("CreateVolume {name}: {err}"));
}

async fn delete(csi: &Csi, name: &str) {
    csi.controller
        .clone()
        .delete_volume(DeleteVolumeRequest {
            volume_id: name.to_owned(),
            ..DeleteVolumeRequest::default()
        })
        .await
        .unwrap_or_else(|err| panic!("DeleteVolume {name}: {err}"));
}

vm_test!(
    a_new_volume_shows_nothing_of_a_deleted_one,
    Vm::new().nvme("nvme-a", 5, GIB).hdd("hdd-a", 0, GIB),
    {
        let size = 128 * MIB;
        // The check can fail: without zeroing, a new LV on the same
        // extents shows every marker of the old one.
        let vg = "lvmlocal-probe";
        let disk = format!("/dev/{}", guest::disk_at("/0000:00:05.0/"));
        run("vgcreate", &[vg, &disk]);
        let old = bare_lvcreate(vg, "old", size);
        fill_with_marker(&old, 0, size);
        run("lvremove", &["--yes", &format!("{vg}/old")]);
        let new = bare_lvcreate(vg, "new", size);
        let (markers, _) = scan(&new, 0, size);
        assert_eq!(markers as u64, size / 32, "bare LVM shows the old blocks");
        run("vgremove", &["--yes", vg]);
        run("pvremove", &[&disk]);
        run("wipefs", &["--all", &disk]);

        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (_agent, csi) = start_agent(&[]).await;
            for media in ["nvme", "hdd"] {
                let vg = format!("lvmlocal-{media}");
                let (old, new) = (format!("old-{media}"), format!("new-{media}"));
                create(&csi, &old, media, None, size).await;
                let device = format!("/dev/{vg}/{old}");
                let extents = lvs("seg_pe_ranges", &format!("{vg}/{old}"));
                fill_with_marker(&device, 0, size);
                let (markers, _) = scan(&device, size - MIB, MIB);
                assert_eq!(markers as u64, MIB / 32, "the marker reached the end");
                let started = Instant::now();
                delete(&csi, &old).await;
                let deleted = started.elapsed();

                create(&csi, &new, media, None, size).await;
                assert_eq!(lv_count(&vg), 1, "nothing else is in {vg}");
                assert_eq!(
                    lvs("seg_pe_ranges", &format!("{vg}/{new}")),
                    extents,
                    "the new volume sits on the old one's extents"
                );
                let device = format!("/dev/{vg}/{new}");
                assert_eq!(size_of(&device), size);
                let (markers, nonzero) = scan(&device, 0, size);
                assert_eq!(
                    (markers, nonzero),
                    (0, 0),
                    "{media}: the new volume shows the old one's blocks"
                );
                println!("{media}: deleting {} MiB took {deleted:.1?}", size / MIB);
                delete(&csi, &new).await;
            }
        });
    }
);

/// Stands in front of `wipefs`, `blkdiscard` and `lvchange` in the agent's
/// `PATH`, runs the real program, and holds the agent at one call (the
/// `n`th of a program) so it can be killed exactly there.
struct Shim;

impl Shim {
    const PROGRAMS: [&str; 3] = ["wipefs", "blkdiscard", "lvchange"];

    fn install() {
        fs::create_dir_all(SHIM).unwrap();
        for program in Self::PROGRAMS {
            let real = PATH
                .split(':')
                .map(|dir| Path::new(dir).join(program))
                .find(|path| path.is_file())
                .unwrap_or_else(|| panic!("no {program}"));
            let script = format!(
                "#!/bin/sh\n\
                 echo {program} >> {SHIM}/calls\n\
                 n=$(grep -cx {program} {SHIM}/calls)\n\
                 if [ \"$(cat {SHIM}/hold 2>/dev/null)\" = \"{program} $n\" ]; then\n\
                 \x20   touch {SHIM}/held\n\
                 \x20   sleep 600\n\
                 fi\n\
                 exec {} \"$@\"\n",
                real.display()
            );
            let path = Path::new(SHIM).join(program);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// Holds the `n`th call of `program` from now on (None: holds none).
    fn hold(at: Option<(&str, usize)>) {
        for file in ["calls", "held", "hold"] {
            let _ = fs::remove_file(Path::new(SHIM).join(file));
        }
        if let Some((program, n)) = at {
            fs::write(Path::new(SHIM).join("hold"), format!("{program} {n}")).unwrap();
        }
    }

    async fn wait_held() {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !Path::new(SHIM).join("held").exists() {
            assert!(Instant::now() < deadline, "the agent never got there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn path() -> String {
        format!("{SHIM}:{PATH}")
    }
}

/// An LV made by LVM alone, neither wiped nor zeroed: it shows whatever its
/// extents held. Returns its device.
fn bare_lvcreate(vg: &str, name: &str, size: u64) -> String {
    run(
        "lvcreate",
        &[
            "-n",
            name,
            "-L",
            &format!("{size}b"),
            "-W",
            "n",
            "-Z",
            "n",
            vg,
        ],
    );
    format!("/dev/{vg}/{name}")
}

/// Leaves free extents at the start of `vg` that hold what a volume removed
/// without zeroing would: an ext4 filesystem and a marker at its end.
fn leave_dirty_extents(vg: &str, size: u64) {
    let device = bare_lvcreate(vg, "dirty", size);
    run("mkfs.ext4", &["-q", "-F", &device]);
    fill_with_marker(&device, size - MIB, MIB);
    run("lvremove", &["--yes", &format!("{vg}/dirty")]);
}

/// The volume a finished create handed out holds nothing of the old one:
/// no signature libblkid knows, both ends zero, no marker.
fn assert_erased(device: &str, size: u64) {
    let probe = Command::new("blkid").args(["-p", device]).output().unwrap();
    assert_eq!(
        probe.status.code(),
        Some(2),
        "a signature survived on {device}: {}",
        String::from_utf8_lossy(&probe.stdout)
    );
    assert_eq!(scan(device, 0, MIB), (0, 0), "start of {device}");
    assert_eq!(scan(device, size - MIB, MIB), (0, 0), "end of {device}");
}

vm_test!(
    an_agent_killed_inside_a_create_leaves_what_the_retry_finishes,
    Vm::new().nvme("nvme-a", 5, 2 * GIB),
    {
        let size = 64 * MIB;
        let vg = "lvmlocal-nvme";
        Shim::install();
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let path = Shim::path();
            let env = [("PATH", path.as_str())];
            // Right after lvcreate; signatures wiped; the start zeroed; all
            // erased but not yet marked ready.
            let points = [
                ("wipefs", 1),
                ("blkdiscard", 1),
                ("blkdiscard", 2),
                ("lvchange", 1),
            ];
            // The agent builds the volume group the first time it runs.
            drop(start_agent(&env).await);
            for (round, (program, n)) in points.into_iter().enumerate() {
                let name = format!("cut-{round}");
                let lv = format!("{vg}/{name}");
                leave_dirty_extents(vg, size);
                Shim::hold(Some((program, n)));
                let (agent, csi) = start_agent(&env).await;
                let request = create_request(&name, "nvme", Some("ext4"), size);
                let mut controller = csi.controller.clone();
                let call = tokio::spawn(async move { controller.create_volume(request).await });
                Shim::wait_held().await;
                agent.kill();
                assert!(call.await.unwrap().is_err(), "the cut create answered");
                let tags = lvs("lv_tags", &lv);
                assert!(
                    tags.contains("lvmlocal.io/state=creating"),
                    "{program} {n}: {tags}"
                );

                Shim::hold(None);
                let (_agent, csi) = start_agent(&env).await;
                let device = format!("/dev/{lv}");
                if round % 2 == 0 {
                    // Listed: it is erased and marked ready first.
                    let listed = csi
                        .controller
                        .clone()
                        .list_volumes(ListVolumesRequest::default())
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(listed.entries.len(), 1, "{listed:?}");
                    assert!(lvs("lv_tags", &lv).contains("lvmlocal.io/state=ready"));
                    assert_erased(&device, size);
                }
                create(&csi, &name, "nvme", Some("ext4"), size).await;
                assert_eq!(lv_count(vg), 1, "exactly one LV");
                let tags = lvs("lv_tags", &lv);
                assert!(tags.contains("lvmlocal.io/state=ready"), "{tags}");
                assert!(!tags.contains("creating"), "{tags}");
                assert_erased(&device, size);
                delete(&csi, &name).await;
                assert_eq!(lv_count(vg), 0);
                println!("killed at {program} {n}: the retry erased and finished it");
            }
        });
    }
);

const PHASE: &str = "LVMLOCAL_SAFETY_PHASE";

#[test]
fn a_power_cut_inside_a_create_leaves_what_the_retry_finishes() {
    let name = "a_power_cut_inside_a_create_leaves_what_the_retry_finishes";
    let size = 64 * MIB;
    let vg = "lvmlocal-nvme";
    let lv = format!("{vg}/cut");
    if guest::inside() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        match std::env::var(PHASE).as_deref() {
            Ok("cut") => runtime.block_on(async {
                Shim::install();
                let path = Shim::path();
                let env = [("PATH", path.as_str())];
                drop(start_agent(&env).await);
                leave_dirty_extents(vg, size);
                Shim::hold(Some(("wipefs", 1)));
                let (_agent, csi) = start_agent(&env).await;
                let mut controller = csi.controller.clone();
                let request = create_request("cut", "nvme", Some("ext4"), size);
                let _call = tokio::spawn(async move { controller.create_volume(request).await });
                Shim::wait_held().await;
                assert!(lvs("lv_tags", &lv).contains("lvmlocal.io/state=creating"));
                run("sync", &[]);
                println!("HELD");
                tokio::time::sleep(Duration::from_secs(600)).await;
            }),
            Ok("after") => runtime.block_on(async {
                let tags = lvs("lv_tags", &lv);
                assert!(tags.contains("lvmlocal.io/state=creating"), "{tags}");
                let (_agent, csi) = start_agent(&[]).await;
                create(&csi, "cut", "nvme", Some("ext4"), size).await;
                assert_eq!(lv_count(vg), 1, "exactly one LV");
                let tags = lvs("lv_tags", &lv);
                assert!(tags.contains("lvmlocal.io/state=ready"), "{tags}");
                assert_erased(&format!("/dev/{lv}"), size);
            }),
            other => panic!("{PHASE} is {other:?}"),
        }
        return;
    }
    let disks = tempfile::tempdir().unwrap();
    let vm = Vm::new().disk_dir(disks.path()).nvme("nvme-a", 5, 2 * GIB);
    let exe = std::env::current_exe().unwrap();
    let argv = [
        exe.to_str().unwrap(),
        "--exact",
        name,
        "--nocapture",
        "--test-threads=1",
    ];
    let cut = vm.clone().env(PHASE, "cut").spawn(&argv).unwrap();
    let stdout = cut.ctl_dir().join("stdout");
    let deadline = Instant::now() + Duration::from_secs(400);
    while !fs::read_to_string(&stdout)
        .unwrap_or_default()
        .contains("HELD")
    {
        assert!(
            Instant::now() < deadline,
            "the create never got past lvcreate:\n{}",
            fs::read_to_string(&stdout).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pulls the plug: qemu dies with whatever the guest had not written.
    drop(cut);

    let after = vm.env(PHASE, "after").run(&argv).unwrap();
    assert!(
        after.success() && after.stdout.contains("test result: ok. 1 passed; 0 failed"),
        "after the power cut\n{}",
        after.report()
    );
}
