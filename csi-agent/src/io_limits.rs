//! Holds the pods of each volume to the volume's IO limits: a cgroup v2
//! `io.max` entry for the LV's device in the cgroup of every pod that has
//! the volume published. The pod comes from the UID kubelet gives at
//! NodePublishVolume; each publication is recorded on disk, so that a
//! change of limits after an agent restart still reaches the pods.
//!
//! The agent touches only the entry of the volume's own device, and only in
//! the cgroups of the pods that publish it.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lvmlocal_proto::crd::IoLimitsStatus;
use lvmlocal_proto::io_limits::IoLimits;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("pod UID {0:?} is not a UID")]
    PodUid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> LimitError + '_ {
    move |source| LimitError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How often every pod is checked against its volumes' limits.
const REFRESH: Duration = Duration::from_secs(10);

/// Where the publications are recorded: the driver's own directory in
/// kubelet's plugin directory, which lives as long as the node's pods.
pub fn records_dir(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins")
        .join(lvmlocal_proto::DRIVER_NAME)
        .join("publications")
}

/// Refreshes every [`REFRESH`]; runs until the task is dropped.
pub async fn run(limiter: Arc<IoLimiter>) {
    let mut ticks = tokio::time::interval(REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let limiter = limiter.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || limiter.refresh()).await {
            tracing::warn!(error = %err, "IO limit refresh stopped");
        }
    }
}

/// What one volume is to be held to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    device: PathBuf,
    limits: IoLimits,
}

pub struct IoLimiter {
    /// The host's cgroup v2 hierarchy.
    cgroup_root: PathBuf,
    /// `<records>/<volume id>/<pod uid>` holds the publication's target path.
    records: PathBuf,
    /// Why limits cannot be enforced on this node, if they cannot.
    unsupported: Option<String>,
    wanted: Mutex<HashMap<String, Wanted>>,
    metrics: Arc<Metrics>,
}

impl IoLimiter {
    pub fn new(cgroup_root: PathBuf, records: PathBuf, metrics: Arc<Metrics>) -> Self {
        let unsupported = support(&cgroup_root).err();
        if let Some(reason) = &unsupported {
            tracing::warn!(%reason, "IO limits cannot be enforced on this node");
        }
        Self {
            cgroup_root,
            records,
            unsupported,
            wanted: Mutex::default(),
            metrics,
        }
    }

    /// Records that pod `pod_uid` has volume `id` published at `target`,
    /// and holds the pod to the volume's limits if they are known yet.
    pub fn published(
        &self,
        id: &str,
        pod_uid: &str,
        target: &Path,
        device: &Path,
    ) -> Result<(), LimitError> {
        check_uid(pod_uid)?;
        let dir = self.records.join(id);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        let record = dir.join(pod_uid);
        let partial = dir.join(format!(".{pod_uid}.new"));
        fs::write(&partial, target.as_os_str().as_bytes()).map_err(at(&partial))?;
        fs::rename(&partial, &record).map_err(at(&record))?;
        let limits = self.wanted_limits(id);
        if let (Some(limits), None) = (limits, &self.unsupported) {
            let (major, minor) = device_number(device)?;
            self.hold_pod(pod_uid, major, minor, limits)?;
        }
        Ok(())
    }

    /// Forgets the publication of volume `id` at `target`. The pod's
    /// `io.max` entry stays: the pod is going away, and with it its cgroup.
    pub fn unpublished(&self, id: &str, target: &Path) -> Result<(), LimitError> {
        for (uid, recorded) in self.publications(id)? {
            if recorded == target {
                let record = self.records.join(id).join(uid);
                fs::remove_file(&record).map_err(at(&record))?;
            }
        }
        let dir = self.records.join(id);
        // Only an empty directory goes; another pod may still publish.
        let _ = fs::remove_dir(&dir);
        Ok(())
    }

    /// Makes `limits` the limits of volume `id` (device `device`) and holds
    /// every pod that publishes it to them; what the status is to say.
    pub fn set(&self, id: &str, device: &Path, limits: IoLimits) -> IoLimitsStatus {
        self.wanted.lock().expect("limit table poisoned").insert(
            id.to_owned(),
            Wanted {
                device: device.to_owned(),
                limits,
            },
        );
        let failure = match &self.unsupported {
            Some(reason) if !limits.is_none() => Some(reason.clone()),
            Some(_) => None,
            None => self
                .apply(id, device, limits)
                .err()
                .map(|err| format!("cannot apply {limits}: {err}")),
        };
        IoLimitsStatus {
            applied: limits,
            enforced: failure.is_none(),
            message: failure,
        }
    }

    /// Forgets volume `id`, whose LV is gone.
    pub fn forget(&self, id: &str) {
        self.wanted.lock().expect("limit table poisoned").remove(id);
        let dir = self.records.join(id);
        if let Err(err) = fs::remove_dir_all(&dir)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(error = %err, path = %dir.display(), "cannot remove publication records");
        }
    }

    /// Holds the pods of every volume to its limits again: a pod whose
    /// cgroup came after its publication, or whose entry was changed by
    /// someone else, is put right. Counts the pods held.
    pub fn refresh(&self) {
        if self.unsupported.is_some() {
            return;
        }
        let wanted = self.wanted.lock().expect("limit table poisoned").clone();
        let mut held = 0;
        for (id, wanted) in wanted {
            match self.apply(&id, &wanted.device, wanted.limits) {
                Ok(pods) => held += pods,
                Err(err) => tracing::debug!(volume = %id, error = %err, "IO limits not applied"),
            }
        }
        self.metrics.io_limited_pods(held);
    }

    fn wanted_limits(&self, id: &str) -> Option<IoLimits> {
        self.wanted
            .lock()
            .expect("limit table poisoned")
            .get(id)
            .map(|wanted| wanted.limits)
    }

    /// Holds every pod that publishes volume `id` to `limits`: how many
    /// pods it holds to a limit, or the first failure (the other pods are
    /// held all the same).
    fn apply(&self, id: &str, device: &Path, limits: IoLimits) -> Result<usize, LimitError> {
        let publications = self.publications(id)?;
        if publications.is_empty() {
            return Ok(0);
        }
        let (major, minor) = device_number(device)?;
        let mut held = 0;
        let mut failure = None;
        for (uid, _) in publications {
            match self.hold_pod(&uid, major, minor, limits) {
                Ok(true) => held += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(volume = %id, pod = %uid, error = %err, "cannot apply IO limits");
                    failure.get_or_insert(err);
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None if limits.is_none() => Ok(0),
            None => Ok(held),
        }
    }

    /// Holds pod `uid` to `limits` on device `major:minor`; false when the
    /// pod has no cgroup (not yet, or no longer). A failure is counted.
    fn hold_pod(
        &self,
        uid: &str,
        major: u64,
        minor: u64,
        limits: IoLimits,
    ) -> Result<bool, LimitError> {
        let Some(cgroup) = pod_cgroup(&self.cgroup_root, uid) else {
            tracing::debug!(pod = %uid, "no cgroup for the pod (yet)");
            return Ok(false);
        };
        hold(&cgroup, major, minor, limits).inspect_err(|_| self.metrics.io_limit_failed())?;
        Ok(true)
    }

    /// The pods that publish volume `id`, with their target paths.
    fn publications(&self, id: &str) -> Result<Vec<(String, PathBuf)>, LimitError> {
        let dir = self.records.join(id);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(at(&dir)(err)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(at(&dir))?;
            let Some(uid) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_uid(&uid).is_err() {
                continue;
            }
            let target = fs::read(entry.path()).map_err(at(&entry.path()))?;
            found.push((uid, PathBuf::from(std::ffi::OsStr::from_bytes(&target))));
        }
        Ok(found)
    }
}

/// Whether `root` is a cgroup v2 hierarchy with the io controller.
fn support(root: &Path) -> Result<(), String> {
    let controllers = root.join("cgroup.controllers");
    let available = fs::read_to_string(&controllers).map_err(|err| {
        format!(
            "no cgroup v2 hierarchy at {} ({}: {err})",
            root.display(),
            controllers.display()
        )
    })?;
    if !available.split_whitespace().any(|name| name == "io") {
        return Err(format!(
            "the io controller is not available in the cgroup v2 hierarchy at {}",
            root.display()
        ));
    }
    Ok(())
}

/// The cgroup of pod `uid`, in kubelet's layout for either cgroup driver
/// (cgroupfs: `kubepods/<qos>/pod<uid>`; systemd:
/// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`).
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let underscored = uid.replace('-', "_");
    let candidates = [
        format!("kubepods/pod{uid}"),
        format!("kubepods/burstable/pod{uid}"),
        format!("kubepods/besteffort/pod{uid}"),
        format!("kubepods.slice/kubepods-pod{underscored}.slice"),
        format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice"
        ),
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice"
        ),
    ];
    candidates
        .into_iter()
        .map(|relative| root.join(relative))
        .find(|path| path.is_dir())
}

/// Writes the `io.max` entry of `major:minor` in `cgroup` unless it already
/// says `limits`.
fn hold(cgroup: &Path, major: u64, minor: u64, limits: IoLimits) -> Result<(), LimitError> {
    let file = cgroup.join("io.max");
    let current = fs::read_to_string(&file).map_err(at(&file))?;
    if IoLimits::from_io_max(&current, major, minor) == limits {
        return Ok(());
    }
    fs::write(&file, limits.io_max_line(major, minor)).map_err(at(&file))?;
    tracing::info!(cgroup = %cgroup.display(), device = %format!("{major}:{minor}"), %limits, "IO limits applied");
    Ok(())
}

fn device_number(device: &Path) -> Result<(u64, u64), LimitError> {
    let rdev = fs::metadata(device).map_err(at(device))?.rdev();
    Ok((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
}

/// A pod UID as kubelet gives it: hex digits and dashes, so that it can
/// name a file and a cgroup and nothing else.
pub fn check_uid(uid: &str) -> Result<(), LimitError> {
    let ok = (1..=64).contains(&uid.len())
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && !uid.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(LimitError::PodUid(uid.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10";

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&lvmlocal_proto::rpc::RpcMetrics::default()))
    }

    #[test]
    fn pod_cgroups_are_found_in_either_layout() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(pod_cgroup(root.path(), UID), None);
        let cgroupfs = root.path().join(format!("kubepods/besteffort/pod{UID}"));
        fs::create_dir_all(&cgroupfs).unwrap();
        assert_eq!(pod_cgroup(root.path(), UID), Some(cgroupfs));

        let root = tempfile::tempdir().unwrap();
        let systemd = root.path().join(
            "kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod0f5c1e2a_9d3b_4c1e_8a7f_6b5d4c3b2a10.slice",
        );
        fs::create_dir_all(&systemd).unwrap();
        assert_eq!(pod_cgroup(root.path(), UID), Some(systemd));
    }

    #[test]
    fn only_uids_can_name_a_pod() {
        assert!(check_uid(UID).is_ok());
        for bad in ["", "..", "../x", "a/b", "-rf", "pod 1", &"a".repeat(65)] {
            assert!(check_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_node_without_the_io_controller_says_so() {
        let root = tempfile::tempdir().unwrap();
        let limiter = IoLimiter::new(root.path().into(), root.path().join("records"), metrics());
        let limits = IoLimits {
            write_iops: Some(10),
            ..IoLimits::NONE
        };
        let status = limiter.set("v", Path::new("/dev/null"), limits);
        assert!(!status.enforced);
        assert!(status.message.unwrap().contains("no cgroup v2"));
        assert_eq!(status.applied, limits);
        // No limits need no controller.
        assert!(
            limiter
                .set("v", Path::new("/dev/null"), IoLimits::NONE)
                .enforced
        );

        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let limiter = IoLimiter::new(root.path().into(), root.path().join("records"), metrics());
        let status = limiter.set("v", Path::new("/dev/null"), limits);
        assert!(status.message.unwrap().contains("io controller"));
    }

    #[test]
    fn publications_are_recorded_and_only_their_own_entry_is_written() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu io memory\n").unwrap();
        let cgroup = root.path().join(format!("kubepods/pod{UID}"));
        fs::create_dir_all(&cgroup).unwrap();
        // A regular file stands for io.max: the kernel would merge a line
        // into its table, the test sees the last line written.
        fs::write(
            cgroup.join("io.max"),
            "8:0 rbps=1 wbps=max riops=max wiops=max\n",
        )
        .unwrap();
        let records = root.path().join("records");
        let limiter = IoLimiter::new(root.path().into(), records.clone(), metrics());
        let device = Path::new("/dev/null");
        let (major, minor) = device_number(device).unwrap();
        let target = Path::new("/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pv/mount");

        limiter.published("v", UID, target, device).unwrap();
        assert_eq!(
            fs::read_to_string(records.join("v").join(UID)).unwrap(),
            target.display().to_string()
        );
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            ..IoLimits::NONE
        };
        let status = limiter.set("v", device, limits);
        assert!(status.enforced, "{status:?}");
        assert_eq!(
            fs::read_to_string(cgroup.join("io.max")).unwrap(),
            format!("{major}:{minor} rbps=max wbps=1048576 riops=max wiops=max")
        );
        assert!(limiter.published("v", "../../etc", target, device).is_err());
        limiter.refresh();
        let text = limiter.metrics.encode();
        assert!(text.contains("lvmlocal_agent_io_limited_pods 1"), "{text}");

        // An io.max that cannot be written (the controller gone from the
        // pod's cgroup) fails the status and is counted.
        fs::remove_file(cgroup.join("io.max")).unwrap();
        let status = limiter.set("v", device, IoLimits::NONE);
        assert!(!status.enforced);
        assert!(status.message.unwrap().contains("io.max"));
        let text = limiter.metrics.encode();
        assert!(
            text.contains("lvmlocal_agent_io_limit_failures_total 1"),
            "{text}"
        );

        limiter.unpublished("v", Path::new("/elsewhere")).unwrap();
        assert!(records.join("v").join(UID).exists(), "another target");
        limiter.unpublished("v", target).unwrap();
        assert!(!records.join("v").exists());
        limiter.forget("v");
    }
}
