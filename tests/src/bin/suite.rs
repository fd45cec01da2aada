//! Runs the test executables of a `cargo test --no-run --message-format=json`
//! build (read from stdin) side by side, and prints the run's time table.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lvmlocal_tests::suite::{self, Limits};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Runs every test of the build on stdin; exits 1 if any failed.
    Run {
        /// Processes at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Processes of heavy binaries at once.
        #[arg(long, default_value_t = 1)]
        heavy_jobs: usize,
        /// An integration test binary whose tests start first (repeatable).
        #[arg(long)]
        heavy: Vec<String>,
        /// A process still running after this many minutes is killed.
        #[arg(long, default_value_t = 30)]
        timeout_minutes: u64,
        /// Each process's output goes to a file here.
        #[arg(long)]
        logs: PathBuf,
        /// The times file the rows of binaries and tests are appended to.
        #[arg(long)]
        times: PathBuf,
        /// Where the closing count goes too, for a caller to print last.
        #[arg(long)]
        summary: Option<PathBuf>,
    },
    /// Prints the time table of a times file.
    Table {
        times: PathBuf,
        /// How many of the slowest tests to list.
        #[arg(long, default_value_t = 15)]
        slowest: usize,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Step::Run {
            jobs,
            heavy_jobs,
            heavy,
            timeout_minutes,
            logs,
            times,
            summary,
        } => {
            let mut cargo_json = String::new();
            std::io::stdin().read_to_string(&mut cargo_json)?;
            let executables = suite::executables(&cargo_json)?;
            let units = suite::plan(&executables, &heavy, suite::list)?;
            let limits = Limits {
                jobs,
                heavy_jobs,
                timeout: Duration::from_secs(timeout_minutes * 60),
            };
            let total = units.len();
            println!("suite: {total} processes, {jobs} at once, {heavy_jobs} of them heavy");
            let mut done = 0;
            let outcomes = suite::run(
                &units,
                &limits,
                &logs,
                suite::origin_from_env(),
                |outcome, output| {
                    done += 1;
                    println!("{}", outcome.line(done, total));
                    if !outcome.passed() {
                        println!("{output}");
                    }
                },
            )?;
            suite::append_rows(&times, &suite::rows_of(&outcomes))?;
            for outcome in outcomes.iter().filter(|o| !o.passed()) {
                println!("suite: failed: {}", outcome.unit.name());
            }
            let (closing, passed) = suite::closing(&outcomes);
            println!("{closing}");
            if let Some(path) = summary {
                std::fs::write(&path, format!("{closing}\n"))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Step::Table { times, slowest } => {
            let text = std::fs::read_to_string(&times)
                .with_context(|| format!("reading {}", times.display()))?;
            print!("{}", suite::table(&suite::parse_rows(&text)?, slowest));
            Ok(ExitCode::SUCCESS)
        }
    }
}
