#[path = "../../proto/tests/support/binary.rs"]
mod binary;

use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_csi-scheduler");
const STARTED: &str = "csi-scheduler started";

#[test]
fn exits_zero_on_sigterm() {
    let status = binary::stop_with(BIN, &[], STARTED, Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn exits_zero_on_sigint() {
    let status = binary::stop_with(BIN, &[], STARTED, Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn help_lists_the_flags() {
    let (status, out) = binary::run(BIN, &["--help"]);
    assert!(status.success(), "{out}");
    for flag in ["--listen", "--log-level", "0.0.0.0:8080"] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn rejects_a_listen_address_that_is_not_one() {
    let (status, out) = binary::run(BIN, &["--listen", "localhost"]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("--listen"), "{out}");
}
