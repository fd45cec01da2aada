//! The cluster-wide controller: serves the CSI Identity and Controller
//! services and maps each volume to a `LogicalVolume` on its node.

use clap::Parser;
use lvmlocal_proto::runtime::{LogArgs, RuntimeError, StopSignals};

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
