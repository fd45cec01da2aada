//! The cluster-wide controller: serves the CSI Identity and Controller
//! services and maps each volume to a `LogicalVolume` on its node.
//!
//! The Controller service is generic over a [`store::Store`], so the agent's
//! standalone mode serves the same validation and error mapping over its LV
//! tags.

pub mod controller;
pub mod error;
pub mod identity;
pub mod placement;
pub mod rpc;
pub mod store;
pub mod validate;
pub mod volume;

use clap::Parser;
use lvmlocal_proto::runtime::{LogArgs, RuntimeError, StopSignals};

pub use controller::{ControllerService, ControllerSettings};
pub use identity::IdentityService;

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Endpoint for the CSI Identity and Controller services.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub csi_endpoint: String,

    #[command(flatten)]
    pub log: LogArgs,
}

pub async fn run(args: Args) -> Result<(), RuntimeError> {
    args.log.init()?;
    let stop = StopSignals::install()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        csi_endpoint = %args.csi_endpoint,
        "csi-controller started"
    );
    let signal = stop.wait().await;
    tracing::info!(%signal, "csi-controller stopping");
    Ok(())
}
