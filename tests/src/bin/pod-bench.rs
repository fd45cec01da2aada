//! Time from a pod being created to its container running, on a real node
//! (kubelet and containerd in the VM): pods with a new 1 GiB claim on NVMe
//! each, beside the same pod without a volume in the same run, alternating.
//!
//!     scripts/bench-pods.sh

use std::time::{Duration, Instant};

use lvmlocal_tests::cluster::{CLAIM_LABEL, Cluster, NodeVm, Options};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::workload::{NS, claim, shell_pod};
use lvmlocal_tests::{GIB, Vm};

const PODS: usize = 10;

fn main() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(Options::default())?;
    let _node = NodeVm::start_with_kubelet(
        &mut cluster,
        "vm-node",
        Vm::new().memory_mib(2048).nvme("bench-a", 5, 32 * GIB),
        &[(CLAIM_LABEL, "true")],
    )?;
    wait_for(
        "the node's capacity published",
        Duration::from_secs(180),
        || match cluster.storage_capacity("vm-node", "lvmlocal-nvme") {
            Ok(Some(bytes)) if bytes > 30 * GIB => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    let (mut with_volume, mut without) = (Vec::new(), Vec::new());
    for i in 0..PODS {
        let plain = format!("plain-{i}");
        without.push(start(&cluster, &plain, None)?);
        let volume = format!("volume-{i}");
        with_volume.push(start(&cluster, &volume, Some(&volume))?);
    }

    let (v50, v90) = percentiles(&mut with_volume);
    let (p50, p90) = percentiles(&mut without);
    println!("{PODS} pods of each kind, one at a time, alternating");
    println!("pod with a new 1 GiB claim -> running   p50 {v50:>8.1?}  p90 {v90:>8.1?}");
    println!("same pod without a volume -> running    p50 {p50:>8.1?}  p90 {p90:>8.1?}");
    println!(
        "ratio (p50)                             {:.2}x",
        v50.as_secs_f64() / p50.as_secs_f64()
    );
    Ok(())
}

/// Creates pod `name` (with a new claim of that name when `claim` is
/// given), times it to its container running, then deletes both and waits
/// until they are gone, so that the next pod meets an idle node.
fn start(cluster: &Cluster, name: &str, claim_name: Option<&str>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    if let Some(claim_name) = claim_name {
        cluster.apply(&claim(claim_name, "lvmlocal-nvme", "1Gi"))?;
    }
    cluster.apply(&shell_pod(name, claim_name, "exec sleep 3600"))?;
    wait_for(&format!("{name} running"), Duration::from_secs(300), || {
        let pod = cluster
            .get(&["pod", name, "-n", NS])
            .map_err(|err| err.to_string())?;
        pod["status"]["containerStatuses"][0]["state"]["running"]
            .is_object()
            .then_some(())
            .ok_or_else(|| pod["status"].to_string())
    })?;
    let took = started.elapsed();
    cluster.kubectl(&[
        "delete",
        "pod",
        name,
        "-n",
        NS,
        "--wait=true",
        "--timeout=180s",
    ])?;
    if let Some(claim_name) = claim_name {
        cluster.kubectl(&[
            "delete",
            "pvc",
            claim_name,
            "-n",
            NS,
            "--wait=true",
            "--timeout=180s",
        ])?;
    }
    Ok(took)
}

fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}
