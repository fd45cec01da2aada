//! The per-node agent: discovers raw disks, builds one volume group per
//! media class, and serves the CSI Identity and Node services.

use clap::Parser;
use lvmlocal_proto::runtime::{LogArgs, RuntimeError, StopSignals};

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Name of the Kubernetes node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Endpoint for the CSI Identity and Node services.
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
        node = %args.node_name,
        csi_endpoint = %args.csi_endpoint,
        "csi-agent started"
    );
    let signal = stop.wait().await;
    tracing::info!(%signal, "csi-agent stopping");
    Ok(())
}
