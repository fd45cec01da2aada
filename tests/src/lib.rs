//! The VM test bed: boots Debian's stock kernel under qemu with emulated NVMe,
//! SATA SSD and SATA HDD disks, runs one command in a guest that sees the
//! host's root file system, and hands back the command's output and status.

pub mod cluster;
pub mod csi;
pub mod guest;
pub mod manifests;
pub mod pod_io;
pub mod process;
pub mod size;
pub mod suite;
pub mod vm;
pub mod workload;

pub use size::{GIB, MIB, parse_size};
pub use vm::{DEFAULT_AHCI_SLOT, Disk, DiskBus, HOST_FROM_GUEST, RunningVm, Vm, VmOutput};
