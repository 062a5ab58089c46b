//! The brokers a scenario runs against: outpost (the `outpost` binary, its embedded broker on
//! a free port, no upstream needed) or Debian's Mosquitto 2 (`/usr/sbin/mosquitto`, a plain
//! configuration written by the test). Each starts fresh for one scenario and stops when the
//! scenario's [`Target`] is dropped.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::common::mqtt::{Client, ConnAck, Connect, Publish, Version};
use crate::common::{write_config, Gateway, Mosquitto};

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Outpost,
    Mosquitto,
}

/// What a scenario needs configured, in each broker's own terms (the same setting).
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Lines of outpost's TOML configuration (its `[broker]` table, say).
    pub outpost: &'static str,
    /// Lines of `mosquitto.conf`.
    pub mosquitto: &'static str,
}

/// Both brokers with their defaults.
pub const DEFAULTS: Setup = Setup {
    outpost: "",
    mosquitto: "",
};

/// What every outpost target has: no metrics publishes on the broker (a subscriber to `#`
/// sees only the scenario's messages).
const OUTPOST_BASE: &str = "[handlers]\nmetrics_interval_ms = 0\n";

enum Broker {
    Outpost(Gateway),
    Mosquitto(Mosquitto),
}

/// A running broker for one scenario.
pub struct Target {
    pub kind: Kind,
    pub port: u16,
    // Dropped before the directory it lives in.
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Target {
    /// Starts `kind` with `setup` and waits until it listens.
    pub fn start(kind: Kind, setup: &Setup) -> Target {
        let dir = tempfile::tempdir().expect("temporary directory");
        let broker = match kind {
            Kind::Outpost => Broker::Outpost(start_outpost(dir.path(), setup.outpost)),
            Kind::Mosquitto => {
                let mut mosquitto = Mosquitto::plain(dir.path(), setup.mosquitto);
                mosquitto.start();
                Broker::Mosquitto(mosquitto)
            }
        };
        let port = match &broker {
            Broker::Outpost(gateway) => gateway.port,
            Broker::Mosquitto(mosquitto) => mosquitto.port,
        };
        Target {
            kind,
            port,
            broker,
            _dir: dir,
        }
    }

    /// Connects with a clean session and no properties.
    pub fn client(&self, version: Version, client_id: &str) -> Client {
        Client::clean(self.port, version, client_id)
    }

    /// Connects as given; the broker must accept.
    pub fn connect(&self, connect: &Connect) -> (Client, ConnAck) {
        Client::connect(self.port, connect)
    }

    /// Publishes `message` from a client of its own (connected for this one message) and
    /// completes its QoS flow: once this returns, the broker has the message.
    pub fn publish(&self, version: Version, message: &Publish) {
        static PUBLISHERS: AtomicU32 = AtomicU32::new(0);
        let n = PUBLISHERS.fetch_add(1, Ordering::Relaxed);
        let mut publisher = self.client(version, &format!("publisher-{n}"));
        publisher.publish_done(message);
        publisher.disconnect();
    }

    /// The broker's log so far.
    fn log(&self) -> String {
        match &self.broker {
            Broker::Outpost(gateway) => gateway.log(),
            Broker::Mosquitto(mosquitto) => mosquitto.log(),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // The gateway prints its own log when a test fails; Mosquitto's is printed here.
        if std::thread::panicking() && self.kind == Kind::Mosquitto {
            eprintln!("---- mosquitto log ----\n{}", self.log());
        }
    }
}

fn start_outpost(dir: &Path, extra: &str) -> Gateway {
    let config = write_config(dir, &format!("{OUTPOST_BASE}{extra}"));
    let config = config.to_str().expect("UTF-8 path").to_string();
    let mut gateway = Gateway::new(dir, &["--config", &config]);
    gateway.start();
    gateway
}

/// Runs `scenario` against a fresh `kind` broker set up with `setup`.
pub fn run(kind: Kind, setup: &Setup, scenario: fn(&Target)) {
    let target = Target::start(kind, setup);
    scenario(&target);
}
