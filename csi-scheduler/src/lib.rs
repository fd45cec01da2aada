//! The kube-scheduler extender: filters and scores nodes by the free space
//! each media class has left.

use std::net::SocketAddr;

use clap::Parser;
use lvmlocal_proto::runtime::{LogArgs, RuntimeError, StopSignals};

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address for the extender's HTTP endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub log: LogArgs,
}

pub async fn run(args: Args) -> Result<(), RuntimeError> {
    args.log.init()?;
    let stop = StopSignals::install()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %args.listen,
        "csi-scheduler started"
    );
    let signal = stop.wait().await;
    tracing::info!(%signal, "csi-scheduler stopping");
    Ok(())
}
