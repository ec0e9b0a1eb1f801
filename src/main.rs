//! The `spillway` binary: parse the configuration, set up logging, raise the
//! open-files limit, run the server until SIGINT or SIGTERM.

use std::process::ExitCode;

use spillway::app::shutdown_signal;
use spillway::config::Config;
use spillway::{Application, net, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::from_args();
    telemetry::init(config.log_format);
    match net::raise_open_files_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "open-files limit raised to the hard limit"
        ),
        Err(error) => tracing::warn!(%error, "cannot raise the open-files limit"),
    }
    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}
