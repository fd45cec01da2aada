//! The per-node agent: discovers raw disks, builds one volume group per
//! media class, and serves the CSI Identity and Node services.

#[cfg(test)]
mod api_mock;
pub mod authority;
pub mod claim;
pub mod command;
pub mod config;
pub mod discovery;
pub mod disk_load;
pub mod erase;
#[cfg(test)]
mod fake_lvm;
pub mod fs_probe;
pub mod heartbeat;
pub mod inventory;
pub mod io_limits;
pub mod kernel_log;
pub mod kubelet_registration;
pub mod lvm;
pub mod metrics;
pub mod mount;
pub mod node_service;
pub mod node_storage;
pub mod orphans;
pub mod plan;
pub mod probe;
pub mod reconciler;
pub mod rescan;
pub mod slot;
pub mod standalone;
pub mod sysfs;
pub mod uevent;
pub mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::controller::{ControllerService, ControllerSettings};
use lvmlocal_proto::csi::v1::controller_server::ControllerServer;
use lvmlocal_proto::csi::v1::identity_server::IdentityServer;
use lvmlocal_proto::csi::v1::node_server::NodeServer;
use lvmlocal_proto::identity::IdentityService;
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::runtime::{KubeClientError, LogArgs, RuntimeError, StopSignals, kube_client};
use lvmlocal_proto::server::{self, ServeError};

use crate::claim::{NodeLabels, NodeSource};
use crate::command::Runner;
use crate::config::{ConfigError, ConfigFile, DiscoveryConfig};
use crate::inventory::{InventoryError, Sources};
use crate::io_limits::IoLimiter;
use crate::kernel_log::KernelErrors;
use crate::kubelet_registration::Registrar;
use crate::lvm::Lvm;
use crate::metrics::Metrics;
use crate::mount::Mounter;
use crate::node_service::{NodeService, NodeSettings};
use crate::node_storage::Publisher;
use crate::rescan::{RescanError, Rescanner};
use crate::standalone::LvTagStore;
use crate::volumes::Volumes;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Rescan(#[from] RescanError),
    #[error("--node-name (or NODE_NAME) is required to run the agent")]
    NoNodeName,
    #[error(transparent)]
    Kube(#[from] KubeClientError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("serving metrics on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Name of the Kubernetes node this agent runs on.
    #[arg(long, env = "NODE_NAME", global = true)]
    pub node_name: Option<String>,

    /// Endpoint for the CSI Identity and Node services.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub csi_endpoint: String,

    /// Run without a Kubernetes API: nothing is reported to a cluster, and
    /// the agent also serves the CSI Controller service for this node, with
    /// the LV tags as its only store.
    #[arg(long)]
    pub standalone: bool,

    /// Kubeconfig to use; in a pod, the service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// kubelet's directory: staging and target paths must lie under it.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// The CSI socket's path as kubelet sees it. Given, the agent registers
    /// the driver with kubelet through a socket in `<kubelet-dir>/plugins_registry`.
    #[arg(long)]
    pub kubelet_registration_path: Option<PathBuf>,

    /// The host's cgroup v2 hierarchy, where the volumes' IO limits are
    /// written into the cgroups of their pods.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Most volumes kubelet may place on this node (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes: i64,

    /// Address of the `/healthz` and `/metrics` endpoints.
    #[arg(long, default_value = "0.0.0.0:9808")]
    pub metrics_address: SocketAddr,

    /// Namespace of the node's heartbeat Lease: the driver's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lvmlocal")]
    pub namespace: String,

    /// Seconds the heartbeat lasts; it is renewed four times as often. The
    /// extender and the controller call the node silent once it lapses.
    #[arg(long, default_value_t = lvmlocal_proto::heartbeat::DEFAULT_DURATION.as_secs(),
          value_parser = clap::value_parser!(u64).range(4..))]
    pub heartbeat_seconds: u64,

    #[command(flatten)]
    pub discovery: DiscoveryArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the disk inventory and the volume group plan, and change nothing.
    Discover {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build the volume groups once: discover, carry out the plan, print the result.
    Apply,
}

/// Discovery settings: a TOML file, each overridden by its flag.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoveryArgs {
    /// TOML configuration file (see the README for its keys).
    #[arg(long, env = "LVMLOCAL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Volume groups are named `<prefix>-<media class>`.
    #[arg(long, global = true)]
    pub vg_prefix: Option<String>,
    /// Media classes to manage (comma-separated: nvme,ssd,hdd).
    #[arg(long, value_delimiter = ',', global = true)]
    pub classes: Option<Vec<MediaClass>>,
    /// Disks smaller than this many bytes are left alone.
    #[arg(long, global = true)]
    pub min_disk_bytes: Option<u64>,
    /// Only disks whose slot matches one of these globs may join.
    #[arg(long, global = true)]
    pub allow: Option<Vec<String>>,
    /// Disks whose slot matches one of these globs never join.
    #[arg(long, global = true)]
    pub deny: Option<Vec<String>>,
    /// Seconds between two rescans of the node's disks.
    #[arg(long, global = true)]
    pub rescan_interval_secs: Option<u64>,
    /// Claim blank disks on this node even without the node label
    /// lvmlocal.io/claim-disks=true (`--claim-disks=false`: only with it).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub claim_disks: Option<bool>,
    /// Claim disks on control-plane nodes too, where claiming is enabled.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub claim_control_plane: Option<bool>,
    /// Root of the sysfs tree to read block devices from.
    #[arg(long, default_value = "/sys", global = true)]
    pub sysfs: PathBuf,
}

impl DiscoveryArgs {
    pub fn resolve(&self) -> Result<DiscoveryConfig, ConfigError> {
        let mut file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        file.vg_prefix = self.vg_prefix.clone().or(file.vg_prefix);
        file.classes = self.classes.clone().or(file.classes);
        file.min_disk_bytes = self.min_disk_bytes.or(file.min_disk_bytes);
        file.allow = self.allow.clone().or(file.allow);
        file.deny = self.deny.clone().or(file.deny);
        file.rescan_interval_secs = self.rescan_interval_secs.or(file.rescan_interval_secs);
        file.claim_disks = self.claim_disks.or(file.claim_disks);
        file.claim_control_plane = self.claim_control_plane.or(file.claim_control_plane);
        DiscoveryConfig::from_file(file)
    }

    pub fn sources(&self) -> Sources {
        Sources {
            sysfs: self.sysfs.clone(),
            ..Sources::default()
        }
    }
}

/// How long shutdown waits for LV changes in flight: within the default
/// 30 s termination grace period, with room for the rest of the exit.
const CHANGES_DRAIN: Duration = Duration::from_secs(20);
/// Where the kernel logs filesystem and I/O errors.
const KERNEL_LOG: &str = "/dev/kmsg";
/// Where the kernel counts each disk's I/O.
const DISKSTATS: &str = "/proc/diskstats";

pub async fn run(args: Args) -> Result<(), AgentError> {
    match args.command {
        Some(Command::Discover { json }) => discover(&args.discovery, json).await,
        Some(Command::Apply) => apply(&args.discovery).await,
        None => serve(args).await,
    }
}

async fn discover(args: &DiscoveryArgs, json: bool) -> Result<(), AgentError> {
    let config = args.resolve()?;
    let runner = Runner::default();
    // Without a Kubernetes API only the configuration can enable claiming.
    let claiming = claim::decide(&config, &NodeLabels::Standalone);
    let inventory = inventory::take(
        &args.sources(),
        &runner,
        &Lvm::new(runner.clone()),
        &config,
        &claiming,
    )
    .await?;
    if json {
        let commands: Vec<String> = inventory
            .plan
            .actions
            .iter()
            .flat_map(Lvm::commands)
            .map(|cmd| cmd.to_string())
            .collect();
        let out = serde_json::json!({
            "disks": inventory.disks,
            "groups": inventory.plan.groups,
            "actions": inventory.plan.actions,
            "commands": commands,
        });
        println!("{out:#}");
    } else {
        print!("{}", inventory.table());
    }
    Ok(())
}

async fn apply(args: &DiscoveryArgs) -> Result<(), AgentError> {
    let mut rescanner = Rescanner::new(
        args.resolve()?,
        args.sources(),
        Runner::default(),
        Arc::new(Metrics::new(&RpcMetrics::default())),
    );
    let inventory = rescanner.rescan().await?;
    print!("{}", inventory.table());
    Ok(())
}

async fn serve(args: Args) -> Result<(), AgentError> {
    args.log.init()?;
    let stop = StopSignals::install()?;
    let node = args.node_name.ok_or(AgentError::NoNodeName)?;
    let socket = server::socket_path(&args.csi_endpoint)?;
    let client = if args.standalone {
        None
    } else {
        Some(kube_client(args.kubeconfig.as_deref()).await?)
    };
    let publisher = client.clone().map(|client| Publisher::new(client, &node));
    let rpc = RpcMetrics::default();
    let metrics = Arc::new(Metrics::new(&rpc));
    let config = args.discovery.resolve()?;
    let runner = Runner::default().with_metrics(metrics.commands.clone());
    let lvm = Lvm::new(runner.clone());
    let kernel_errors = KernelErrors::default();
    let volumes = Arc::new(Volumes::new(lvm, &config, kernel_errors.clone()));
    let mut rescanner = Rescanner::new(
        config.clone(),
        args.discovery.sources(),
        runner.clone(),
        metrics.clone(),
    );
    rescanner.publisher = publisher;
    rescanner.volumes = Some(volumes.clone());
    rescanner.node = client.clone().map(|client| NodeSource::new(client, &node));
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .map_err(|source| AgentError::Metrics {
            address: args.metrics_address,
            source,
        })?;
    // Healthy while rescans keep coming; three missed intervals is not.
    let max_age = config.rescan_interval * 3;
    let metrics_server = tokio::spawn(metrics::serve(listener, metrics.clone(), max_age));

    let (trigger, triggered) = tokio::sync::mpsc::channel(1);
    let labels = rescanner
        .node
        .clone()
        .map(|node| tokio::spawn(node.watch(trigger.clone())));
    if let Err(err) = uevent::watch(trigger.clone()) {
        tracing::warn!(error = %err, "no uevents; disks are found by periodic rescans only");
    }
    if let Err(err) = kernel_log::watch(Path::new(KERNEL_LOG), kernel_errors, trigger) {
        tracing::warn!(error = %err, path = KERNEL_LOG, "no kernel log; filesystem errors go unseen");
    }
    let load = tokio::spawn(disk_load::run(
        DISKSTATS.into(),
        rescanner.members(),
        client.clone(),
        node.clone(),
        metrics.clone(),
    ));
    let disks = tokio::spawn(rescanner.run(triggered));

    let beat = client.clone().map(|client| {
        tokio::spawn(heartbeat::run(
            client,
            args.namespace.clone(),
            node.clone(),
            Duration::from_secs(args.heartbeat_seconds),
        ))
    });
    let limiter = Arc::new(IoLimiter::new(
        args.cgroup_root.clone(),
        io_limits::records_dir(&args.kubelet_dir),
        metrics.clone(),
    ));
    let limits = tokio::spawn(io_limits::run(limiter.clone()));
    let reconciler = client.map(|client| {
        tokio::spawn(reconciler::run(
            client,
            node.clone(),
            volumes.clone(),
            limiter.clone(),
            metrics.clone(),
            volumes.lv_changes(),
        ))
    });
    let node_service = NodeService::new(
        NodeSettings {
            node: node.clone(),
            kubelet_dir: args.kubelet_dir.clone(),
            max_volumes: args.max_volumes,
        },
        volumes.clone(),
        Mounter::new(runner.clone()),
        rpc.clone(),
        metrics.clone(),
        limiter,
    );
    let mut router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(
            args.standalone,
            rpc.clone(),
        )))
        .add_service(NodeServer::new(node_service));
    if args.standalone {
        let store = LvTagStore::new(&node, volumes.clone());
        let controller = ControllerService::new(store, ControllerSettings::default(), rpc.clone());
        router = router.add_service(ControllerServer::new(controller));
    }
    let csi_listener = server::bind(&socket)?;
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let csi_socket = socket.clone();
    let csi = tokio::spawn(async move {
        server::serve(router, csi_listener, &csi_socket, async {
            let _ = stopped.await;
        })
        .await
    });
    // Only once the CSI socket listens: kubelet calls NodeGetInfo as soon
    // as it reads the registration.
    let registration = match args.kubelet_registration_path {
        Some(endpoint) => {
            let path = kubelet_registration::socket_path(&args.kubelet_dir);
            let listener = server::bind(&path)?;
            let registrar = Registrar::new(endpoint, metrics.clone());
            Some(tokio::spawn(async move {
                if let Err(err) = registrar.serve(listener).await {
                    tracing::error!(error = %err, path = %path.display(), "the kubelet registration socket failed");
                }
            }))
        }
        None => None,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %node,
        csi_endpoint = %args.csi_endpoint,
        standalone = args.standalone,
        "csi-agent started"
    );
    let signal = stop.wait().await;
    tracing::info!(%signal, "csi-agent stopping");
    disks.abort();
    load.abort();
    limits.abort();
    if let Some(registration) = registration {
        registration.abort();
    }
    if let Some(labels) = labels {
        labels.abort();
    }
    if let Some(reconciler) = reconciler {
        reconciler.abort();
    }
    if let Some(beat) = beat {
        beat.abort();
    }
    metrics_server.abort();
    // Let calls in flight finish: an interrupted mount is retried, but cleanly.
    let _ = stopping.send(());
    let served = csi.await;
    // LV changes run in tasks of their own (an aborted reconcile or a
    // cancelled call does not cut one short): let them end, within kubelet's
    // grace period. One still running resumes from its recorded state.
    if !volumes.drain(CHANGES_DRAIN).await {
        tracing::warn!("LV changes still running at exit; they resume on the next start");
    }
    match served {
        Ok(result) => result?,
        Err(err) => tracing::error!(error = %err, "CSI server task failed"),
    }
    Ok(())
}
