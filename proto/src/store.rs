//! What the Controller service needs from wherever volumes are kept:
//! `LogicalVolume` objects in a cluster ([`crate::kube_store`]), or the LV
//! tags of one node in the agent's standalone mode.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use crate::MediaClass;
use crate::io_limits::IoLimits;
use tokio::time::Instant;
use tonic::Code;

use crate::placement::NodeCapacity;
use crate::volume::{NewVolume, Volume, VolumeId};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A backend for [`crate::ControllerService`]. Every method must be safe to
/// repeat and to abandon half-way: the CO retries every call.
pub trait Store: Send + Sync + 'static {
    /// Whether the store keeps IO limits, so ControllerModifyVolume is
    /// offered.
    fn keeps_io_limits(&self) -> bool {
        true
    }

    /// Whether the store keeps snapshots and volumes made from them, so
    /// the snapshot calls and content sources are offered.
    fn keeps_snapshots(&self) -> bool {
        true
    }

    /// The volume with this id, read from the source of truth (not a cache),
    /// since it decides whether a retried CreateVolume makes a second volume.
    fn get(&self, id: &VolumeId)
    -> impl Future<Output = Result<Option<Volume>, StoreError>> + Send;

    /// Stores `volume` unless a volume with its id exists, and returns the
    /// stored one: the new volume, or the existing one if another call got
    /// there first.
    fn create(&self, volume: NewVolume) -> impl Future<Output = Result<Volume, StoreError>> + Send;

    /// Waits until the node has answered for `volume` at its generation or a
    /// later one, i.e. until [`Volume::settled`]; [`StoreError::Timeout`] once
    /// `deadline` passes.
    fn wait(
        &self,
        volume: &Volume,
        deadline: Instant,
    ) -> impl Future<Output = Result<Volume, StoreError>> + Send;

    /// Asks for the volume to be removed. An unknown id is not an error.
    fn delete(&self, id: &VolumeId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Asks for the volume to grow to `size_bytes`; returns the stored
    /// volume with the new size and generation.
    fn resize(
        &self,
        volume: &Volume,
        size_bytes: u64,
    ) -> impl Future<Output = Result<Volume, StoreError>> + Send;

    /// Asks for the volume's IO limits to become `io_limits`; returns the
    /// stored volume.
    fn modify(
        &self,
        volume: &Volume,
        io_limits: IoLimits,
    ) -> impl Future<Output = Result<Volume, StoreError>> + Send;

    /// Up to `limit` volumes (or with `snapshots`, snapshots) not being
    /// deleted, sorted by id, starting after `after`.
    fn list(
        &self,
        after: Option<&VolumeId>,
        limit: usize,
        snapshots: bool,
    ) -> impl Future<Output = Result<Vec<Volume>, StoreError>> + Send;

    /// The volume groups of class `media` on the nodes that can take volumes.
    fn capacities(
        &self,
        media: MediaClass,
    ) -> impl Future<Output = Result<Vec<NodeCapacity>, StoreError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {id} is not ready after {waited:?}; retry the call to keep waiting")]
    Timeout { id: VolumeId, waited: Duration },
    #[error("{context}")]
    Unavailable {
        context: String,
        #[source]
        source: BoxError,
    },
    #[error("{0}")]
    Corrupt(String),
    /// The store cannot keep what the request asks for.
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    /// Wraps a backend failure with what was being done.
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            context: context.into(),
            source: source.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            StoreError::Timeout { .. } => Code::DeadlineExceeded,
            StoreError::Unavailable { .. } => Code::Unavailable,
            StoreError::Corrupt(_) => Code::Internal,
            StoreError::Unsupported(_) => Code::InvalidArgument,
        }
    }
}
