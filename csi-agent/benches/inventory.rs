//! Inventory + plan over a 64-disk sysfs tree, against the floor of just
//! reading the same sysfs files.
//!
//!     cargo bench -p csi-agent --bench inventory

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use csi_agent::config::DiscoveryConfig;
use csi_agent::discovery::{Probe, classify};
use csi_agent::plan::{LvmState, plan};
use csi_agent::sysfs::scan;

const ROUNDS: usize = 300;

/// 32 NVMe namespaces (16 controllers, 2 each) and 32 SATA disks (8 AHCI
/// controllers, ports 1-4), shaped like the tree captured in the VM.
fn build_tree(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut write = |path: &Path, content: &str| {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        files.push(path.display().to_string());
    };
    fs::create_dir_all(root.join("block")).unwrap();
    let mut minor = 0;
    let mut disk =
        |root: &Path, dir: &str, device: &str, rotational: bool, extra: &[(&str, &str)]| {
            let name = dir.rsplit('/').next().unwrap().to_owned();
            let dir_path = root.join(dir);
            write(&dir_path.join("dev"), &format!("259:{minor}\n"));
            minor += 1;
            write(&dir_path.join("size"), "7814037168\n");
            write(&dir_path.join("ro"), "0\n");
            write(&dir_path.join("removable"), "0\n");
            write(
                &dir_path.join("queue/rotational"),
                if rotational { "1\n" } else { "0\n" },
            );
            for (file, content) in extra {
                write(&root.join(file), content);
            }
            fs::create_dir_all(dir_path.join("holders")).unwrap();
            let device_path = root.join(device);
            fs::create_dir_all(&device_path).unwrap();
            write(&device_path.join("model"), "BENCH DISK\n");
            write(&device_path.join("serial"), &format!("S{name}\n"));
            let depth = dir.split('/').count() - device.split('/').count();
            let up = "../".repeat(depth);
            let rest = &device[device.rfind('/').unwrap() + 1..];
            std::os::unix::fs::symlink(format!("{up}{rest}"), dir_path.join("device")).unwrap();
            std::os::unix::fs::symlink(format!("../{dir}"), root.join("block").join(&name))
                .unwrap();
        };
    for controller in 0..16 {
        let pci = format!("devices/pci0000:00/0000:{:02x}:00.0", controller + 1);
        for ns in 1..=2 {
            let ctrl = format!("{pci}/nvme/nvme{controller}");
            let dir = format!("{ctrl}/nvme{controller}n{ns}");
            disk(
                root,
                &dir,
                &ctrl,
                false,
                &[(&format!("{dir}/nsid"), &format!("{ns}\n"))],
            );
        }
    }
    let mut host = 0;
    for controller in 0..8 {
        let pci = format!("devices/pci0000:00/0000:00:{:02x}.0", controller + 0x10);
        for port in 1..=4 {
            let ata = format!("ata{host}");
            let device = format!("{pci}/{ata}/host{host}/target{host}:0:0/{host}:0:0:0");
            let dir = format!("{device}/block/sd{host}");
            let port_file = format!("{pci}/{ata}/ata_port/{ata}/port_no");
            disk(
                root,
                &dir,
                &device,
                host % 2 == 0,
                &[(&port_file, &format!("{port}\n"))],
            );
            host += 1;
        }
    }
    files
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn measure(what: &str, mut run: impl FnMut()) {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        run();
        samples.push(started.elapsed());
    }
    println!(
        "{what:<42} p50 {:>9.3?}  p99 {:>9.3?}",
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99)
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let files = build_tree(dir.path());
    let config = DiscoveryConfig::default();
    let members = BTreeMap::new();
    let lvm = LvmState::default();

    let devices = scan(dir.path()).unwrap();
    assert_eq!(devices.len(), 64);
    let disks: Vec<_> = devices
        .iter()
        .map(|device| classify(device, &Probe::default(), &members, &config))
        .collect();
    assert_eq!(plan(&disks, &lvm, &config).actions.len(), 3);

    measure("floor: read the same sysfs files", || {
        for file in &files {
            std::hint::black_box(fs::read(file).unwrap());
        }
    });
    measure("inventory + plan, 64 disks", || {
        let devices = scan(dir.path()).unwrap();
        let disks: Vec<_> = devices
            .iter()
            .map(|device| classify(device, &Probe::default(), &members, &config))
            .collect();
        std::hint::black_box(plan(&disks, &lvm, &config));
    });
}
