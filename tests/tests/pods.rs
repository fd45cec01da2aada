//! Pods on a real node: the control plane on the host, and in a VM with real
//! disks kubelet, containerd and the agent, which registers the driver with
//! kubelet. Every volume here is staged, published, expanded and torn down
//! by kubelet's own calls, and every byte is written and read by a pod.

use std::sync::Mutex;
use std::time::Duration;

use lvmlocal_tests::cluster::{CLAIM_LABEL, Cluster, NodeVm, Options, TOPOLOGY_KEY};
use lvmlocal_tests::pod_io::{
    attributes_class, dd_in_pod, pod_io_max, set_attributes_class, volume_device,
};
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::workload::{NS, claim, shell_pod, shell_stateful_set};
use lvmlocal_tests::{GIB, Vm};
use serde_json::{Value, json};

/// One cluster and VM at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

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
        .apply(&shell_pod(
            &format!("writer-{fs}"),
            Some(&claim_name),
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
        .apply(&shell_pod(
            &format!("reader-{fs}"),
            Some(&claim_name),
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
            shell_pod(name, Some("raw"), script),
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
            shell_pod(
                "grouped",
                Some("shared"),
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
        .apply(&shell_pod(
            "grower",
            Some("growing"),
            "while :; do set -- $(df -Pk /data | tail -n 1); \
             if [ \"$2\" -gt 1500000 ]; then echo $2 > /dev/termination-log; exit 0; fi; \
             sleep 1; done",
        ))
        .unwrap();
    cluster.wait_running(NS, "grower").unwrap();
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

/// The value of the first sample of `metric` whose labels contain
/// `labels`, in a Prometheus text exposition.
fn sample(exposition: &str, metric: &str, labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (found, value) = rest.split_once("} ")?;
        found.contains(labels).then(|| value.trim().parse().ok())?
    })
}

#[test]
fn a_stateful_set_spreads_and_kubelet_reports_what_the_agent_measures() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = kubelet_node(&mut cluster, "vm-node");
    // A second node with room, but of SSD only: kube-scheduler's own
    // storage capacity check (the CSIStorageCapacity objects) refuses it
    // before the extender is asked.
    cluster
        .add_paper_node("paper-ssd", "ssd", 100 * GIB)
        .unwrap();

    // Two replicas that may not share a node: one runs on the VM node with
    // its claim; the other has nowhere to go, and says why for each node.
    let mut db = shell_stateful_set(
        "db",
        2,
        "lvmlocal-nvme",
        "1Gi",
        "dd if=/dev/zero of=/data/fill bs=1M count=8 2>/dev/null && sync && exec sleep 3600",
    );
    db["spec"]["template"]["spec"]["affinity"] = json!({"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app": "db"}},
            "topologyKey": "kubernetes.io/hostname",
        }],
    }});
    cluster.apply(&db).unwrap();
    let running = wait_for("one replica running", Duration::from_secs(300), || {
        let pods = cluster.list("pods").map_err(|err| err.to_string())?;
        pods.iter()
            .find(|pod| pod["status"]["phase"] == "Running")
            .cloned()
            .ok_or(format!("{pods:?}"))
    })
    .unwrap();
    assert_eq!(running["spec"]["nodeName"], "vm-node");
    let name = running["metadata"]["name"].as_str().unwrap().to_owned();
    let other = if name == "db-0" { "db-1" } else { "db-0" };
    let reason = wait_for(
        &format!("{other} refused by every node"),
        Duration::from_secs(120),
        || {
            let events = cluster
                .kubectl(&[
                    "get",
                    "events",
                    "-n",
                    NS,
                    "--field-selector",
                    &format!("involvedObject.name={other},reason=FailedScheduling"),
                    "-o",
                    "jsonpath={.items[*].message}",
                ])
                .map_err(|err| err.to_string())?;
            (events.contains("1 node(s) didn't match pod anti-affinity rules")
                && events.contains("1 node(s) did not have enough free storage"))
            .then_some(events.clone())
            .ok_or(events)
        },
    )
    .unwrap();
    let pending = cluster.get(&["pod", other, "-n", NS]).unwrap();
    assert_eq!(pending["status"]["phase"], "Pending", "{reason}");
    assert!(pending["spec"]["nodeName"].is_null());

    // kubelet's volume stats for the running replica's claim are what the
    // agent answered NodeGetVolumeStats with.
    let claim_name = format!("data-{name}");
    let pvc = cluster.get(&["pvc", &claim_name, "-n", NS]).unwrap();
    let volume = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let (used, capacity) = wait_for(
        "kubelet's volume stats equal to the agent's",
        Duration::from_secs(120),
        || {
            let kubelet = node
                .sh("busybox wget -qO- http://127.0.0.1:10255/metrics")
                .map_err(|err| err.to_string())?;
            let agent = node
                .sh("busybox wget -qO- http://127.0.0.1:9808/metrics")
                .map_err(|err| err.to_string())?;
            let of_claim = format!("persistentvolumeclaim=\"{claim_name}\"");
            let of_volume = format!("volume=\"{volume}\"");
            let kubelet_used = sample(&kubelet, "kubelet_volume_stats_used_bytes", &of_claim);
            let kubelet_capacity =
                sample(&kubelet, "kubelet_volume_stats_capacity_bytes", &of_claim);
            let agent_used = sample(&agent, "lvmlocal_agent_volume_used_bytes", &of_volume);
            let agent_capacity =
                sample(&agent, "lvmlocal_agent_volume_capacity_bytes", &of_volume);
            let seen = format!(
                "kubelet used {kubelet_used:?} capacity {kubelet_capacity:?}, agent used {agent_used:?} capacity {agent_capacity:?}"
            );
            match (kubelet_used, kubelet_capacity) {
                (Some(used), Some(capacity))
                    if used >= 8.0 * 1024.0 * 1024.0
                        && kubelet_used == agent_used
                        && kubelet_capacity == agent_capacity =>
                {
                    Ok((used, capacity))
                }
                _ => Err(seen),
            }
        },
    )
    .unwrap();
    assert!(
        used < capacity && capacity <= GIB as f64,
        "{used} of {capacity}"
    );
}

/// `measured` is within 10 % of `limit`.
fn near(what: &str, measured: f64, limit: f64) {
    let ratio = measured / limit;
    println!(
        "{what}: {measured:.1} against a limit of {limit:.0} ({:.1} %)",
        ratio * 100.0
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {measured:.1} is not within 10 % of {limit}"
    );
}

fn io_status(cluster: &Cluster, volume: &str) -> Value {
    cluster.get(&["logicalvolume", volume]).unwrap()["status"]["ioLimits"].clone()
}

/// IO limits from the StorageClass hold a running pod's direct and
/// buffered writes and its reads to the limits; a VolumeAttributesClass set
/// on the claim replaces them (csi-resizer's ControllerModifyVolume) and
/// the pod's writes are unlimited again within seconds. Bad values are
/// refused by the API server, naming the parameter.
#[test]
fn io_limits_hold_a_pods_io_and_follow_its_attributes_class() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = kubelet_node(&mut cluster, "vm-node");

    const WRITE_BPS: f64 = 6.0 * 1024.0 * 1024.0;
    const WRITE_IOPS: f64 = 50.0;
    const READ_IOPS: f64 = 80.0;
    let mut class: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    class["metadata"] = json!({"name": "lvmlocal-nvme-limited"});
    class["parameters"]["lvmlocal.io/write-bps"] = json!("6Mi");
    class["parameters"]["lvmlocal.io/write-iops"] = json!("50");
    class["parameters"]["lvmlocal.io/read-iops"] = json!("80");
    let mut bad = class.clone();
    bad["metadata"] = json!({"name": "lvmlocal-nvme-bad"});
    bad["parameters"]["lvmlocal.io/write-iops"] = json!("0");
    let refused = cluster.apply(&bad).expect_err("a write-iops of 0");
    assert!(
        format!("{refused:#}").contains("lvmlocal.io/write-iops must be whole numbers"),
        "{refused:#}"
    );
    cluster.apply(&class).unwrap();
    let refused = cluster
        .apply(&attributes_class(
            "bad",
            json!({"lvmlocal.io/write-bps": "6MB"}),
        ))
        .expect_err("a write-bps in MB");
    assert!(
        format!("{refused:#}").contains("lvmlocal.io/write-bps must be whole numbers"),
        "{refused:#}"
    );
    let refused = cluster
        .apply(&attributes_class(
            "bad",
            json!({"lvmlocal.io/media": "hdd"}),
        ))
        .expect_err("a media class in an attributes class");
    assert!(
        format!("{refused:#}")
            .contains("unknown VolumeAttributesClass parameter lvmlocal.io/media"),
        "{refused:#}"
    );

    cluster
        .apply(&claim("limited", "lvmlocal-nvme-limited", "1Gi"))
        .unwrap();
    cluster
        .apply(&shell_pod("limited", Some("limited"), "sleep 3600"))
        .unwrap();
    let pod = cluster.wait_running(NS, "limited").unwrap();
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let pvc = cluster.get(&["pvc", "limited", "-n", NS]).unwrap();
    let pv = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let volume = cluster.get(&["pv", &pv]).unwrap()["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    let limits = json!({"writeBps": 6291456, "writeIops": 50, "readIops": 80});
    wait_for("the limits in force", Duration::from_secs(60), || {
        let status = io_status(&cluster, &volume);
        (status["applied"] == limits && status["enforced"] == true)
            .then_some(())
            .ok_or(status.to_string())
    })
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    // The agent's next check counts the pod as held.
    wait_for("the pod counted as held", Duration::from_secs(30), || {
        let metrics = node
            .sh("busybox wget -qO- http://127.0.0.1:9808/metrics")
            .map_err(|err| err.to_string())?;
        metrics
            .contains("lvmlocal_agent_io_limited_pods 1")
            .then_some(())
            .ok_or(metrics)
    })
    .unwrap();
    let io_max = pod_io_max(&node, &uid).unwrap();
    assert!(
        io_max.contains("rbps=max wbps=6291456 riops=80 wiops=50"),
        "{io_max}"
    );

    let target = format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount");
    let device = volume_device(&cluster, &node, &volume).unwrap();
    let run = dd_in_pod(
        &node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/direct bs=1M count=36 oflag=direct"),
    )
    .unwrap();
    near("direct writes, bytes/s", run.bytes / run.seconds, WRITE_BPS);
    let run = dd_in_pod(
        &node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/direct bs=4k count=300 oflag=direct conv=notrunc"),
    )
    .unwrap();
    near(
        "direct 4 KiB writes, IOPS",
        run.bytes / 4096.0 / run.seconds,
        WRITE_IOPS,
    );
    // Buffered writes fill the page cache at memory speed; the limit holds
    // their writeback, charged to the pod: timed here as the fsync that
    // waits for it, against the bytes the device took from the cgroup.
    let run = dd_in_pod(
        &node,
        &uid,
        &device,
        &format!(
            "sh -c 'dd if=/dev/zero of={target}/buffered bs=1M count=48 2>/dev/null && \
             dd if=/dev/null of={target}/buffered count=0 oflag=append conv=notrunc,fsync'"
        ),
    )
    .unwrap();
    assert!(
        run.device.get("wbytes").copied().unwrap_or(0.0) >= 48.0 * 1024.0 * 1024.0,
        "the writeback was not charged to the pod: {:?}",
        run.device
    );
    near(
        "buffered writes' writeback, bytes/s",
        run.device_rate("wbytes"),
        WRITE_BPS,
    );
    let run = dd_in_pod(
        &node,
        &uid,
        &device,
        &format!("dd if={target}/direct of=/dev/null bs=4k count=240 iflag=direct"),
    )
    .unwrap();
    near(
        "direct 4 KiB reads, IOPS",
        run.bytes / 4096.0 / run.seconds,
        READ_IOPS,
    );

    // A VolumeAttributesClass with reads limited only: the writes are free.
    cluster
        .apply(&attributes_class(
            "reads-only",
            json!({"lvmlocal.io/read-iops": "80"}),
        ))
        .unwrap();
    let asked = std::time::Instant::now();
    set_attributes_class(&cluster, NS, "limited", "reads-only").unwrap();
    wait_for("the new limits in force", Duration::from_secs(120), || {
        let status = io_status(&cluster, &volume);
        (status["applied"] == json!({"readIops": 80}) && status["enforced"] == true)
            .then_some(())
            .ok_or(status.to_string())
    })
    .unwrap();
    println!(
        "claim patched → new limits in force: {:.1} s",
        asked.elapsed().as_secs_f64()
    );
    wait_for("the claim's class current", Duration::from_secs(60), || {
        let pvc = cluster
            .get(&["pvc", "limited", "-n", NS])
            .map_err(|err| err.to_string())?;
        (pvc["status"]["currentVolumeAttributesClassName"] == "reads-only")
            .then_some(())
            .ok_or(pvc["status"].to_string())
    })
    .unwrap();
    let run = dd_in_pod(
        &node,
        &uid,
        &device,
        &format!("dd if=/dev/zero of={target}/direct bs=1M count=36 oflag=direct conv=notrunc"),
    )
    .unwrap();
    let unlimited = run.bytes / run.seconds;
    println!("direct writes without a limit: {unlimited:.0} bytes/s");
    assert!(
        unlimited > 1.5 * WRITE_BPS,
        "writes still held to the old limit: {unlimited:.0} bytes/s"
    );

    // A crashed and restarted agent, which has seen no publication since,
    // still reaches the running pod: its publication was recorded on disk.
    node.kill_agent().unwrap();
    node.start_agent_with(&["--kubelet-registration-path", "/run/lvmlocal/csi.sock"])
        .unwrap();
    cluster
        .apply(&attributes_class(
            "writes-8mi",
            json!({"lvmlocal.io/write-bps": "8Mi"}),
        ))
        .unwrap();
    set_attributes_class(&cluster, NS, "limited", "writes-8mi").unwrap();
    wait_for(
        "the pod held by the restarted agent",
        Duration::from_secs(120),
        || {
            let status = io_status(&cluster, &volume);
            let io_max = pod_io_max(&node, &uid).map_err(|err| err.to_string())?;
            (status["applied"] == json!({"writeBps": 8388608})
                && status["enforced"] == true
                && io_max.contains(&format!(
                    "{device} rbps=max wbps=8388608 riops=max wiops=max"
                )))
            .then_some(())
            .ok_or(format!("{status}\n{io_max}"))
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));

    delete_pod(&cluster, "limited");
    cluster
        .kubectl(&[
            "delete",
            "pvc",
            "limited",
            "-n",
            NS,
            "--wait=true",
            "--timeout=180s",
        ])
        .unwrap();
    // The publication records went with the volume.
    let records = node
        .sh("ls /var/lib/kubelet/plugins/lvmlocal.io/publications 2>/dev/null; true")
        .unwrap();
    assert!(!records.contains(&volume), "{records}");
}
