//! The cluster-wide controller: serves the CSI Identity and Controller
//! services over [`kube_store::KubeStore`], which maps each volume to a
//! `LogicalVolume` on its node, under a Lease, with the garbage collection
//! of volumes whose node is gone. The services themselves are
//! `lvmlocal_proto`'s, shared with the agent's standalone mode.

pub mod caches;
pub mod capacity;
pub mod crdgen;
pub mod gc;
pub mod http;
pub mod kube_store;
pub mod leader;
pub mod recovery;
pub mod unclaimed;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};
use kube::Client;
use lvmlocal_proto::controller::{ControllerService, ControllerSettings};
use lvmlocal_proto::csi::v1::controller_server::ControllerServer;
use lvmlocal_proto::csi::v1::identity_server::IdentityServer;
use lvmlocal_proto::identity::IdentityService;
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::runtime::{KubeClientError, LogArgs, RuntimeError, StopSignals, kube_client};
use lvmlocal_proto::server::{self, ServeError};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::kube_store::KubeStore;
use crate::leader::{Leadership, LeaseError, LeaseSettings};
use crate::unclaimed::UnclaimedMetrics;

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Endpoint for the CSI Identity and Controller services.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub csi_endpoint: String,

    /// Kubeconfig to use; in a pod, the service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address of the HTTP server for /healthz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,

    /// Take a Lease before serving, so one replica acts at a time.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,

    /// Namespace of the Lease; defaults to the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    #[arg(long, default_value = "lvmlocal-controller")]
    pub leader_election_lease_name: String,

    /// This replica's name in the Lease; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,

    /// Seconds a Lease lasts without renewal; renewal is retried every
    /// third of it and abandoned after two thirds.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// The driver's namespace, where the agents' heartbeat Leases are.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lvmlocal")]
    pub namespace: String,

    /// Size of a volume whose CreateVolume sets no capacity.
    #[arg(long, default_value_t = 1 << 30)]
    pub default_volume_size_bytes: u64,

    /// Seconds CreateVolume and ControllerExpandVolume wait for the agent
    /// before DEADLINE_EXCEEDED; keep below the sidecars' --timeout.
    #[arg(long, default_value_t = 10)]
    pub volume_wait_seconds: u64,

    /// Seconds a Node object must have been gone before the finalizers of
    /// its deleted LogicalVolumes are removed.
    #[arg(long, default_value_t = 3600)]
    pub node_gone_grace_seconds: u64,

    /// Seconds a node's agent must have been silent, with the Node
    /// NotReady, before the claims that opted in to recovery are recreated.
    #[arg(long, default_value_t = 300)]
    pub recovery_silence_seconds: u64,

    /// Most claims recreated after a loss, and most unclaimed volumes
    /// collected, in any one minute.
    #[arg(long, default_value_t = 5)]
    pub recovery_max_per_minute: usize,

    /// Seconds a LogicalVolume must have had no PersistentVolume and no
    /// claim waiting for it before it is reported, and collected if its
    /// class chose lvmlocal.io/on-node-loss=recreate.
    #[arg(long, default_value_t = 900)]
    pub unclaimed_grace_seconds: u64,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML, generated from the
    /// types, and exit: the source of `deploy/base/crds/`.
    Crdgen,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Kube(#[from] KubeClientError),
    #[error("cannot listen on {address}: {source}")]
    Http {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("lost leadership, stopping: {0}")]
    Leadership(#[from] LeaseError),
    #[error("cannot write the CRDs as YAML: {0}")]
    Crdgen(#[from] serde_norway::Error),
}

pub async fn run(args: Args) -> Result<(), RunError> {
    if let Some(Command::Crdgen) = args.command {
        print!("{}", crdgen::yaml()?);
        return Ok(());
    }
    args.log.init()?;
    let stop = StopSignals::install()?;
    let socket = server::socket_path(&args.csi_endpoint)?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;

    let metrics = RpcMetrics::default();
    let unclaimed = UnclaimedMetrics::default();
    let mut registry = Registry::with_prefix("lvmlocal");
    metrics.register(&mut registry);
    unclaimed.register(&mut registry);
    let http_listener = TcpListener::bind(args.metrics_address)
        .await
        .map_err(|source| RunError::Http {
            address: args.metrics_address,
            source,
        })?;
    let metrics_address = http_listener.local_addr().unwrap_or(args.metrics_address);
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::spawn(http::serve(
        http_listener,
        Arc::new(registry),
        stopped(stopping.clone()),
    ));

    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        csi_endpoint = %args.csi_endpoint,
        %metrics_address,
        "csi-controller started"
    );
    let work = serve_when_leader(&args, client, metrics, unclaimed, &socket, stopping);
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => result,
        signal = stop.wait() => {
            tracing::info!(%signal, "csi-controller stopping");
            stopping_tx.send_replace(true);
            // Let in-flight calls finish; the work ends itself on the flag.
            work.await
        }
    }
}

/// Waits for the lease, fills the caches, then serves the CSI socket until
/// `stopping`; an error if leadership is lost.
async fn serve_when_leader(
    args: &Args,
    client: Client,
    metrics: RpcMetrics,
    unclaimed: UnclaimedMetrics,
    socket: &Path,
    stopping: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let leadership = if args.leader_election {
        let leadership = Leadership::new(client.clone(), lease_settings(args, &client));
        if until_stopped(leadership.acquire(), &stopping)
            .await
            .is_none()
        {
            return Ok(());
        }
        Some(leadership)
    } else {
        None
    };

    let (caches, feed) = caches::caches();
    tokio::spawn(feed.run(client.clone(), args.namespace.clone()));
    if until_stopped(caches.synced(), &stopping).await.is_none() {
        return Ok(());
    }
    tokio::spawn(gc::run(
        client.clone(),
        caches.clone(),
        Duration::from_secs(args.node_gone_grace_seconds),
        Duration::from_secs(60),
    ));
    tokio::spawn(recovery::run(
        client.clone(),
        caches.clone(),
        recovery::Settings {
            silence_grace: Duration::from_secs(args.recovery_silence_seconds),
            per_minute: args.recovery_max_per_minute,
            every: Duration::from_secs(10),
        },
    ));
    tokio::spawn(unclaimed::run(
        client.clone(),
        caches.clone(),
        unclaimed,
        unclaimed::Settings {
            grace: Duration::from_secs(args.unclaimed_grace_seconds),
            per_minute: args.recovery_max_per_minute,
            // Each sweep lists every PersistentVolume.
            every: Duration::from_secs(args.unclaimed_grace_seconds / 4)
                .clamp(Duration::from_secs(5), Duration::from_secs(60)),
        },
    ));

    let settings = ControllerSettings {
        default_size_bytes: args.default_volume_size_bytes,
        wait: Duration::from_secs(args.volume_wait_seconds),
    };
    let controller =
        ControllerService::new(KubeStore::new(client, caches), settings, metrics.clone());
    let router = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(true, metrics)))
        .add_service(ControllerServer::new(controller));
    let listener = server::bind(socket)?;
    tracing::info!(socket = %socket.display(), "serving CSI");
    let serving = server::serve(router, listener, socket, stopped(stopping));

    let Some(leadership) = leadership else {
        return Ok(serving.await?);
    };
    tokio::select! {
        served = serving => served?,
        lost = leadership.keep() => return Err(lost.into()),
    }
    if let Err(err) = leadership.release().await {
        tracing::warn!(error = %err, "cannot release the lease; a standby takes over when it expires");
    }
    Ok(())
}

fn lease_settings(args: &Args, client: &Client) -> LeaseSettings {
    let duration = Duration::from_secs(args.lease_duration_seconds.max(3));
    LeaseSettings {
        name: args.leader_election_lease_name.clone(),
        namespace: args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned()),
        identity: args
            .leader_election_identity
            .clone()
            .unwrap_or_else(host_name),
        duration,
        retry: duration / 3,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "csi-controller".to_owned())
}

/// Resolves when the stop flag is raised.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// `work`'s output, or `None` if the stop flag is raised first.
async fn until_stopped<T>(
    work: impl Future<Output = T>,
    stopping: &watch::Receiver<bool>,
) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        () = stopped(stopping.clone()) => None,
    }
}
