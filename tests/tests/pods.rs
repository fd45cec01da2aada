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

/// `pod` with `patch` merged into its spec's first container (`container`)
/// and into its spec (`spec`).
fn with(mut pod: Value, spec: Value, container: Value) -> Value {
    for (key, value) in spec.as_object().unwrap() {
        pod["spec"][key] = value.clone();
    }
    for (key, value) in container.as_object().unwrap() {
        pod["spec"]["containers"][0][key] = value.clone();
    }
    pod
}

#[test]
fn block_volumes_fs_groups_and_online_expansion_in_running_pods() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = kubelet_node(&mut cluster, "vm-node");

    // A raw block volume: bytes written to the device in one pod are on the
    // device in the next.
    let mut raw = claim("raw", "lvmlocal-ssd", "1Gi");
    raw["spec"]["volumeMode"] = json!("Block");
    cluster.apply(&raw).unwrap();
    let device = |name: &str, script: &str| {
        with(
            job_pod(name, "raw", script),
            json!({}),
            json!({"volumeMounts": [], "volumeDevices": [{"name": "data", "devicePath": "/dev/xvda"}]}),
        )
    };
    cluster
        .apply(&device(
            "raw-writer",
            "dd if=/dev/urandom of=/tmp/blob bs=64k count=64 2>/dev/null && \
             dd if=/tmp/blob of=/dev/xvda bs=64k conv=fsync 2>/dev/null && \
             set -- $(sha256sum /tmp/blob) && echo $1 > /dev/termination-log",
        ))
        .unwrap();
    let written = finished(&cluster, &node, "raw-writer");
    assert_eq!(written.len(), 64, "{written:?}");
    delete_pod(&cluster, "raw-writer");
    cluster
        .apply(&device(
            "raw-reader",
            "set -- $(dd if=/dev/xvda bs=64k count=64 2>/dev/null | sha256sum) && \
             echo $1 > /dev/termination-log",
        ))
        .unwrap();
    assert_eq!(finished(&cluster, &node, "raw-reader"), written);
    delete_pod(&cluster, "raw-reader");

    // fsGroup: kubelet gives the volume's files to the pod's group (the
    // CSIDriver's fsGroupPolicy is File), so a pod running as another user
    // writes there, and its new files take the group.
    cluster
        .apply(&claim("shared", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster
        .apply(&with(
            job_pod(
                "grouped",
                "shared",
                "touch /data/mine && set -- $(stat -c '%g %u' /data/mine) && \
                 echo \"$(stat -c %g /data) $1 $2\" > /dev/termination-log",
            ),
            json!({"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000}}),
            json!({}),
        ))
        .unwrap();
    assert_eq!(
        finished(&cluster, &node, "grouped"),
        "2000 2000 1000",
        "the volume's group, and the group and owner of a file the pod made"
    );
    delete_pod(&cluster, "grouped");

    // Online expansion: the claim grows while its pod runs, and the pod
    // sees the larger filesystem without a restart.
    cluster
        .apply(&claim("growing", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster
        .apply(&job_pod(
            "grower",
            "growing",
            "while :; do set -- $(df -Pk /data | tail -n 1); \
             if [ \"$2\" -gt 1500000 ]; then echo $2 > /dev/termination-log; exit 0; fi; \
             sleep 1; done",
        ))
        .unwrap();
    wait_for("pod grower running", Duration::from_secs(300), || {
        let pod = cluster
            .get(&["pod", "grower", "-n", NS])
            .map_err(|err| err.to_string())?;
        (pod["status"]["phase"] == "Running")
            .then_some(())
            .ok_or(pod["status"].to_string())
    })
    .unwrap();
    cluster
        .kubectl(&[
            "patch",
            "pvc",
            "growing",
            "-n",
            NS,
            "--type=merge",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
        ])
        .unwrap();
    let kib: u64 = finished(&cluster, &node, "grower").parse().unwrap();
    assert!(
        kib > 1_500_000 && kib <= 2 * 1024 * 1024,
        "the pod's df after the expansion: {kib} KiB"
    );
    wait_for("PVC growing at 2Gi", Duration::from_secs(120), || {
        let pvc = cluster
            .get(&["pvc", "growing", "-n", NS])
            .map_err(|err| err.to_string())?;
        (pvc["status"]["capacity"]["storage"] == "2Gi")
            .then_some(())
            .ok_or(pvc["status"].to_string())
    })
    .unwrap();
    delete_pod(&cluster, "grower");
}
