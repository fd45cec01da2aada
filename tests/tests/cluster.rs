//! lvmlocal on a real control plane: kube-apiserver, kube-controller-manager,
//! kube-scheduler with the extender, csi-provisioner and csi-resizer on the
//! host, the agent on real disks in a VM. Each test asserts what the cluster
//! ends up holding: PVC phases, PVs, LogicalVolumes, LVs in the VM.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lvmlocal_tests::cluster::{Cluster, NAMESPACE, NodeVm, Options, RELEASE, TOPOLOGY_KEY};
use lvmlocal_tests::manifests::CHART;
use lvmlocal_tests::pod_io::attributes_class;
use lvmlocal_tests::process::wait_for;
use lvmlocal_tests::workload::{NS, claim};
use lvmlocal_tests::{GIB, HOST_FROM_GUEST, Vm};
use serde_json::{Value, json};

/// One cluster and VM at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn node_vm(cluster: &mut Cluster, name: &str) -> NodeVm {
    let vm = Vm::new()
        .nvme("nvme-a", 5, 8 * GIB)
        .ssd("ssd-a", 0, 4 * GIB)
        .hdd("hdd-a", 1, 4 * GIB);
    let node = NodeVm::start(cluster, name, vm).expect("booting the node VM");
    wait_for(
        "the agent's NodeLocalStorage",
        Duration::from_secs(180),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", name])
                .map_err(|err| err.to_string())?;
            let ready = ["nvme", "ssd", "hdd"]
                .iter()
                .all(|media| nls["status"][media]["totalBytes"].as_u64().unwrap_or(0) > 0);
            ready.then_some(()).ok_or(nls.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    // The provisioner's CSIStorageCapacity for each class: what GetCapacity
    // gives for the node, the free space of its volume group.
    let nls = cluster.get(&["nodelocalstorage", name]).unwrap();
    for media in ["nvme", "ssd", "hdd"] {
        let free = nls["status"][media]["freeBytes"].as_u64().unwrap();
        let class = format!("lvmlocal-{media}");
        wait_for(
            &format!("CSIStorageCapacity of {name} for {class} at {free} bytes"),
            Duration::from_secs(60),
            || match cluster.storage_capacity(name, &class) {
                Ok(Some(capacity)) if capacity == free => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
    }
    node
}

fn pod(name: &str, claims: &[&str]) -> Value {
    let volumes: Vec<Value> = claims
        .iter()
        .map(|claim| json!({"name": claim, "persistentVolumeClaim": {"claimName": claim}}))
        .collect();
    let mounts: Vec<Value> = claims
        .iter()
        .map(|claim| json!({"name": claim, "mountPath": format!("/data/{claim}")}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "containers": [{"name": "app", "image": "busybox", "volumeMounts": mounts}],
            "volumes": volumes,
        },
    })
}

fn wait_bound(cluster: &Cluster, name: &str, timeout: Duration) -> Value {
    wait_for(&format!("PVC {name} Bound"), timeout, || {
        let pvc = cluster
            .get(&["pvc", name, "-n", NS])
            .map_err(|err| err.to_string())?;
        (pvc["status"]["phase"] == "Bound")
            .then(|| pvc.clone())
            .ok_or_else(|| {
                let pods = cluster.list("pods").unwrap_or_default();
                let users: Vec<String> = pods
                    .iter()
                    .filter(|pod| {
                        pod.to_string()
                            .contains(&format!("\"claimName\":\"{name}\""))
                    })
                    .map(|pod| {
                        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
                        format!(
                            "pod {pod_name}: {}\nevents: {}",
                            pod["status"],
                            events(cluster, pod_name)
                        )
                    })
                    .collect();
                format!(
                    "{}\nevents: {}\n{}",
                    pvc["status"],
                    events(cluster, name),
                    users.join("\n")
                )
            })
    })
    .unwrap_or_else(|err| panic!("{err:#}"))
}

/// The messages of the events about object `name` in the test namespace.
fn events(cluster: &Cluster, name: &str) -> String {
    events_in(cluster, &["-n", NS], name)
}

/// The messages of the events about object `name` in any namespace, for
/// cluster-scoped objects.
fn all_events(cluster: &Cluster, name: &str) -> String {
    events_in(cluster, &["-A"], name)
}

fn events_in(cluster: &Cluster, scope: &[&str], name: &str) -> String {
    let selector = format!("involvedObject.name={name}");
    let mut args = vec!["events", "--field-selector", &selector];
    args.extend_from_slice(scope);
    cluster
        .get(&args)
        .map(|list| {
            list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|event| format!("{}: {}", event["reason"], event["message"]))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn delete_pod(cluster: &Cluster, name: &str) {
    // No kubelet confirms a graceful deletion here.
    cluster
        .kubectl(&[
            "delete",
            "pod",
            name,
            "-n",
            NS,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])
        .unwrap();
}

#[test]
fn a_claim_of_each_class_binds_grows_and_goes() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = node_vm(&mut cluster, "vm-node");

    let classes = [
        ("nvme", "lvmlocal-nvme"),
        ("ssd", "lvmlocal-ssd"),
        ("hdd", "lvmlocal-hdd"),
    ];
    let started = Instant::now();
    for (media, class) in classes {
        cluster
            .apply(&claim(&format!("data-{media}"), class, "1Gi"))
            .unwrap();
        cluster
            .apply(&pod(&format!("app-{media}"), &[&format!("data-{media}")]))
            .unwrap();
    }
    let mut volumes = Vec::new();
    for (media, _) in classes {
        let name = format!("data-{media}");
        let bound = wait_bound(&cluster, &name, Duration::from_secs(180));
        println!("{name} Bound after {:.1?}", started.elapsed());
        assert_eq!(
            bound["metadata"]["annotations"]["volume.kubernetes.io/selected-node"], "vm-node",
            "{bound}"
        );
        // kube-scheduler binds the pod once its claims are bound.
        let pod_name = format!("app-{media}");
        wait_for(
            &format!("{pod_name} bound to vm-node"),
            Duration::from_secs(60),
            || {
                let pod = cluster
                    .get(&["pod", &pod_name, "-n", NS])
                    .map_err(|err| err.to_string())?;
                (pod["spec"]["nodeName"] == "vm-node")
                    .then_some(())
                    .ok_or(pod["spec"]["nodeName"].to_string())
            },
        )
        .unwrap();
        let pv_name = bound["spec"]["volumeName"].as_str().unwrap().to_string();
        let pv = cluster.get(&["pv", &pv_name]).unwrap();
        assert_eq!(pv["spec"]["csi"]["driver"], "lvmlocal.io");
        let handle = pv["spec"]["csi"]["volumeHandle"]
            .as_str()
            .unwrap()
            .to_string();
        let terms =
            &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!(terms["key"], TOPOLOGY_KEY, "{pv}");
        assert_eq!(terms["values"][0], "vm-node", "{pv}");
        assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi", "{pv}");
        let llv = cluster.get(&["logicalvolume", &handle]).unwrap();
        assert_eq!(llv["status"]["phase"], "Ready", "{llv}");
        assert_eq!(llv["spec"]["media"], media, "{llv}");
        assert_eq!(llv["spec"]["pvc"]["name"], name.as_str(), "{llv}");
        let lvs = node.lvs().unwrap();
        assert_eq!(
            lvs.get(&format!("lvmlocal-{media}/{handle}")),
            Some(&GIB),
            "LVs in the VM: {lvs:?}"
        );
        volumes.push((media, name, pv_name, handle));
    }

    // IO limits from the claim's VolumeAttributesClass reach the
    // LogicalVolume at creation. This node has no cgroup v2 mounted: the
    // volume works, and its status and an event say the limits are not
    // enforced, and why.
    cluster
        .apply(&attributes_class(
            "modest",
            json!({"lvmlocal.io/write-iops": "100", "lvmlocal.io/read-bps": "10Mi"}),
        ))
        .unwrap();
    let mut limited = claim("limited", "lvmlocal-ssd", "1Gi");
    limited["spec"]["volumeAttributesClassName"] = json!("modest");
    cluster.apply(&limited).unwrap();
    cluster.apply(&pod("app-limited", &["limited"])).unwrap();
    let bound = wait_bound(&cluster, "limited", Duration::from_secs(180));
    let pv = cluster
        .get(&["pv", bound["spec"]["volumeName"].as_str().unwrap()])
        .unwrap();
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap();
    wait_for(
        "the limits reported not enforced",
        Duration::from_secs(60),
        || {
            let llv = cluster
                .get(&["logicalvolume", handle])
                .map_err(|err| err.to_string())?;
            let io = &llv["status"]["ioLimits"];
            (llv["status"]["phase"] == "Ready"
                && llv["spec"]["ioLimits"] == json!({"writeIops": 100, "readBps": 10485760})
                && io["applied"] == llv["spec"]["ioLimits"]
                && io["enforced"] == false
                && io["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no cgroup v2 hierarchy at /sys/fs/cgroup")))
            .then_some(())
            .ok_or(llv.to_string())
        },
    )
    .unwrap();
    wait_for("the event", Duration::from_secs(30), || {
        let said = all_events(&cluster, handle);
        (said.contains("IoLimitsNotEnforced") && said.contains("the volume works without"))
            .then_some(())
            .ok_or(said)
    })
    .unwrap();
    delete_all(&cluster, "app-limited", &["limited"]);
    wait_for("the limited volume gone", Duration::from_secs(120), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        (!lvs.contains_key(&format!("lvmlocal-ssd/{handle}")))
            .then_some(())
            .ok_or(format!("{lvs:?}"))
    })
    .unwrap();

    // The extender saw every pod: its metrics count the filter calls.
    let metrics = lvmlocal_tests::guest::http_get(
        &format!("127.0.0.1:{}", cluster.extender_port),
        "/metrics",
    );
    assert!(metrics.contains("filter"), "{metrics}");

    // Expansion through csi-resizer: the LV grows, the PV says so.
    let (_, name, pv_name, handle) = &volumes[0];
    cluster
        .kubectl(&[
            "patch",
            "pvc",
            name,
            "-n",
            NS,
            "--type=merge",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
        ])
        .unwrap();
    wait_for("PV capacity 2Gi", Duration::from_secs(120), || {
        let pv = cluster
            .get(&["pv", pv_name])
            .map_err(|err| err.to_string())?;
        (pv["spec"]["capacity"]["storage"] == "2Gi")
            .then_some(())
            .ok_or_else(|| format!("{}\n{}", pv["spec"]["capacity"], events(&cluster, name)))
    })
    .unwrap();
    let lvs = node.lvs().unwrap();
    assert_eq!(
        lvs.get(&format!("lvmlocal-nvme/{handle}")),
        Some(&(2 * GIB)),
        "{lvs:?}"
    );

    // Deletion: pod, then claim; the provisioner deletes the PV, the
    // LogicalVolume and the LV go with it.
    for (media, name, pv_name, handle) in &volumes {
        delete_pod(&cluster, &format!("app-{media}"));
        cluster
            .kubectl(&["delete", "pvc", name, "-n", NS, "--wait=false"])
            .unwrap();
        wait_for(
            &format!("{pv_name} and {handle} gone"),
            Duration::from_secs(120),
            || {
                let pvs = cluster.list("pv").map_err(|err| err.to_string())?;
                let llvs = cluster
                    .list("logicalvolume")
                    .map_err(|err| err.to_string())?;
                let named = |items: &[Value], wanted: &str| {
                    items.iter().any(|item| item["metadata"]["name"] == wanted)
                };
                (!named(&pvs, pv_name) && !named(&llvs, handle))
                    .then_some(())
                    .ok_or_else(|| format!("PVs {pvs:?}\nLogicalVolumes {llvs:?}"))
            },
        )
        .unwrap();
    }
    let lvs = node.lvs().unwrap();
    assert!(lvs.is_empty(), "LVs left in the VM: {lvs:?}");
}

/// The node kube-scheduler chose for the claim, once it has.
fn selected_node(cluster: &Cluster, name: &str) -> String {
    wait_for(
        &format!("a node selected for {name}"),
        Duration::from_secs(120),
        || {
            let pvc = cluster
                .get(&["pvc", name, "-n", NS])
                .map_err(|err| err.to_string())?;
            pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| events(cluster, name))
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}"))
}

/// Deletes the pod and its claims and waits until the claims are gone.
fn delete_all(cluster: &Cluster, pod: &str, claims: &[&str]) {
    delete_pod(cluster, pod);
    for claim in claims {
        cluster
            .kubectl(&["delete", "pvc", claim, "-n", NS, "--wait=false"])
            .unwrap();
    }
    wait_for(
        &format!("claims of {pod} gone"),
        Duration::from_secs(120),
        || {
            let left: Vec<String> = cluster
                .list("pvc")
                .map_err(|err| err.to_string())?
                .iter()
                .filter_map(|pvc| pvc["metadata"]["name"].as_str().map(str::to_owned))
                .filter(|name| claims.contains(&name.as_str()))
                .collect();
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        },
    )
    .unwrap();
}

fn llv_phases(cluster: &Cluster) -> Vec<(String, String, String)> {
    cluster
        .list("logicalvolume")
        .unwrap()
        .iter()
        .map(|llv| {
            (
                llv["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                llv["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                llv["status"]["phase"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn placement_binpack_spread_two_claims_and_the_race_for_the_last_space() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    // Nodes whose storage exists only in their NodeLocalStorage: placement
    // choices, never carried out.
    cluster.add_paper_node("paper-1g", "nvme", GIB).unwrap();
    cluster.add_paper_node("paper-2g", "nvme", 2 * GIB).unwrap();
    let node = node_vm(&mut cluster, "vm-node");
    for (paper, bytes) in [("paper-1g", GIB), ("paper-2g", 2 * GIB)] {
        wait_for(
            &format!("capacity of {paper}"),
            Duration::from_secs(60),
            || match cluster.storage_capacity(paper, "lvmlocal-nvme") {
                Ok(Some(capacity)) if capacity == bytes => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
    }

    // A misspelt StorageClass parameter is refused by the API server,
    // naming it; so is a media class that does not exist.
    let mut typo: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    typo["metadata"] = json!({"name": "lvmlocal-typo"});
    typo["parameters"] = json!({"lvmlocal.io/medai": "nvme"});
    let refused = cluster.apply(&typo).expect_err("a misspelt parameter");
    assert!(
        format!("{refused:#}").contains("unknown StorageClass parameter lvmlocal.io/medai"),
        "{refused:#}"
    );
    typo["parameters"] = json!({"lvmlocal.io/media": "floppy"});
    let refused = cluster.apply(&typo).expect_err("an unknown media class");
    assert!(
        format!("{refused:#}").contains("lvmlocal.io/media must be nvme, ssd or hdd"),
        "{refused:#}"
    );
    assert!(cluster.get(&["storageclass", "lvmlocal-typo"]).is_err());

    // binpack (the extender's default): the fullest node that fits.
    cluster
        .apply(&claim("packed", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster.apply(&pod("packed", &["packed"])).unwrap();
    assert_eq!(selected_node(&cluster, "packed"), "paper-1g");
    delete_all(&cluster, "packed", &["packed"]);

    // spread, named by the StorageClass: the emptiest node.
    let mut spread: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    spread["metadata"] = json!({"name": "lvmlocal-nvme-spread"});
    spread["parameters"]["lvmlocal.io/placement"] = json!("spread");
    cluster.apply(&spread).unwrap();
    wait_capacities(&cluster, "lvmlocal-nvme-spread");
    cluster
        .apply(&claim("spread", "lvmlocal-nvme-spread", "1Gi"))
        .unwrap();
    cluster.apply(&pod("spread", &["spread"])).unwrap();
    assert_eq!(selected_node(&cluster, "spread"), "vm-node");
    wait_bound(&cluster, "spread", Duration::from_secs(120));
    delete_all(&cluster, "spread", &["spread"]);

    // Two claims of one pod, each fitting paper-2g alone but not together.
    for name in ["left", "right"] {
        cluster
            .apply(&claim(name, "lvmlocal-nvme", "1536Mi"))
            .unwrap();
    }
    cluster.apply(&pod("pair", &["left", "right"])).unwrap();
    for name in ["left", "right"] {
        assert_eq!(selected_node(&cluster, name), "vm-node", "{name}");
        wait_bound(&cluster, name, Duration::from_secs(120));
    }
    delete_all(&cluster, "pair", &["left", "right"]);
    wait_for("the pair's LVs removed", Duration::from_secs(120), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        lvs.is_empty().then_some(()).ok_or(format!("{lvs:?}"))
    })
    .unwrap();

    balanced_follows_the_load_of_the_disks(&cluster, &node);

    // The race: six pods of 3 GiB for the 8 GiB only vm-node has.
    let racers: Vec<String> = (0..6).map(|i| format!("racer-{i}")).collect();
    for name in &racers {
        cluster.apply(&claim(name, "lvmlocal-nvme", "3Gi")).unwrap();
        cluster.apply(&pod(name, &[name])).unwrap();
    }
    let bound = |cluster: &Cluster| -> Vec<String> {
        cluster
            .list("pvc")
            .unwrap()
            .iter()
            .filter(|pvc| pvc["status"]["phase"] == "Bound")
            .filter_map(|pvc| pvc["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    wait_for("two racers bound", Duration::from_secs(180), || {
        let bound = bound(&cluster);
        (bound.len() >= 2).then_some(()).ok_or(format!("{bound:?}"))
    })
    .unwrap();
    // Let the losers go round the scheduling queue a few more times.
    std::thread::sleep(Duration::from_secs(20));
    let winners = bound(&cluster);
    assert_eq!(winners.len(), 2, "bound: {winners:?}");
    for name in racers.iter().filter(|name| !winners.contains(name)) {
        let pod = cluster.get(&["pod", name, "-n", NS]).unwrap();
        assert!(pod["spec"]["nodeName"].is_null(), "{name} placed: {pod}");
        let said = events(&cluster, name);
        // The extender's reason, or kube-scheduler's own once the new
        // CSIStorageCapacity reached it first.
        assert!(
            said.contains("nvme: needs 3Gi") || said.contains("did not have enough free storage"),
            "{name}: {said}"
        );
    }
    let phases = llv_phases(&cluster);
    let racing: Vec<_> = phases
        .iter()
        .filter(|(_, node, _)| node == "vm-node")
        .collect();
    assert_eq!(racing.len(), 2, "{phases:?}");
    assert!(
        racing.iter().all(|(_, _, phase)| phase == "Ready"),
        "{phases:?}"
    );
    assert!(
        !phases.iter().any(|(_, _, phase)| phase == "Failed"),
        "{phases:?}"
    );
}

/// Waits until every node of the placement test has a CSIStorageCapacity
/// for a new StorageClass (paper-1g's is 0 once binpack filled it):
/// kube-scheduler's own check refuses a node without one, and
/// csi-provisioner makes them a while after the class.
fn wait_capacities(cluster: &Cluster, class: &str) {
    for node in ["paper-1g", "paper-2g", "vm-node"] {
        wait_for(
            &format!("capacity of {node} for {class}"),
            Duration::from_secs(60),
            || match cluster.storage_capacity(node, class) {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
    }
}

/// The `loadPercent` of `node`'s NVMe group as its NodeLocalStorage says.
fn nvme_load(cluster: &Cluster, node: &str) -> Result<u64, String> {
    let nls = cluster
        .get(&["nodelocalstorage", node])
        .map_err(|err| err.to_string())?;
    nls["status"]["load"]["nvme"]["loadPercent"]
        .as_u64()
        .ok_or_else(|| format!("no NVMe load: {}", nls["status"]))
}

/// `balanced` ranks by the load each node reports: the paper nodes' is
/// written here, the VM node's agent measures its own disks' for real.
fn balanced_follows_the_load_of_the_disks(cluster: &Cluster, node: &NodeVm) {
    let mut balanced: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    balanced["metadata"] = json!({"name": "lvmlocal-nvme-balanced"});
    balanced["parameters"]["lvmlocal.io/placement"] = json!("balanced");
    cluster.apply(&balanced).unwrap();
    wait_capacities(cluster, "lvmlocal-nvme-balanced");
    let paper_load = |percent: Option<u64>| {
        for paper in ["paper-1g", "paper-2g"] {
            let load = percent.map(|percent| {
                json!({"nvme": {"loadPercent": percent, "busyPercent": percent, "queueDepthMilli": 0}})
            });
            cluster
                .patch_status("nodelocalstorage", paper, &json!({ "load": load }))
                .unwrap();
        }
    };

    // The VM node's disks are idle, the paper nodes' busy: the VM node,
    // which binpack would never pick for 1 GiB.
    wait_for("the VM node's idle load", Duration::from_secs(60), || {
        let load = nvme_load(cluster, "vm-node")?;
        (load < 10).then_some(()).ok_or(format!("{load}"))
    })
    .unwrap();
    paper_load(Some(60));
    cluster
        .apply(&claim("calm", "lvmlocal-nvme-balanced", "1Gi"))
        .unwrap();
    cluster.apply(&pod("calm", &["calm"])).unwrap();
    assert_eq!(selected_node(cluster, "calm"), "vm-node");
    wait_bound(cluster, "calm", Duration::from_secs(120));
    delete_all(cluster, "calm", &["calm"]);

    // Four streams of reads keep the VM node's NVMe disk busy (O_DIRECT, so
    // the page cache does not answer them) until its agent reports the load;
    // the paper nodes report none: one of them, which spread would never
    // pick. One stream left gaps on a busy machine. As with the agent,
    // setsid makes the readers a group of their own.
    node.sh(
        "setsid sh -c 'for i in 0 1 2 3; do \
           (while :; do dd if=/dev/nvme0n1 of=/dev/null bs=1M count=256 skip=$((i * 256)) iflag=direct; done) & \
         done; wait' </dev/null >/dev/null 2>&1 &\n\
         echo $! > /run/vmbed/reader.pid\n",
    )
    .unwrap();
    paper_load(None);
    let busy = wait_for(
        "the VM node's NVMe load reported",
        Duration::from_secs(240),
        || {
            let load = nvme_load(cluster, "vm-node")?;
            // Any load of 10 or more scores below an idle node.
            (load >= 20).then_some(load).ok_or(format!("{load}"))
        },
    )
    .unwrap();
    cluster
        .apply(&claim("busy", "lvmlocal-nvme-balanced", "1Gi"))
        .unwrap();
    cluster.apply(&pod("busy", &["busy"])).unwrap();
    let chosen = selected_node(cluster, "busy");
    assert!(
        chosen.starts_with("paper-"),
        "{chosen}, vm-node at {busy} %"
    );
    node.sh("kill -KILL -$(cat /run/vmbed/reader.pid)").unwrap();
    delete_all(cluster, "busy", &["busy"]);
}

fn lv_of(cluster: &Cluster, claim: &str) -> String {
    let pvc = cluster.get(&["pvc", claim, "-n", NS]).unwrap();
    let pv = cluster
        .get(&["pv", pvc["spec"]["volumeName"].as_str().unwrap()])
        .unwrap();
    pv["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn crashes_and_restarts_lose_nothing_and_leak_nothing() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = node_vm(&mut cluster, "vm-node");

    // csi-controller SIGKILLed while CreateVolume waits for the agent.
    cluster
        .apply(&claim("survivor", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster.apply(&pod("survivor", &["survivor"])).unwrap();
    wait_for(
        "a LogicalVolume for survivor",
        Duration::from_secs(120),
        || {
            let phases = llv_phases(&cluster);
            (!phases.is_empty())
                .then_some(())
                .ok_or(format!("{phases:?}"))
        },
    )
    .unwrap();
    cluster.restart("csi-controller").unwrap();
    wait_bound(&cluster, "survivor", Duration::from_secs(180));
    let survivor = lv_of(&cluster, "survivor");
    let lvs = node.lvs().unwrap();
    assert_eq!(lvs.len(), 1, "{lvs:?}");
    assert!(
        lvs.contains_key(&format!("lvmlocal-nvme/{survivor}")),
        "{lvs:?}"
    );
    assert_eq!(llv_phases(&cluster).len(), 1);

    // The agent SIGKILLed: a claim made meanwhile waits, and binds once it
    // is back; the volume it already had is untouched.
    node.kill_agent().unwrap();
    cluster
        .apply(&claim("patient", "lvmlocal-ssd", "1Gi"))
        .unwrap();
    cluster.apply(&pod("patient", &["patient"])).unwrap();
    selected_node(&cluster, "patient");
    node.start_agent().unwrap();
    wait_bound(&cluster, "patient", Duration::from_secs(180));
    let lvs = node.lvs().unwrap();
    assert_eq!(lvs.len(), 2, "{lvs:?}");
    assert!(
        lvs.contains_key(&format!("lvmlocal-nvme/{survivor}")),
        "{lvs:?}"
    );
    assert!(
        llv_phases(&cluster)
            .iter()
            .all(|(_, _, phase)| phase == "Ready"),
        "{:?}",
        llv_phases(&cluster)
    );

    // The API server restarted: every watch breaks, and those resuming from
    // a version older than its new watch cache are told 410 Gone. A claim
    // made afterwards needs all three binaries' caches.
    cluster.restart("kube-apiserver").unwrap();
    let restarted = Instant::now();
    cluster
        .apply(&claim("after", "lvmlocal-hdd", "1Gi"))
        .unwrap();
    cluster.apply(&pod("after", &["after"])).unwrap();
    wait_bound(&cluster, "after", Duration::from_secs(180));
    println!(
        "a claim made after the API server restart Bound in {:.1?}",
        restarted.elapsed()
    );
    let lvs = node.lvs().unwrap();
    assert_eq!(lvs.len(), 3, "{lvs:?}");

    // Everything goes away cleanly, nothing leaks.
    for name in ["survivor", "patient", "after"] {
        delete_all(&cluster, name, &[name]);
    }
    wait_for(
        "no LogicalVolume, PV or LV left",
        Duration::from_secs(180),
        || {
            let phases = llv_phases(&cluster);
            let pvs = cluster.list("pv").map_err(|err| err.to_string())?;
            let lvs = node.lvs().map_err(|err| err.to_string())?;
            (phases.is_empty() && pvs.is_empty() && lvs.is_empty())
                .then_some(())
                .ok_or(format!("{phases:?} {} PVs {lvs:?}", pvs.len()))
        },
    )
    .unwrap();
}

/// csi-sanity against the cluster-mode pair: csi-controller's socket as the
/// controller endpoint, the agent's as the node endpoint, every volume a
/// LogicalVolume on the real API server. Both run in the VM, where the
/// node socket is; the host's csi-controller is stopped so one serves.
#[test]
fn csi_sanity_against_the_cluster_mode_pair() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = node_vm(&mut cluster, "vm-node");
    cluster.service("csi-controller").kill();
    let kubeconfig = cluster
        .service_account_kubeconfig(
            "lvmlocal-controller",
            &format!("https://{HOST_FROM_GUEST}:6443"),
            "controller-in-vm",
        )
        .unwrap();
    let controller = lvmlocal_tests::guest::workspace_binary("csi-controller");
    node.sh(&format!(
        "KUBECONFIG={} POD_NAMESPACE=lvmlocal POD_NAME=sanity RUST_LOG=info setsid {} \
         --csi-endpoint unix:///run/lvmlocal/controller.sock --leader-election=false \
         --volume-wait-seconds 40 \
         --metrics-address 127.0.0.1:9809 >> /run/vmbed/controller.log 2>&1 &\n\
         for i in $(seq 1 100); do [ -S /run/lvmlocal/controller.sock ] && exit 0; sleep 0.2; done\n\
         cat /run/vmbed/controller.log; exit 1",
        kubeconfig.display(),
        controller.display()
    ))
    .unwrap();
    let sanity = lvmlocal_tests::cluster::component("csi-sanity");
    let script = format!(
        "mkdir -p /var/lib/kubelet/sanity /tmp/sanity-cluster\n\
         printf 'lvmlocal.io/media: nvme\\nlvmlocal.io/provisioning: thin\\n' > /tmp/sanity-cluster/parameters.yaml\n\
         printf 'lvmlocal.io/write-iops: \"500\"\\nlvmlocal.io/read-bps: 64Mi\\n' > /tmp/sanity-cluster/mutable.yaml\n\
         {} --csi.endpoint=unix:///run/lvmlocal/csi.sock \
         --csi.controllerendpoint=unix:///run/lvmlocal/controller.sock \
         --csi.stagingdir=/var/lib/kubelet/sanity/staging --csi.mountdir=/var/lib/kubelet/sanity/mount \
         --csi.testvolumeparameters=/tmp/sanity-cluster/parameters.yaml \
         --csi.testvolumemutableparameters=/tmp/sanity-cluster/mutable.yaml \
         --csi.testvolumesize=536870912 --ginkgo.no-color 2>&1",
        sanity.display()
    );
    let (status, output) = node.vm.exec(&script, Duration::from_secs(900)).unwrap();
    let summary = output
        .lines()
        .find(|line| line.contains(" Passed | "))
        .unwrap_or_default()
        .to_string();
    let controller_log =
        std::fs::read_to_string(node.vm.ctl_dir().join("controller.log")).unwrap_or_default();
    assert!(
        status == 0 && summary.contains("| 0 Failed |"),
        "csi-sanity exited {status}: {summary}\n{output}\n--- csi-controller in the VM ---\n{controller_log}"
    );
    let passed: usize = summary
        .split_whitespace()
        .take_while(|word| *word != "Passed")
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    println!("csi-sanity, cluster mode: {summary}");
    // With csi-sanity's six ModifyVolume specs and its snapshot and clone
    // specs, which the cluster mode offers for thin volumes (the standalone
    // agent keeps neither IO limits nor snapshots, and skips them).
    assert!(passed >= 70, "{summary}");
    // csi-sanity deletes what it made: nothing is left in the cluster or VM
    // but the thin pool its volumes made.
    wait_for(
        "no LogicalVolume or LV left",
        Duration::from_secs(60),
        || {
            let phases = llv_phases(&cluster);
            let mut lvs = node.lvs().map_err(|err| err.to_string())?;
            lvs.remove("lvmlocal-nvme/lvmlocal_thinpool");
            (phases.is_empty() && lvs.is_empty())
                .then_some(())
                .ok_or(format!("{phases:?} {lvs:?}"))
        },
    )
    .unwrap();
}

/// The bytes at 4 MiB into `device` in the guest, as text.
fn marker_at(node: &NodeVm, device: &str) -> String {
    node.sh(&format!(
        "dd if={device} bs=1M skip=4 count=1 status=none | head -c 32"
    ))
    .unwrap()
}

/// Whether the node's NodeLocalStorage lists `id` as an orphaned LV.
fn listed_orphan(cluster: &Cluster, node: &str, id: &str) -> Result<(), String> {
    let nls = cluster
        .get(&["nodelocalstorage", node])
        .map_err(|err| err.to_string())?;
    nls["status"]["orphanedVolumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|orphan| orphan["id"] == id)
        .then_some(())
        .ok_or_else(|| nls["status"].to_string())
}

/// What vm-node reports no LogicalVolume accounts for in its NVMe group.
fn unaccounted_nvme(cluster: &Cluster) -> u64 {
    cluster
        .get(&["nodelocalstorage", "vm-node"])
        .map(|nls| {
            nls["status"]["unaccountedBytes"]["nvme"]
                .as_u64()
                .unwrap_or(u64::MAX)
        })
        .unwrap_or(u64::MAX)
}

/// A volume's data outlives every deletion but its claim's: a bare delete is
/// refused, deleting the CRD (which admission does not see) leaves the LV as
/// a reported orphan that a re-created object adopts, node and media are
/// immutable, a deletion on intent waits for the PV, and removing the
/// driver's namespace removes no LV.
#[test]
fn data_outlives_every_deletion_but_its_claims() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = node_vm(&mut cluster, "vm-node");

    cluster
        .apply(&claim("precious", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster.apply(&pod("db", &["precious"])).unwrap();
    let bound = wait_bound(&cluster, "precious", Duration::from_secs(180));
    let pv_name = bound["spec"]["volumeName"].as_str().unwrap().to_owned();
    let pv = cluster.get(&["pv", &pv_name]).unwrap();
    let id = pv["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    let device = format!("/dev/lvmlocal-nvme/{id}");
    let marker = "lvmlocal-marker-0123456789abcdef";
    node.sh(&format!(
        "printf '{marker}' | dd of={device} bs=1M seek=4 conv=notrunc,fsync status=none"
    ))
    .unwrap();
    assert_eq!(marker_at(&node, &device), marker);
    let original = cluster.get(&["logicalvolume", &id]).unwrap();

    // A bare delete is refused by admission, naming the way to do it.
    let refused = cluster
        .kubectl(&["delete", "logicalvolume", &id, "--wait=false"])
        .expect_err("an admin's bare delete is refused");
    assert!(
        refused.to_string().contains("lvmlocal.io/delete-intent"),
        "{refused:#}"
    );
    let llv = cluster.get(&["logicalvolume", &id]).unwrap();
    assert!(llv["metadata"]["deletionTimestamp"].is_null(), "{llv}");

    // Node and media cannot be edited away from the LV.
    for (field, value) in [("nodeName", "elsewhere"), ("media", "hdd")] {
        let patch = json!({"spec": {field: value}}).to_string();
        let refused = cluster
            .kubectl(&["patch", "logicalvolume", &id, "--type=merge", "-p", &patch])
            .expect_err("an immutable field");
        assert!(
            refused
                .to_string()
                .contains(&format!("spec.{field} is immutable")),
            "{refused:#}"
        );
    }

    // Removing the CRD deletes every object without admission: the agent
    // lets the objects go and keeps the LV and its data.
    cluster
        .kubectl(&[
            "delete",
            "crd",
            "logicalvolumes.lvmlocal.io",
            "--wait=false",
        ])
        .unwrap();
    wait_for(
        "the LogicalVolume CRD gone",
        Duration::from_secs(120),
        || match cluster.get(&["crd", "logicalvolumes.lvmlocal.io"]) {
            Ok(crd) => Err(crd["status"].to_string()),
            Err(_) => Ok(()),
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    assert_eq!(
        node.lvs().unwrap().get(&format!("lvmlocal-nvme/{id}")),
        Some(&GIB)
    );
    assert_eq!(marker_at(&node, &device), marker);
    wait_for("the orphan listed", Duration::from_secs(120), || {
        listed_orphan(&cluster, "vm-node", &id)
    })
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    assert_eq!(unaccounted_nvme(&cluster), GIB, "the orphan's room");
    let announced = cluster
        .get(&[
            "events",
            "-n",
            NS,
            "--field-selector",
            "involvedObject.name=vm-node",
        ])
        .unwrap();
    assert!(
        announced.to_string().contains("OrphanedVolume"),
        "{announced}"
    );

    // Re-created with the same name and spec, the object adopts the LV.
    cluster
        .kubectl(&[
            "apply",
            "-f",
            &lvmlocal_tests::cluster::workspace_root()
                .join("deploy/base/crds/lvmlocal.io.yaml")
                .display()
                .to_string(),
        ])
        .unwrap();
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/logicalvolumes.lvmlocal.io",
            "--timeout=60s",
        ])
        .unwrap();
    let adopted = json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "LogicalVolume",
        "metadata": {"name": id},
        "spec": original["spec"],
    });
    wait_for(
        "the LogicalVolume re-created",
        Duration::from_secs(60),
        || cluster.apply(&adopted).map_err(|err| err.to_string()),
    )
    .unwrap();
    wait_for("the LV adopted", Duration::from_secs(180), || {
        let llv = cluster
            .get(&["logicalvolume", &id])
            .map_err(|err| err.to_string())?;
        (llv["status"]["phase"] == "Ready" && llv["status"]["devicePath"] == device.as_str())
            .then_some(())
            .ok_or_else(|| llv.to_string())
    })
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    assert_eq!(marker_at(&node, &device), marker);
    wait_for(
        "the orphan no longer listed",
        Duration::from_secs(120),
        || match listed_orphan(&cluster, "vm-node", &id) {
            Ok(()) => Err("still listed".to_owned()),
            Err(_) => Ok(()),
        },
    )
    .unwrap();
    assert_eq!(unaccounted_nvme(&cluster), 0);

    // An LV made by hand in lvmlocal's group takes room no LogicalVolume
    // accounts for, reported once a rescan sees it.
    node.sh("lvcreate -q -y -L 8m -n byhand lvmlocal-nvme")
        .unwrap();
    wait_for(
        "the hand-made LV reported",
        Duration::from_secs(180),
        || {
            let bytes = unaccounted_nvme(&cluster);
            (bytes == 8 << 20).then_some(()).ok_or(bytes.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    node.sh("lvremove -q -y lvmlocal-nvme/byhand").unwrap();
    wait_for("the hand-made LV gone", Duration::from_secs(180), || {
        let bytes = unaccounted_nvme(&cluster);
        (bytes == 0).then_some(()).ok_or(bytes.to_string())
    })
    .unwrap();

    // An operator's deletion on intent is admitted, but the LV stays while
    // the claim's PV still names it.
    cluster
        .kubectl(&[
            "annotate",
            "logicalvolume",
            &id,
            "lvmlocal.io/delete-intent=removed by hand in a test",
        ])
        .unwrap();
    cluster
        .kubectl(&["delete", "logicalvolume", &id, "--wait=false"])
        .unwrap();
    wait_for(
        "the deletion waiting for the PV",
        Duration::from_secs(120),
        || {
            let events = cluster
                .get(&[
                    "events",
                    "-n",
                    NS,
                    "--field-selector",
                    &format!("involvedObject.name={id}"),
                ])
                .map_err(|err| err.to_string())?;
            events
                .to_string()
                .contains("WaitingForPersistentVolume")
                .then_some(())
                .ok_or_else(|| events.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        node.lvs().unwrap().get(&format!("lvmlocal-nvme/{id}")),
        Some(&GIB)
    );
    assert_eq!(marker_at(&node, &device), marker);

    // The claim's deletion is the intent that completes it.
    delete_all(&cluster, "db", &["precious"]);
    wait_for(
        "PV, LogicalVolume and LV gone",
        Duration::from_secs(120),
        || {
            let pvs = cluster.list("pv").map_err(|err| err.to_string())?;
            let llvs = cluster
                .list("logicalvolume")
                .map_err(|err| err.to_string())?;
            let lvs = node.lvs().map_err(|err| err.to_string())?;
            (pvs.is_empty() && llvs.is_empty() && lvs.is_empty())
                .then_some(())
                .ok_or_else(|| format!("PVs {pvs:?}\nLogicalVolumes {llvs:?}\nLVs {lvs:?}"))
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));

    // The driver's namespace removed: its components lose their accounts,
    // no LV is removed.
    cluster
        .apply(&claim("kept", "lvmlocal-ssd", "1Gi"))
        .unwrap();
    cluster.apply(&pod("keeper", &["kept"])).unwrap();
    let bound = wait_bound(&cluster, "kept", Duration::from_secs(180));
    let pv = cluster
        .get(&["pv", bound["spec"]["volumeName"].as_str().unwrap()])
        .unwrap();
    let kept = format!(
        "lvmlocal-ssd/{}",
        pv["spec"]["csi"]["volumeHandle"].as_str().unwrap()
    );
    cluster
        .kubectl(&[
            "delete",
            "namespace",
            "lvmlocal",
            "--wait=true",
            "--timeout=120s",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let lvs = node.lvs().unwrap();
    assert_eq!(lvs.get(&kept), Some(&GIB), "{lvs:?}");
    assert_eq!(lvs.len(), 1, "{lvs:?}");
}

/// The `state` and `reason` NodeLocalStorage reports for the disk at `slot`.
fn disk_report(cluster: &Cluster, node: &str, slot: &str) -> Result<(String, String), String> {
    let nls = cluster
        .get(&["nodelocalstorage", node])
        .map_err(|err| err.to_string())?;
    nls["status"]["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|disk| disk["slot"] == slot)
        .map(|disk| {
            let field = |name: &str| disk[name].as_str().unwrap_or_default().to_owned();
            (field("state"), field("reason"))
        })
        .ok_or_else(|| nls["status"].to_string())
}

/// A node's disks are claimed only once it is labelled, a control plane's
/// not even then, and the label takes effect without restarting the agent.
#[test]
fn disks_are_claimed_only_on_nodes_labelled_for_it() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let slot = "pci-0000:00:05.0-nvme-1";
    let second = "pci-0000:00:06.0-nvme-1";
    let vm = Vm::new()
        .nvme("nvme-a", 5, 2 * GIB)
        .nvme("nvme-b", 6, 2 * GIB);
    let node = NodeVm::start_labelled(&mut cluster, "vm-node", vm, &[]).unwrap();
    let reported = |state: &str, reason: &str, timeout: u64| {
        wait_for(
            &format!("disk {slot} reported {state}: ...{reason}..."),
            Duration::from_secs(timeout),
            || match disk_report(&cluster, "vm-node", slot)? {
                (got, why) if got == state && why.contains(reason) => Ok(why),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()))
    };
    let no_lvm = || {
        let lvm = node.sh("pvs --noheadings; vgs --noheadings").unwrap();
        assert_eq!(lvm.trim(), "", "LVM metadata written:\n{lvm}");
    };

    let why = reported("not-claimed", "lvmlocal.io/claim-disks=true", 180);
    assert!(why.starts_with("blank, would join lvmlocal-nvme"), "{why}");
    no_lvm();

    cluster
        .label_node(
            "vm-node",
            &[(CONTROL_PLANE, ""), ("lvmlocal.io/claim-disks", "true")],
        )
        .unwrap();
    reported("not-claimed", "claim_control_plane", 60);
    no_lvm();
    let nls = cluster.get(&["nodelocalstorage", "vm-node"]).unwrap();
    assert!(nls["status"]["nvme"].is_null(), "{}", nls["status"]);

    // Shorter than the agent's rescan interval (60 s): the watch brings it.
    cluster
        .label_node("vm-node", &[(CONTROL_PLANE, "-")])
        .unwrap();
    reported("member", "lvmlocal-nvme", 45);
    let pvs = node.sh("pvs --noheadings -o pv_name,vg_name").unwrap();
    assert_eq!(pvs.matches("lvmlocal-nvme").count(), 2, "{pvs}");
    // Both disks joined in one pass; each has an event of its own.
    let joined = wait_for(
        "one DiskJoined event per disk",
        Duration::from_secs(30),
        || {
            let list = cluster
                .get(&[
                    "events",
                    "-n",
                    NS,
                    "--field-selector",
                    "involvedObject.name=vm-node,reason=DiskJoined",
                ])
                .map_err(|err| format!("{err:#}"))?;
            let notes: Vec<String> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|event| event["message"].as_str().unwrap_or_default().to_owned())
                .collect();
            if notes.len() >= 2 {
                Ok(notes)
            } else {
                Err(format!("{notes:?}"))
            }
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    assert_eq!(joined.len(), 2, "{joined:?}");
    for disk in [slot, second] {
        assert!(
            joined.iter().any(|note| note.contains(disk)),
            "no event names {disk}: {joined:?}"
        );
    }
    wait_for(
        "CSIStorageCapacity of the new group",
        Duration::from_secs(60),
        || match cluster.storage_capacity("vm-node", "lvmlocal-nvme") {
            Ok(Some(bytes)) if bytes > GIB => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
}

/// Marks each LogicalVolume of `node` that has no status yet Ready, as an
/// agent would: for a paper node, whose volumes nobody makes.
fn stand_in_for_agent(cluster: &Cluster, node: &str) -> Result<(), String> {
    for llv in cluster.list("logicalvolumes").map_err(|e| e.to_string())? {
        if llv["spec"]["nodeName"] != node || !llv["status"].is_null() {
            continue;
        }
        let name = llv["metadata"]["name"].as_str().unwrap_or_default();
        let size = llv["spec"]["sizeBytes"].clone();
        let status = json!({
            "phase": "Ready",
            "devicePath": format!("/dev/lvmlocal-{}/{name}", llv["spec"]["media"].as_str().unwrap_or_default()),
            "sizeBytes": size,
            "observedGeneration": llv["metadata"]["generation"],
            "condition": {"abnormal": false, "reason": "Healthy", "message": "healthy"},
        });
        cluster
            .patch_status("logicalvolume", name, &status)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn uid(cluster: &Cluster, kind: &str, name: &str) -> Option<String> {
    cluster
        .get(&[kind, name, "-n", NS])
        .ok()
        .and_then(|object| object["metadata"]["uid"].as_str().map(str::to_owned))
}

/// A StatefulSet of `replicas` pods, each with one claim of the SSD class
/// that opts in to being recreated when its volume is lost.
fn opted_in_stateful_set(name: &str, replicas: u32, size: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "db", "image": "busybox",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data",
                    "annotations": {"lvmlocal.io/on-node-loss": "recreate"}},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "lvmlocal-ssd",
                    "resources": {"requests": {"storage": size}},
                },
            }],
        },
    })
}

#[test]
fn lost_nodes_and_volumes_are_told_and_opted_in_claims_move() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options {
        unclaimed_grace_secs: Some(20),
        ..Options::default()
    })
    .expect("starting the cluster");
    cluster.add_paper_node("paper", "ssd", 2 * GIB).unwrap();
    let node = node_vm(&mut cluster, "vm-node");

    // A claim on paper without the opt-in, and a StatefulSet of two replicas
    // with it: binpack puts one replica on each node.
    cluster
        .apply(&claim("keep-me", "lvmlocal-ssd", "256Mi"))
        .unwrap();
    let mut keeper = pod("keeper", &["keep-me"]);
    keeper["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "paper"});
    cluster.apply(&keeper).unwrap();
    cluster
        .apply(&opted_in_stateful_set("db", 2, "1536Mi"))
        .unwrap();
    let claims = ["keep-me", "data-db-0", "data-db-1"];
    wait_for("every claim Bound", Duration::from_secs(240), || {
        stand_in_for_agent(&cluster, "paper")?;
        let unbound: Vec<&str> = claims
            .iter()
            .copied()
            .filter(|name| {
                cluster
                    .get(&["pvc", name, "-n", NS])
                    .map_or(true, |pvc| pvc["status"]["phase"] != "Bound")
            })
            .collect();
        unbound
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("{unbound:?}\n{}", events(&cluster, "db")))
    })
    .unwrap();
    assert_eq!(selected_node(&cluster, "keep-me"), "paper");
    let on_paper: Vec<&str> = ["data-db-0", "data-db-1"]
        .into_iter()
        .filter(|name| selected_node(&cluster, name) == "paper")
        .collect();
    assert_eq!(on_paper.len(), 1, "one replica per node");
    let moved = on_paper[0];
    let moved_uid = uid(&cluster, "pvc", moved).unwrap();
    let stayed = if moved == "data-db-0" {
        "data-db-1"
    } else {
        "data-db-0"
    };
    let stayed_uid = uid(&cluster, "pvc", stayed).unwrap();
    let kept_uid = uid(&cluster, "pvc", "keep-me").unwrap();

    // The Node object deleted: the opted-in claim is deleted and made again
    // by the StatefulSet, on the node that is left; the other is kept, and
    // an event says why.
    cluster.kubectl(&["delete", "node", "paper"]).unwrap();
    wait_for(
        &format!("{moved} recreated on vm-node and Bound"),
        Duration::from_secs(240),
        || {
            let pvc = cluster
                .get(&["pvc", moved, "-n", NS])
                .map_err(|e| e.to_string())?;
            let fresh = pvc["metadata"]["uid"].as_str() != Some(moved_uid.as_str());
            let bound = pvc["status"]["phase"] == "Bound";
            (fresh && bound)
                .then_some(())
                .ok_or_else(|| format!("{}\n{}", pvc["status"], events(&cluster, moved)))
        },
    )
    .unwrap();
    assert_eq!(selected_node(&cluster, moved), "vm-node");
    assert_eq!(
        uid(&cluster, "pvc", stayed).as_deref(),
        Some(stayed_uid.as_str())
    );
    wait_for("keep-me told it is kept", Duration::from_secs(60), || {
        let said = events(&cluster, "keep-me");
        said.contains("NodeDeleted").then_some(()).ok_or(said)
    })
    .unwrap();
    let said = events(&cluster, "keep-me");
    assert!(
        said.contains("node paper was deleted")
            && said.contains("the claim is kept: annotate it lvmlocal.io/on-node-loss=recreate"),
        "{said}"
    );
    assert_eq!(
        uid(&cluster, "pvc", "keep-me").as_deref(),
        Some(kept_uid.as_str())
    );

    // An LV removed behind the agent's back: its LogicalVolume and its
    // claim say so, and the claim, without the opt-in, is kept.
    cluster
        .apply(&claim("fragile", "lvmlocal-ssd", "256Mi"))
        .unwrap();
    cluster.apply(&pod("fragile", &["fragile"])).unwrap();
    wait_bound(&cluster, "fragile", Duration::from_secs(120));
    let fragile = lv_of(&cluster, "fragile");
    node.sh(&format!("lvremove -y lvmlocal-ssd/{fragile}"))
        .unwrap();
    wait_for("fragile reported lost", Duration::from_secs(120), || {
        let llv = cluster
            .get(&["logicalvolume", &fragile])
            .map_err(|e| e.to_string())?;
        let condition = &llv["status"]["condition"];
        (condition["abnormal"] == true && condition["reason"] == "VolumeLost")
            .then_some(())
            .ok_or(llv["status"].to_string())
    })
    .unwrap();
    wait_for("fragile's claim told", Duration::from_secs(60), || {
        let said = events(&cluster, "fragile");
        (said.contains("VolumeLost")
            && said.contains("is gone from the node")
            && said.contains("the claim is kept"))
        .then_some(())
        .ok_or(said)
    })
    .unwrap();
    assert!(
        !node
            .lvs()
            .unwrap()
            .contains_key(&format!("lvmlocal-ssd/{fragile}")),
        "no blank LV is made in the lost one's place"
    );

    // A class may opt in too: the API server takes its parameter and
    // refuses a wrong value, and CreateVolume records the choice on the
    // volume. Volumes left with no PV and no claim (Retain, then the PV
    // deleted by hand) are reported; the opted-in one is collected, LV and
    // all, the other kept.
    let mut class: Value = cluster.get(&["storageclass", "lvmlocal-ssd"]).unwrap();
    class["metadata"] = json!({"name": "lvmlocal-ssd-recreate"});
    class["reclaimPolicy"] = "Retain".into();
    class["parameters"]["lvmlocal.io/on-node-loss"] = "delete".into();
    let refused = cluster.apply(&class).expect_err("a wrong choice");
    assert!(
        format!("{refused:#}").contains("lvmlocal.io/on-node-loss must be keep or recreate"),
        "{refused:#}"
    );
    class["parameters"]["lvmlocal.io/on-node-loss"] = "recreate".into();
    cluster.apply(&class).unwrap();
    class["metadata"] = json!({"name": "lvmlocal-ssd-retain"});
    class["parameters"]
        .as_object_mut()
        .unwrap()
        .remove("lvmlocal.io/on-node-loss");
    cluster.apply(&class).unwrap();
    let mut left = Vec::new();
    let mut pvs = Vec::new();
    for (name, class) in [
        ("collected", "lvmlocal-ssd-recreate"),
        ("kept", "lvmlocal-ssd-retain"),
    ] {
        cluster.apply(&claim(name, class, "64Mi")).unwrap();
        cluster.apply(&pod(name, &[name])).unwrap();
        let pvc = wait_bound(&cluster, name, Duration::from_secs(120));
        pvs.push(pvc["spec"]["volumeName"].as_str().unwrap().to_owned());
        left.push(lv_of(&cluster, name));
    }
    let [collected, kept] = [left[0].clone(), left[1].clone()];
    let llv = cluster.get(&["logicalvolume", &collected]).unwrap();
    assert_eq!(
        llv["metadata"]["annotations"]["lvmlocal.io/on-node-loss"], "recreate",
        "{llv}"
    );
    let llv = cluster.get(&["logicalvolume", &kept]).unwrap();
    assert!(
        llv["metadata"]["annotations"]["lvmlocal.io/on-node-loss"].is_null(),
        "{llv}"
    );
    for name in ["collected", "kept"] {
        delete_pod(&cluster, name);
        cluster.kubectl(&["delete", "pvc", name, "-n", NS]).unwrap();
    }
    for lv in [&collected, &kept] {
        wait_for(
            &format!("PV {lv} Released"),
            Duration::from_secs(60),
            || {
                let pv = cluster.get(&["pv", lv]).map_err(|e| e.to_string())?;
                (pv["status"]["phase"] == "Released")
                    .then_some(())
                    .ok_or(pv["status"].to_string())
            },
        )
        .unwrap();
        cluster.kubectl(&["delete", "pv", lv]).unwrap();
    }
    wait_for(
        "the opted-in leftover collected",
        Duration::from_secs(180),
        || {
            let gone = cluster
                .kubectl(&["get", "logicalvolume", &collected, "--ignore-not-found"])
                .map_err(|e| e.to_string())?
                .trim()
                .is_empty();
            let lvs = node.lvs().map_err(|e| e.to_string())?;
            (gone && !lvs.contains_key(&format!("lvmlocal-ssd/{collected}")))
                .then_some(())
                .ok_or(format!("{lvs:?}\n{}", all_events(&cluster, &collected)))
        },
    )
    .unwrap();
    // Each event is told once the controller has acted; a busy API server
    // may record it a moment after the volume is gone.
    for (volume, words) in [
        (&collected, ["Unclaimed", "collecting it"]),
        (&kept, ["Unclaimed", "it is kept"]),
    ] {
        wait_for(
            &format!("the event about {volume}"),
            Duration::from_secs(30),
            || {
                let said = all_events(&cluster, volume);
                words
                    .iter()
                    .all(|word| said.contains(word))
                    .then_some(())
                    .ok_or(said)
            },
        )
        .unwrap();
    }
    assert!(
        node.lvs()
            .unwrap()
            .contains_key(&format!("lvmlocal-ssd/{kept}")),
        "the leftover without the opt-in keeps its LV"
    );
    wait_for("the leftover counted", Duration::from_secs(60), || {
        let metrics = lvmlocal_tests::guest::http_get(
            &format!("127.0.0.1:{}", cluster.controller_metrics_port),
            "/metrics",
        );
        metrics
            .contains(r#"lvmlocal_controller_unclaimed_volumes{media="ssd"} 1"#)
            .then_some(())
            .ok_or(metrics)
    })
    .unwrap();

    // The agent stopped: once its heartbeat is past due, the node takes no
    // new volume. GetCapacity gives 0 there and the extender refuses it,
    // naming the silence.
    node.kill_agent().unwrap();
    node.start_agent_with(&["--heartbeat-seconds", "8"])
        .unwrap();
    wait_for("the 8 s heartbeat", Duration::from_secs(120), || {
        let lease = cluster
            .get(&["lease", "lvmlocal-agent-vm-node", "-n", NAMESPACE])
            .map_err(|e| e.to_string())?;
        (lease["spec"]["leaseDurationSeconds"] == 8)
            .then_some(())
            .ok_or(lease["spec"].to_string())
    })
    .unwrap();
    cluster
        .apply(&claim("stranded", "lvmlocal-nvme", "256Mi"))
        .unwrap();
    let filter = json!({
        "Pod": pod("stranded", &["stranded"]),
        "Nodes": null,
        "NodeNames": ["vm-node"],
    })
    .to_string();
    let extender = format!("127.0.0.1:{}", cluster.extender_port);
    let answer = lvmlocal_tests::guest::http_post(&extender, "/lvmlocal/filter", &filter);
    assert!(answer.contains(r#""NodeNames":["vm-node"]"#), "{answer}");
    assert!(
        cluster
            .storage_capacity("vm-node", "lvmlocal-nvme")
            .unwrap()
            > Some(0),
        "the live agent's node has room"
    );
    node.kill_agent().unwrap();
    wait_for(
        "no capacity on the silent node",
        Duration::from_secs(120),
        || match cluster.storage_capacity("vm-node", "lvmlocal-nvme") {
            Ok(Some(0)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
    wait_for(
        "the extender refuses the silent node",
        Duration::from_secs(60),
        || {
            let answer = lvmlocal_tests::guest::http_post(&extender, "/lvmlocal/filter", &filter);
            answer
                .contains("the lvmlocal agent has not renewed its heartbeat")
                .then_some(())
                .ok_or(answer)
        },
    )
    .unwrap();
    let answer = lvmlocal_tests::guest::http_post(&extender, "/lvmlocal/filter", &filter);
    assert!(answer.contains("FailedAndUnresolvableNodes"), "{answer}");
    assert!(!answer.contains(r#""NodeNames":["vm-node"]"#), "{answer}");
}

#[test]
fn helm_installs_upgrades_and_uninstalls_without_touching_volumes() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options {
        helm: true,
        ..Options::default()
    })
    .expect("starting the cluster");
    // Every object of the chart is there, its workloads too, as Helm's.
    let objects = cluster.deploy().to_vec();
    assert!(objects.len() > 25, "{}", objects.len());
    for object in &objects {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let mut args = vec![kind, name];
        if let Some(namespace) = object["metadata"]["namespace"].as_str() {
            args.extend(["-n", namespace]);
        }
        let live = cluster
            .get(&args)
            .unwrap_or_else(|err| panic!("{kind} {name}: {err:#}"));
        if kind != "CustomResourceDefinition" {
            assert_eq!(
                live["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
                "{kind} {name}"
            );
        }
    }

    // The driver works from there.
    let node = node_vm(&mut cluster, "vm-node");
    cluster
        .apply(&claim("charted", "lvmlocal-ssd", "256Mi"))
        .unwrap();
    cluster.apply(&pod("charted", &["charted"])).unwrap();
    wait_bound(&cluster, "charted", Duration::from_secs(180));
    let volume = lv_of(&cluster, "charted");
    let lv = format!("lvmlocal-ssd/{volume}");
    assert!(node.lvs().unwrap().contains_key(&lv));

    // An upgrade with changed values changes the objects, and nothing else.
    // (`--set` of one list item would replace the whole list.)
    let changed = cluster.dir.path().join("changed-values.yaml");
    std::fs::write(
        &changed,
        "extender:\n  placement: spread\nstorageClasses:\n\
         - {name: lvmlocal-nvme, media: nvme, fsType: ext4, reclaimPolicy: Delete, default: true}\n\
         - {name: lvmlocal-ssd, media: ssd, fsType: ext4, reclaimPolicy: Delete}\n\
         - {name: lvmlocal-hdd, media: hdd, fsType: ext4, reclaimPolicy: Delete}\n",
    )
    .unwrap();
    cluster
        .helm(&["upgrade", RELEASE, CHART, "-f", changed.to_str().unwrap()])
        .unwrap();
    let scheduler = cluster
        .get(&["deployment", "lvmlocal-scheduler", "-n", NAMESPACE])
        .unwrap();
    let args = &scheduler["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--default-placement=spread")),
        "{args}"
    );
    let nvme = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    assert_eq!(
        nvme["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    assert_eq!(
        cluster.get(&["pvc", "charted", "-n", NS]).unwrap()["status"]["phase"],
        "Bound"
    );

    // Uninstalled: the chart's objects go, the volume and its records stay.
    cluster.helm(&["uninstall", RELEASE]).unwrap();
    // No kubelet confirms the end of the chart's own pods here, which the
    // namespace's deletion waits for.
    wait_for("the chart's pods gone", Duration::from_secs(120), || {
        let left = cluster
            .kubectl(&[
                "delete",
                "pods",
                "--all",
                "-n",
                NAMESPACE,
                "--grace-period=0",
                "--force",
            ])
            .map_err(|e| e.to_string())?;
        let pods = cluster
            .kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "name"])
            .map_err(|e| e.to_string())?;
        pods.trim().is_empty().then_some(()).ok_or(left + &pods)
    })
    .unwrap();
    wait_for("the chart's objects gone", Duration::from_secs(180), || {
        let left = cluster
            .kubectl(&[
                "get",
                "storageclass/lvmlocal-ssd",
                "namespace/lvmlocal",
                "--ignore-not-found",
                "-o",
                "name",
            ])
            .map_err(|e| e.to_string())?;
        left.trim().is_empty().then_some(()).ok_or(left)
    })
    .unwrap();
    assert!(
        node.lvs().unwrap().contains_key(&lv),
        "helm uninstall removed the LV"
    );
    let llv = cluster.get(&["logicalvolume", &volume]).unwrap();
    assert_eq!(llv["status"]["phase"], "Ready", "{}", llv["status"]);
    cluster
        .get(&["crd", "logicalvolumes.lvmlocal.io"])
        .expect("Helm keeps the CRDs it installed");
    let pvc = cluster.get(&["pvc", "charted", "-n", NS]).unwrap();
    cluster
        .get(&["pv", pvc["spec"]["volumeName"].as_str().unwrap()])
        .expect("the PV stays");
}

/// A filter request for `pod` (using `claims`) on `nodes`, as kube-scheduler
/// sends it with nodeCacheCapable.
fn filter_request(cluster: &Cluster, pod: &str, claims: &[&str], nodes: &[&str]) -> String {
    let mut body = self::pod(pod, claims);
    body["metadata"]["uid"] = json!(format!("uid-{pod}"));
    let answer = json!({"Pod": body, "Nodes": null, "NodeNames": nodes}).to_string();
    let extender = format!("127.0.0.1:{}", cluster.extender_port);
    lvmlocal_tests::guest::http_post(&extender, "/lvmlocal/filter", &answer)
}

#[test]
fn the_extender_is_never_bypassed_and_counts_what_no_volume_accounts_for() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    cluster.add_paper_node("paper-4g", "nvme", 4 * GIB).unwrap();
    cluster.add_paper_node("paper-8g", "nvme", 8 * GIB).unwrap();

    // An extender whose caches are not listed yet fails every node for a
    // retry: kube-scheduler would skip one that answers with an error
    // (ignorable: true) and place the pod unchecked.
    cluster.restart_csi_scheduler_unsynced().unwrap();
    cluster
        .apply(&claim("early", "lvmlocal-nvme", "1Gi"))
        .unwrap();
    cluster.apply(&pod("early", &["early"])).unwrap();
    wait_for(
        "kube-scheduler told the extender is not ready",
        Duration::from_secs(60),
        || {
            let said = events(&cluster, "early");
            said.contains("waiting for the first listing of")
                .then_some(())
                .ok_or(said)
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let pvc = cluster.get(&["pvc", "early", "-n", NS]).unwrap();
    assert!(
        pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"].is_null(),
        "placed without the extender: {pvc}"
    );
    let pod_now = cluster.get(&["pod", "early", "-n", NS]).unwrap();
    assert!(pod_now["spec"]["nodeName"].is_null(), "{pod_now}");
    // Once it has listed, the pod is retried at the next cluster event (a
    // node changing here) and placed by its rules (binpack: the fullest
    // node that fits).
    cluster.restart("csi-scheduler").unwrap();
    cluster
        .label_node("paper-8g", &[("example.com/touched", "yes")])
        .unwrap();
    assert_eq!(selected_node(&cluster, "early"), "paper-4g");
    wait_for("early made", Duration::from_secs(60), || {
        stand_in_for_agent(&cluster, "paper-4g")?;
        let pvc = cluster
            .get(&["pvc", "early", "-n", NS])
            .map_err(|e| e.to_string())?;
        (pvc["status"]["phase"] == "Bound")
            .then_some(())
            .ok_or(pvc["status"].to_string())
    })
    .unwrap();

    // paper-4g has 3 GiB left, and binpack would send a 2 GiB claim there;
    // but 2 GiB of it are taken by LVs no LogicalVolume accounts for (made
    // by hand, or orphans), as its agent reports them.
    cluster
        .patch_status(
            "nodelocalstorage",
            "paper-4g",
            &json!({"unaccountedBytes": {"nvme": 2 * GIB, "ssd": 0, "hdd": 0}}),
        )
        .unwrap();
    wait_for(
        "GetCapacity counting the unaccounted bytes",
        Duration::from_secs(60),
        || match cluster.storage_capacity("paper-4g", "lvmlocal-nvme") {
            Ok(Some(capacity)) if capacity == GIB => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
    let answer = filter_request(&cluster, "probe", &["next"], &["paper-4g", "paper-8g"]);
    assert!(answer.contains("not in the extender's cache"), "{answer}");
    cluster
        .apply(&claim("next", "lvmlocal-nvme", "2Gi"))
        .unwrap();
    wait_for(
        "the extender refusing paper-4g",
        Duration::from_secs(30),
        || {
            let answer = filter_request(&cluster, "probe", &["next"], &["paper-4g", "paper-8g"]);
            answer
                .contains(r#""paper-4g":"nvme: needs 2Gi, 1Gi free""#)
                .then_some(())
                .ok_or(answer)
        },
    )
    .unwrap();
    cluster.apply(&pod("next", &["next"])).unwrap();
    assert_eq!(selected_node(&cluster, "next"), "paper-8g");
    delete_all(&cluster, "next", &["next"]);
    expansion_refused_then_asked_less(&mut cluster);

    // The shipped NetworkPolicy for the extender is one the API server takes
    // (no network plugin here enforces it).
    let overlay = lvmlocal_tests::manifests::render("deploy/overlays/extender-network-policy");
    let policy = overlay
        .iter()
        .find(|object| object["kind"] == "NetworkPolicy")
        .expect("the overlay's NetworkPolicy");
    cluster.apply(policy).unwrap();
    let stored = cluster
        .get(&["networkpolicy", "lvmlocal-scheduler", "-n", NAMESPACE])
        .unwrap();
    assert_eq!(
        stored["spec"]["ingress"], policy["spec"]["ingress"],
        "{stored}"
    );

    // A StorageClass CreateVolume would refuse (one made before the
    // admission policy was installed) fails the pod's nodes, naming why.
    cluster
        .kubectl(&[
            "delete",
            "validatingadmissionpolicybinding",
            "lvmlocal-storageclass-parameters",
        ])
        .unwrap();
    let mut typo: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    typo["metadata"] = json!({"name": "lvmlocal-typo"});
    typo["parameters"]["lvmlocal.io/medai"] = json!("nvme");
    wait_for("the typo class created", Duration::from_secs(30), || {
        cluster.apply(&typo).map_err(|err| format!("{err:#}"))
    })
    .unwrap();
    cluster
        .apply(&claim("typo", "lvmlocal-typo", "1Gi"))
        .unwrap();
    wait_for(
        "the extender naming the parameter",
        Duration::from_secs(30),
        || {
            let answer = filter_request(&cluster, "typo", &["typo"], &["paper-4g", "paper-8g"]);
            (answer.contains("FailedAndUnresolvableNodes")
                && answer.contains(r#"unknown parameter \"lvmlocal.io/medai\""#)
                && answer.contains(r#""NodeNames":[]"#))
            .then_some(())
            .ok_or(answer)
        },
    )
    .unwrap();
}

/// Writes the status the agent of a paper node would write for `llv`.
fn report_as_agent(cluster: &Cluster, llv: &str, phase: &str, size: u64, message: Option<&str>) {
    let object = cluster.get(&["logicalvolume", llv]).unwrap();
    let mut status = json!({
        "phase": phase,
        "devicePath": format!("/dev/lvmlocal-nvme/{llv}"),
        "sizeBytes": size,
        "observedGeneration": object["metadata"]["generation"],
        "condition": {"abnormal": false, "reason": "Healthy", "message": "healthy"},
    });
    if let Some(message) = message {
        status["message"] = json!(message);
    }
    cluster.patch_status("logicalvolume", llv, &status).unwrap();
}

fn resize_status(cluster: &Cluster, claim: &str) -> String {
    let pvc = cluster.get(&["pvc", claim, "-n", NS]).unwrap();
    pvc["status"]["allocatedResourceStatuses"]["storage"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Kubernetes' recovery from a failed expansion, on the claim `early` of
/// paper-4g (1 GiB of 4 GiB): the node refuses to grow it, the user asks
/// for less, and what the failed expansion held is given back.
fn expansion_refused_then_asked_less(cluster: &mut Cluster) {
    cluster
        .patch_status(
            "nodelocalstorage",
            "paper-4g",
            &json!({"unaccountedBytes": {"nvme": 0, "ssd": 0, "hdd": 0}}),
        )
        .unwrap();
    let wait_capacity = |cluster: &Cluster, bytes: u64, what: &str| {
        wait_for(what, Duration::from_secs(60), || {
            match cluster.storage_capacity("paper-4g", "lvmlocal-nvme") {
                Ok(Some(capacity)) if capacity == bytes => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .unwrap();
    };
    wait_capacity(cluster, 3 * GIB, "paper-4g with 3 GiB free");
    let llv = lv_of(cluster, "early");
    let resize = |size: &str| {
        cluster
            .kubectl(&[
                "patch",
                "pvc",
                "early",
                "-n",
                NS,
                "--type=merge",
                "-p",
                &json!({"spec": {"resources": {"requests": {"storage": size}}}}).to_string(),
            ])
            .unwrap();
    };
    // The controller sees room for 3 GiB; the agent finds an LV made by
    // hand in the way and cannot grow it.
    resize("3Gi");
    wait_for(
        "the expansion asked of the node",
        Duration::from_secs(60),
        || {
            let object = cluster
                .get(&["logicalvolume", &llv])
                .map_err(|e| e.to_string())?;
            (object["spec"]["sizeBytes"] == 3 * GIB)
                .then_some(())
                .ok_or(object["spec"].to_string())
        },
    )
    .unwrap();
    report_as_agent(
        cluster,
        &llv,
        "Failed",
        GIB,
        Some("cannot extend: not enough free space in volume group lvmlocal-nvme"),
    );
    wait_for(
        "the resizer told the expansion is infeasible",
        Duration::from_secs(120),
        || {
            let status = resize_status(cluster, "early");
            (status == "ControllerResizeInfeasible")
                .then_some(())
                .ok_or(format!("{status:?}: {}", events(cluster, "early")))
        },
    )
    .unwrap();
    assert!(
        events(cluster, "early").contains("Ask for less"),
        "{}",
        events(cluster, "early")
    );
    // The failed expansion still holds its room.
    wait_capacity(cluster, GIB, "paper-4g holding the failed expansion");

    // The user gives most of it up: the controller lowers what is asked
    // of the node, and the room comes back.
    resize("1536Mi");
    wait_for("the expansion lowered", Duration::from_secs(120), || {
        let object = cluster
            .get(&["logicalvolume", &llv])
            .map_err(|e| e.to_string())?;
        (object["spec"]["sizeBytes"] == 1536 << 20)
            .then_some(())
            .ok_or(format!("{} {}", object["spec"], events(cluster, "early")))
    })
    .unwrap();
    report_as_agent(cluster, &llv, "Ready", 1536 << 20, None);
    wait_capacity(cluster, 4 * GIB - (1536 << 20), "the room given back");
    wait_for(
        "the controller's part done",
        Duration::from_secs(120),
        || {
            let status = resize_status(cluster, "early");
            // No kubelet grows the filesystem here.
            (status == "NodeResizePending")
                .then_some(())
                .ok_or(format!("{status:?}: {}", events(cluster, "early")))
        },
    )
    .unwrap();
    let pv = cluster
        .get(&[
            "pv",
            cluster.get(&["pvc", "early", "-n", NS]).unwrap()["spec"]["volumeName"]
                .as_str()
                .unwrap(),
        ])
        .unwrap();
    assert_eq!(pv["spec"]["capacity"]["storage"], "1536Mi", "{pv}");
}

/// A thin class on the real API server and a node VM: the ratio refused
/// outside a thin class, capacity published at the ratio's multiple, a
/// claim bound to a thin LV, and a pool filled to the last block twice:
/// writes fail at once, the agent grows it into the room its group has
/// left, and reports it filling, then full, in the node's status, events
/// and metrics.
#[test]
fn a_thin_claim_fills_its_pool_and_the_node_says_so() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options::default()).expect("starting the cluster");
    let node = NodeVm::start(&mut cluster, "vm-thin", Vm::new().nvme("nvme-a", 5, GIB))
        .expect("booting the node VM");
    let free = wait_for(
        "the agent's NodeLocalStorage",
        Duration::from_secs(180),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", "vm-thin"])
                .map_err(|err| err.to_string())?;
            nls["status"]["nvme"]["freeBytes"]
                .as_u64()
                .filter(|free| *free > 0)
                .ok_or(nls.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));

    // A ratio belongs to a thin class: the API server says so.
    let mut class: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    class["metadata"] = json!({"name": "lvmlocal-thin"});
    class["parameters"]["lvmlocal.io/overprovision-ratio"] = json!("1.5");
    let refused = cluster.apply(&class).expect_err("a ratio in a thick class");
    assert!(
        format!("{refused:#}").contains("lvmlocal.io/provisioning: thin"),
        "{refused:#}"
    );
    class["parameters"]["lvmlocal.io/provisioning"] = json!("thin");
    class["parameters"]["lvmlocal.io/overprovision-ratio"] = json!("2");
    cluster.apply(&class).unwrap();
    wait_for(
        "CSIStorageCapacity of the thin class at twice the free space",
        Duration::from_secs(60),
        || match cluster.storage_capacity("vm-thin", "lvmlocal-thin") {
            Ok(Some(capacity)) if capacity == free * 2 => Ok(()),
            other => Err(format!("{other:?} of {free}")),
        },
    )
    .unwrap();

    // A claim that, at 2, leaves the group 128 MiB beside its pool (the
    // pool's metadata and its spare take 4 MiB each).
    const MIB: u64 = 1 << 20;
    let charge = free - 8 * MIB - 128 * MIB;
    let size = 2 * charge;
    cluster
        .apply(&claim("thin", "lvmlocal-thin", &size.to_string()))
        .unwrap();
    cluster.apply(&pod("thin", &["thin"])).unwrap();
    let pvc = wait_bound(&cluster, "thin", Duration::from_secs(120));
    let id = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let llv = cluster.get(&["logicalvolume", &id]).unwrap();
    assert_eq!(llv["spec"]["thin"]["overprovisionPercent"], 200, "{llv}");
    let attrs = node
        .sh(&format!(
            "lvs --noheadings -o lv_attr,pool_lv lvmlocal-nvme/{id}"
        ))
        .unwrap();
    assert!(attrs.trim().starts_with('V'), "{attrs}");
    assert!(attrs.contains("lvmlocal_thinpool"), "{attrs}");
    let pool = |cluster: &Cluster| {
        cluster.get(&["nodelocalstorage", "vm-thin"]).unwrap()["status"]["thinPools"]["nvme"]
            .clone()
    };
    wait_for(
        "the pool in the node's status",
        Duration::from_secs(90),
        || {
            let pool = pool(&cluster);
            (pool["dataBytes"] == charge && pool["virtualBytes"] == size && pool["freeBytes"] == 0)
                .then_some(())
                .ok_or(pool.to_string())
        },
    )
    .unwrap();
    let thick_room = |cluster: &Cluster, bytes: u64| {
        wait_for(
            &format!("{bytes} bytes of CSIStorageCapacity left for thick volumes"),
            Duration::from_secs(90),
            || match cluster.storage_capacity("vm-thin", "lvmlocal-nvme") {
                Ok(Some(capacity)) if capacity == bytes => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap();
    };
    thick_room(&cluster, 128 * MIB);

    // Writing more than the pool holds fails in the writer, at once.
    let device = format!("/dev/lvmlocal-nvme/{id}");
    let fill = || {
        let written = node
            .sh(&format!(
                "dd if=/dev/zero of={device} bs=1M count={} oflag=direct 2>&1; echo \"exit $?\"",
                size / MIB
            ))
            .unwrap();
        assert!(
            written.contains("No space left on device") || written.contains("Input/output error"),
            "{written}"
        );
        assert!(!written.trim_end().ends_with("exit 0"), "{written}");
    };
    fill();
    // The agent grows it into the group's last 128 MiB, which leaves it
    // nearly full: filling.
    wait_for(
        "the pool grown and filling",
        Duration::from_secs(150),
        || {
            let pool = pool(&cluster);
            let events = all_events(&cluster, "vm-thin");
            (pool["dataBytes"] == charge + 128 * MIB
                && events.contains("ThinPoolGrown")
                && events.contains("ThinPoolFilling"))
            .then_some(())
            .ok_or(format!("{pool}\n{events}"))
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    thick_room(&cluster, 0);
    // Filled again, with no room to grow: full.
    fill();
    wait_for("the full pool reported", Duration::from_secs(150), || {
        let pool = pool(&cluster);
        let events = all_events(&cluster, "vm-thin");
        (pool["dataPercent"] == 100 && events.contains("ThinPoolFull"))
            .then_some(())
            .ok_or(format!("{pool}\n{events}"))
    })
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    let metrics = node.sh("curl -s http://127.0.0.1:9808/metrics").unwrap();
    assert!(
        metrics.contains("lvmlocal_agent_thin_pool_data_percent{media=\"nvme\"} 100"),
        "{metrics}"
    );
    // What was written stays readable.
    node.sh(&format!(
        "dd if={device} of=/dev/null bs=1M count=16 iflag=direct"
    ))
    .unwrap();

    // The volume goes with its claim; its pool stays, empty, as room for
    // the next thin volume.
    delete_all(&cluster, "thin", &["thin"]);
    wait_for("the LV removed", Duration::from_secs(120), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        (!lvs.contains_key(&format!("lvmlocal-nvme/{id}")))
            .then_some(())
            .ok_or(format!("{lvs:?}"))
    })
    .unwrap();
    wait_for("the empty pool reported", Duration::from_secs(90), || {
        let pool = pool(&cluster);
        (pool["dataPercent"] == 0 && pool["freeBytes"] == pool["dataBytes"])
            .then_some(())
            .ok_or(pool.to_string())
    })
    .unwrap();
}

/// The first 4 MiB of `device` in the node VM, hashed.
fn head_sum(node: &NodeVm, device: &str) -> String {
    node.sh(&format!(
        "dd if={device} bs=1M count=4 iflag=direct 2>/dev/null | md5sum"
    ))
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .to_owned()
}

/// Fills the first 4 MiB of `device` with fresh random bytes; their hash.
fn write_head(node: &NodeVm, device: &str) -> String {
    node.sh(&format!(
        "dd if=/dev/urandom of={device} bs=1M count=4 oflag=direct 2>/dev/null"
    ))
    .unwrap();
    head_sum(node, device)
}

fn device_of(cluster: &Cluster, claim: &str) -> (String, Value) {
    let pvc = cluster.get(&["pvc", claim, "-n", NS]).unwrap();
    let id = pvc["spec"]["volumeName"].as_str().unwrap();
    let llv = cluster.get(&["logicalvolume", id]).unwrap();
    (format!("/dev/lvmlocal-nvme/{id}"), llv)
}

/// Snapshots with the real snapshot-controller and csi-snapshotter: a
/// VolumeSnapshot of a thin claim turns ReadyToUse; a claim restored from
/// it holds what the volume held then, not what was written after; a clone
/// holds the volume as it is; both land on the node of their source; the
/// snapshot outlives its volume, and goes with its VolumeSnapshot.
#[test]
fn snapshots_restore_and_clone_on_the_sources_node() {
    let _serial = serial();
    let mut cluster = Cluster::start(Options {
        snapshots: true,
        ..Options::default()
    })
    .expect("starting the cluster");
    cluster
        .add_paper_node("paper-big", "nvme", 64 * GIB)
        .unwrap();
    let node = NodeVm::start(
        &mut cluster,
        "vm-snap",
        Vm::new().nvme("nvme-a", 5, 2 * GIB),
    )
    .expect("booting the node VM");
    wait_for(
        "the agent's NodeLocalStorage",
        Duration::from_secs(180),
        || {
            let nls = cluster
                .get(&["nodelocalstorage", "vm-snap"])
                .map_err(|err| err.to_string())?;
            (nls["status"]["nvme"]["freeBytes"].as_u64().unwrap_or(0) > 0)
                .then_some(())
                .ok_or(nls.to_string())
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", node.agent_log()));
    let mut class: Value = cluster.get(&["storageclass", "lvmlocal-nvme"]).unwrap();
    class["metadata"] = json!({"name": "lvmlocal-thin"});
    class["parameters"]["lvmlocal.io/provisioning"] = json!("thin");
    cluster.apply(&class).unwrap();

    // binpack: the fuller node, the VM's.
    cluster
        .apply(&claim("origin", "lvmlocal-thin", "256Mi"))
        .unwrap();
    cluster.apply(&pod("origin", &["origin"])).unwrap();
    assert_eq!(selected_node(&cluster, "origin"), "vm-snap");
    wait_bound(&cluster, "origin", Duration::from_secs(120));
    let (origin, _) = device_of(&cluster, "origin");
    let then = write_head(&node, &origin);

    let snapshot = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "daily", "namespace": NS},
        "spec": {"volumeSnapshotClassName": "lvmlocal",
                 "source": {"persistentVolumeClaimName": "origin"}},
    });
    cluster.apply(&snapshot).unwrap();
    let ready = wait_for("the VolumeSnapshot ready", Duration::from_secs(120), || {
        let snapshot = cluster
            .get(&["volumesnapshot", "daily", "-n", NS])
            .map_err(|err| err.to_string())?;
        (snapshot["status"]["readyToUse"] == true)
            .then(|| snapshot.clone())
            .ok_or(snapshot.to_string())
    })
    .unwrap_or_else(|err| panic!("{err:#}\n{}", cluster.report()));
    let content = ready["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap();
    let content = cluster.get(&["volumesnapshotcontent", content]).unwrap();
    let handle = content["status"]["snapshotHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    let snap_llv = cluster.get(&["logicalvolume", &handle]).unwrap();
    assert_eq!(snap_llv["spec"]["nodeName"], "vm-snap");
    assert_eq!(
        snap_llv["spec"]["snapshot"]["volumeSnapshot"]["name"],
        "daily"
    );
    let attrs = node
        .sh(&format!(
            "lvs --noheadings -o lv_attr,origin lvmlocal-nvme/{handle}"
        ))
        .unwrap();
    assert!(
        attrs.trim().starts_with("Vr"),
        "a read-only thin LV: {attrs}"
    );
    let now = write_head(&node, &origin);
    assert_ne!(then, now);

    // Restored and cloned claims go to their source's node.
    let mut restored = claim("restored", "lvmlocal-thin", "512Mi");
    restored["spec"]["dataSource"] = json!({
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "daily"});
    cluster.apply(&restored).unwrap();
    let mut cloned = claim("cloned", "lvmlocal-thin", "256Mi");
    cloned["spec"]["dataSource"] = json!({"kind": "PersistentVolumeClaim", "name": "origin"});
    cluster.apply(&cloned).unwrap();
    cluster
        .apply(&pod("copies", &["restored", "cloned"]))
        .unwrap();
    assert_eq!(selected_node(&cluster, "restored"), "vm-snap");
    wait_bound(&cluster, "restored", Duration::from_secs(120));
    wait_bound(&cluster, "cloned", Duration::from_secs(120));
    let (restored, restored_llv) = device_of(&cluster, "restored");
    assert_eq!(restored_llv["spec"]["source"]["kind"], "Snapshot");
    assert_eq!(
        head_sum(&node, &restored),
        then,
        "the restore holds the snapshot"
    );
    let size = node
        .sh(&format!("blockdev --getsize64 {restored}"))
        .unwrap();
    assert_eq!(
        size.trim(),
        (512u64 << 20).to_string(),
        "grown to its claim"
    );
    let (cloned, _) = device_of(&cluster, "cloned");
    assert_eq!(head_sum(&node, &cloned), now, "the clone holds the volume");

    // The origin goes; its snapshot stays, and restores again.
    delete_all(&cluster, "origin", &["origin"]);
    wait_for("the origin's LV removed", Duration::from_secs(120), || {
        let lvs = node.lvs().map_err(|err| err.to_string())?;
        let gone = !lvs.contains_key(origin.trim_start_matches("/dev/"));
        (gone && lvs.contains_key(&format!("lvmlocal-nvme/{handle}")))
            .then_some(())
            .ok_or(format!("{lvs:?}"))
    })
    .unwrap();
    let ready = cluster.get(&["volumesnapshot", "daily", "-n", NS]).unwrap();
    assert_eq!(ready["status"]["readyToUse"], true);
    let mut again = claim("again", "lvmlocal-thin", "256Mi");
    again["spec"]["dataSource"] = json!({
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "daily"});
    cluster.apply(&again).unwrap();
    cluster.apply(&pod("again", &["again"])).unwrap();
    wait_bound(&cluster, "again", Duration::from_secs(120));
    let (again, _) = device_of(&cluster, "again");
    assert_eq!(head_sum(&node, &again), then, "restored without its volume");

    // The VolumeSnapshot goes, and with it (deletionPolicy Delete) the LV.
    cluster
        .kubectl(&["delete", "volumesnapshot", "daily", "-n", NS])
        .unwrap();
    wait_for(
        "the snapshot's LV removed",
        Duration::from_secs(120),
        || {
            let lvs = node.lvs().map_err(|err| err.to_string())?;
            (!lvs.contains_key(&format!("lvmlocal-nvme/{handle}")))
                .then_some(())
                .ok_or(format!("{lvs:?}"))
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", cluster.report()));
    assert_eq!(head_sum(&node, &restored), then, "the restore is its own");
}
