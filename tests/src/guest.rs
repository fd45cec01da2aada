//! Tests that run inside the VM. A `vm_test!` is an ordinary `#[test]`: on the
//! host it boots its VM and runs itself, alone, inside the guest; the host
//! side passes only if the guest side ran and passed.

use std::path::PathBuf;
use std::process::Command;

use crate::vm::{IN_VM_ENV, Vm};

pub fn inside() -> bool {
    std::env::var_os(IN_VM_ENV).is_some()
}

/// On the host: boots `vm`, runs the test `path` (as `module_path!()::name`)
/// of this test binary inside it and panics unless it passed; returns false.
/// In the guest: returns true, and the caller runs the test body.
pub fn enter(path: &str, vm: Vm) -> bool {
    if inside() {
        return true;
    }
    // libtest names a test by its path without the crate's own name.
    let name = path.split_once("::").map_or(path, |(_, rest)| rest);
    let exe = std::env::current_exe().expect("path of the running test binary");
    let exe = exe.display().to_string();
    let output = vm
        .run(&[
            exe.as_str(),
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .unwrap_or_else(|err| panic!("VM for {name}: {err:#}"));
    // Guard against a filter that matched nothing: that also exits 0.
    let ran = output
        .stdout
        .contains("test result: ok. 1 passed; 0 failed");
    assert!(
        output.success() && ran,
        "in-VM test {name} failed\n{}",
        output.report()
    );
    println!(
        "{name}: passed in the VM ({:.1?})\n{}",
        output.elapsed, output.stdout
    );
    false
}

/// Declares a test whose body runs as root inside a VM with the given disks.
///
/// ```text
/// vm_test!(lvm_on_nvme, Vm::new().nvme("data", 5, GIB), {
///     /* runs in the guest */
/// });
/// ```
#[macro_export]
macro_rules! vm_test {
    ($name:ident, $vm:expr, $body:block) => {
        #[test]
        fn $name() {
            if $crate::guest::enter(concat!(module_path!(), "::", stringify!($name)), $vm) {
                $body
            }
        }
    };
}

/// Runs `program` and returns its stdout, panicking with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A binary of this workspace, from the `target/<profile>` directory of the
/// running binary (test binaries run from its `deps`): `scripts/test.sh`
/// builds them all first.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running binary");
    let mut dir = exe.parent().expect("binary in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps in target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built (cargo build --workspace)",
        path.display()
    );
    path
}

/// Kernel name of the one disk whose sysfs device path contains `place`,
/// such as `/0000:00:05.0/` or `/ata2/`.
pub fn disk_at(place: &str) -> String {
    let found: Vec<String> = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .map(|entry| entry.expect("sysfs entry").path())
        .filter(|dev| {
            std::fs::canonicalize(dev)
                .map(|target| target.display().to_string().contains(place))
                .unwrap_or(false)
        })
        .map(|dev| {
            dev.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(found.len(), 1, "disks at {place}: {found:?}");
    found[0].clone()
}

/// The whole HTTP/1.1 response to a GET of `path` from a server on `address`.
pub fn http_get(address: &str, path: &str) -> String {
    http(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// The whole HTTP/1.1 response to a POST of the JSON `body` to `path`.
pub fn http_post(address: &str, path: &str, body: &str) -> String {
    http(
        address,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn http(address: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)
        .unwrap_or_else(|err| panic!("connecting to {address}: {err}"));
    stream
        .write_all(request.as_bytes())
        .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    response
}
