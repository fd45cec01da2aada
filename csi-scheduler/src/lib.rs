//! The kube-scheduler extender: filters and scores nodes by the free space
//! each media class has left.
//!
//! The flow of a call: `needs` (what the pod asks for) → `inventory` (what
//! each node has left, reservations included) → `capacity::fit` and
//! `placement::scores`. `watch` keeps the inventory current; `http` speaks the
//! extender protocol.

pub mod capacity;
pub mod extender;
pub mod http;
pub mod inventory;
pub mod metrics;
pub mod needs;
pub mod placement;
pub mod quantity;
pub mod reservation;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lvmlocal_proto::params::Placement;
use lvmlocal_proto::runtime::{KubeClientError, LogArgs, RuntimeError, StopSignals, kube_client};

use crate::extender::{Extender, Policy};
use crate::metrics::Metrics;

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address for the extender's HTTP endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Path prefix of the extender verbs: `<prefix>/filter` and
    /// `<prefix>/prioritize`. Empty, or starting with `/`.
    #[arg(long, default_value = "", value_parser = parse_prefix)]
    pub path_prefix: String,

    /// Placement for StorageClasses that do not set `lvmlocal.io/placement`.
    #[arg(long, value_enum, default_value_t = Placement::Binpack)]
    pub default_placement: Placement,

    /// Seconds a reservation lives when the pod's claims never show a node.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub reservation_ttl_seconds: u64,

    /// Most reservations kept at once; past it, the one closest to expiry
    /// gives way. Bounds what any caller of the extender can hold.
    #[arg(long, default_value_t = reservation::DEFAULT_LIMIT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_reservations: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_request_bytes: usize,

    /// Namespace of the agents' heartbeat Leases: the driver's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lvmlocal")]
    pub namespace: String,

    /// Kubeconfig to reach the API server; in-cluster configuration if unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() || (prefix.starts_with('/') && !prefix.ends_with('/')) {
        Ok(prefix.to_owned())
    } else {
        Err("must be empty, or start with / and not end with /".into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Kube(#[from] KubeClientError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub async fn run(args: Args) -> Result<(), StartError> {
    args.log.init()?;
    let stop = StopSignals::install()?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let policy = Policy {
        default_placement: args.default_placement,
        reservation_ttl: Duration::from_secs(args.reservation_ttl_seconds),
        max_reservations: args.max_reservations,
    };
    let extender = Arc::new(Extender::new(policy, Metrics::new()).with_client(client.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: args.listen,
            source,
        })?;

    let watching = tokio::spawn(watch::follow_cluster(
        client,
        args.namespace.clone(),
        extender.clone(),
    ));
    let expiring = tokio::spawn(expire_reservations(
        extender.clone(),
        policy.reservation_ttl,
    ));
    let app = http::router(extender, &args.path_prefix, args.max_request_bytes);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %args.listen,
        path_prefix = %args.path_prefix,
        default_placement = %args.default_placement,
        reservation_ttl_seconds = args.reservation_ttl_seconds,
        max_reservations = args.max_reservations,
        namespace = %args.namespace,
        "csi-scheduler started"
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let signal = stop.wait().await;
            tracing::info!(%signal, "csi-scheduler stopping");
        })
        .await;
    watching.abort();
    expiring.abort();
    served.map_err(StartError::Serve)
}

/// Expired reservations are also dropped on every call; this keeps the
/// gauge honest while no pod is being scheduled.
async fn expire_reservations(extender: Arc<Extender>, ttl: Duration) {
    let mut ticks = tokio::time::interval(ttl / 2);
    loop {
        ticks.tick().await;
        extender.expire_reservations(Instant::now());
    }
}
