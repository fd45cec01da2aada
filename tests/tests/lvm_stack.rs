//! The storage stack lvmlocal stands on, exercised for real in the VM: LVM
//! on an emulated NVMe disk, a filesystem on a logical volume, a mount.

use std::fs;
use std::path::PathBuf;

use lvmlocal_tests::guest::{disk_at, run};
use lvmlocal_tests::{GIB, Vm, vm_test};

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
