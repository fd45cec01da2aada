//! The CustomResourceDefinitions as YAML, generated from the Rust types in
//! `lvmlocal-proto` so the manifests can never drift from the code:
//! `csi-controller crdgen` prints what `deploy/base/crds/` must hold.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};

/// Where the generated file is committed, relative to the repository root.
pub const CRDS_PATH: &str = "deploy/base/crds/lvmlocal.io.yaml";

/// The command that rewrites [`CRDS_PATH`] from the types.
pub const REGENERATE: &str =
    "cargo run -q -p csi-controller -- crdgen > deploy/base/crds/lvmlocal.io.yaml";

/// Every CustomResourceDefinition lvmlocal installs, labelled as part of
/// it: the Helm chart installs this file as it is, where kustomize would
/// add the label.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![NodeLocalStorage::crd(), LogicalVolume::crd()];
    for crd in &mut crds {
        crd.metadata
            .labels
            .get_or_insert_default()
            .insert("app.kubernetes.io/part-of".into(), "lvmlocal".into());
    }
    crds
}

/// The CRDs as one multi-document YAML file, with a header saying where it
/// comes from.
pub fn yaml() -> Result<String, serde_norway::Error> {
    let mut out = format!(
        "# Generated from proto/src/crd.rs; do not edit. Regenerate with:\n#   {REGENERATE}\n"
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_reads_back_as_the_crd_it_came_from() {
        let text = yaml().unwrap();
        let documents: Vec<CustomResourceDefinition> = text
            .split("\n---\n")
            .skip(1)
            .map(|doc| serde_norway::from_str(doc).unwrap())
            .collect();
        assert_eq!(documents, crds());
        let names: Vec<_> = documents
            .iter()
            .map(|crd| crd.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "nodelocalstorages.lvmlocal.io",
                "logicalvolumes.lvmlocal.io"
            ]
        );
    }
}
