use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match csi_agent::run(csi_agent::Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("csi-agent: {err}");
            ExitCode::FAILURE
        }
    }
}
