//! The demo of the whole system: a control plane on 127.0.0.1 with lvmlocal
//! installed from deploy/, a node in a VM (kubelet, containerd, the agent,
//! emulated NVMe, SSD and HDD disks), and what a user comes for: a
//! StatefulSet on NVMe whose data outlives its pod, an online expansion, a
//! volume deleted. Prints each command as a user would type it, what it
//! showed, and the time each step took; everything goes away at the end.

use std::time::{Duration, Instant};

use anyhow::Context;
use lvmlocal_tests::cluster::{CLAIM_LABEL, Cluster, NodeVm, Options};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::workload::{NS, shell_stateful_set};
use lvmlocal_tests::{GIB, Vm};

const NODE: &str = "vm-node";

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    step("a control plane on 127.0.0.1, lvmlocal installed from deploy/");
    let mut cluster = Cluster::start(Options::default())?;
    took(started);

    let at = Instant::now();
    step(
        "a node: kubelet, containerd and the lvmlocal agent in a VM with 2 NVMe, 1 SSD, 1 HDD disk",
    );
    let vm = Vm::new()
        .memory_mib(2048)
        .nvme("nvme-a", 5, 8 * GIB)
        .nvme("nvme-b", 6, 8 * GIB)
        .ssd("ssd-a", 0, 4 * GIB)
        .hdd("hdd-a", 1, 16 * GIB);
    let node = NodeVm::start_with_kubelet(&mut cluster, NODE, vm, &[])?;
    took(at);

    let at = Instant::now();
    step("the node's blank disks handed to lvmlocal, one volume group per media class");
    kubectl(
        &cluster,
        &["label", "node", NODE, &format!("{CLAIM_LABEL}=true")],
    )?;
    wait_for(
        "a volume group of each class",
        Duration::from_secs(300),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", NODE])
                .map_err(|err| err.to_string())?;
            ["nvme", "ssd", "hdd"]
                .iter()
                .all(|media| nls["status"][media]["freeBytes"].as_u64().unwrap_or(0) > 0)
                .then_some(())
                .ok_or(nls["status"].to_string())
        },
    )?;
    kubectl(&cluster, &["get", "nodelocalstorage"])?;
    took(at);

    let at = Instant::now();
    step("a StatefulSet on NVMe: each start of its pod appends a line to /data/history");
    cluster.apply(&shell_stateful_set(
        "db",
        1,
        "lvmlocal-nvme",
        "1Gi",
        "echo \"pod $POD_UID started\" >> /data/history && exec sleep 3600",
    ))?;
    println!(
        "$ kubectl apply -f db.yaml   # StatefulSet db, volumeClaimTemplates: 1Gi of lvmlocal-nvme"
    );
    let first = running(&cluster, None)?;
    kubectl(&cluster, &["get", "pod,pvc", "-n", NS, "-o", "wide"])?;
    show_history(&cluster, &node, &first)?;
    took(at);

    let at = Instant::now();
    step("the pod deleted: the StatefulSet makes a new one, on the same volume");
    kubectl(&cluster, &["delete", "pod", "db-0", "-n", NS])?;
    let second = running(&cluster, Some(&first))?;
    let history = show_history(&cluster, &node, &second)?;
    anyhow::ensure!(
        history.lines().count() == 2,
        "the first pod's line is lost: {history}"
    );
    took(at);

    let at = Instant::now();
    step(
        "the claim grown to 2 GiB while its pod runs (kubelet grows the filesystem at its next sync)",
    );
    kubectl(
        &cluster,
        &[
            "patch",
            "pvc",
            "data-db-0",
            "-n",
            NS,
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
        ],
    )?;
    wait_for("the filesystem at 2 GiB", Duration::from_secs(300), || {
        let pvc = cluster
            .get(&["pvc", "data-db-0", "-n", NS])
            .map_err(|err| err.to_string())?;
        (pvc["status"]["capacity"]["storage"] == "2Gi")
            .then_some(())
            .ok_or(pvc["status"].to_string())
    })?;
    kubectl(&cluster, &["get", "pvc", "-n", NS])?;
    println!("df of the volume, on the node:");
    print!(
        "{}",
        node.sh(&format!("df -h {}", mount_path(&cluster, &second)?))?
    );
    took(at);

    let at = Instant::now();
    step("the StatefulSet and its claim deleted: the volume goes, and nothing else");
    kubectl(&cluster, &["delete", "statefulset", "db", "-n", NS])?;
    kubectl(&cluster, &["delete", "pvc", "data-db-0", "-n", NS])?;
    wait_for("the LV removed", Duration::from_secs(180), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        lvs.is_empty().then_some(()).ok_or(format!("{lvs:?}"))
    })?;
    kubectl(&cluster, &["get", "logicalvolumes,pv"])?;
    wait_for(
        "the space back in the node's report",
        Duration::from_secs(180),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", NODE])
                .map_err(|err| err.to_string())?;
            let nvme = &nls["status"]["nvme"];
            (nvme["freeBytes"] == nvme["totalBytes"])
                .then_some(())
                .ok_or(nvme.to_string())
        },
    )?;
    kubectl(&cluster, &["get", "nodelocalstorage"])?;
    took(at);

    println!(
        "\n== done in {:.1?}; stopping the VM and the control plane",
        started.elapsed()
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn took(at: Instant) {
    println!("   ({:.1?})", at.elapsed());
}

/// Prints `kubectl ARGS` as a shell would take it, and what it answers.
fn kubectl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    let quoted: Vec<String> = args
        .iter()
        .map(|arg| {
            let plain = arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,~".contains(c));
            if plain {
                (*arg).to_owned()
            } else {
                format!("'{arg}'")
            }
        })
        .collect();
    println!("$ kubectl {}", quoted.join(" "));
    let out = cluster.kubectl(args)?;
    if out.is_empty() {
        println!("No resources found");
    }
    print!("{out}");
    Ok(())
}

/// Waits for db-0 running (another pod than `not`) and returns its uid.
fn running(cluster: &Cluster, not: Option<&str>) -> anyhow::Result<String> {
    wait_for("db-0 running", Duration::from_secs(300), || {
        let pod = cluster
            .get(&["pod", "db-0", "-n", NS])
            .map_err(|err| err.to_string())?;
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        (pod["status"]["containerStatuses"][0]["state"]["running"].is_object() && Some(uid) != not)
            .then(|| uid.to_owned())
            .ok_or(pod["status"].to_string())
    })
}

/// Where kubelet has the pod `uid`'s volume mounted on the node.
fn mount_path(cluster: &Cluster, uid: &str) -> anyhow::Result<String> {
    let pvc = cluster.get(&["pvc", "data-db-0", "-n", NS])?;
    let pv = pvc["spec"]["volumeName"]
        .as_str()
        .context("claim not bound")?;
    Ok(format!(
        "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount"
    ))
}

/// Prints /data/history of the pod `uid`, read on the node (this local
/// setup does not route `kubectl exec` from the API server to kubelet).
fn show_history(cluster: &Cluster, node: &NodeVm, uid: &str) -> anyhow::Result<String> {
    let history = node.sh(&format!("cat {}/history", mount_path(cluster, uid)?))?;
    println!("/data/history of db-0, read on the node:");
    print!("{history}");
    Ok(history)
}
