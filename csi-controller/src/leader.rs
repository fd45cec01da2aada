//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several
//! replicas only one serves the CSI socket and collects garbage.
//!
//! Expiry is judged the way client-go does: by how long this process has
//! seen the lease record unchanged on its own monotonic clock, never by
//! comparing another host's timestamps with ours.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::{Instant, sleep};

use crate::kube_store::FIELD_MANAGER;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity`; the pod name.
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews (and others retry).
    pub retry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {0} was taken over by {1}")]
    TakenOver(String, String),
    #[error("could not renew lease {name} for {waited:?}: {source}")]
    RenewFailed {
        name: String,
        waited: Duration,
        #[source]
        source: kube::Error,
    },
}

/// What a read of the lease means for this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ours,
    /// Nobody holds it, or the holder stopped renewing.
    Free,
    Held {
        by: String,
    },
}

/// Judges a lease record that this process has seen unchanged for
/// `unchanged_for`.
pub fn judge(spec: &LeaseSpec, me: &str, unchanged_for: Duration, default: Duration) -> Verdict {
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default, Duration::from_secs);
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Verdict::Ours,
        None | Some("") => Verdict::Free,
        Some(_) if unchanged_for >= duration => Verdict::Free,
        Some(holder) => Verdict::Held {
            by: holder.to_owned(),
        },
    }
}

pub struct Leadership {
    api: Api<Lease>,
    settings: LeaseSettings,
}

/// A lease record as last read, and since when it has looked so.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

impl Leadership {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    /// Returns once this replica holds the lease.
    pub async fn acquire(&self) {
        let mut observed = None;
        loop {
            match self.try_acquire(&mut observed).await {
                Ok(Verdict::Ours) => {
                    tracing::info!(lease = %self.settings.name, "became the leader");
                    return;
                }
                Ok(Verdict::Held { by }) => tracing::debug!(leader = %by, "waiting for the lease"),
                Ok(Verdict::Free) => {}
                Err(err) => tracing::warn!(error = %err, "cannot read or take the lease"),
            }
            sleep(self.settings.retry).await;
        }
    }

    /// One attempt; `Ours` if this replica holds the lease afterwards.
    async fn try_acquire(&self, observed: &mut Option<Observed>) -> Result<Verdict, kube::Error> {
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.claim(None)),
            };
            return match self.api.create(&post_params(), &lease).await {
                Ok(_) => Ok(Verdict::Ours),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Verdict::Free),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        if observed.as_ref().is_none_or(|o| o.record != record) {
            *observed = Some(Observed { record, since: now });
        }
        let unchanged_for = observed.as_ref().map_or(Duration::ZERO, |o| now - o.since);
        match judge(
            &spec,
            &self.settings.identity,
            unchanged_for,
            self.settings.duration,
        ) {
            Verdict::Held { by } => Ok(Verdict::Held { by }),
            Verdict::Ours | Verdict::Free => {
                let taken = Lease {
                    metadata: lease.metadata.clone(),
                    spec: Some(self.claim(Some(&spec))),
                };
                // `replace` carries the resourceVersion read above, so of two
                // replicas taking a free lease at once only one succeeds.
                match self
                    .api
                    .replace(&self.settings.name, &post_params(), &taken)
                    .await
                {
                    Ok(_) => Ok(Verdict::Ours),
                    Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Verdict::Free),
                    Err(err) => Err(err),
                }
            }
        }
    }

    /// The lease spec with this replica holding it from now.
    fn claim(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let me = &self.settings.identity;
        let ours = previous.is_some_and(|p| p.holder_identity.as_ref() == Some(me));
        LeaseSpec {
            holder_identity: Some(me.clone()),
            lease_duration_seconds: Some(self.settings.duration.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0)
                    + i32::from(!ours && previous.is_some()),
            ),
            ..LeaseSpec::default()
        }
    }

    /// Renews the lease until it is lost, and says why. The caller must
    /// then stop acting at once: another replica may take over after
    /// `duration`, and renewal is abandoned well before that.
    pub async fn keep(&self) -> LeaseError {
        let deadline = self.settings.duration * 2 / 3;
        let mut renewed = Instant::now();
        loop {
            sleep(self.settings.retry).await;
            match self.renew().await {
                Ok(()) => renewed = Instant::now(),
                Err(RenewError::Taken(by)) => {
                    return LeaseError::TakenOver(self.settings.name.clone(), by);
                }
                Err(RenewError::Api(source)) if renewed.elapsed() >= deadline => {
                    return LeaseError::RenewFailed {
                        name: self.settings.name.clone(),
                        waited: renewed.elapsed(),
                        source,
                    };
                }
                Err(RenewError::Api(err)) => {
                    tracing::warn!(error = %err, "lease renewal failed; retrying")
                }
            }
        }
    }

    async fn renew(&self) -> Result<(), RenewError> {
        let lease = self.api.get(&self.settings.name).await?;
        let spec = lease.spec.clone().unwrap_or_default();
        match spec.holder_identity.as_deref() {
            Some(holder) if holder == self.settings.identity => {}
            other => return Err(RenewError::Taken(other.unwrap_or_default().to_owned())),
        }
        let renewed = Lease {
            metadata: lease.metadata,
            spec: Some(self.claim(Some(&spec))),
        };
        self.api
            .replace(&self.settings.name, &post_params(), &renewed)
            .await?;
        Ok(())
    }

    /// Gives the lease up on a clean stop, so a standby takes over at once
    /// instead of after `duration`.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let lease = self.api.get(&self.settings.name).await?;
        let Some(spec) = lease.spec.as_ref() else {
            return Ok(());
        };
        if spec.holder_identity.as_ref() != Some(&self.settings.identity) {
            return Ok(());
        }
        let released = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..spec.clone()
            }),
        };
        self.api
            .replace(&self.settings.name, &post_params(), &released)
            .await?;
        Ok(())
    }
}

enum RenewError {
    Taken(String),
    Api(kube::Error),
}

impl From<kube::Error> for RenewError {
    fn from(err: kube::Error) -> Self {
        RenewError::Api(err)
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn judge_the_lease() {
        let default = Duration::from_secs(15);
        let s = Duration::from_secs;
        let cases = [
            (held_by(Some("me"), Some(15)), s(100), Verdict::Ours),
            (held_by(None, Some(15)), s(0), Verdict::Free),
            (held_by(Some(""), Some(15)), s(0), Verdict::Free),
            (
                held_by(Some("other"), Some(15)),
                s(14),
                Verdict::Held { by: "other".into() },
            ),
            (held_by(Some("other"), Some(15)), s(15), Verdict::Free),
            // The record's own duration wins over ours.
            (
                held_by(Some("other"), Some(60)),
                s(30),
                Verdict::Held { by: "other".into() },
            ),
            (held_by(Some("other"), None), s(15), Verdict::Free),
            (held_by(Some("other"), Some(1)), s(1), Verdict::Free),
        ];
        for (spec, unchanged, want) in cases {
            assert_eq!(
                judge(&spec, "me", unchanged, default),
                want,
                "{spec:?} {unchanged:?}"
            );
        }
    }
}
