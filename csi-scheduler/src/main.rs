use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match csi_scheduler::run(csi_scheduler::Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("csi-scheduler: {err}");
            ExitCode::FAILURE
        }
    }
}
