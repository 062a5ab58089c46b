//! The set-up most integration tests share: a temporary directory, a Mosquitto upstream,
//! subscribers on it, and the gateway with its configuration, made in that order.
//!
//! ```ignore
//! let mut h = Harness::builder()
//!     .subscriber("telemetry/#")      // "test-sub" on the upstream, which is started for it
//!     .stop_upstream()                // the gateway starts against an upstream that is down
//!     .config("[store]\nmax_db_mib = 1\n")
//!     .upstream_arg()                 // `--upstream mqtt://127.0.0.1:<upstream port>`
//!     .start()
//!     .await;
//! let device = Device::connect(h.gateway.port, "dev").await;
//! h.upstream.start();
//! eventually("delivered", || h.received.len() >= 1).await;
//! ```
//!
//! The harness owns every peer; they are stopped when it is dropped (the gateway first, the
//! upstreams last, then the directory is removed).
//!
//! A test that needs two brokers (one per region, say) asks for a second upstream and puts
//! subscribers on either:
//!
//! ```ignore
//! let setup = Harness::builder().second_upstream();
//! let us_url = setup.second_upstream_url();
//! let h = setup
//!     .subscriber_as("eu-sub", "#")           // on `h.upstream`
//!     .second_subscriber_as("us-sub", "#")    // on `h.second_upstream()`
//!     .config_with(|eu_url| config(eu_url, &us_url))
//!     .start()
//!     .await;
//! ```
//!
//! A test without a runtime (a `#[test]` that drives raw sockets) uses
//! [`HarnessBuilder::start_blocking`] (or [`HarnessBuilder::build_blocking`]): the same
//! set-up, without subscribers.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::{write_config, Gateway, Mosquitto, Received, Subscriber};

/// The client id of the subscriber made by [`HarnessBuilder::subscriber`].
pub const SUBSCRIBER_ID: &str = "test-sub";

/// A running set-up: the gateway, the upstream broker, subscribers on the upstream, and the
/// temporary directory that holds their files.
pub struct Harness {
    /// The `outpost` binary: `--data <dir>/gw-data`, its log in `<dir>/gateway.log`.
    pub gateway: Gateway,
    /// What the first subscriber the builder made received (without one, reading it fails the
    /// test).
    pub received: Received,
    subscribers: Vec<(String, Subscriber)>,
    second_upstream: Option<Mosquitto>,
    /// The upstream Mosquitto. It always has a port and a directory (so that a gateway can be
    /// pointed at an upstream that is down from the start); it runs only if the builder
    /// started it ([`HarnessBuilder::upstream`] or [`HarnessBuilder::subscriber`]).
    pub upstream: Mosquitto,
    /// The configuration file given with `--config`, if the builder wrote one.
    pub config: Option<PathBuf>,
    /// The temporary directory (removed on drop).
    pub dir: PathBuf,
    _tmp: TempDir,
}

impl Harness {
    /// A new set-up in a new temporary directory: nothing runs yet.
    pub fn builder() -> HarnessBuilder {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let upstream = Mosquitto::new(tmp.path());
        HarnessBuilder {
            upstream,
            start_upstream: false,
            second_upstream: None,
            subscribers: Vec::new(),
            stop_upstream: false,
            config: None,
            args: Vec::new(),
            program: None,
            tmp,
        }
    }

    /// What the subscriber with this client id received.
    pub fn received_by(&self, id: &str) -> &Received {
        self.subscribers
            .iter()
            .find(|(name, _)| name == id)
            .map(|(_, subscriber)| &subscriber.received)
            .unwrap_or_else(|| panic!("no subscriber {id}"))
    }

    /// Another gateway next to [`Harness::gateway`] (a fleet of them on one upstream): `outpost
    /// run --config <dir>/<name>/outpost.toml` with `config` as that file, its data and its log
    /// in `<dir>/<name>`; not started, and stopped when dropped.
    pub fn another_gateway(&self, name: &str, config: &str) -> Gateway {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("the other gateway's directory");
        let file = write_config(&dir, config);
        Gateway::new(&dir, &["--config", file.to_str().expect("UTF-8 path")])
    }

    /// The second upstream ([`HarnessBuilder::second_upstream`]); it runs from the start.
    pub fn second_upstream(&mut self) -> &mut Mosquitto {
        self.second_upstream
            .as_mut()
            .expect("no second upstream: ask the harness builder for one")
    }
}

/// Which upstream a subscriber of the builder is on.
#[derive(Clone, Copy, PartialEq)]
enum On {
    Upstream,
    Second,
}

/// What [`Harness::builder`] makes, step by step; [`HarnessBuilder::start`] makes it.
pub struct HarnessBuilder {
    upstream: Mosquitto,
    start_upstream: bool,
    second_upstream: Option<Mosquitto>,
    subscribers: Vec<(On, String, String)>,
    stop_upstream: bool,
    config: Option<PathBuf>,
    /// The arguments of `outpost run` after `--listen` and `--data`, in the order asked for.
    args: Vec<String>,
    /// What runs the gateway instead of the test's own binary ([`HarnessBuilder::program`]).
    program: Option<Vec<String>>,
    tmp: TempDir,
}

impl HarnessBuilder {
    /// The temporary directory (for files the configuration names).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The upstream's URL (`mqtt://127.0.0.1:<port>`), known before it starts.
    pub fn upstream_url(&self) -> String {
        self.upstream.url()
    }

    /// Starts the upstream before the gateway.
    pub fn upstream(mut self) -> Self {
        self.start_upstream = true;
        self
    }

    /// Appends `extra` to the upstream's Mosquitto configuration (see
    /// [`Mosquitto::with_config`]: more listeners, each with its own settings).
    pub fn upstream_config(self, extra: &str) -> Self {
        self.upstream.set_config(extra);
        self
    }

    /// A subscriber `test-sub` on the upstream (started for it) with a persistent session,
    /// subscribed to `filter` before the gateway starts.
    pub fn subscriber(self, filter: &str) -> Self {
        self.subscriber_as(SUBSCRIBER_ID, filter)
    }

    /// Like [`HarnessBuilder::subscriber`], with this client id.
    pub fn subscriber_as(mut self, id: &str, filter: &str) -> Self {
        self.start_upstream = true;
        self.subscribers
            .push((On::Upstream, id.to_string(), filter.to_string()));
        self
    }

    /// A second upstream Mosquitto in the directory, started before the gateway (and before
    /// any subscriber) and running until the harness is dropped.
    pub fn second_upstream(mut self) -> Self {
        if self.second_upstream.is_none() {
            self.second_upstream = Some(Mosquitto::new(self.tmp.path()));
        }
        self
    }

    /// The second upstream's URL, known before it starts.
    pub fn second_upstream_url(&self) -> String {
        self.second_upstream
            .as_ref()
            .expect("no second upstream: call second_upstream first")
            .url()
    }

    /// Like [`HarnessBuilder::subscriber_as`], on the second upstream (which it asks for).
    pub fn second_subscriber_as(mut self, id: &str, filter: &str) -> Self {
        self = self.second_upstream();
        self.subscribers
            .push((On::Second, id.to_string(), filter.to_string()));
        self
    }

    /// Stops the upstream once the subscribers have subscribed: the gateway starts against
    /// an upstream that is down, and the subscribers' sessions collect what comes once it is
    /// started again.
    pub fn stop_upstream(mut self) -> Self {
        self.stop_upstream = true;
        self
    }

    /// Writes `text` as the gateway's configuration file (`outpost.toml` in the directory)
    /// and gives it to the gateway with `--config`.
    pub fn config(mut self, text: &str) -> Self {
        assert!(self.config.is_none(), "one configuration file");
        let path = write_config(self.tmp.path(), text);
        self.args
            .extend(["--config".to_string(), path.display().to_string()]);
        self.config = Some(path);
        self
    }

    /// [`HarnessBuilder::config`] with the text made from the upstream's URL.
    pub fn config_with(self, text: impl FnOnce(&str) -> String) -> Self {
        let text = text(&self.upstream.url());
        self.config(&text)
    }

    /// Gives the gateway the upstream with `--upstream <url>`.
    pub fn upstream_arg(mut self) -> Self {
        self.args
            .extend(["--upstream".to_string(), self.upstream.url()]);
        self
    }

    /// More arguments for `outpost run`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Runs the gateway as `program` (the command before `run`: an emulator and its options,
    /// then a cross-built `outpost`) instead of the test's own binary; see
    /// [`Gateway::with_program`].
    pub fn program(mut self, program: &[String]) -> Self {
        self.program = Some(program.to_vec());
        self
    }

    /// Starts the upstream and the subscribers as asked, and the gateway.
    pub async fn start(self) -> Harness {
        let mut harness = self.build().await;
        harness.gateway.start();
        harness
    }

    /// Like [`HarnessBuilder::start`], but leaves the gateway to the test to start.
    pub async fn build(mut self) -> Harness {
        self.start_upstreams();
        let mut subscribers = Vec::new();
        for (on, id, filter) in &self.subscribers {
            let port = match on {
                On::Upstream => self.upstream.port,
                On::Second => self.second_upstream.as_ref().expect("second upstream").port,
            };
            let subscriber = Subscriber::connect(port, id, filter).await;
            subscribers.push((id.clone(), subscriber));
        }
        self.assemble(subscribers)
    }

    /// [`HarnessBuilder::start`] for a test without a runtime (a plain `#[test]`): the same
    /// set-up, but subscribers (which need a runtime) cannot be asked for.
    pub fn start_blocking(self) -> Harness {
        let mut harness = self.build_blocking();
        harness.gateway.start();
        harness
    }

    /// Like [`HarnessBuilder::start_blocking`], but leaves the gateway to the test to start.
    pub fn build_blocking(mut self) -> Harness {
        assert!(
            self.subscribers.is_empty(),
            "subscribers need a runtime: use start().await or build().await"
        );
        self.start_upstreams();
        self.assemble(Vec::new())
    }

    fn start_upstreams(&mut self) {
        if self.start_upstream {
            self.upstream.start();
        }
        if let Some(second) = self.second_upstream.as_mut() {
            second.start();
        }
    }

    /// The harness once the upstreams run and the subscribers have subscribed: stops the
    /// upstream if asked, and makes the gateway (not started).
    fn assemble(mut self, subscribers: Vec<(String, Subscriber)>) -> Harness {
        if self.stop_upstream {
            self.upstream.stop();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let gateway = match &self.program {
            Some(program) => Gateway::with_program(self.tmp.path(), program, &args),
            None => Gateway::new(self.tmp.path(), &args),
        };
        let received = subscribers
            .first()
            .map(|(_, subscriber)| subscriber.received.clone())
            .unwrap_or_else(Received::nobody);
        Harness {
            gateway,
            received,
            subscribers,
            second_upstream: self.second_upstream,
            upstream: self.upstream,
            config: self.config,
            dir: self.tmp.path().to_path_buf(),
            _tmp: self.tmp,
        }
    }
}
