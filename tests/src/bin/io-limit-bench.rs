//! IO limits on a real node (kubelet and containerd in the VM): for each
//! media class, a pod's direct writes without a limit (the disk's floor in
//! this run), then under three limits set one after another through the
//! claim's VolumeAttributesClass, each with the time from the claim's
//! change to the limit in force.
//!
//!     scripts/bench-io-limits.sh

use std::time::{Duration, Instant};

use anyhow::Context;
use lvmlocal_tests::cluster::{CLAIM_LABEL, Cluster, NodeVm, Options};
use lvmlocal_tests::pod_io::{
    Run, attributes_class, dd_in_pod, set_attributes_class, volume_device,
};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::workload::{NS, claim, shell_pod};
use lvmlocal_tests::{GIB, Vm};
use serde_json::{Value, json};

const MIB: f64 = 1024.0 * 1024.0;

/// What a limit is and how it is measured.
struct Limit {
    class: &'static str,
    parameter: &'static str,
    value: &'static str,
    status: Value,
    /// What is asked of the pod, and the figure that is held to the limit.
    limit: f64,
    unit: &'static str,
    command: fn(&str) -> String,
    measure: fn(&Run) -> f64,
}

fn limits() -> Vec<Limit> {
    let direct_mib = |target: &str| {
        format!("dd if=/dev/zero of={target}/bench bs=1M count=48 oflag=direct conv=notrunc")
    };
    let bytes_per_second = |run: &Run| run.bytes / run.seconds;
    vec![
        Limit {
            class: "bench-8mi",
            parameter: "lvmlocal.io/write-bps",
            value: "8Mi",
            status: json!({"writeBps": 8 << 20}),
            limit: 8.0 * MIB,
            unit: "MiB/s",
            command: direct_mib,
            measure: bytes_per_second,
        },
        Limit {
            class: "bench-24mi",
            parameter: "lvmlocal.io/write-bps",
            value: "24Mi",
            status: json!({"writeBps": 24 << 20}),
            limit: 24.0 * MIB,
            unit: "MiB/s",
            command: |target| {
                format!(
                    "dd if=/dev/zero of={target}/bench bs=1M count=144 oflag=direct conv=notrunc"
                )
            },
            measure: bytes_per_second,
        },
        Limit {
            class: "bench-100iops",
            parameter: "lvmlocal.io/write-iops",
            value: "100",
            status: json!({"writeIops": 100}),
            limit: 100.0,
            unit: "IOPS",
            command: |target| {
                format!(
                    "dd if=/dev/zero of={target}/bench bs=4k count=600 oflag=direct conv=notrunc"
                )
            },
            measure: |run| run.bytes / 4096.0 / run.seconds,
        },
    ]
}

fn main() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(Options::default())?;
    let node = NodeVm::start_with_kubelet(
        &mut cluster,
        "vm-node",
        Vm::new()
            .memory_mib(2048)
            .nvme("bench-n", 5, 4 * GIB)
            .ssd("bench-s", 0, 4 * GIB)
            .hdd("bench-h", 1, 4 * GIB),
        &[(CLAIM_LABEL, "true")],
    )?;
    for limit in limits() {
        cluster.apply(&attributes_class(
            limit.class,
            json!({ limit.parameter: limit.value }),
        ))?;
    }
    println!("direct writes from a pod's cgroup, per media class; a limit's 'applied' is");
    println!("the time from the claim's new VolumeAttributesClass to the limit in force\n");
    println!("media  limit              achieved          of the limit  applied");
    for media in ["nvme", "ssd", "hdd"] {
        bench_media(&cluster, &node, media)?;
    }
    Ok(())
}

fn bench_media(cluster: &Cluster, node: &NodeVm, media: &str) -> anyhow::Result<()> {
    let name = format!("bench-{media}");
    wait_for(
        &format!("{media} capacity published"),
        Duration::from_secs(180),
        || match cluster.storage_capacity("vm-node", &format!("lvmlocal-{media}")) {
            Ok(Some(bytes)) if bytes > GIB => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    cluster.apply(&claim(&name, &format!("lvmlocal-{media}"), "2Gi"))?;
    cluster.apply(&shell_pod(&name, Some(&name), "sleep 3600"))?;
    let pod = cluster.wait_running(NS, &name)?;
    let uid = pod["metadata"]["uid"]
        .as_str()
        .context("pod uid")?
        .to_owned();
    let pv = cluster.get(&["pvc", &name, "-n", NS])?["spec"]["volumeName"]
        .as_str()
        .context("bound claim")?
        .to_owned();
    let volume = cluster.get(&["pv", &pv])?["spec"]["csi"]["volumeHandle"]
        .as_str()
        .context("volume handle")?
        .to_owned();
    let device = volume_device(cluster, node, &volume)?;
    let target = format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount");

    // The floor: the same writes without a limit, on a file laid out first.
    dd_in_pod(
        node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/bench bs=1M count=144 oflag=direct"),
    )?;
    let run = dd_in_pod(
        node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/bench bs=1M count=144 oflag=direct conv=notrunc"),
    )?;
    println!(
        "{media:<6} none (1 MiB)       {:>8.1} MiB/s",
        run.bytes / run.seconds / MIB
    );
    let run = dd_in_pod(
        node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/bench bs=4k count=2000 oflag=direct conv=notrunc"),
    )?;
    println!(
        "{media:<6} none (4 KiB)       {:>8.0} IOPS",
        run.bytes / 4096.0 / run.seconds
    );

    for limit in limits() {
        let asked = Instant::now();
        set_attributes_class(cluster, NS, &name, limit.class)?;
        wait_for("the limit in force", Duration::from_secs(120), || {
            let status = cluster
                .get(&["logicalvolume", &volume])
                .map_err(|err| err.to_string())?["status"]["ioLimits"]
                .clone();
            (status["applied"] == limit.status && status["enforced"] == true)
                .then_some(())
                .ok_or(status.to_string())
        })?;
        let applied = asked.elapsed();
        let run = dd_in_pod(node, &uid, &device, &(limit.command)(&target))?;
        let achieved = (limit.measure)(&run);
        let (shown, limit_shown) = if limit.unit == "MiB/s" {
            (achieved / MIB, limit.limit / MIB)
        } else {
            (achieved, limit.limit)
        };
        println!(
            "{media:<6} {:<18} {:>8.1} {:<8} {:>6.1} %       {:>5.2} s",
            format!("{limit_shown} {}", limit.unit),
            shown,
            limit.unit,
            achieved / limit.limit * 100.0,
            applied.as_secs_f64()
        );
    }
    for kind in ["pod", "pvc"] {
        cluster.kubectl(&[
            "delete",
            kind,
            &name,
            "-n",
            NS,
            "--wait=true",
            "--timeout=180s",
        ])?;
    }
    Ok(())
}
