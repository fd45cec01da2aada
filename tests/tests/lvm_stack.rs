//! The storage stack lvmlocal stands on, exercised for real in the VM: LVM
//! on an emulated NVMe disk, a filesystem on a logical volume, a mount.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use lvmlocal_tests::{GIB, Vm, vm_test};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The kernel name of the one block device on the PCI function `pci`.
fn disk_at(pci: &str) -> String {
    let found: Vec<String> = fs::read_dir("/sys/block")
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|dev| {
            fs::canonicalize(dev.join("device"))
                .map(|target| target.display().to_string().contains(pci))
                .unwrap_or(false)
        })
        .map(|dev| dev.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(found.len(), 1, "disks at {pci}: {found:?}");
    found[0].clone()
}

vm_test!(
    lvm_ext4_on_nvme_holds_a_file,
    Vm::new().nvme("data", 5, 2 * GIB),
    {
        let disk = format!("/dev/{}", disk_at("/0000:00:05.0/"));
        assert!(disk.starts_with("/dev/nvme"), "{disk}");

        run("pvcreate", &[&disk]);
        run("vgcreate", &["vg-test", &disk]);
        run("lvcreate", &["-n", "vol", "-L", "300m", "-y", "vg-test"]);
        let lvs = run(
            "lvs",
            &[
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_name,lv_size",
                "vg-test",
            ],
        );
        assert!(
            lvs.contains(r#""lv_name":"vol", "lv_size":"314572800""#),
            "{lvs}"
        );

        let lv = "/dev/vg-test/vol";
        assert!(PathBuf::from(lv).exists(), "{lv} was not created");
        run("mkfs.ext4", &["-q", lv]);
        let mnt = tempfile::tempdir().unwrap();
        let mnt = mnt.path().to_str().unwrap();
        run("mount", &[lv, mnt]);
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            mounts.lines().any(|l| l.contains(&format!(" {mnt} ext4 "))),
            "{mounts}"
        );

        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(format!("{mnt}/payload"), &payload).unwrap();
        run("umount", &[mnt]);
        // Drop the page cache so the read below comes from the disk.
        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        run("mount", &["-o", "ro", lv, mnt]);
        assert_eq!(fs::read(format!("{mnt}/payload")).unwrap(), payload);
        run("umount", &[mnt]);

        run("lvremove", &["-y", "vg-test/vol"]);
        assert!(!PathBuf::from(lv).exists(), "{lv} outlived lvremove");
    }
);
