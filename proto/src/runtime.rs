//! Process plumbing shared by the three lvmlocal binaries: log setup,
//! waiting for the orchestrator's stop signal, the Kubernetes client and the
//! retry policy of its watches.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::watcher::ExponentialBackoff;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid log filter {filter:?}: {source}")]
    LogFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot install the log subscriber: {0}")]
    LogInit(#[from] tracing_subscriber::util::TryInitError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: StopSignal,
        source: std::io::Error,
    },
}

/// Log settings common to every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `lvmlocal=debug,tower=warn`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the global subscriber, logging to stderr.
    pub fn init(&self) -> Result<(), RuntimeError> {
        let filter =
            EnvFilter::try_new(&self.log_level).map_err(|source| RuntimeError::LogFilter {
                filter: self.log_level.clone(),
                source,
            })?;
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .try_init()?;
        Ok(())
    }
}

/// The signals that ask a process to stop: SIGTERM from kubelet, SIGINT from
/// a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Interrupt,
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Interrupt => "SIGINT",
        })
    }
}

/// Handlers for the stop signals.
///
/// Installed before a process reports itself started, so a signal that
/// arrives at any later moment is caught instead of killing the process.
pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub fn install() -> Result<Self, RuntimeError> {
        let listen = |stop: StopSignal, kind: SignalKind| {
            signal(kind).map_err(|source| RuntimeError::Signal {
                signal: stop,
                source,
            })
        };
        Ok(Self {
            terminate: listen(StopSignal::Terminate, SignalKind::terminate())?,
            interrupt: listen(StopSignal::Interrupt, SignalKind::interrupt())?,
        })
    }

    /// Resolves with the first stop signal received.
    pub async fn wait(mut self) -> StopSignal {
        tokio::select! {
            _ = self.terminate.recv() => StopSignal::Terminate,
            _ = self.interrupt.recv() => StopSignal::Interrupt,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("cannot configure the Kubernetes client: {0}")]
    Infer(#[from] InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or without one from the pod's service
/// account (or the environment's default kubeconfig).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let failed = |source| KubeClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(failed)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(failed)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// First and longest wait between two attempts of a failing watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(4);

/// Retry delays of every watch: exponential up to [`WATCH_RETRY_MAX`] (plus
/// up to as much again of jitter), back to the start as soon as the watch
/// yields anything. kube's default backoff only forgets its failures after
/// 120 s without one, so an API server back after an outage, or the 410
/// that follows it, waited out up to a minute of earlier failures before
/// the re-list.
pub fn watch_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(WATCH_RETRY_MIN)
        .with_max_delay(WATCH_RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    use tokio::time::Instant;

    use super::*;

    /// Virtual time before each item of a watch that fails `failures`
    /// times, yields once, then fails twice.
    async fn gaps(failures: usize) -> Vec<Duration> {
        let items = (0..failures)
            .map(|_| Err(()))
            .chain([Ok(()), Err(()), Err(())])
            .collect::<Vec<Result<(), ()>>>();
        let mut stream = futures::stream::iter(items)
            .backoff(watch_backoff())
            .boxed();
        let mut last = Instant::now();
        let mut gaps = Vec::new();
        while stream.next().await.is_some() {
            gaps.push(last.elapsed());
            last = Instant::now();
        }
        gaps
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_retries_within_seconds_however_long_it_failed() {
        let gaps = gaps(40).await;
        assert_eq!(gaps.len(), 43);
        let longest = WATCH_RETRY_MAX * 2;
        assert!(
            gaps.iter().all(|gap| *gap <= longest),
            "a retry waited longer than {longest:?}: {gaps:?}"
        );
        assert!(
            gaps[..40].iter().sum::<Duration>() > WATCH_RETRY_MAX * 20,
            "failures are spaced out: {gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_success_forgets_the_failures_before_it() {
        let gaps = gaps(40).await;
        // The retry after the first failure that follows the success waits
        // the first delay again, not the longest.
        assert!(
            gaps[42] <= WATCH_RETRY_MIN * 2,
            "the retry after a success waited {:?}",
            gaps[42]
        );
    }
}
