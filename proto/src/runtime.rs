//! Process plumbing shared by the three lvmlocal binaries: log setup,
//! waiting for the orchestrator's stop signal, and the Kubernetes client.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
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
