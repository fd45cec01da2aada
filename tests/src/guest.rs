//! Tests that run inside the VM. A `vm_test!` is an ordinary `#[test]`: on the
//! host it boots its VM and runs itself, alone, inside the guest; the host
//! side passes only if the guest side ran and passed.

use crate::vm::Vm;

/// Set in the guest's environment, so a test binary knows where it runs.
pub const IN_VM_ENV: &str = "LVMLOCAL_IN_VM";

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
