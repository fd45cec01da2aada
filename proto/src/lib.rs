//! Contracts shared by the lvmlocal components: the CSI gRPC bindings, the
//! custom resources, the names every component must agree on, and the media
//! classes.

pub mod crd;
pub mod extender;
mod media;
mod names;
#[cfg(feature = "runtime")]
pub mod runtime;

pub use media::{MediaClass, ParseMediaClassError};
pub use names::{DRIVER_NAME, TOPOLOGY_KEY};

/// Bindings generated from the vendored `csi.proto` (package `csi.v1`).
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
