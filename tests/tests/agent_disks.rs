//! The agent on real disks in the VM: only blank disks join the volume group
//! of their class, identity survives kernel renames, a second run changes
//! nothing, hot-added disks join, and vanished ones degrade without harm.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lvmlocal_tests::guest::{disk_at, http_get, run, workspace_binary};
use lvmlocal_tests::{GIB, MIB, Vm, vm_test};
use serde_json::Value;

fn agent(args: &[&str]) -> String {
    run(workspace_binary("csi-agent").to_str().unwrap(), args)
}

/// `csi-agent discover --json` with `args`.
fn discover(args: &[&str]) -> Value {
    let args: Vec<&str> = ["discover", "--json"].iter().chain(args).copied().collect();
    serde_json::from_str(&agent(&args)).unwrap()
}

/// The discovery verdict of the disk at `slot`.
fn verdict(inventory: &Value, slot: &str) -> Value {
    inventory["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|disk| disk["slot"] == slot)
        .unwrap_or_else(|| panic!("no disk at {slot}: {inventory:#}"))
        .clone()
}

/// `(device, vg, tags)` of every PV.
fn pvs() -> Vec<(String, String, String)> {
    let report: Value = serde_json::from_str(&run(
        "pvs",
        &["--reportformat", "json", "-o", "pv_name,vg_name,pv_tags"],
    ))
    .unwrap();
    let mut pvs: Vec<(String, String, String)> = report["report"][0]["pv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pv| {
            let field = |name: &str| pv[name].as_str().unwrap().to_owned();
            (field("pv_name"), field("vg_name"), field("pv_tags"))
        })
        .collect();
    pvs.sort();
    pvs
}

/// Metadata sequence number of each volume group: it grows with every write.
fn vg_seqnos() -> String {
    run("vgs", &["--noheadings", "-o", "vg_name,vg_seqno"])
}

vm_test!(
    only_blank_disks_join_the_group_of_their_class,
    Vm::new()
        .nvme("nvme-blank", 5, 4 * GIB)
        .nvme("nvme-ext4", 6, 2 * GIB)
        .nvme("nvme-mounted", 7, 2 * GIB)
        .ssd("ssd-blank", 0, 2 * GIB)
        .ssd("ssd-gpt", 1, 2 * GIB)
        .hdd("hdd-blank", 2, 4 * GIB)
        .hdd("hdd-foreign", 3, 4 * GIB),
    {
        let ext4 = format!("/dev/{}", disk_at("/0000:00:06.0/"));
        run("mkfs.ext4", &["-q", &ext4]);
        let mounted = format!("/dev/{}", disk_at("/0000:00:07.0/"));
        run("mkfs.ext4", &["-q", &mounted]);
        let mnt = tempfile::tempdir().unwrap();
        run("mount", &[&mounted, mnt.path().to_str().unwrap()]);
        let gpt = format!("/dev/{}", disk_at("/ata2/"));
        run(
            "sh",
            &["-c", &format!("echo 'label: gpt' | sfdisk -q {gpt}")],
        );
        let foreign = format!("/dev/{}", disk_at("/ata4/"));
        run("vgcreate", &["foreign", &foreign]);

        let inventory = discover(&["--claim-disks"]);
        let expect = [
            ("pci-0000:00:05.0-nvme-1", "usable", None),
            ("pci-0000:00:06.0-nvme-1", "signature", Some("ext4")),
            ("pci-0000:00:07.0-nvme-1", "mounted", None),
            ("pci-0000:00:10.0-ata-1", "usable", None),
            ("pci-0000:00:10.0-ata-2", "partitioned", Some("gpt")),
            ("pci-0000:00:10.0-ata-3", "usable", None),
            (
                "pci-0000:00:10.0-ata-4",
                "signature",
                Some("LVM2_member of volume group foreign"),
            ),
        ];
        for (slot, want, detail) in expect {
            let disk = verdict(&inventory, slot);
            assert_eq!(disk["verdict"], want, "{disk:#}");
            if let Some(detail) = detail {
                let said = disk["kind"].as_str().or(disk["table"].as_str()).unwrap();
                assert_eq!(said, detail, "{disk:#}");
            }
        }

        agent(&["apply", "--claim-disks"]);
        let slot_tag = |slot: &str| format!("lvmlocal.io/slot={slot}");
        let nvme = format!("/dev/{}", disk_at("/0000:00:05.0/"));
        let ssd = format!("/dev/{}", disk_at("/ata1/"));
        let hdd = format!("/dev/{}", disk_at("/ata3/"));
        let mut want = vec![
            (
                nvme,
                "lvmlocal-nvme".into(),
                slot_tag("pci-0000:00:05.0-nvme-1"),
            ),
            (
                ssd,
                "lvmlocal-ssd".into(),
                slot_tag("pci-0000:00:10.0-ata-1"),
            ),
            (
                hdd,
                "lvmlocal-hdd".into(),
                slot_tag("pci-0000:00:10.0-ata-3"),
            ),
            (foreign, "foreign".into(), String::new()),
        ];
        want.sort();
        assert_eq!(pvs(), want);

        // The refused disks are exactly as they were.
        assert!(run("blkid", &["-p", &ext4]).contains(r#"TYPE="ext4""#));
        assert!(run("blkid", &["-p", &gpt]).contains(r#"PTTYPE="gpt""#));
        assert!(
            std::fs::read_to_string("/proc/mounts")
                .unwrap()
                .contains(&mounted)
        );

        // A second run finds nothing to do and writes no LVM metadata.
        let before = vg_seqnos();
        let again = agent(&["apply", "--claim-disks"]);
        assert!(again.contains("plan: nothing to do"), "{again}");
        assert_eq!(vg_seqnos(), before);
        assert_eq!(
            discover(&["--claim-disks"])["commands"],
            serde_json::json!([])
        );
        run("umount", &[mnt.path().to_str().unwrap()]);
    }
);

/// Slot and kernel name of every PV, as the guest sees them after `script`.
fn boot(vm: &Vm, script: &str) -> String {
    let agent = workspace_binary("csi-agent");
    let out = vm
        .run(&["sh", "-c", script, "boot", agent.to_str().unwrap()])
        .unwrap();
    assert!(out.success(), "{}", out.report());
    out.stdout
}

#[test]
fn kernel_renames_change_nothing() {
    let disks = tempfile::tempdir().unwrap();
    let first = Vm::new()
        .disk_dir(disks.path())
        .nvme("nvme-a", 6, 2 * GIB)
        .nvme("nvme-b", 7, 2 * GIB)
        .ssd("ssd-a", 2, 2 * GIB);
    let report = r#"pvs --noheadings -o pv_name,vg_name,pv_tags | sort"#;
    let built = boot(
        &first,
        &format!(r#""$1" apply --claim-disks >/dev/null && {report}"#),
    );
    assert_eq!(built.matches("lvmlocal.io/slot=").count(), 3, "{built}");

    // Disks that sort first now take the kernel names nvme0n1 and sda, so
    // every disk of the first boot answers to another name.
    let second = first
        .clone()
        .nvme("nvme-small", 4, 512 * MIB)
        .ssd("ssd-small", 0, 512 * MIB);
    let script = format!(
        r#"vgs --noheadings -o vg_name,vg_seqno > /tmp/before
        "$1" discover --json --claim-disks | grep -q '"commands": \[\]' && echo no-commands
        "$1" apply --claim-disks | grep '^plan'
        vgs --noheadings -o vg_name,vg_seqno | cmp - /tmp/before && echo unchanged
        {report}"#
    );
    let rebooted = boot(&second, &script);
    assert!(
        rebooted.starts_with("no-commands\nplan: nothing to do\nunchanged\n"),
        "{rebooted}"
    );
    // slot tag -> (kernel name, volume group)
    let pvs_by_slot = |text: &str| -> std::collections::BTreeMap<String, (String, String)> {
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields[..] {
                    [name, vg, tag] => Some((tag.to_owned(), (name.to_owned(), vg.to_owned()))),
                    _ => None,
                }
            })
            .collect()
    };
    let before = pvs_by_slot(&built);
    let after = pvs_by_slot(&rebooted);
    assert_eq!(before.len(), 3, "{built}");
    // Same slots in the same groups...
    assert_eq!(
        before
            .iter()
            .map(|(slot, (_, vg))| (slot, vg))
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|(slot, (_, vg))| (slot, vg))
            .collect::<Vec<_>>()
    );
    // ... though the kernel calls the disks by other names now.
    assert!(
        before
            .iter()
            .any(|(slot, (name, _))| after[slot].0 != *name),
        "kernel names did not change:\n{built}\n{rebooted}"
    );
}

/// Polls `check` every 200 ms for up to a minute.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pv_count(vg: &str) -> usize {
    pvs().iter().filter(|(_, group, _)| group == vg).count()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

vm_test!(
    hot_added_disk_joins_and_a_vanished_one_degrades,
    Vm::new()
        .nvme("nvme-a", 5, 2 * GIB)
        .nvme("nvme-b", 6, 2 * GIB),
    {
        let unplug = |pci: &str| {
            std::fs::write(format!("/sys/bus/pci/devices/{pci}/remove"), "1").unwrap();
        };
        unplug("0000:00:06.0");
        // A rescan interval of an hour: only the uevent can bring the new disk in.
        let _agent = Running(
            Command::new(workspace_binary("csi-agent"))
                .args([
                    "--node-name",
                    "vm",
                    "--standalone",
                    "--claim-disks",
                    "--rescan-interval-secs",
                    "3600",
                ])
                .args(["--metrics-address", "127.0.0.1:9808"])
                .args(["--csi-endpoint", "unix:///run/lvmlocal-agent.sock"])
                .spawn()
                .unwrap(),
        );
        eventually("the first disk to join", || pv_count("lvmlocal-nvme") == 1);

        // Device-mapper uevents (LVs coming and going) start no rescan.
        let rescans = || {
            let metrics = http_get("127.0.0.1:9808", "/metrics");
            metrics
                .lines()
                .find_map(|line| line.strip_prefix("lvmlocal_agent_rescan_duration_seconds_count "))
                .map_or(0, |count| count.trim().parse::<u64>().unwrap())
        };
        eventually("the first rescan to be counted", || rescans() == 1);
        for n in 0..3 {
            let name = format!("dm-{n}");
            run(
                "lvcreate",
                &["-n", &name, "-L", "16m", "-y", "lvmlocal-nvme"],
            );
            run("lvremove", &["-y", &format!("lvmlocal-nvme/{name}")]);
        }
        // Longer than the settle and the gap between two passes.
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(rescans(), 1, "a device-mapper uevent started a rescan");

        std::fs::write("/sys/bus/pci/rescan", "1").unwrap();
        // vgextend, then pvchange records the slot: wait for both.
        let joined = "lvmlocal.io/slot=pci-0000:00:06.0-nvme-1";
        eventually("the hot-added disk to join with its slot", || {
            pvs()
                .iter()
                .any(|(_, vg, tags)| vg == "lvmlocal-nvme" && tags == joined)
        });
        eventually("the rescan the disk's uevent started", || rescans() == 2);
        assert_eq!(pv_count("lvmlocal-nvme"), 2);

        eventually("metrics of the grown group", || {
            let metrics = http_get("127.0.0.1:9808", "/metrics");
            metrics.contains(&format!(
                "lvmlocal_agent_vg_size_bytes{{media=\"nvme\"}} {}",
                4 * GIB - 8 * MIB
            ))
        });
        assert!(http_get("127.0.0.1:9808", "/healthz").starts_with("HTTP/1.1 200"));

        run(
            "lvcreate",
            &["-n", "keep", "-L", "100m", "-y", "lvmlocal-nvme"],
        );
        unplug("0000:00:06.0");
        let inventory = discover(&["--claim-disks"]);
        let nvme = inventory["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|group| group["media"] == "nvme")
            .unwrap()
            .clone();
        assert_eq!(nvme["missingPvs"], 1, "{nvme:#}");
        assert_eq!(inventory["commands"], serde_json::json!([]));
        assert!(run("lvs", &["--noheadings", "-o", "lv_name", "lvmlocal-nvme"]).contains("keep"));
    }
);

/// `(vg, pv count)` of every volume group.
fn vgs() -> String {
    run("vgs", &["--noheadings", "-o", "vg_name,pv_count"])
}

vm_test!(
    disks_are_claimed_only_where_opted_in,
    Vm::new()
        .nvme("nvme-a", 5, 2 * GIB)
        .nvme("nvme-b", 6, 2 * GIB)
        .ssd("ssd-a", 0, 2 * GIB),
    {
        // Without the opt-in: every blank disk is reported with what it
        // would join and why it does not, and no LVM metadata is written.
        let report = agent(&["apply"]);
        assert!(report.contains("plan: nothing to do"), "{report}");
        assert_eq!(pvs(), []);
        assert_eq!(vgs().trim(), "");
        let inventory = discover(&[]);
        assert_eq!(inventory["commands"], serde_json::json!([]));
        for (slot, vg) in [
            ("pci-0000:00:05.0-nvme-1", "lvmlocal-nvme"),
            ("pci-0000:00:06.0-nvme-1", "lvmlocal-nvme"),
            ("pci-0000:00:10.0-ata-1", "lvmlocal-ssd"),
        ] {
            let disk = verdict(&inventory, slot);
            assert_eq!(disk["verdict"], "not-claimed", "{disk:#}");
            assert_eq!(disk["vg"], vg, "{disk:#}");
            assert!(
                disk["why"].as_str().unwrap().contains("claim_disks = true"),
                "{disk:#}"
            );
        }
        // blkid finds no signature at all (exit status 2) on any of them.
        for place in ["/0000:00:05.0/", "/0000:00:06.0/", "/ata1/"] {
            let device = format!("/dev/{}", disk_at(place));
            let status = Command::new("blkid")
                .args(["-p", &device])
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(2), "{device}");
        }

        // Opted in through the configuration file: the same disks join.
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config.path(), "claim_disks = true\n").unwrap();
        let config = config.path().to_str().unwrap();
        std::fs::write("/sys/bus/pci/devices/0000:00:06.0/remove", "1").unwrap();
        agent(&["apply", "--config", config]);
        let nvme_a = format!("/dev/{}", disk_at("/0000:00:05.0/"));
        let ssd = format!("/dev/{}", disk_at("/ata1/"));
        let members: Vec<(String, String)> =
            pvs().into_iter().map(|(pv, vg, _)| (pv, vg)).collect();
        let mut want = vec![
            (nvme_a.clone(), "lvmlocal-nvme".to_string()),
            (ssd, "lvmlocal-ssd".to_string()),
        ];
        want.sort();
        assert_eq!(members, want);

        // The opt-in gone, the groups built keep being used, and a disk that
        // shows up waits: growing a group is claiming too.
        std::fs::write("/sys/bus/pci/rescan", "1").unwrap();
        eventually("the second NVMe disk back", || {
            std::fs::read_dir("/sys/block").unwrap().any(|entry| {
                std::fs::canonicalize(entry.unwrap().path())
                    .is_ok_and(|path| path.display().to_string().contains("/0000:00:06.0/"))
            })
        });
        run(
            "lvcreate",
            &["-n", "keep", "-L", "100m", "-y", "lvmlocal-nvme"],
        );
        let before = vg_seqnos();
        let report = agent(&["apply"]);
        assert!(report.contains("plan: nothing to do"), "{report}");
        assert_eq!(vg_seqnos(), before);
        assert_eq!(pv_count("lvmlocal-nvme"), 1);
        let inventory = discover(&[]);
        assert_eq!(
            verdict(&inventory, "pci-0000:00:05.0-nvme-1")["verdict"],
            "member"
        );
        assert_eq!(
            verdict(&inventory, "pci-0000:00:06.0-nvme-1")["verdict"],
            "not-claimed"
        );

        // Opted in again: the new disk extends its group, data kept.
        agent(&["apply", "--config", config]);
        assert_eq!(pv_count("lvmlocal-nvme"), 2);
        assert!(run("lvs", &["--noheadings", "-o", "lv_name", "lvmlocal-nvme"]).contains("keep"));
    }
);
