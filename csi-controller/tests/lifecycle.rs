#[path = "../../proto/tests/support/binary.rs"]
mod binary;

use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_csi-controller");
const STARTED: &str = "csi-controller started";

/// A kubeconfig for an API server that is not there: the controller starts,
/// keeps trying to take its lease, and must still stop cleanly.
const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: https://127.0.0.1:1
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
    namespace: lvmlocal
current-context: nowhere
users:
- name: nobody
  user:
    token: not-a-token
"#;

fn stop_with(signal: Signal) -> std::process::ExitStatus {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let args = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--csi-endpoint",
        &endpoint,
        "--metrics-address",
        "127.0.0.1:0",
    ];
    binary::stop_with(BIN, &args, STARTED, signal)
}

#[test]
fn exits_zero_on_sigterm() {
    let status = stop_with(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn exits_zero_on_sigint() {
    let status = stop_with(Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn help_lists_the_flags() {
    let (status, out) = binary::run(BIN, &["--help"]);
    assert!(status.success(), "{out}");
    for flag in [
        "--csi-endpoint",
        "--kubeconfig",
        "--metrics-address",
        "--leader-election",
        "--leader-election-namespace",
        "--lease-duration-seconds",
        "--default-volume-size-bytes",
        "--volume-wait-seconds",
        "--node-gone-grace-seconds",
        "--log-level",
        "unix:///csi/csi.sock",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn refuses_an_endpoint_that_is_not_a_unix_socket() {
    let (status, out) = binary::run(BIN, &["--csi-endpoint", "tcp://0.0.0.0:10000"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("is not unix://"), "{out}");
}
