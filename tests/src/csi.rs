//! A small CSI client over the agent's unix socket, and the whole life of
//! one volume walked through it: what the demo shows and the tests assert.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hyper_util::rt::TokioIo;
use lvmlocal_proto::csi::v1::controller_client::ControllerClient;
use lvmlocal_proto::csi::v1::identity_client::IdentityClient;
use lvmlocal_proto::csi::v1::node_client::NodeClient;
use lvmlocal_proto::csi::v1::volume_capability::access_mode::Mode;
use lvmlocal_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use lvmlocal_proto::csi::v1::*;
use tokio::net::UnixStream;

use lvmlocal_proto::extent::human_bytes;
use tonic::transport::{Channel, Endpoint, Uri};

pub const KUBELET_DIR: &str = "/var/lib/kubelet";
pub use lvmlocal_proto::params::MEDIA_PARAM;

/// The three CSI services behind one socket.
#[derive(Clone)]
pub struct Csi {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Csi {
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let socket = socket.to_owned();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel =
            Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
                .context("connecting to the CSI socket")?;
        Ok(Self {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}

/// A running agent, killed when dropped.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
}

impl Agent {
    /// Starts `csi-agent` standalone on `socket`, opted in to claiming the
    /// VM's disks, and waits until it answers Probe and has built its volume
    /// groups (GetCapacity of `media` > 0).
    pub async fn start(binary: &Path, socket: &Path, media: &str) -> anyhow::Result<(Self, Csi)> {
        Self::start_with_env(binary, socket, media, &[]).await
    }

    /// As `start`, with more environment for the agent (a `PATH` that
    /// slows its commands down, say).
    pub async fn start_with_env(
        binary: &Path,
        socket: &Path,
        media: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Self, Csi)> {
        let child = Command::new(binary)
            .args([
                "--node-name",
                "vm",
                "--standalone",
                "--claim-disks",
                "--metrics-address",
                "127.0.0.1:9808",
            ])
            .arg("--csi-endpoint")
            .arg(format!("unix://{}", socket.display()))
            .envs(env.iter().copied())
            // Its own process group, so a kill takes its commands with it.
            .process_group(0)
            .spawn()
            .context("starting csi-agent")?;
        let agent = Self {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(mut csi) = Csi::connect(socket).await
                && csi.identity.probe(ProbeRequest {}).await.is_ok()
                && let Ok(capacity) = csi.controller.get_capacity(capacity_request(media)).await
                && capacity.into_inner().available_capacity > 0
            {
                return Ok((agent, csi));
            }
            ensure!(
                Instant::now() < deadline,
                "csi-agent did not come up on {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the agent and every command it runs at once, as a node crash
    /// would.
    pub fn kill(mut self) {
        self.kill_group();
    }

    fn kill_group(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_group();
    }
}

pub fn capacity_request(media: &str) -> GetCapacityRequest {
    GetCapacityRequest {
        volume_capabilities: vec![],
        parameters: HashMap::from([(MEDIA_PARAM.to_owned(), media.to_owned())]),
        accessible_topology: None,
    }
}

/// A single-node-writer capability: a filesystem of `fs`, or raw block.
pub fn capability(fs: Option<&str>) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(match fs {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.to_owned(),
                ..MountVolume::default()
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
    }
}

pub fn create_request(
    name: &str,
    media: &str,
    fs: Option<&str>,
    bytes: u64,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: i64::try_from(bytes).expect("size fits i64"),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(fs)],
        parameters: HashMap::from([(MEDIA_PARAM.to_owned(), media.to_owned())]),
        ..CreateVolumeRequest::default()
    }
}

/// One volume's life: what to make and how to grow it.
#[derive(Debug, Clone)]
pub struct Walk {
    pub name: String,
    pub media: String,
    /// `ext4`, `xfs`, or None for raw block.
    pub fs: Option<String>,
    pub size: u64,
    pub grown: u64,
    /// Send every call twice: the second must succeed and change nothing.
    pub twice: bool,
}

/// One call on a clone of `client` (clones share the connection), as a
/// future that owns what it needs, so a step can send it again.
macro_rules! rpc {
    ($client:expr, $method:ident, $request:expr) => {{
        let mut client = $client.clone();
        let request = $request.clone();
        async move { client.$method(request).await }
    }};
}

/// What the walk reports at each step: its name, how long it took, a detail.
pub type Log<'a> = &'a mut dyn FnMut(&str, Duration, String);

async fn step<T, F, Fut>(log: Log<'_>, name: &str, twice: bool, mut call: F) -> anyhow::Result<T>
where
    T: std::fmt::Debug + PartialEq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let first = call()
        .await
        .with_context(|| format!("{name} failed"))?
        .into_inner();
    let took = started.elapsed();
    if twice {
        let again = call()
            .await
            .with_context(|| format!("{name}, sent again, failed"))?
            .into_inner();
        ensure!(
            again == first,
            "{name} answered differently the second time:\n{first:?}\n{again:?}"
        );
    }
    log(name, took, String::new());
    Ok(first)
}

/// Creates, stages, publishes, writes and reads, expands online, reports
/// stats, and takes down one volume, checking each answer.
pub async fn walk(csi: &Csi, walk: &Walk, log: Log<'_>) -> anyhow::Result<()> {
    let fs = walk.fs.as_deref();
    let capability = capability(fs);
    let twice = walk.twice;

    let request = create_request(&walk.name, &walk.media, fs, walk.size);
    let created = step(log, "CreateVolume", twice, || {
        rpc!(csi.controller, create_volume, request)
    })
    .await?;
    let volume = created.volume.context("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    ensure!(
        volume.capacity_bytes >= walk.size as i64,
        "created {} bytes",
        volume.capacity_bytes
    );
    let topology = &volume.accessible_topology;
    ensure!(
        topology.len() == 1
            && topology[0]
                .segments
                .get("lvmlocal.io/node")
                .map(String::as_str)
                == Some("vm"),
        "topology {topology:?}"
    );
    log(
        "",
        Duration::ZERO,
        format!("volume {id}, {} bytes", volume.capacity_bytes),
    );

    let staging = PathBuf::from(format!(
        "{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/{id}/globalmount"
    ));
    let target = match fs {
        Some(_) => PathBuf::from(format!(
            "{KUBELET_DIR}/pods/demo-pod/volumes/kubernetes.io~csi/{id}/mount"
        )),
        None => PathBuf::from(format!(
            "{KUBELET_DIR}/plugins/kubernetes.io/csi/volumeDevices/publish/{id}/demo-pod"
        )),
    };
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());

    let stage = NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging_s.clone(),
        volume_capability: Some(capability.clone()),
        ..NodeStageVolumeRequest::default()
    };
    step(log, "NodeStageVolume", twice, || {
        rpc!(csi.node, node_stage_volume, stage)
    })
    .await?;
    let publish = NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging_s.clone(),
        target_path: target_s.clone(),
        volume_capability: Some(capability.clone()),
        readonly: false,
        ..NodePublishVolumeRequest::default()
    };
    step(log, "NodePublishVolume", twice, || {
        rpc!(csi.node, node_publish_volume, publish)
    })
    .await?;

    let started = Instant::now();
    let written = write_and_read_back(&target, fs.is_some())?;
    log("write + read back", started.elapsed(), written);

    let expand = ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: walk.grown as i64,
            limit_bytes: 0,
        }),
        volume_capability: Some(capability.clone()),
        ..ControllerExpandVolumeRequest::default()
    };
    let expanded = step(log, "ControllerExpandVolume", twice, || {
        rpc!(csi.controller, controller_expand_volume, expand)
    })
    .await?;
    ensure!(
        expanded.capacity_bytes == walk.grown as i64,
        "expanded to {}",
        expanded.capacity_bytes
    );
    ensure!(
        expanded.node_expansion_required == fs.is_some(),
        "node expansion {expanded:?}"
    );
    let node_expand = NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target_s.clone(),
        capacity_range: expand.capacity_range,
        staging_target_path: staging_s.clone(),
        volume_capability: Some(capability.clone()),
        secrets: HashMap::new(),
    };
    let grown = step(log, "NodeExpandVolume", twice, || {
        rpc!(csi.node, node_expand_volume, node_expand)
    })
    .await?;
    ensure!(
        grown.capacity_bytes >= walk.grown as i64,
        "node expanded to {}",
        grown.capacity_bytes
    );
    if fs.is_some() {
        let df = Command::new("df")
            .args(["-B1", "--output=size,target"])
            .arg(&target)
            .output()?;
        let df = String::from_utf8_lossy(&df.stdout).into_owned();
        let size: u64 = df
            .lines()
            .nth(1)
            .and_then(|line| line.split_whitespace().next())
            .and_then(|size| size.parse().ok())
            .context("df output")?;
        // Filesystem overhead aside, the filesystem must now exceed the old size.
        ensure!(
            size > walk.size,
            "df still shows {size} bytes after growing:\n{df}"
        );
        log("", Duration::ZERO, format!("df: {} bytes", size));
    }

    let stats_request = NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target_s.clone(),
        staging_target_path: staging_s.clone(),
    };
    let stats = step(log, "NodeGetVolumeStats", false, || {
        rpc!(csi.node, node_get_volume_stats, stats_request)
    })
    .await?;
    let condition = stats.volume_condition.context("no volume condition")?;
    ensure!(!condition.abnormal, "volume condition {condition:?}");
    let total = stats.usage.first().map_or(0, |usage| usage.total);
    ensure!(total > walk.size as i64 * 9 / 10, "stats total {total}");
    log(
        "",
        Duration::ZERO,
        format!("stats: {}", usage_text(&stats.usage)),
    );

    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target_s.clone(),
    };
    step(log, "NodeUnpublishVolume", twice, || {
        rpc!(csi.node, node_unpublish_volume, unpublish)
    })
    .await?;
    ensure!(
        !target.exists(),
        "{} outlived NodeUnpublishVolume",
        target.display()
    );
    let unstage = NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging_s,
    };
    step(log, "NodeUnstageVolume", twice, || {
        rpc!(csi.node, node_unstage_volume, unstage)
    })
    .await?;
    let delete = DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: HashMap::new(),
    };
    step(log, "DeleteVolume", twice, || {
        rpc!(csi.controller, delete_volume, delete)
    })
    .await?;
    let left = csi
        .controller
        .clone()
        .list_volumes(ListVolumesRequest::default())
        .await?
        .into_inner();
    if left
        .entries
        .iter()
        .any(|entry| entry.volume.as_ref().is_some_and(|v| v.volume_id == id))
    {
        bail!("volume {id} is still listed after DeleteVolume");
    }
    Ok(())
}

/// Writes 1 MiB of a pattern and reads it back through the published path.
fn write_and_read_back(target: &Path, filesystem: bool) -> anyhow::Result<String> {
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let path = if filesystem {
        target.join("data")
    } else {
        target.to_owned()
    };
    let mut file = fs::OpenOptions::new()
        .create(filesystem)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(&payload)?;
    file.sync_all()?;
    file.seek(SeekFrom::Start(0))?;
    let mut back = vec![0; payload.len()];
    file.read_exact(&mut back)?;
    ensure!(
        back == payload,
        "read back other bytes than written at {}",
        path.display()
    );
    Ok(format!("1 MiB through {}", path.display()))
}

/// NodeGetVolumeStats usage as a person reads it: `1.0Gi total, 950.2Mi
/// available, 12.0Mi used; 65536 inodes, 65525 free`.
fn usage_text(usage: &[VolumeUsage]) -> String {
    usage
        .iter()
        .map(|usage| {
            let [total, available, used] =
                [usage.total, usage.available, usage.used].map(|n| u64::try_from(n).unwrap_or(0));
            if usage.unit == volume_usage::Unit::Inodes as i32 {
                format!("{total} inodes, {available} free")
            } else {
                format!(
                    "{} total, {} available, {} used",
                    human_bytes(total),
                    human_bytes(available),
                    human_bytes(used)
                )
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}
