#[path = "../../proto/tests/support/binary.rs"]
mod binary;

use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_csi-controller");
const STARTED: &str = "csi-controller started";

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
    for flag in ["--csi-endpoint", "--log-level", "unix:///csi/csi.sock"] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}
