//! Contracts and shared rules of the lvmlocal components: the CSI gRPC
//! bindings, the custom resources, the names every component must agree
//! on, the volume model and the checks of CSI requests, StorageClass
//! parameters, extent and capacity arithmetic, and (feature `service`) the
//! CSI service edge the node plugin and the cluster controller both serve.
//! Each rule lives here once, so the binaries cannot drift apart.

pub mod crd;
pub mod extender;
pub mod extent;
pub mod heartbeat;
pub mod io_limits;
pub mod load;
mod media;
mod names;
pub mod params;
pub mod placement;
pub mod thin;
pub mod validate;
pub mod volume;

#[cfg(feature = "service")]
pub mod controller;
#[cfg(feature = "service")]
pub mod error;
#[cfg(feature = "service")]
pub mod identity;
#[cfg(feature = "service")]
pub mod logical_volume;
#[cfg(feature = "service")]
pub mod rpc;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "service")]
pub mod server;
#[cfg(feature = "service")]
pub mod store;

pub use media::{MediaClass, ParseMediaClassError};
pub use names::{DRIVER_NAME, TOPOLOGY_KEY};

/// Bindings generated from the vendored `csi.proto` (package `csi.v1`).
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// kubelet's plugin registration service (v1, package `pluginregistration`).
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}
