//! The `agentidp` command line: `serve` (the default), `migrate`, `openapi`, `config`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{app::Application, config::Config, db, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "agentidp",
    version,
    about = "Identity provider, policy decision point, usage meter and delegation broker for AI agents"
)]
pub struct Cli {
    /// A TOML file layered over the built-in defaults (environment variables still win).
    #[arg(long, global = true, env = "AGENTIDP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document as JSON.
    Openapi,
    /// Print the effective configuration, every secret redacted.
    Config,
}

/// Parses arguments, runs the command, maps failures to exit codes (2: bad configuration).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Openapi = command {
        print!("{}", crate::http::openapi::json());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentidp: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config = command {
        print!("{}", config.redacted_toml());
        return ExitCode::SUCCESS;
    }
    telemetry::init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentidp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Migrate => {
                let pool = db::connect(&config.database).await?;
                db::migrate(&pool).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            _ => {
                let app = Application::build(config).await?;
                app.run_until(crate::app::shutdown_signal()).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("agentidp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
