//! The agent's heartbeat: the node's Lease in the driver's namespace,
//! renewed four times per duration so that one or two lost renewals do not
//! make the node look dead to the extender and the controller.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use lvmlocal_proto::heartbeat::{self, LABEL, LABEL_VALUE};
use serde_json::json;
use tracing::Instrument;

use crate::node_storage::FIELD_MANAGER;

/// Renews the heartbeat of `node` until aborted.
pub async fn run(client: Client, namespace: String, node: String, duration: Duration) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let name = heartbeat::lease_name(&node);
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    let mut ticks = tokio::time::interval(duration / 4);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "labels": {LABEL: LABEL_VALUE}},
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": seconds,
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = leases
            .patch(&name, &params, &Patch::Apply(&lease))
            .instrument(tracing::debug_span!("heartbeat", node = %node, lease = %name))
            .await;
        match result {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(lease = %name, "heartbeat renewed again");
            }
            Ok(_) => {}
            Err(err) => {
                // One line per outage, not per tick.
                if !failing {
                    tracing::warn!(lease = %name, %namespace, error = %err, "cannot renew the heartbeat; retrying");
                }
                failing = true;
            }
        }
    }
}
