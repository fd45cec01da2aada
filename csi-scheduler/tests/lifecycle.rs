#[path = "../../proto/tests/support/binary.rs"]
mod binary;

use std::io::Write;

use nix::sys::signal::Signal;
use tempfile::NamedTempFile;

const BIN: &str = env!("CARGO_BIN_EXE_csi-scheduler");
const STARTED: &str = "csi-scheduler started";

/// A kubeconfig naming an API server that refuses connections: the extender
/// starts and keeps retrying its watches in the background.
fn unreachable_cluster() -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("create a temporary kubeconfig");
    file.write_all(
        br#"apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: http://127.0.0.1:9
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
users:
- name: nobody
  user: {}
"#,
    )
    .expect("write the kubeconfig");
    file
}

fn stop_with(signal: Signal) -> std::process::ExitStatus {
    let kubeconfig = unreachable_cluster();
    let path = kubeconfig.path().to_str().expect("utf-8 temp path");
    binary::stop_with(
        BIN,
        &["--kubeconfig", path, "--listen", "127.0.0.1:0"],
        STARTED,
        signal,
    )
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
        "--listen",
        "--log-level",
        "0.0.0.0:8080",
        "--path-prefix",
        "--default-placement",
        "binpack",
        "spread",
        "--reservation-ttl-seconds",
        "--max-request-bytes",
        "--kubeconfig",
        "--namespace",
        "POD_NAMESPACE",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn rejects_a_listen_address_that_is_not_one() {
    let (status, out) = binary::run(BIN, &["--listen", "localhost"]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("--listen"), "{out}");
}

#[test]
fn rejects_bad_policy_flags() {
    for args in [
        &["--default-placement", "pack"][..],
        &["--path-prefix", "lvmlocal"],
        &["--path-prefix", "/lvmlocal/"],
        &["--reservation-ttl-seconds", "0"],
    ] {
        let (status, out) = binary::run(BIN, args);
        assert!(!status.success(), "{args:?}: {out}");
        assert!(out.contains(args[0]), "{args:?}: {out}");
    }
}

#[test]
fn fails_clearly_without_a_kubeconfig() {
    let (status, out) = binary::run(
        BIN,
        &[
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("cannot read kubeconfig /nonexistent/kubeconfig"),
        "{out}"
    );
}
