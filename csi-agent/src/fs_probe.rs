//! Filesystem calls on kubelet's paths, off the async runtime and under a
//! deadline. A call into a hung filesystem (a pod path on a dead device, a
//! stuck network or FUSE mount below it) cannot be cancelled: it keeps one
//! blocking thread, its caller gets an answer at the deadline, and later
//! calls on the same path are answered at once until it returns, so hung
//! threads do not pile up behind kubelet's retries.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Long enough for a healthy disk under heavy load; short enough that
/// kubelet's own call deadline (two minutes) is not what ends the call.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{path} did not answer within {deadline:?}: the filesystem there may hang")]
    Hung { path: String, deadline: Duration },
    #[error("{path} has not answered an earlier call yet: the filesystem there may hang")]
    StillHung { path: String },
}

#[derive(Debug, Clone)]
pub struct FsProbe {
    deadline: Duration,
    /// Paths with a call past its deadline and not returned.
    hung: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Default for FsProbe {
    fn default() -> Self {
        Self::new(DEADLINE)
    }
}

impl FsProbe {
    pub fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            hung: Arc::default(),
        }
    }

    /// Runs `call`, which touches `path`, on a blocking thread; its result,
    /// unless the deadline comes first.
    pub async fn run<T: Send + 'static>(
        &self,
        path: &Path,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProbeError> {
        if self
            .hung
            .lock()
            .expect("hung paths poisoned")
            .contains(path)
        {
            return Err(ProbeError::StillHung {
                path: path.display().to_string(),
            });
        }
        let done = Arc::new(Mutex::new(false));
        let task = {
            let (done, hung, path) = (done.clone(), self.hung.clone(), path.to_owned());
            tokio::task::spawn_blocking(move || {
                let result = call();
                // Under the set's lock, so a deadline passing now either
                // sees the call done or is undone here.
                let mut hung = hung.lock().expect("hung paths poisoned");
                *done.lock().expect("probe flag poisoned") = true;
                hung.remove(&path);
                result
            })
        };
        match tokio::time::timeout(self.deadline, task).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Err(_) => {
                let mut hung = self.hung.lock().expect("hung paths poisoned");
                if !*done.lock().expect("probe flag poisoned") {
                    hung.insert(path.to_owned());
                }
                tracing::warn!(path = %path.display(), deadline = ?self.deadline, "filesystem call hangs");
                Err(ProbeError::Hung {
                    path: path.display().to_string(),
                    deadline: self.deadline,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[tokio::test]
    async fn a_hung_call_answers_at_the_deadline_and_holds_back_its_path() {
        let probe = FsProbe::new(Duration::from_millis(50));
        let (release, released) = mpsc::channel::<()>();
        let path = Path::new("/var/lib/kubelet/pods/p/volumes/v/mount");
        let hung = probe
            .run(path, move || released.recv().is_ok())
            .await
            .unwrap_err();
        assert!(matches!(hung, ProbeError::Hung { .. }), "{hung}");
        // Later calls on that path are answered at once, others run.
        let again = probe.run(path, || true).await.unwrap_err();
        assert!(matches!(again, ProbeError::StillHung { .. }), "{again}");
        assert!(probe.run(Path::new("/elsewhere"), || true).await.unwrap());

        release.send(()).unwrap();
        let mut answered = Err(again);
        for _ in 0..100 {
            answered = probe.run(path, || true).await;
            if answered.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            answered.unwrap(),
            "the path is used again once its call returned"
        );
    }
}
