//! The agent's heartbeat: a Lease per node in the driver's namespace, renewed
//! by the agent, read by the extender and the controller to tell a node whose
//! agent has gone silent. Readers judge silence on their own monotonic clock
//! (how long since they last saw the renewal time move), so a node's clock
//! being off cannot make it look alive or dead.

use std::fmt;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

/// Label every heartbeat Lease carries; readers list by it.
pub const LABEL: &str = "lvmlocal.io/heartbeat";
pub const LABEL_VALUE: &str = "agent";
/// The label selector for [`LABEL`].
pub const SELECTOR: &str = "lvmlocal.io/heartbeat=agent";
/// How long a heartbeat lasts unless the agent is told otherwise.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(40);

const PREFIX: &str = "lvmlocal-agent-";
const MAX_NAME: usize = 253;

/// Name of the heartbeat Lease of `node`.
pub fn lease_name(node: &str) -> String {
    let mut name = format!("{PREFIX}{node}");
    name.truncate(MAX_NAME);
    name
}

/// The node a heartbeat Lease speaks for (its holder), if it is one.
pub fn node_of(lease: &Lease) -> Option<&str> {
    if lease.labels().get(LABEL).map(String::as_str) != Some(LABEL_VALUE) {
        return None;
    }
    lease.spec.as_ref()?.holder_identity.as_deref()
}

/// What a reader has seen of one node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The renewal time as written, compared only for change.
    renewed: String,
    /// When this reader saw it change.
    seen: Instant,
    duration: Duration,
}

impl Beat {
    /// The beat after reading `lease` at `now`: moved on if its renewal time
    /// differs from the last one seen. A reader counts a first sighting as a
    /// renewal, so a restarted reader gives every agent one full duration.
    pub fn observe(previous: Option<&Beat>, lease: &Lease, now: Instant) -> Beat {
        let spec = lease.spec.as_ref();
        let renewed = spec
            .and_then(|spec| spec.renew_time.as_ref())
            .map(|time| time.0.to_string())
            .unwrap_or_default();
        let duration = spec
            .and_then(|spec| spec.lease_duration_seconds)
            .and_then(|secs| u64::try_from(secs).ok())
            .filter(|secs| *secs > 0)
            .map_or(DEFAULT_DURATION, Duration::from_secs);
        let seen = match previous {
            Some(beat) if beat.renewed == renewed => beat.seen,
            _ => now,
        };
        Beat {
            renewed,
            seen,
            duration,
        }
    }

    /// Silent past its own duration, at `now`.
    pub fn silent(&self, now: Instant) -> Option<Silence> {
        let quiet = now.saturating_duration_since(self.seen);
        (quiet > self.duration).then_some(Silence::For(quiet))
    }

    /// How long since the renewal was last seen to move.
    pub fn quiet(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.seen)
    }
}

/// Why a node's agent counts as silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// No heartbeat Lease at all.
    Never,
    /// The Lease has not been renewed for this long.
    For(Duration),
}

/// The silence of a node with `beat` at `now`, if any.
pub fn silence(beat: Option<&Beat>, now: Instant) -> Option<Silence> {
    match beat {
        None => Some(Silence::Never),
        Some(beat) => beat.silent(now),
    }
}

impl fmt::Display for Silence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Silence::Never => f.write_str("the lvmlocal agent has no heartbeat"),
            Silence::For(quiet) => write!(
                f,
                "the lvmlocal agent has not renewed its heartbeat for {}s",
                quiet.as_secs()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;

    fn lease(node: &str, renewed_secs: i64, labelled: bool) -> Lease {
        let mut lease = Lease::default();
        lease.metadata.name = Some(lease_name(node));
        if labelled {
            lease
                .labels_mut()
                .insert(LABEL.to_owned(), LABEL_VALUE.to_owned());
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(10),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_secs).unwrap())),
            ..LeaseSpec::default()
        });
        lease
    }

    #[test]
    fn names_fit_and_only_labelled_leases_speak_for_a_node() {
        assert_eq!(lease_name("n1"), "lvmlocal-agent-n1");
        assert_eq!(lease_name(&"x".repeat(300)).len(), MAX_NAME);
        assert_eq!(node_of(&lease("n1", 1, true)), Some("n1"));
        assert_eq!(node_of(&lease("n1", 1, false)), None);
    }

    #[test]
    fn silence_is_judged_on_the_readers_clock() {
        let start = Instant::now();
        let first = Beat::observe(None, &lease("n1", 100, true), start);
        assert_eq!(first.silent(start + Duration::from_secs(10)), None);
        let later = start + Duration::from_secs(11);
        assert_eq!(
            first.silent(later),
            Some(Silence::For(Duration::from_secs(11)))
        );

        // The same renewal read again does not count as a beat.
        let same = Beat::observe(Some(&first), &lease("n1", 100, true), later);
        assert!(same.silent(later).is_some());
        // A moved renewal does, whatever the time written in it.
        let moved = Beat::observe(Some(&same), &lease("n1", 5, true), later);
        assert_eq!(moved.silent(later + Duration::from_secs(10)), None);

        assert_eq!(silence(None, later), Some(Silence::Never));
        assert_eq!(
            Silence::For(Duration::from_secs(42)).to_string(),
            "the lvmlocal agent has not renewed its heartbeat for 42s"
        );
    }
}
