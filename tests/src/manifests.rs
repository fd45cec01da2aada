//! The manifests of `deploy/`, rendered the ways an operator renders them
//! (`kubectl kustomize`, `helm template`), and checked against the
//! k8s-openapi types so that no field is lost on the way to the API server.

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::workspace_root;

/// The Helm chart, relative to the workspace root.
pub const CHART: &str = "deploy/helm/lvmlocal";

/// The documents of a YAML stream as JSON values, empty documents skipped.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `kubectl kustomize <dir>`, as JSON values.
pub fn render(dir: &str) -> Vec<Value> {
    let mut kubectl = Command::new(crate::cluster::component("kubectl"));
    kubectl.arg("kustomize").arg(workspace_root().join(dir));
    rendered(kubectl, &format!("kubectl kustomize {dir}"))
}

/// `helm template` of the chart in `deploy/helm/lvmlocal` with these
/// extra arguments (values files, `--set`), CRDs included, as JSON values.
pub fn helm_template(extra: &[&str]) -> Vec<Value> {
    let mut helm = Command::new(crate::cluster::component("helm"));
    helm.args(["template", "lvmlocal"])
        .arg(workspace_root().join(CHART))
        .arg("--include-crds")
        .args(extra)
        .current_dir(workspace_root());
    rendered(helm, &format!("helm template {extra:?}"))
}

/// The objects `command` prints as YAML; fails unless it succeeds and
/// prints some.
fn rendered(mut command: Command, what: &str) -> Vec<Value> {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = documents(&String::from_utf8(out.stdout).unwrap());
    assert!(!objects.is_empty(), "{what} renders nothing");
    objects
}

/// The one object of `kind` named `name` among `objects`, typed.
pub fn one<T: DeserializeOwned>(objects: &[Value], kind: &str, name: &str) -> T {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name}");
    serde_json::from_value(found[0].clone()).unwrap()
}

/// The typed struct's view of `object`, serialized back.
fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Value {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", describe(object)));
    serde_json::to_value(typed).unwrap()
}

pub fn describe(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Parses `object` into its k8s-openapi type and fails if anything in it is
/// not in that type (a misspelt or misplaced field would be dropped silently
/// by the API server's client-side decoding). Objects of the Prometheus
/// Operator, which k8s-openapi lacks, get a structural check instead.
pub fn check_typed(object: &Value) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let back = match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(object),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(object),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(object),
        ("v1", "Service") => round_trip::<Service>(object),
        ("v1", "PersistentVolumeClaim") => round_trip::<PersistentVolumeClaim>(object),
        ("v1", "Pod") => round_trip::<Pod>(object),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(object),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(object),
        ("apps/v1", "StatefulSet") => round_trip::<StatefulSet>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(object)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(object),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(object),
        ("storage.k8s.io/v1", "StorageClass") => round_trip::<StorageClass>(object),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            round_trip::<k8s_openapi::api::networking::v1::NetworkPolicy>(object)
        }
        ("storage.k8s.io/v1", "CSIDriver") => round_trip::<CSIDriver>(object),
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            round_trip::<ValidatingAdmissionPolicy>(object)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            round_trip::<ValidatingAdmissionPolicyBinding>(object)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(object)
        }
        ("monitoring.coreos.com/v1", "PodMonitor" | "ServiceMonitor") => {
            check_monitor(object);
            return;
        }
        _ => panic!(
            "{}: no typed check for {api_version} {kind}",
            describe(object)
        ),
    };
    if let Err(at) = same(&back, object, "", 0) {
        panic!(
            "{} loses or changes fields in its typed form at {at}:\n typed: {back}\n input: {object}",
            describe(object)
        );
    }
}

/// Whether the typed round trip `back` says what `input` says: numbers are
/// compared by value (a schema's `minimum: 0` comes back as 0.0), and
/// k8s-openapi may add `apiVersion` and `kind` to embedded objects (the
/// claim templates of a StatefulSet). Anything else is a difference; the
/// error is where.
pub fn same(back: &Value, input: &Value, at: &str, depth: usize) -> Result<(), String> {
    match (back, input) {
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => Ok(()),
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => same(value, other, &format!("{at}.{key}"), depth + 1)?,
                    None if depth > 0 && (key == "apiVersion" || key == "kind") => {}
                    None => return Err(format!("{at}.{key} (added)")),
                }
            }
            match b.keys().find(|key| !a.contains_key(*key)) {
                Some(key) => Err(format!("{at}.{key} (dropped)")),
                None => Ok(()),
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                same(x, y, &format!("{at}[{i}]"), depth + 1)?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        _ => Err(at.to_owned()),
    }
}

fn check_monitor(object: &Value) {
    let spec = &object["spec"];
    let endpoints = match object["kind"].as_str() {
        Some("PodMonitor") => &spec["podMetricsEndpoints"],
        _ => &spec["endpoints"],
    };
    let endpoints = endpoints.as_array().expect("endpoints");
    assert!(!endpoints.is_empty(), "{}", describe(object));
    for endpoint in endpoints {
        let keys: BTreeSet<&str> = endpoint
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let known: BTreeSet<&str> = ["port", "path", "interval", "relabelings"].into();
        assert!(keys.is_subset(&known), "{}: {keys:?}", describe(object));
        assert!(endpoint["port"].is_string(), "{}", describe(object));
    }
    assert!(spec["selector"]["matchLabels"].is_object());
}
