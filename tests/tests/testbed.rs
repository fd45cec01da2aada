//! The test bed itself: the guest runs what it is given, reports back, and
//! sees each emulated disk at the place it was attached, across reboots.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use lvmlocal_tests::{GIB, Vm, vm_test};

#[test]
fn status_and_output_come_back_to_the_host() {
    let out = Vm::new()
        .env("GREETING", "it's me")
        .run(&["sh", "-c", "echo \"$GREETING\"; pwd; echo oops >&2; exit 7"])
        .unwrap();
    assert_eq!(out.status, 7, "{}", out.report());
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(out.stdout, format!("it's me\n{}\n", cwd.display()));
    assert_eq!(out.stderr, "oops\n");
}

/// The sysfs directories of the block devices attached below `path`, a piece
/// of their device path such as `/0000:00:05.0/` or `/0000:00:10.0/ata1/`.
fn block_devices_at(path: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/block")
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|dir| {
            let target = fs::canonicalize(dir.join("device")).unwrap_or_default();
            target.display().to_string().contains(path)
        })
        .collect()
}

fn the_one(mut found: Vec<PathBuf>, what: &str) -> PathBuf {
    assert_eq!(found.len(), 1, "{what}: {found:?}");
    found.pop().unwrap()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .trim()
        .to_owned()
}

vm_test!(
    disks_appear_where_attached,
    Vm::new()
        .nvme("nv-a", 5, GIB)
        .nvme_ns("nv-b", 5, 2, 2 * GIB)
        .ssd("ssd-a", 0, 3 * GIB)
        .hdd("hdd-a", 2, 4 * GIB),
    {
        let namespaces = block_devices_at("/0000:00:05.0/");
        assert_eq!(namespaces.len(), 2, "{namespaces:?}");
        for (nsid, size) in [("1", GIB), ("2", 2 * GIB)] {
            let ns = the_one(
                namespaces
                    .iter()
                    .filter(|ns| read(ns.join("nsid")) == nsid)
                    .cloned()
                    .collect(),
                "namespace",
            );
            assert_eq!(read(ns.join("size")), (size / 512).to_string());
            assert_eq!(read(ns.join("device/serial")), "nv-a");
            assert_eq!(read(ns.join("queue/rotational")), "0");
        }

        let ssd = the_one(block_devices_at("/0000:00:10.0/ata1/"), "port 0");
        assert_eq!(read(ssd.join("queue/rotational")), "0");
        assert_eq!(read(ssd.join("size")), (3 * GIB / 512).to_string());
        let hdd = the_one(block_devices_at("/0000:00:10.0/ata3/"), "port 2");
        assert_eq!(read(hdd.join("queue/rotational")), "1");
        assert_eq!(read(hdd.join("size")), (4 * GIB / 512).to_string());
        assert!(
            Path::new("/dev/mapper/control").exists(),
            "no device-mapper in the guest"
        );
    }
);

/// For each `PLACE=LABEL` argument, writes LABEL at the start of the disk whose
/// device path holds PLACE, or prints `PLACE=<what is there>` when LABEL is `?`.
const LABELS: &str = r#"
for arg in "$@"; do
    place=${arg%%=*} label=${arg#*=}
    for dev in /sys/block/*; do
        case "$(readlink -f "$dev/device")" in
        *"$place"*)
            if [ "$label" = "?" ]; then
                printf '%s=%s\n' "$place" "$(head -c 2 "/dev/${dev##*/}")"
            else
                printf '%s' "$label" | dd of="/dev/${dev##*/}" conv=notrunc status=none
            fi ;;
        esac
    done
done
"#;

fn labels(vm: &Vm, args: &[&str]) -> String {
    let mut argv = vec!["sh", "-c", LABELS, "labels"];
    argv.extend(args);
    let out = vm.run(&argv).unwrap();
    assert!(out.success(), "{}", out.report());
    out.stdout
}

#[test]
fn kept_disks_boot_again_in_another_order() {
    let dir = tempfile::tempdir().unwrap();
    let first = Vm::new()
        .disk_dir(dir.path())
        .nvme("nv-a", 5, GIB)
        .nvme("nv-b", 6, GIB)
        .ssd("ssd-a", 0, GIB)
        .ssd("ssd-b", 1, GIB);
    labels(
        &first,
        &[
            "/0000:00:05.0/=p5",
            "/0000:00:06.0/=p6",
            "/ata1/=a1",
            "/ata2/=a2",
        ],
    );
    for (image, label) in [
        ("nv-a", "p5"),
        ("nv-b", "p6"),
        ("ssd-a", "a1"),
        ("ssd-b", "a2"),
    ] {
        let mut start = [0u8; 2];
        let mut file = fs::File::open(dir.path().join(format!("{image}.img"))).unwrap();
        file.read_exact(&mut start).unwrap();
        assert_eq!(&start, label.as_bytes(), "{image}.img");
    }

    let swapped = Vm::new()
        .disk_dir(dir.path())
        .nvme("nv-b", 5, GIB)
        .nvme("nv-a", 6, GIB)
        .ssd("ssd-b", 0, GIB)
        .ssd("ssd-a", 1, GIB);
    let seen = labels(
        &swapped,
        &[
            "/0000:00:05.0/=?",
            "/0000:00:06.0/=?",
            "/ata1/=?",
            "/ata2/=?",
        ],
    );
    assert_eq!(
        seen,
        "/0000:00:05.0/=p6\n/0000:00:06.0/=p5\n/ata1/=a2\n/ata2/=a1\n"
    );
}
