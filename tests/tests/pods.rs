//! Pods on a real node: the control plane on the host, and in a VM with real
//! disks kubelet, containerd and the agent, which registers the driver with
//! kubelet. Every volume here is staged, published, expanded and torn down
//! by kubelet's own calls, and every byte is written and read by a pod.

use std::sync::Mutex;
use std::time::Duration;

use lvmlocal_tests::cluster::{CLAIM_LABEL, Cluster, NodeVm, Options, TOPOLOGY_KEY};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::{GIB, Vm};
use serde_json::{Value, json};

/// One cluster and VM at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const NS: &str = "default";
/// Built by scripts/images.sh and imported into the node's containerd.
const SHELL_IMAGE: &str = "lvmlocal.test/shell:1";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kubelet_node(cluster: &mut Cluster, name: &str) -> NodeVm {
    let vm = Vm::new()
        .memory_mib(2048)
        .nvme("nvme-a", 5, 8 * GIB)
        .ssd("ssd-a", 0, 4 * GIB);
    let node = NodeVm::start_with_kubelet(cluster, name, vm, &[(CLAIM_LABEL, "true")])
        .expect("booting the kubelet node");
    wait_for(
        "the agent's NodeLocalStorage",
        Duration::from_secs(180),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", name])
                .map_err(|err| err.to_string())?;
            let ready = ["nvme", "ssd"]
                .iter()
                .all(|media| nls["status"][media]["freeBytes"].as_u64().unwrap_or(0) > 0);
            ready.then_some(()).ok_or(nls.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    node
}

fn claim(name: &str, class: &str, size: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    })
}

/// A pod that runs `script` once with claim `claim` at /data, on the host's
/// network (the node has no CNI network), and writes what it wants the test
/// to see to its termination message.
fn job_pod(name: &str, claim: &str, script: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "hostNetwork": true,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "job",
                "image": SHELL_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    })
}

/// Waits for pod `name` to succeed and returns its termination message.
fn finished(cluster: &Cluster, node: &NodeVm, name: &str) -> String {
    wait_for(
        &format!("pod {name} Succeeded"),
        Duration::from_secs(300),
        || {
            let pod = cluster
                .get(&["pod", name, "-n", NS])
                .map_err(|err| err.to_string())?;
            match pod["status"]["phase"].as_str() {
                Some("Succeeded") => Ok(
                    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                ),
                Some("Failed") => panic!(
                    "pod {name} failed: {}\n{}",
                    pod["status"],
                    node.kubelet_log_tail(40)
                ),
                _ => Err(format!(
                    "{}\n{}",
                    pod["status"],
                    cluster
                        .kubectl(&[
                            "get",
                            "events",
                            "-n",
                            NS,
                            "--field-selector",
                            &format!("involvedObject.name={name}")
                        ])
                        .unwrap_or_default()
                )),
            }
        },
    )
    .unwrap()
}

/// Deletes pod `name` and waits until kubelet has torn it down (unpublished
/// and unstaged its volumes) and the object is gone.
fn delete_pod(cluster: &Cluster, name: &str) {
    cluster
        .kubectl(&[
            "delete",
            "pod",
            name,
            "-n",
            NS,
            "--wait=true",
            "--timeout=180s",
        ])
        .unwrap();
}

/// Bytes written by one pod are read back by the next on the same claim,
/// for each filesystem.
fn data_survives_its_pod(cluster: &Cluster, node: &NodeVm, class: &str, fs: &str) {
    let claim_name = format!("data-{fs}");
    cluster.apply(&claim(&claim_name, class, "1Gi")).unwrap();
    cluster
        .apply(&job_pod(
            &format!("writer-{fs}"),
            &claim_name,
            "dd if=/dev/urandom of=/data/blob bs=64k count=64 2>/dev/null && sync && \
             set -- $(sha256sum /data/blob) && echo $1 > /dev/termination-log",
        ))
        .unwrap();
    let written = finished(cluster, node, &format!("writer-{fs}"));
    assert_eq!(written.len(), 64, "a sha256 from the writer: {written:?}");
    let pvc = cluster.get(&["pvc", &claim_name, "-n", NS]).unwrap();
    let volume = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let pv = cluster.get(&["pv", &volume]).unwrap();
    assert_eq!(pv["spec"]["csi"]["fsType"], fs, "{pv}");
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
        TOPOLOGY_KEY
    );
    // Once its pod is gone kubelet has unpublished and unstaged it.
    delete_pod(cluster, &format!("writer-{fs}"));
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap();
    let mounts = node.sh("cat /proc/mounts").unwrap();
    assert!(
        !mounts.contains(handle),
        "{handle} still mounted after its pod is gone:\n{mounts}"
    );

    cluster
        .apply(&job_pod(
            &format!("reader-{fs}"),
            &claim_name,
            "set -- $(sha256sum /data/blob) && echo $1 > /dev/termination-log",
        ))
        .unwrap();
    let read = finished(cluster, node, &format!("reader-{fs}"));
    assert_eq!(read, written, "the second pod reads what the first wrote");
    delete_pod(cluster, &format!("reader-{fs}"));
    cluster
        .kubectl(&[
            "delete",
            "pvc",
            &claim_name,
            "-n",
            NS,
            "--wait=true",
            "--timeout=180s",
        ])
        .unwrap();
}

#[test]
fn pods_write_and_read_their_volumes_through_kubelet() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = kubelet_node(&mut cluster, "vm-node");

    // kubelet learnt the driver from the agent: the CSINode says so, and the
    // node carries the topology the agent answered NodeGetInfo with.
    let node_object = cluster.get(&["node", "vm-node"]).unwrap();
    assert_eq!(node_object["metadata"]["labels"][TOPOLOGY_KEY], "vm-node");
    let metrics = node
        .sh("busybox wget -qO- http://127.0.0.1:9808/metrics")
        .unwrap();
    assert!(
        metrics.contains("lvmlocal_agent_kubelet_registered 1"),
        "{metrics}"
    );

    data_survives_its_pod(&cluster, &node, "lvmlocal-nvme", "ext4");
    let mut xfs: Value = cluster.get(&["storageclass", "lvmlocal-ssd"]).unwrap();
    xfs["metadata"] = json!({"name": "lvmlocal-ssd-xfs"});
    xfs["parameters"]["csi.storage.k8s.io/fstype"] = json!("xfs");
    cluster.apply(&xfs).unwrap();
    data_survives_its_pod(&cluster, &node, "lvmlocal-ssd-xfs", "xfs");

    // Every volume went with its claim: no LogicalVolume and no LV is left.
    wait_for("no LV left", Duration::from_secs(120), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        lvs.is_empty().then_some(()).ok_or(format!("{lvs:?}"))
    })
    .unwrap();
}
