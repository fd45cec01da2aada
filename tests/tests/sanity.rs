//! csi-sanity, the CSI conformance suite, against a standalone agent in the
//! VM: Identity, Controller and Node on one socket, for an ext4, an xfs and
//! a raw block volume. Every spec passes or is skipped for a capability the
//! driver does not offer, and each skip says which.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use lvmlocal_proto::params::FS_TYPE_PARAM;
use lvmlocal_tests::cluster::component;
use lvmlocal_tests::csi::{Agent, KUBELET_DIR, MEDIA_PARAM};
use lvmlocal_tests::guest::workspace_binary;
use lvmlocal_tests::{GIB, MIB, Vm, vm_test};
use serde_json::Value;

const SOCKET: &str = "/run/lvmlocal/csi.sock";
/// Large enough for xfs (mkfs.xfs refuses below 300 MiB), and with the
/// default 1 GiB expansion still a whole number of extents.
const VOLUME_BYTES: u64 = 512 * MIB;
/// Specs passed by each run of csi-sanity v5.4.0: all it runs, the rest
/// being skipped for capabilities lvmlocal does not offer.
const PASSED_FLOOR: usize = 48;

/// What one csi-sanity run counted.
struct Outcome {
    passed: usize,
    failed: Vec<String>,
    /// Skip reason → how many specs it skipped.
    skipped: BTreeMap<String, usize>,
}

/// Starts the agent, runs csi-sanity against it with these StorageClass
/// parameters and access type, and checks the specs' states in its report.
fn sanity(name: &str, parameters: &[(&str, &str)], access: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    std::fs::create_dir_all("/run/lvmlocal").unwrap();
    let _agent = runtime
        .block_on(Agent::start(
            &workspace_binary("csi-agent"),
            Path::new(SOCKET),
            "nvme",
        ))
        .unwrap();

    let work = Path::new("/tmp/sanity").join(name);
    std::fs::create_dir_all(&work).unwrap();
    let params = work.join("parameters.yaml");
    let yaml: String = parameters
        .iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect();
    std::fs::write(&params, yaml).unwrap();
    let report = work.join("report.json");
    // csi-sanity makes its mount and staging directories, but not their parent.
    let base = format!("{KUBELET_DIR}/sanity/{name}");
    std::fs::create_dir_all(&base).unwrap();

    let output = Command::new(component("csi-sanity"))
        .arg(format!("--csi.endpoint=unix://{SOCKET}"))
        .arg(format!("--csi.stagingdir={base}/staging"))
        .arg(format!("--csi.mountdir={base}/mount"))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.testvolumeaccesstype={access}"))
        .arg(format!("--csi.testvolumesize={VOLUME_BYTES}"))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .args(["--ginkgo.v", "--ginkgo.no-color"])
        .output()
        .expect("running csi-sanity");
    let log = String::from_utf8_lossy(&output.stdout);
    let outcome = read_report(&report);
    assert!(
        output.status.success() && outcome.failed.is_empty(),
        "csi-sanity {name}: {}, failed:\n{}\n\n{log}\n{}",
        output.status,
        outcome.failed.join("\n"),
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "csi-sanity {name}: {} passed, {} skipped, 0 failed",
        outcome.passed,
        outcome.skipped.values().sum::<usize>()
    );
    for (reason, count) in &outcome.skipped {
        println!("  skipped {count:>2}: {reason}");
    }
    assert!(
        outcome.passed >= PASSED_FLOOR,
        "only {} specs passed, {PASSED_FLOOR} did before",
        outcome.passed
    );
    assert!(
        !outcome.skipped.contains_key("no reason given"),
        "a spec was skipped without saying why"
    );
}

/// Counts the `It` specs of a Ginkgo JSON report by state.
fn read_report(path: &Path) -> Outcome {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("csi-sanity report {}: {err}", path.display()));
    let suites: Vec<Value> = serde_json::from_str(&text).expect("a Ginkgo JSON report");
    let mut outcome = Outcome {
        passed: 0,
        failed: Vec::new(),
        skipped: BTreeMap::new(),
    };
    let specs = suites
        .iter()
        .flat_map(|suite| suite["SpecReports"].as_array().into_iter().flatten())
        .filter(|spec| spec["LeafNodeType"] == "It");
    for spec in specs {
        let mut title: Vec<&str> = spec["ContainerHierarchyTexts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        title.push(spec["LeafNodeText"].as_str().unwrap_or_default());
        let title = title.join(" ");
        let message = spec["Failure"]["Message"].as_str().unwrap_or_default();
        match spec["State"].as_str().unwrap_or_default() {
            "passed" => outcome.passed += 1,
            // csi-sanity itself disables a spec that cannot pass yet.
            "pending" => {
                let reason = format!("pending in csi-sanity: {title}");
                *outcome.skipped.entry(reason).or_default() += 1;
            }
            "skipped" => {
                let reason = match message {
                    "" => "no reason given".to_owned(),
                    message => message.to_owned(),
                };
                *outcome.skipped.entry(reason).or_default() += 1;
            }
            state => outcome.failed.push(format!("[{state}] {title}: {message}")),
        }
    }
    outcome
}

vm_test!(csi_sanity_ext4, Vm::new().nvme("nvme-a", 5, 8 * GIB), {
    sanity("ext4", &[(MEDIA_PARAM, "nvme")], "mount");
});

vm_test!(csi_sanity_xfs, Vm::new().nvme("nvme-a", 5, 8 * GIB), {
    sanity(
        "xfs",
        &[(MEDIA_PARAM, "nvme"), (FS_TYPE_PARAM, "xfs")],
        "mount",
    );
});

vm_test!(csi_sanity_block, Vm::new().nvme("nvme-a", 5, 8 * GIB), {
    sanity("block", &[(MEDIA_PARAM, "nvme")], "block");
});
