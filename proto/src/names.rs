/// CSI driver name; also the API group of the CRDs.
pub const DRIVER_NAME: &str = "lvmlocal.io";

/// Topology segment key that pins a volume to the node holding its LV.
pub const TOPOLOGY_KEY: &str = "lvmlocal.io/node";
