//! The `outpost` command line: run the gateway, check configuration, run the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost::config::{Config, Overrides, DEFAULT_CONFIG_TOML};
use outpost::gateway::Gateway;
use tracing_subscriber::EnvFilter;

mod demo;

/// outpost: an edge gateway with an embedded MQTT broker, sandboxed WebAssembly handlers and a
/// store-and-forward uplink.
#[derive(Parser)]
#[command(name = "outpost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Run {
        /// Configuration file (TOML); without it the built-in defaults apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen for devices (MQTT 3.1.1) on this address only, e.g. 0.0.0.0:1883.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Upstream broker URL (replaces the first upstream's), e.g. mqtt://10.0.0.5:1883.
        #[arg(long)]
        upstream: Option<String>,
        /// Data directory for the database.
        #[arg(long)]
        data: Option<PathBuf>,
        /// This gateway's id.
        #[arg(long)]
        gateway_id: Option<String>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the gateway with example handlers, simulated devices and a stand-in upstream; take
    /// the upstream away, bring it back, and print a summary.
    Demo {
        /// Seconds of each phase (before, during and after the outage).
        #[arg(long, default_value_t = 6)]
        phase_secs: u64,
        /// Number of simulated devices (at most the number of cities known).
        #[arg(long, default_value_t = 12)]
        devices: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file; prints what is wrong, with the key.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the documented default configuration.
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every connection at info and every disconnect as an error; the demo's
    // progress lines say what matters.
    let default_level = match cli.command {
        Command::Demo { .. } => "error,rumqttd=off",
        _ => "info,rumqttd=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Run {
            config,
            listen,
            upstream,
            data,
            gateway_id,
        } => run(
            config,
            Overrides {
                listen,
                upstream,
                data_dir: data,
                gateway_id,
            },
        ),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => check(&file),
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Command::Demo {
            phase_secs,
            devices,
        } => tokio_runtime().and_then(|rt| rt.block_on(demo::run(phase_secs, devices))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn load(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let config = load(Some(file))?;
    let routes = config.validate()?;
    println!(
        "{}: ok ({} route(s), {} module(s), {} upstream(s))",
        file.display(),
        routes.routes().len(),
        config.modules.len(),
        config.upstreams.len()
    );
    Ok(())
}

fn run(file: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let mut config = load(file.as_deref())?;
    config.apply(&overrides);
    config.validate()?;
    tokio_runtime()?.block_on(async move {
        let gateway = Gateway::start(config).await?;
        wait_for_stop_signal().await?;
        tracing::info!("stop requested; finishing the current batch");
        gateway.shutdown().await;
        Ok(())
    })
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
