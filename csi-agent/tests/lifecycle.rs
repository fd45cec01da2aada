#[path = "../../proto/tests/support/binary.rs"]
mod binary;

use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_csi-agent");
const STARTED: &str = "csi-agent started";

/// Runs the agent standalone with a sysfs root that does not exist: it runs
/// its loop but finds no disk, so nothing on the machine running the test is
/// touched. Its CSI socket goes into a directory of the test's own.
fn stop_with(signal: Signal) -> std::process::ExitStatus {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/csi.sock", dir.path().display());
    let args = [
        "--node-name",
        "node-a",
        "--standalone",
        "--sysfs",
        "/nonexistent/sysfs",
        "--metrics-address",
        "127.0.0.1:0",
        "--csi-endpoint",
        &endpoint,
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
        "--node-name",
        "--csi-endpoint",
        "--log-level",
        "unix:///csi/csi.sock",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn refuses_to_start_without_a_node_name() {
    let (status, out) = binary::run(BIN, &[]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("--node-name"), "{out}");
}

#[test]
fn rejects_a_malformed_log_filter() {
    let (status, out) = binary::run(BIN, &["--node-name", "node-a", "--log-level", "=["]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("invalid log filter"), "{out}");
}
