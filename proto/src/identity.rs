//! The CSI Identity service: who the plugin is and what it serves.

use std::collections::HashMap;

use crate::DRIVER_NAME;
use crate::csi::v1::identity_server::Identity;
use crate::csi::v1::plugin_capability::{self, Service, VolumeExpansion};
use crate::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::rpc::RpcMetrics;

pub struct IdentityService {
    serves_controller: bool,
    metrics: RpcMetrics,
}

impl IdentityService {
    /// `serves_controller`: the Controller service is on the same endpoint
    /// (the cluster controller, the agent's standalone mode); the agent's
    /// Node-only endpoint says false.
    pub fn new(serves_controller: bool, metrics: RpcMetrics) -> Self {
        Self {
            serves_controller,
            metrics,
        }
    }

    fn capabilities(&self) -> Vec<PluginCapability> {
        let service = |kind: plugin_capability::service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(Service {
                r#type: kind as i32,
            })),
        };
        let mut capabilities = vec![
            service(plugin_capability::service::Type::VolumeAccessibilityConstraints),
            PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                })),
            },
        ];
        if self.serves_controller {
            capabilities.push(service(plugin_capability::service::Type::ControllerService));
        }
        capabilities
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        self.metrics
            .observe("GetPluginInfo", async {
                Ok::<_, Status>(GetPluginInfoResponse {
                    name: DRIVER_NAME.to_owned(),
                    vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                    manifest: HashMap::new(),
                })
            })
            .await
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        self.metrics
            .observe("GetPluginCapabilities", async {
                Ok::<_, Status>(GetPluginCapabilitiesResponse {
                    capabilities: self.capabilities(),
                })
            })
            .await
    }

    /// Ready whenever it answers: the endpoint is only opened once the
    /// service behind it can work.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        self.metrics
            .observe("Probe", async {
                Ok::<_, Status>(ProbeResponse { ready: Some(true) })
            })
            .await
    }
}
