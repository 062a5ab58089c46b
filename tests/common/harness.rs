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
//! upstream last, then the directory is removed).

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
            subscribers: Vec::new(),
            stop_upstream: false,
            config: None,
            args: Vec::new(),
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
}

/// What [`Harness::builder`] makes, step by step; [`HarnessBuilder::start`] makes it.
pub struct HarnessBuilder {
    upstream: Mosquitto,
    start_upstream: bool,
    subscribers: Vec<(String, String)>,
    stop_upstream: bool,
    config: Option<PathBuf>,
    /// The arguments of `outpost run` after `--listen` and `--data`, in the order asked for.
    args: Vec<String>,
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
        self.subscribers.push((id.to_string(), filter.to_string()));
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

    /// Starts the upstream and the subscribers as asked, and the gateway.
    pub async fn start(self) -> Harness {
        let mut harness = self.build().await;
        harness.gateway.start();
        harness
    }

    /// Like [`HarnessBuilder::start`], but leaves the gateway to the test to start.
    pub async fn build(mut self) -> Harness {
        if self.start_upstream {
            self.upstream.start();
        }
        let mut subscribers = Vec::new();
        for (id, filter) in &self.subscribers {
            let subscriber = Subscriber::connect(self.upstream.port, id, filter).await;
            subscribers.push((id.clone(), subscriber));
        }
        if self.stop_upstream {
            self.upstream.stop();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let gateway = Gateway::new(self.tmp.path(), &args);
        let received = subscribers
            .first()
            .map(|(_, subscriber)| subscriber.received.clone())
            .unwrap_or_else(Received::nobody);
        Harness {
            gateway,
            received,
            subscribers,
            upstream: self.upstream,
            config: self.config,
            dir: self.tmp.path().to_path_buf(),
            _tmp: self.tmp,
        }
    }
}
