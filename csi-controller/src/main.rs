use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match csi_controller::run(csi_controller::Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("csi-controller: {err}");
            ExitCode::FAILURE
        }
    }
}
