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
    /// Create the first organization and its owner, who becomes a system admin. Changes nothing
    /// (and exits 1) if a system admin, the email or the organization already exists.
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Send this machine's heartbeat (metrics from /proc, GPUs from nvidia-smi, served models) to
    /// the server every interval, as node ID. The node credential is read from the
    /// AGENTIDP_NODE_CREDENTIAL environment variable or from --credential-file, never from a flag.
    NodeGuardian {
        /// The server's base URL.
        #[arg(long, value_name = "URL")]
        url: String,
        #[arg(long, value_name = "ID")]
        node_id: uuid::Uuid,
        /// A file holding the node credential (instead of AGENTIDP_NODE_CREDENTIAL).
        #[arg(long, value_name = "FILE")]
        credential_file: Option<PathBuf>,
        #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval_secs: u64,
        /// Report each entry of this directory as a served model.
        #[arg(long, value_name = "DIR")]
        models_dir: Option<PathBuf>,
        /// Report the models this shell command prints as JSON (`[{name, size_bytes, loaded}]`).
        #[arg(long, value_name = "COMMAND", conflicts_with = "models_dir")]
        models_command: Option<String>,
        /// The file system whose usage is reported.
        #[arg(long, value_name = "PATH", default_value = "/")]
        disk_path: PathBuf,
    },
    Bootstrap {
        /// The organization's name.
        #[arg(long, value_name = "NAME")]
        org: String,
        /// The owner's email.
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new signing key (of `auth.signing_algorithm`): published in the JWKS now, signing
    /// `auth.key_publish_ahead_secs` later. Retired keys stay in the JWKS until the tokens they
    /// signed have expired.
    Rotate {
        /// Sign with the new key at once (the active key is compromised).
        #[arg(long)]
        emergency: bool,
    },
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
            Command::Bootstrap { org, email, password_stdin } => bootstrap(&config, &org, &email, password_stdin).await,
            Command::Keys { command: KeysCommand::Rotate { emergency } } => {
                let pool = db::connect(&config.database).await?;
                db::migrate(&pool).await?;
                let keys = crate::auth::keys::KeyRing::new(config.kek());
                let how = if emergency { crate::auth::keys::Rotation::Emergency } else { config.scheduled_rotation() };
                let ttl = config.auth.access_token_ttl_secs;
                let rotated = keys.rotate(&pool, config.algorithm(), ttl, how).await?;
                // Running instances learn of it from their next unknown-kid reload or pub/sub.
                if let Ok(redis) = crate::redis::Redis::new(&config.redis) {
                    crate::cache::invalidation::publish(&redis, "keys", "").await;
                }
                println!(
                    "signing key {} ({}) signs from {}",
                    rotated.kid,
                    config.algorithm().as_str(),
                    rotated.activates_at.format(&time::format_description::well_known::Rfc3339)?
                );
                Ok(())
            }
            Command::NodeGuardian {
                url,
                node_id,
                credential_file,
                interval_secs,
                models_dir,
                models_command,
                disk_path,
            } => {
                let credential = crate::city::guardian::credential(credential_file.as_deref())?;
                let opts = crate::city::guardian::Options {
                    url,
                    node_id,
                    credential,
                    interval: std::time::Duration::from_secs(interval_secs),
                    models_dir,
                    models_command,
                    disk_path,
                };
                crate::city::guardian::run(opts, crate::app::shutdown_signal()).await
            }
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
        Err(e) if e.downcast_ref::<AlreadyDone>().is_some() => {
            eprintln!("agentidp: nothing changed: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("agentidp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Bootstrap found its work done already.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AlreadyDone(String);

async fn bootstrap(config: &Config, org: &str, email: &str, password_stdin: bool) -> anyhow::Result<()> {
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let p = line.trim_end_matches(['\r', '\n']).to_owned();
        anyhow::ensure!(!p.is_empty(), "no password on standard input");
        Some(p)
    } else {
        None
    };
    let pool = db::connect(&config.database).await?;
    db::migrate(&pool).await?;
    match crate::auth::bootstrap::run(&pool, org, email, password).await? {
        crate::auth::bootstrap::Outcome::AlreadyDone(what) => Err(AlreadyDone(what).into()),
        crate::auth::bootstrap::Outcome::Created { org_id, user_id, generated_password } => {
            println!("organization: {org_id}");
            println!("owner:        {user_id} ({email}, system admin)");
            if let Some(p) = generated_password {
                println!("password:     {p}");
                println!("(shown once; it is stored only as an argon2id hash)");
            }
            Ok(())
        }
    }
}
