//! The one way this agent runs external programs: an argument vector (never a
//! shell), a timeout, captured output, and an error that names the command.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::process::Command;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{command}: cannot start: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command}: still running after {timeout:?}, killed")]
    Timeout { command: String, timeout: Duration },
    #[error("{command}: exit status {code}: {stderr}")]
    Failed {
        command: String,
        code: i32,
        stderr: String,
    },
}

impl CommandError {
    /// Exit status of a command that ran and failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            CommandError::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    program: String,
    outcome: String,
}

/// Durations of external commands (lvcreate, mkfs.ext4, mount, ...) by
/// program and outcome; the histogram's count is the number of runs.
#[derive(Debug, Clone)]
pub struct CommandMetrics {
    seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        Self {
            // 5 ms .. ~80 s: a cached lvs up to a slow mkfs.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 15))
            }),
        }
    }
}

impl CommandMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "command_duration_seconds",
            "External commands (lvm2, mkfs, mount, ...) by program and outcome",
            self.seconds.clone(),
        );
    }

    fn observe(&self, program: &str, outcome: String, took: Duration) {
        let labels = CommandLabels {
            program: program.to_owned(),
            outcome,
        };
        self.seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// One command line, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
}

impl Cmd {
    pub fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for arg in &self.args {
            write!(f, " {arg}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Runner {
    timeout: Duration,
    metrics: Option<CommandMetrics>,
}

impl Default for Runner {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl Runner {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            metrics: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same runner with another timeout, for commands whose run time
    /// grows with their work (zeroing a whole volume).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Counts and times every command by program and outcome.
    pub fn with_metrics(mut self, metrics: CommandMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs `cmd` to completion and returns its stdout; a non-zero exit is an error.
    pub async fn run(&self, cmd: &Cmd) -> Result<String, CommandError> {
        let (code, stdout, stderr) = self.status(cmd).await?;
        if code != 0 {
            return Err(CommandError::Failed {
                command: cmd.to_string(),
                code,
                stderr,
            });
        }
        Ok(stdout)
    }

    /// Runs `cmd` and returns its exit status, stdout and stderr, for programs
    /// whose exit status is an answer rather than a failure (blkid).
    pub async fn status(&self, cmd: &Cmd) -> Result<(i32, String, String), CommandError> {
        let started = std::time::Instant::now();
        let result = self.execute(cmd).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok((0, _, _)) => "ok".to_owned(),
                Ok((code, _, _)) => format!("exit-{code}"),
                Err(CommandError::Timeout { .. }) => "timeout".to_owned(),
                Err(_) => "not-started".to_owned(),
            };
            metrics.observe(&cmd.program, outcome, started.elapsed());
        }
        result
    }

    async fn execute(&self, cmd: &Cmd) -> Result<(i32, String, String), CommandError> {
        tracing::debug!(command = %cmd, "running");
        let child = Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CommandError::Spawn {
                command: cmd.to_string(),
                source,
            })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| CommandError::Timeout {
                command: cmd.to_string(),
                timeout: self.timeout,
            })?
            .map_err(|source| CommandError::Spawn {
                command: cmd.to_string(),
                source,
            })?;
        Ok((
            // A signal leaves no code; report it like a shell does.
            output.status.code().unwrap_or(128),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_and_failures() {
        let runner = Runner::default();
        let out = runner.run(&Cmd::new("echo", ["a b", "c"])).await.unwrap();
        assert_eq!(out, "a b c\n");

        let err = runner
            .run(&Cmd::new("sh", ["-c", "echo nope >&2; exit 3"]))
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        assert_eq!(
            err.to_string(),
            "sh -c echo nope >&2; exit 3: exit status 3: nope"
        );

        let err = runner
            .run(&Cmd::new("/nonexistent/tool", ["x"]))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn arguments_are_not_interpreted_by_a_shell() {
        let out = Runner::default()
            .run(&Cmd::new("echo", ["$HOME; rm -rf /"]))
            .await
            .unwrap();
        assert_eq!(out, "$HOME; rm -rf /\n");
    }

    #[tokio::test]
    async fn commands_are_counted_by_program_and_outcome() {
        let metrics = CommandMetrics::default();
        let runner = Runner::default().with_metrics(metrics.clone());
        runner
            .run(&Cmd::new("true", Vec::<String>::new()))
            .await
            .unwrap();
        runner
            .run(&Cmd::new("false", Vec::<String>::new()))
            .await
            .unwrap_err();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"command_duration_seconds_count{program="true",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"command_duration_seconds_count{program="false",outcome="exit-1"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hung_command_is_killed() {
        let runner = Runner::new(Duration::from_millis(200));
        let err = runner.run(&Cmd::new("sleep", ["30"])).await.unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
    }
}
