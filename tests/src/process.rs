//! Host processes of the cluster tests: each in a process group of its own,
//! its output in a log file, and the whole group killed when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub struct Service {
    pub name: String,
    log: PathBuf,
    child: Child,
}

impl Service {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn start(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Self {
            name: name.into(),
            log: log.to_owned(),
            child,
        })
    }

    /// Whether the process has exited; its status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL to the whole process group, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port on 127.0.0.1 that nothing listens on, never the same twice on
/// this machine while the process lives: each port handed out holds a lock
/// file in the temporary directory until the process ends, so that test
/// processes running side by side keep apart. It is taken below the
/// kernel's ephemeral range (32768 and up), so that an outgoing connection
/// does not take it before its listener binds it.
pub fn free_port() -> u16 {
    const FIRST: u16 = 20000;
    const SPAN: u16 = 12000;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    static HELD: std::sync::Mutex<Vec<fs::File>> = std::sync::Mutex::new(Vec::new());
    let locks = std::env::temp_dir().join("lvmlocal-test-ports");
    fs::create_dir_all(&locks).expect("a directory for the test ports' locks");
    // Processes started together begin far apart and walk the span.
    let start = (std::process::id().wrapping_mul(7919) % u32::from(SPAN)) as u16;
    loop {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(
            step < SPAN,
            "no free port left between {FIRST} and {}",
            FIRST + SPAN
        );
        let port = FIRST + (start + step) % SPAN;
        let Ok(lock) = fs::File::create(locks.join(port.to_string())) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(lock);
            return port;
        }
    }
}

/// Polls `check` until it returns `Ok`, or fails after `timeout` with the
/// last complaint `check` gave. The pause between checks grows with the
/// wait, a tenth of it from 100 ms to 500 ms: a check is often a process
/// (kubectl) whose start costs more CPU than the answer, and a long wait
/// polled ten times a second takes a core from the cluster it waits for.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => {
                anyhow::bail!("{what}: not within {timeout:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(poll_pause(start.elapsed())),
        }
    }
}

/// The pause after a failed check, `waited` into a wait.
fn poll_pause(waited: Duration) -> Duration {
    (waited / 10).clamp(Duration::from_millis(100), Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_handed_out_is_held_against_other_processes() {
        let port = free_port();
        assert_ne!(free_port(), port);
        // flock(2) locks belong to an open file: a second open, as another
        // process would make, finds this one's lock.
        let again = fs::File::open(
            std::env::temp_dir()
                .join("lvmlocal-test-ports")
                .join(port.to_string()),
        )
        .unwrap();
        assert!(again.try_lock().is_err(), "port {port} is not held");
    }

    #[test]
    fn polls_slow_down_with_the_wait() {
        assert_eq!(poll_pause(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(
            poll_pause(Duration::from_secs(3)),
            Duration::from_millis(300)
        );
        assert_eq!(
            poll_pause(Duration::from_secs(60)),
            Duration::from_millis(500)
        );
    }
}
