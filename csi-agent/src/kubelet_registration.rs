//! Registration with kubelet: a socket in kubelet's `plugins_registry`
//! directory, which kubelet's plugin watcher finds, asks what the plugin is
//! (the driver, and its CSI socket's path as kubelet sees it), and answers
//! whether it accepted it. The agent hears that answer itself and reports
//! it, instead of leaving it to a sidecar.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lvmlocal_proto::DRIVER_NAME;
use lvmlocal_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use lvmlocal_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::authority;
use crate::metrics::Metrics;

/// The plugin type kubelet hands CSI drivers to.
const CSI_PLUGIN: &str = "CSIPlugin";
/// CSI versions the agent serves, as kubelet spells them.
const CSI_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration socket in kubelet's directory `kubelet_dir`. kubelet
/// ignores names starting with a dot and reads every other socket there.
pub fn socket_path(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(format!("{DRIVER_NAME}-reg.sock"))
}

/// The registration service: tells kubelet where the CSI socket is.
pub struct Registrar {
    /// The CSI socket's path as kubelet sees it (the agent may see it at
    /// another path, inside its container).
    endpoint: PathBuf,
    metrics: Arc<Metrics>,
}

impl Registrar {
    pub fn new(endpoint: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self { endpoint, metrics }
    }

    /// Serves kubelet on `listener` until the task is dropped. Each
    /// connection reaches the gRPC server through the authority relay, over
    /// an in-memory pipe.
    pub async fn serve(self, listener: UnixListener) -> Result<(), tonic::transport::Error> {
        let (connections, incoming) = mpsc::channel(4);
        let accept = async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot accept a kubelet registration connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (near, far) = tokio::io::duplex(64 * 1024);
                if connections
                    .send(Ok::<_, std::io::Error>(far))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::spawn(async move {
                    if let Err(err) = authority::relay(client, near).await {
                        tracing::warn!(error = %err, "kubelet registration connection failed");
                    }
                });
            }
        };
        let accepting = tokio::spawn(accept);
        let served = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(self))
            .serve_with_incoming(ReceiverStream::new(incoming))
            .await;
        accepting.abort();
        served
    }
}

#[tonic::async_trait]
impl Registration for Registrar {
    #[tracing::instrument(skip_all, name = "kubelet.GetInfo")]
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: CSI_PLUGIN.into(),
            name: DRIVER_NAME.into(),
            endpoint: self.endpoint.display().to_string(),
            supported_versions: CSI_VERSIONS.iter().map(|v| (*v).into()).collect(),
        }))
    }

    #[tracing::instrument(skip_all, name = "kubelet.NotifyRegistrationStatus")]
    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        self.metrics.kubelet_registered(status.plugin_registered);
        if status.plugin_registered {
            tracing::info!(endpoint = %self.endpoint.display(), "kubelet registered the driver");
        } else {
            // kubelet tries again only when the socket appears anew: the
            // cause (often the endpoint path) needs an operator.
            tracing::error!(
                endpoint = %self.endpoint.display(),
                error = %status.error,
                "kubelet refused the driver's registration"
            );
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use lvmlocal_proto::rpc::RpcMetrics;

    use super::*;

    #[test]
    fn the_socket_lies_in_kubelets_registry() {
        assert_eq!(
            socket_path(Path::new("/var/lib/kubelet")),
            PathBuf::from("/var/lib/kubelet/plugins_registry/lvmlocal.io-reg.sock")
        );
    }

    #[tokio::test]
    async fn kubelet_learns_the_driver_and_its_answer_is_reported() {
        let metrics = Arc::new(Metrics::new(&RpcMetrics::default()));
        let registrar = Registrar::new(
            PathBuf::from("/var/lib/kubelet/plugins/lvmlocal.io/csi.sock"),
            metrics.clone(),
        );
        let info = registrar
            .get_info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info,
            PluginInfo {
                r#type: "CSIPlugin".into(),
                name: "lvmlocal.io".into(),
                endpoint: "/var/lib/kubelet/plugins/lvmlocal.io/csi.sock".into(),
                supported_versions: vec!["1.0.0".into()],
            }
        );
        let gauge = |metrics: &Metrics| {
            metrics
                .encode()
                .lines()
                .find(|line| line.starts_with("lvmlocal_agent_kubelet_registered "))
                .map(str::to_owned)
        };
        assert_eq!(
            gauge(&metrics).as_deref(),
            Some("lvmlocal_agent_kubelet_registered 0")
        );
        for (registered, want) in [(true, "1"), (false, "0")] {
            registrar
                .notify_registration_status(Request::new(RegistrationStatus {
                    plugin_registered: registered,
                    error: if registered { "" } else { "bad endpoint" }.into(),
                }))
                .await
                .unwrap();
            assert_eq!(
                gauge(&metrics),
                Some(format!("lvmlocal_agent_kubelet_registered {want}"))
            );
        }
    }
}
