//! Time from a pod and its claim being created to the claim Bound, on the
//! real control plane with the agent in the VM, beside the floor in the same
//! VM run: a bare `lvcreate` of the same size with the same tags.
//!
//!     scripts/bench-bound.sh

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lvmlocal_tests::cluster::{Cluster, NodeVm, Options};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::{GIB, Vm};
use serde_json::json;

const VOLUMES: usize = 20;

fn main() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(Options::default())?;
    let node = NodeVm::start(
        &mut cluster,
        "vm-node",
        Vm::new().nvme("bench-a", 5, 64 * GIB).memory_mib(2048),
    )?;
    wait_for(
        "the node's capacity published",
        Duration::from_secs(180),
        || match cluster.storage_capacity("vm-node", "lvmlocal-nvme") {
            Ok(Some(bytes)) if bytes > 60 * GIB => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    let mut bound = Vec::new();
    for i in 0..VOLUMES {
        let name = format!("bench-{i}");
        let started = Instant::now();
        cluster.apply(&json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "lvmlocal-nvme",
                     "resources": {"requests": {"storage": "1Gi"}}},
        }))?;
        cluster.apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox",
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]},
        }))?;
        wait_for(&format!("{name} Bound"), Duration::from_secs(120), || {
            let pvc = cluster
                .get(&["pvc", &name, "-n", "default"])
                .map_err(|err| err.to_string())?;
            (pvc["status"]["phase"] == "Bound")
                .then_some(())
                .ok_or_else(|| pvc["status"].to_string())
        })?;
        bound.push(started.elapsed());
    }

    // The floor: the same LV made by hand, timed inside the guest.
    let script = format!(
        "for i in $(seq 1 {VOLUMES}); do\n\
         s=$(date +%s%N)\n\
         lvcreate -q -y -W y -Z y -L 1G -n floor-$i --addtag lvmlocal.io/volume \
         --addtag lvmlocal.io/requested=1073741824 --addtag lvmlocal.io/access=ext4 lvmlocal-nvme >/dev/null\n\
         e=$(date +%s%N)\n\
         echo $((e - s))\n\
         done\n\
         for i in $(seq 1 {VOLUMES}); do lvremove -q -y lvmlocal-nvme/floor-$i >/dev/null; done"
    );
    let floor: Vec<Duration> = node
        .sh(&script)?
        .lines()
        .map(|line| line.trim().parse().map(Duration::from_nanos))
        .collect::<Result<_, _>>()
        .context("reading the guest's timings")?;
    ensure!(floor.len() == VOLUMES, "{} floor timings", floor.len());

    let (b50, b90) = percentiles(&mut bound);
    let (f50, f90) = percentiles(&mut floor.clone());
    println!("{VOLUMES} volumes of 1 GiB, one at a time");
    println!("pod + claim created -> Bound   p50 {b50:>8.1?}  p90 {b90:>8.1?}");
    println!("bare lvcreate in the VM        p50 {f50:>8.1?}  p90 {f90:>8.1?}");
    println!(
        "ratio (p50)                    {:.2}x",
        b50.as_secs_f64() / f50.as_secs_f64()
    );
    Ok(())
}

fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}
