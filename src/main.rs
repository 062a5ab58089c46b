//! The `outpost` command line: run the gateway, check configuration, run the demo, work with
//! a running gateway's dead letters, make signing keys, sign and verify handler modules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost::config::{Config, Overrides, DEFAULT_CONFIG_TOML};
use outpost::gateway::Gateway;
use outpost::plan::Plan;
use tracing_subscriber::EnvFilter;

mod cli;
use cli::{bench, demo};

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
    /// Inspect, replay or purge the dead letters of a running gateway (an MQTT client of its
    /// control topics, `outpost/<gateway-id>/deadletters/...`).
    Deadletters {
        #[command(subcommand)]
        command: DeadLettersCommand,
        #[command(flatten)]
        options: DeadLettersOptions,
    },
    /// Make an Ed25519 key pair for signing handler modules: DIR/NAME.key (secret, mode 0600)
    /// and DIR/NAME.pub (to list in the gateways' `[deploy] trusted_keys`). Never overwrites.
    Keygen {
        /// Directory for the two files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Base name of the files: letters, digits, '.', '_', '-'.
        #[arg(long, default_value = "outpost")]
        name: String,
    },
    /// Add a user to a password file in Mosquitto's format (`broker.password_file`), or change
    /// their password: a PBKDF2-SHA512 (`$7$`) hash that Mosquitto 2 reads too. Asks for the
    /// password twice on a terminal; otherwise reads it from the first line of standard input.
    /// Creates the file (mode 0600) if missing; every other line is kept.
    Passwd {
        /// The password file.
        file: PathBuf,
        /// The username (the one devices give in CONNECT).
        username: String,
    },
    /// Sign handler modules and verify signed ones; deploy, list, roll back and remove them on
    /// running gateways over MQTT.
    Module {
        #[command(subcommand)]
        command: ModuleCommand,
    },
    /// Run the gateway with example handlers, simulated devices and a stand-in upstream; take
    /// the upstream away, bring it back, and print a summary.
    Demo(demo::Options),
    /// Measure the gateway end to end: simulated devices publish QoS 1 as fast as they can
    /// through an in-process gateway to a stand-in upstream; then, with the upstream
    /// unreachable, the rate as the outbox grows; then a backlog drains while the devices keep
    /// publishing. Build with --release. With a mode (load, fanout, retained, idle), only a
    /// load generator for a broker running as a process of its own.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        /// Generate load for a broker that runs as a process of its own (outpost run,
        /// Mosquitto) instead of measuring an in-process gateway.
        #[command(subcommand)]
        external: Option<bench::external::Mode>,
        #[command(flatten)]
        options: bench::Options,
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

#[derive(Subcommand)]
enum ModuleCommand {
    /// Sign a module: writes the signed module (header + module bytes) that a deploy carries.
    /// The signature covers the name, the version and the SHA-256 of the module.
    Sign {
        /// The module file (a WebAssembly component).
        file: PathBuf,
        /// The module's name (what routes call it): letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: String,
        /// The module's version: letters, digits, '.', '_', '-'.
        #[arg(long)]
        version: String,
        /// The secret key file (NAME.key from `outpost keygen`).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        /// Where to write the signed module [default: FILE.signed].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a signed module against trusted public keys; says why and exits non-zero when it
    /// does not verify.
    Verify {
        /// The signed module (from `outpost module sign`).
        signed: PathBuf,
        /// Trusted public key files (NAME.pub); several may follow one --trust.
        #[arg(long, value_name = "PUBFILE", num_args = 1.., required_unless_present = "config")]
        trust: Vec<PathBuf>,
        /// Also trust the keys of this configuration file's `deploy.trusted_keys`, and apply its
        /// `deploy.max_module_bytes`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Require the module to be signed under this name.
        #[arg(long)]
        name: Option<String>,
        /// Require the module to be signed with this version.
        #[arg(long)]
        version: Option<String>,
    },
    /// Deploy a module to a running gateway (or a fleet group) over MQTT: signs FILE for
    /// --name with --key, publishes it on `outpost/<gateway>/modules/<name>/deploy` and waits
    /// for the gateway's status. Exits non-zero with the gateway's reason if it refuses.
    Push {
        /// The module (a WebAssembly component, signed here), or a signed module from `outpost
        /// module sign` (published as it is).
        file: PathBuf,
        /// The module's name (what routes call it); a signed FILE must be signed for it.
        #[arg(long)]
        name: String,
        /// The version to sign [default: the first 12 hex digits of the module's SHA-256]; a
        /// signed FILE must be signed with it.
        #[arg(long)]
        version: Option<String>,
        /// The secret key file (NAME.key from `outpost keygen`); not needed for a signed FILE.
        #[arg(long, value_name = "KEYFILE")]
        key: Option<PathBuf>,
        #[command(flatten)]
        target: TargetOptions,
        /// Fleet only: publish the module retained, so that the group's gateways that connect
        /// later get it too (it stays on the broker until replaced or cleared).
        #[arg(long)]
        retain: bool,
    },
    /// List the modules a running gateway has: deployed and configured, with their versions,
    /// the version a rollback would return to, and whether they are quarantined.
    List {
        #[command(flatten)]
        target: TargetOptions,
    },
    /// Go back to a deployed module's previous version (a signed command).
    Rollback {
        /// The module's name.
        name: String,
        /// The secret key file that signs the command (its public key must be trusted).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        #[command(flatten)]
        target: TargetOptions,
    },
    /// Stop running a deployed module and forget it (a signed command). Routes that use it
    /// fail until it is deployed again.
    Remove {
        /// The module's name.
        name: String,
        /// The secret key file that signs the command (its public key must be trusted).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        #[command(flatten)]
        target: TargetOptions,
    },
}

/// Where a module request goes and how long to wait for its answer.
#[derive(clap::Args)]
struct TargetOptions {
    /// The MQTT broker: the gateway's own listener, or an upstream broker its gateways are
    /// connected to (needed for --fleet): mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS
    /// (port 8883 by default).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Log in to the broker as this user (one of the gateway's `broker.admins`, or one the
    /// ACL lets publish the module topics).
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// The password of --username.
    #[arg(long, requires = "username")]
    password: Option<String>,
    #[command(flatten)]
    tls: TlsOptions,
    /// The gateway's id (its `gateway_id`).
    #[arg(long, required_unless_present = "fleet", conflicts_with = "fleet")]
    gateway: Option<String>,
    /// Every gateway of this fleet group (on an upstream broker); collects their statuses.
    #[arg(long, value_name = "GROUP")]
    fleet: Option<String>,
    /// Fleet only: the first topic levels of fleet requests [default: outpost/fleet].
    #[arg(long, value_name = "PREFIX")]
    fleet_prefix: Option<String>,
    /// Fleet only: seconds to collect statuses [default: 10].
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    /// Fleet only: stop waiting once this many gateways answered (and fail if fewer did).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    expect: Option<u64>,
    /// Seconds to wait for a gateway's status.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        conflicts_with = "fleet"
    )]
    timeout: u64,
    /// Print the status(es) as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// TLS to the broker, for an mqtts:// --broker (named as the configuration's `cafile`,
/// `certfile` and `keyfile`; `--key` is the signing key of `outpost module`).
#[derive(clap::Args)]
struct TlsOptions {
    /// mqtts:// only: PEM file of the CA certificates the broker's certificate must chain to
    /// [default: the system's CA certificates]. The certificate must also be valid for the
    /// host in --broker.
    #[arg(long, global = true, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// mqtts:// only: a client certificate to present (PEM), for a listener that requires
    /// one; with `use_identity_as_username` its CN is the user (an admin's, for these
    /// commands). Needs --keyfile.
    #[arg(long, global = true, value_name = "FILE", requires = "keyfile")]
    certfile: Option<PathBuf>,
    /// mqtts:// only: the private key of --certfile (PEM), readable by its owner only (mode
    /// 0600).
    #[arg(long, global = true, value_name = "FILE", requires = "certfile")]
    keyfile: Option<PathBuf>,
}

impl TlsOptions {
    fn files(&self) -> outpost::config::TlsFiles<'_> {
        outpost::config::TlsFiles {
            cafile: self.cafile.as_deref(),
            certfile: self.certfile.as_deref(),
            keyfile: self.keyfile.as_deref(),
        }
    }
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List dead letters, newest first (without payloads).
    List,
    /// Show one dead letter, with its payload.
    Show {
        /// The dead letter's id (see `list`).
        #[arg(value_name = "ID")]
        number: i64,
    },
    /// Process dead letters again: events through their route, outputs to their upstream.
    /// Needs --id, --reason, --route or --all.
    Replay,
    /// Delete dead letters for good. Needs --id, --reason, --route or --all.
    Purge,
}

#[derive(clap::Args)]
struct DeadLettersOptions {
    /// Only the dead letter with this id.
    #[arg(long, global = true)]
    id: Option<i64>,
    /// Only dead letters with this reason (trap, timeout, handler-error, expired, ...).
    #[arg(long, global = true)]
    reason: Option<String>,
    /// Only dead letters from this route.
    #[arg(long, global = true)]
    route: Option<String>,
    /// Replay or purge every dead letter (required when no filter is given).
    #[arg(long, global = true)]
    all: bool,
    /// List or show at most this many (default 100, at most 1000).
    #[arg(long, global = true)]
    limit: Option<usize>,
    /// Print the gateway's JSON reply instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The gateway's MQTT listener: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for its TLS
    /// listener (port 8883 by default).
    #[arg(long, global = true, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Log in to the broker as this user (one of the gateway's `broker.admins`, or one the
    /// ACL lets use the dead-letter topics).
    #[arg(long, global = true, requires = "password")]
    username: Option<String>,
    /// The password of --username.
    #[arg(long, global = true, requires = "username")]
    password: Option<String>,
    #[command(flatten)]
    tls: TlsOptions,
    /// The gateway's id (its `gateway_id`).
    #[arg(long, global = true, default_value = "outpost")]
    gateway_id: String,
    /// Seconds to wait for the gateway's answer.
    #[arg(long, global = true, default_value_t = 10)]
    timeout_secs: u64,
}

/// glibc gives each thread that allocates while another does an arena of its own, which
/// reserves 64 MiB of address space (up to 8 per core): with the gateway's threads that is all
/// of a 512 MiB board's, and thread spawns, SQLite and handler instances then fail with
/// "cannot allocate memory". Two arenas are plenty for the gateway's allocation pattern.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Other allocators (musl's) keep no per-thread arenas.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    // The demo's and the benchmark's progress lines say what matters.
    let default_level = match cli.command {
        Command::Demo(_) | Command::Bench { .. } => "error",
        Command::Deadletters { .. } => "warn",
        Command::Module { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain `key=value` lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Deadletters { command, options } => deadletters(command, options),
        Command::Keygen { out, name } => keygen(&out, &name),
        Command::Passwd { file, username } => passwd(&file, &username),
        Command::Module {
            command:
                ModuleCommand::Sign {
                    file,
                    name,
                    version,
                    key,
                    out,
                },
        } => module_sign(&file, &name, &version, &key, out),
        Command::Module {
            command:
                ModuleCommand::Verify {
                    signed,
                    trust,
                    config,
                    name,
                    version,
                },
        } => module_verify(&signed, &trust, config.as_deref(), name, version),
        Command::Module {
            command:
                ModuleCommand::Push {
                    file,
                    name,
                    version,
                    key,
                    target,
                    retain,
                },
        } => module_push(
            &file,
            &name,
            version.as_deref(),
            key.as_deref(),
            &target,
            retain,
        ),
        Command::Module {
            command: ModuleCommand::List { target },
        } => module_list(&target),
        Command::Module {
            command: ModuleCommand::Rollback { name, key, target },
        } => module_command(outpost::signing::CommandOp::Rollback, &name, &key, &target),
        Command::Module {
            command: ModuleCommand::Remove { name, key, target },
        } => module_command(outpost::signing::CommandOp::Remove, &name, &key, &target),
        Command::Demo(options) => tokio_runtime().and_then(|rt| rt.block_on(demo::run(options))),
        Command::Bench {
            external: Some(mode),
            ..
        } => tokio_runtime().and_then(|rt| rt.block_on(bench::external::run(mode))),
        Command::Bench {
            external: None,
            options,
        } => tokio_runtime().and_then(|rt| rt.block_on(bench::run(options))),
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
        // Blocking work is SQLite and handler invocations, both bounded elsewhere; tokio's
        // default of 512 threads (2 MiB of stack each) would not fit a small board's memory.
        .max_blocking_threads(64)
        .build()?)
}

fn load(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    // Checked, compiled and every file read as the gateway will at start (the uplinks'
    // credentials, the broker's password, ACL and TLS files); what would not stop a start is
    // a warning.
    let plan = Plan::new(load(Some(file))?)?;
    println!(
        "{}: ok ({} route(s), {} module(s), {} upstream(s), {} geofence(s), {} region(s))",
        file.display(),
        plan.routes.routes().len(),
        plan.config.modules.len(),
        plan.config.upstreams.len(),
        plan.geo.geography.fences().len(),
        plan.geo.geography.regions().len(),
    );
    for warning in plan.warnings(std::time::SystemTime::now()) {
        println!("warning: {warning}");
    }
    Ok(())
}

fn run(file: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let mut config = load(file.as_deref())?;
    config.apply(&overrides);
    let plan = Plan::new(config)?;
    tokio_runtime()?.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Before the start, so that neither signal kills a gateway that is still starting.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let gateway = Gateway::start_planned(plan).await?;
        // Under systemd (Type=notify): ready once devices are served.
        if let Err(e) = outpost::notify::notify("READY=1") {
            tracing::warn!(error = %e, "cannot tell systemd the gateway is ready");
        }
        wait_for_stop_signal(&gateway, &mut terminate, &mut hangup).await?;
        let _ = outpost::notify::notify("STOPPING=1");
        tracing::info!("stop requested; finishing the current batch");
        gateway.shutdown().await;
        Ok(())
    })
}

/// Waits for SIGTERM or Ctrl-C; on SIGHUP (`systemctl reload outpost`) the gateway re-reads
/// its uplinks' credential files and goes on.
async fn wait_for_stop_signal(
    gateway: &Gateway,
    terminate: &mut tokio::signal::unix::Signal,
    hangup: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => return Ok(result?),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: re-reading the credential, password and TLS files");
                gateway.reload();
            }
        }
    }
}

fn deadletters(command: DeadLettersCommand, o: DeadLettersOptions) -> anyhow::Result<()> {
    use outpost::client::dead_letters as client;
    use outpost::control::dead_letters::{Request, Verb};
    let (verb, id) = match command {
        DeadLettersCommand::List => (Verb::List, o.id),
        DeadLettersCommand::Show { number } => {
            if o.id.is_some_and(|id| id != number) {
                anyhow::bail!("show takes one id: {number} or --id {}?", o.id.unwrap_or(0));
            }
            (Verb::Show, Some(number))
        }
        DeadLettersCommand::Replay => (Verb::Replay, o.id),
        DeadLettersCommand::Purge => (Verb::Purge, o.id),
    };
    let request = Request {
        reply_to: None,
        id,
        reason: o.reason,
        route: o.route,
        limit: o.limit,
        all: o.all,
        nonce: None,
    };
    let timeout = std::time::Duration::from_secs(o.timeout_secs);
    let broker = outpost::config::Endpoint {
        url: &o.broker,
        login: o.username.as_deref().zip(o.password.as_deref()),
        tls: o.tls.files(),
    };
    let reply = tokio_runtime()?.block_on(client::request(
        broker,
        &o.gateway_id,
        verb,
        &request,
        timeout,
    ))?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    if let Some(error) = client::reply_error(&reply) {
        anyhow::bail!("gateway {} refused the request: {error}", o.gateway_id);
    }
    let found = reply["dead_letters"].as_array().map_or(0, Vec::len);
    if verb == Verb::Show && found == 0 {
        anyhow::bail!(
            "gateway {} has no dead letter {}",
            o.gateway_id,
            id.unwrap_or(0)
        );
    }
    if !o.json {
        print!("{}", client::render(verb, &reply, outpost::event::now_ms()));
    }
    Ok(())
}

/// `outpost passwd FILE USER`.
fn passwd(file: &std::path::Path, username: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use outpost::edge::passwords::{self, Change};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let (text, mode) = match outpost::edge::auth::load_password_text(file) {
        Ok(contents) => contents,
        Err(outpost::files::FileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            (String::new(), 0o600)
        }
        Err(e) => anyhow::bail!("{}: {e}", file.display()),
    };
    let password = read_new_password()?;
    let (updated, change) = passwords::set_password(&text, username, password.as_bytes())
        .with_context(|| format!("{username:?}"))?;
    // Written next to it and renamed over it, so that a crash leaves the old file or the new
    // one, never half of one.
    let mut temporary = file.as_os_str().to_owned();
    temporary.push(".outpost-new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    out.write_all(updated.as_bytes())
        .and_then(|()| out.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, file)
        .with_context(|| format!("cannot replace {}", file.display()))?;
    let what = match change {
        Change::Added => "added",
        Change::Changed => "password changed",
    };
    println!("{username}: {what} in {}", file.display());
    Ok(())
}

/// The new password: asked twice without echo on a terminal, else the first line of stdin.
fn read_new_password() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        let password = line.trim_end_matches(['\n', '\r']).to_string();
        anyhow::ensure!(!password.is_empty(), "no password on standard input");
        return Ok(password);
    }
    let first = prompt_hidden("Password: ")?;
    let second = prompt_hidden("Password again: ")?;
    anyhow::ensure!(first == second, "the passwords differ; nothing changed");
    Ok(first)
}

/// Reads one line from the terminal with echo off (restored afterwards, also on error).
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, Write};
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is stdin and `saved` is a valid termios to fill.
    let have_terminal = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_terminal {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: a termios copied from tcgetattr with one flag cleared.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if have_terminal {
        // SAFETY: restores what tcgetattr returned.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn keygen(dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    use outpost::signing;
    let key = signing::generate_key()?;
    let files = signing::write_key_pair(dir, name, &key)?;
    println!("key id  {}", files.key_id);
    println!(
        "secret  {}  (mode 0600: keep it private; sign with it)",
        files.secret.display()
    );
    println!(
        "public  {}  (list it in the gateways' [deploy] trusted_keys)",
        files.public.display()
    );
    Ok(())
}

fn module_sign(
    file: &std::path::Path,
    name: &str,
    version: &str,
    key_file: &std::path::Path,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use outpost::signing::{self, SignedModule};
    signing::validate_name(name)?;
    signing::validate_version(version)?;
    let key = signing::read_secret_key(key_file)?;
    let wasm = read_module_file(file)?;
    if wasm.starts_with(signing::ENVELOPE_MAGIC) {
        anyhow::bail!(
            "{} is already a signed module; sign the module itself",
            file.display()
        );
    }
    let out = out.unwrap_or_else(|| {
        let mut name = file.as_os_str().to_owned();
        name.push(".signed");
        PathBuf::from(name)
    });
    if out == file {
        anyhow::bail!("--out {} would replace the module itself", out.display());
    }
    if !wasm.starts_with(b"\0asm") {
        eprintln!(
            "warning: {} is not WebAssembly (no \\0asm magic); a gateway will refuse to load it",
            file.display()
        );
    }
    let signed = SignedModule::sign(&key, name, version, outpost::event::now_ms(), wasm)?;
    std::fs::write(&out, signed.to_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    let manifest = signed.manifest();
    println!("signed   {}", out.display());
    println!("name     {}", manifest.name());
    println!("version  {}", manifest.version());
    println!("sha256   {}", manifest.sha256_hex());
    println!("issued   {}", describe_issued(manifest.issued_ms()));
    println!("size     {} bytes", signed.wasm().len());
    println!("key id   {}", signed.key_id());
    Ok(())
}

fn module_verify(
    file: &std::path::Path,
    trust: &[PathBuf],
    config: Option<&std::path::Path>,
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<()> {
    use outpost::signing::{self, KeyId, SignedModule};
    let mut sources: Vec<(PathBuf, signing::VerifyingKey)> = Vec::new();
    for path in trust {
        sources.push((path.clone(), signing::read_public_key(path)?));
    }
    let mut max_module_bytes = u64::MAX;
    if let Some(config_file) = config {
        let config = Config::load(config_file)?;
        max_module_bytes = config.deploy.max_module_bytes;
        let keys = config.trusted_keys()?;
        sources.extend(config.deploy.trusted_keys.into_iter().zip(keys));
    }
    let bytes = read_module_file(file)?;
    let not_accepted =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: not accepted: {e}", file.display());
    let signed =
        SignedModule::from_bytes_limited(&bytes, max_module_bytes).map_err(|e| not_accepted(&e))?;
    let trusted: Vec<_> = sources.iter().map(|(_, key)| *key).collect();
    let key_id = signed
        .verify_against(&trusted)
        .map_err(|e| not_accepted(&e))?;
    if let Some(name) = name {
        signed
            .expect_identity(&name, version.as_deref())
            .map_err(|e| not_accepted(&e))?;
    } else if let Some(version) = version {
        let signed_name = signed.manifest().name().to_string();
        signed
            .expect_identity(&signed_name, Some(&version))
            .map_err(|e| not_accepted(&e))?;
    }
    let trusted_by = sources
        .iter()
        .find(|(_, key)| KeyId::of(key) == key_id)
        .map(|(path, _)| path.display().to_string())
        .unwrap_or_default();
    let manifest = signed.manifest();
    println!("{}: verified", file.display());
    println!("name     {}", manifest.name());
    println!("version  {}", manifest.version());
    println!("sha256   {}", manifest.sha256_hex());
    println!("issued   {}", describe_issued(manifest.issued_ms()));
    println!("size     {} bytes", signed.wasm().len());
    println!("key id   {key_id}  ({trusted_by})");
    Ok(())
}

/// A signing time for people: `2026-11-27T10:45:12Z (1795776312000 ms)`. A gateway accepts a
/// deploy only if it was signed after everything it accepted for that module, so this is what
/// an operator compares when a deploy is refused as stale.
fn describe_issued(issued_ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(issued_ms);
    format!("{} ({issued_ms} ms)", humantime::format_rfc3339_seconds(at))
}

/// The target of a module request, from the command line.
fn module_target(o: &TargetOptions) -> anyhow::Result<outpost::client::modules::Target> {
    use outpost::client::modules::{Target, DEFAULT_FLEET_PREFIX};
    if o.fleet.is_none() {
        let fleet_only = [
            ("--fleet-prefix", o.fleet_prefix.is_some()),
            ("--wait", o.wait.is_some()),
            ("--expect", o.expect.is_some()),
        ];
        if let Some((flag, _)) = fleet_only.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} applies to --fleet GROUP only");
        }
    }
    match (&o.gateway, &o.fleet) {
        (Some(gateway), None) => Target::gateway(gateway),
        (None, Some(group)) => Target::fleet(
            o.fleet_prefix.as_deref().unwrap_or(DEFAULT_FLEET_PREFIX),
            group,
        ),
        // clap enforces exactly one of the two.
        _ => anyhow::bail!("give --gateway ID or --fleet GROUP"),
    }
}

/// Publishes `request` and reports the answer(s): text or JSON on stdout, an error (exit code
/// 1) when a gateway refused or did not answer.
fn module_request(
    request: outpost::client::modules::Request,
    o: &TargetOptions,
) -> anyhow::Result<()> {
    use outpost::client::modules::{self as deploy_client, Target};
    let rt = tokio_runtime()?;
    let broker = outpost::config::Endpoint {
        url: &o.broker,
        login: o.username.as_deref().zip(o.password.as_deref()),
        tls: o.tls.files(),
    };
    match request.target() {
        Target::Gateway(_) => {
            let timeout = std::time::Duration::from_secs(o.timeout);
            let status = rt.block_on(deploy_client::request(broker, &request, timeout))?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if status.ok {
                print!("{}", deploy_client::render(&status));
            }
            if let Some(reason) = status.failure() {
                anyhow::bail!(
                    "gateway {} refused the {}: {reason}",
                    status.gateway,
                    status.op
                );
            }
        }
        Target::Fleet { .. } => {
            let wait = std::time::Duration::from_secs(o.wait.unwrap_or(10));
            let expect = o.expect.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            let statuses =
                rt.block_on(deploy_client::request_fleet(broker, &request, wait, expect))?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                print!("{}", deploy_client::render_all(&statuses));
                if statuses.is_empty() && request.is_retained() {
                    println!(
                        "the module is retained on the broker: the group's gateways get it when they connect"
                    );
                }
            }
            deploy_client::check_fleet(&statuses, expect, request.is_retained())
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

fn module_push(
    file: &std::path::Path,
    name: &str,
    version: Option<&str>,
    key_file: Option<&std::path::Path>,
    target: &TargetOptions,
    retain: bool,
) -> anyhow::Result<()> {
    use outpost::client::modules::Request;
    use outpost::signing::{self, SignedModule};
    signing::validate_name(name)?;
    if let Some(version) = version {
        signing::validate_version(version)?;
    }
    let to = module_target(target)?;
    if retain && target.fleet.is_none() {
        anyhow::bail!("--retain applies to --fleet GROUP only");
    }
    let bytes = read_module_file(file)?;
    let request = if bytes.starts_with(signing::ENVELOPE_MAGIC) {
        let signed = SignedModule::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        signed
            .expect_identity(name, version)
            .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was sent", file.display()))?;
        if key_file.is_some() {
            eprintln!(
                "note: {} is already signed; --key is not used",
                file.display()
            );
        }
        Request::deploy(to, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
    } else {
        let Some(key_file) = key_file else {
            anyhow::bail!(
                "{} is not signed: give --key KEYFILE to sign it (or push a file from `outpost module sign`)",
                file.display()
            );
        };
        if !bytes.starts_with(b"\0asm") {
            anyhow::bail!(
                "{} is neither WebAssembly (no \\0asm magic) nor a signed module; nothing was sent",
                file.display()
            );
        }
        let key = signing::read_secret_key(key_file)?;
        let version = match version {
            Some(v) => v.to_string(),
            None => signing::to_hex(&signing::sha256(&bytes))[..12].to_string(),
        };
        let signed = SignedModule::sign(&key, name, &version, outpost::event::now_ms(), bytes)?;
        Request::deploy_module(to, &signed)
    };
    let request = if retain { request.retained()? } else { request };
    module_request(request, target)
}

fn module_list(target: &TargetOptions) -> anyhow::Result<()> {
    let request = outpost::client::modules::Request::list(module_target(target)?);
    module_request(request, target)
}

fn module_command(
    op: outpost::signing::CommandOp,
    name: &str,
    key_file: &std::path::Path,
    target: &TargetOptions,
) -> anyhow::Result<()> {
    use outpost::signing::{self, SignedCommand};
    signing::validate_name(name)?;
    let to = module_target(target)?;
    let key = signing::read_secret_key(key_file)?;
    let command = SignedCommand::sign(&key, op, name, outpost::event::now_ms())?;
    module_request(
        outpost::client::modules::Request::command(to, &command),
        target,
    )
}

/// Reads a module or signed-module file the operator named (a regular file of at most
/// `MAX_MODULE_BYTES_LIMIT`, so a FIFO or `/dev/zero` is an error, not a hang or an OOM).
fn read_module_file(file: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    outpost::files::read_regular(file, outpost::config::MAX_MODULE_BYTES_LIMIT)
        .map(|contents| contents.bytes)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))
}
