//! Every way a Controller call fails, and the gRPC code the CSI spec names
//! for it. Errors become `tonic::Status` only here, at the service edge.

use std::error::Error as StdError;

use tonic::{Code, Status};

use crate::placement::PlacementError;
use crate::store::StoreError;
use crate::validate::Invalid;
use crate::volume::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {0} does not exist")]
    NotFound(VolumeId),
    #[error("volume {id} already exists with {existing}; this request asks for {wanted}")]
    AlreadyExists {
        id: VolumeId,
        existing: String,
        wanted: String,
    },
    #[error("node {node} cannot provide volume {id}: {message}")]
    NodeFailed {
        id: VolumeId,
        node: String,
        message: String,
    },
    #[error(
        "node {node} cannot grow volume {id}: {message}. Ask for less (down to the volume's \
         size) to give the expansion up"
    )]
    GrowFailed {
        id: VolumeId,
        node: String,
        message: String,
    },
    #[error("volume {0} is being deleted; retry once it is gone")]
    BeingDeleted(VolumeId),
    #[error("{0} is not supported by lvmlocal")]
    Unsupported(&'static str),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(VolumeId),
    #[error("{0}")]
    Thick(String),
    #[error("{what} {id} is on node {node}, which the request does not allow: {why}")]
    SourceElsewhere {
        what: &'static str,
        id: VolumeId,
        node: String,
        why: &'static str,
    },
    #[error("{what} {id} is not ready yet; retry")]
    SourceNotReady { what: &'static str, id: VolumeId },
    #[error("the volume would be {wanted} bytes, smaller than its source's {source_bytes}")]
    SmallerThanSource { wanted: u64, source_bytes: u64 },
}

impl CsiError {
    pub fn code(&self) -> Code {
        match self {
            CsiError::Invalid(err) => err.code(),
            CsiError::Placement(err) => err.code(),
            CsiError::Store(err) => err.code(),
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists { .. } => Code::AlreadyExists,
            // RESOURCE_EXHAUSTED sends the pod back to the scheduler, which
            // is what a node that cannot make the LV calls for.
            CsiError::NodeFailed { .. } => Code::ResourceExhausted,
            // Final for Kubernetes' resizer, which then lets the claim's
            // request come back down.
            CsiError::GrowFailed { .. } => Code::OutOfRange,
            CsiError::BeingDeleted(_) => Code::Aborted,
            CsiError::Unsupported(_) => Code::Unimplemented,
            CsiError::SnapshotNotFound(_) => Code::NotFound,
            CsiError::Thick(_) => Code::InvalidArgument,
            // Back to the scheduler, which the extender points at the
            // source's node.
            CsiError::SourceElsewhere { .. } => Code::ResourceExhausted,
            CsiError::SourceNotReady { .. } => Code::Unavailable,
            CsiError::SmallerThanSource { .. } => Code::OutOfRange,
        }
    }
}

impl From<CsiError> for Status {
    fn from(err: CsiError) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Status::new(err.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn status_carries_the_code_and_the_cause_chain() {
        let err = CsiError::from(StoreError::unavailable(
            "cannot read LogicalVolume pvc-1",
            io::Error::other("connection refused"),
        ));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "cannot read LogicalVolume pvc-1: connection refused"
        );
    }

    #[test]
    fn each_error_has_the_spec_code() {
        let id = VolumeId::parse("v").unwrap();
        let cases = [
            (CsiError::NotFound(id.clone()), Code::NotFound),
            (
                CsiError::AlreadyExists {
                    id: id.clone(),
                    existing: "a".into(),
                    wanted: "b".into(),
                },
                Code::AlreadyExists,
            ),
            (
                CsiError::NodeFailed {
                    id: id.clone(),
                    node: "n".into(),
                    message: "m".into(),
                },
                Code::ResourceExhausted,
            ),
            (CsiError::BeingDeleted(id.clone()), Code::Aborted),
            (CsiError::Unsupported("snapshots"), Code::Unimplemented),
            (
                CsiError::Invalid(Invalid::MissingName),
                Code::InvalidArgument,
            ),
            (
                CsiError::Store(StoreError::Timeout {
                    id,
                    waited: std::time::Duration::from_secs(1),
                }),
                Code::DeadlineExceeded,
            ),
            (
                CsiError::Store(StoreError::Corrupt("bad".into())),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }
}
