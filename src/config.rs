//! The gateway's one typed configuration: TOML on disk, defaults for every field, and
//! the checks of its own fields, which name the offending key.
//!
//! Loading never panics: a file that cannot be read, parsed or checked gives a
//! [`ConfigError`] whose message names the key (for example
//! `route "alerts".upstream: no upstream named "clowd"`).
//!
//! This module does not open sockets or files other than the configuration file itself and the
//! trusted public keys it lists (`deploy.trusted_keys`, read and parsed by [`Config::check`]);
//! the module paths it lists are checked for existence by [`Config::check`], not loaded. It
//! does not compile the route table, read geofences or load credentials: turning a checked
//! configuration into what the gateway runs is [`crate::plan`]'s.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routing::RouteSpec;

/// The documented default configuration, as printed by `outpost config default`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default_config.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What is wrong: what the operating system said, not a regular file, larger than
        /// [`MAX_CONFIG_BYTES`], not UTF-8 (in the message, so not also a `source`, which would
        /// print it twice in an error chain).
        error: crate::files::FileError,
    },
    /// The file is not valid TOML or has a key of the wrong type or an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The file being parsed.
        path: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value is out of range or refers to something that does not exist.
    #[error("{key}: {message}")]
    Invalid {
        /// The offending key, e.g. `upstream "cloud".url`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The rules of `[broker.tls]` that its keys alone decide.
fn validate_broker_tls(tls: &BrokerTlsConfig) -> Result<(), ConfigError> {
    if tls.listen.is_empty() {
        return Err(invalid(
            "broker.tls.listen",
            "at least one address (e.g. \"0.0.0.0:8883\"); remove [broker.tls] for no TLS listener",
        ));
    }
    for (key, path) in [
        ("broker.tls.certfile", Some(&tls.certfile)),
        ("broker.tls.keyfile", Some(&tls.keyfile)),
        ("broker.tls.cafile", tls.cafile.as_ref()),
        ("broker.tls.crlfile", tls.crlfile.as_ref()),
    ] {
        if path.is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(key, "must not be empty"));
        }
    }
    if tls.cafile.is_none() {
        if tls.crlfile.is_some() {
            return Err(invalid(
                "broker.tls.cafile",
                "required with crlfile (the CA certificates whose revocations it lists)",
            ));
        }
        if tls.require_certificate {
            return Err(invalid(
                "broker.tls.cafile",
                "required with require_certificate (the CA certificates client certificates \
                 must chain to)",
            ));
        }
    }
    if tls.use_identity_as_username && !tls.require_certificate {
        return Err(invalid(
            "broker.tls.use_identity_as_username",
            "needs require_certificate = true (a device without a certificate has no identity)",
        ));
    }
    Ok(())
}

/// The whole configuration of one gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This gateway's identity: used in upstream client ids and output message ids.
    pub gateway_id: String,
    /// Directory for the SQLite database (outbox, dead letters, handler state).
    pub data_dir: PathBuf,
    /// The device-facing MQTT broker.
    pub broker: BrokerConfig,
    /// Limits applied to every handler invocation.
    pub handlers: HandlerConfig,
    /// Caps on the database: journal, outbox, dead letters, file size.
    pub store: StoreConfig,
    /// Deploying handler modules: the trusted signing keys and the size limit.
    pub deploy: DeployConfig,
    /// Upstream brokers, by name (`[[upstream]]` tables).
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Handler modules, by name (`[[module]]` tables).
    #[serde(rename = "module")]
    pub modules: Vec<ModuleConfig>,
    /// Routes, in order (`[[route]]` tables). Every matching route gets the event.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Where events come from: location sources, the no-location policy, enter/exit events.
    pub geography: GeographyConfig,
    /// Named geofences (`[[geofence]]` tables): GeoJSON files or circles.
    #[serde(rename = "geofence", skip_serializing_if = "Vec::is_empty")]
    pub geofences: Vec<GeofenceConfig>,
    /// Regions (`[[region]]` tables): named groups of geofences, the unit of data residency.
    #[serde(rename = "region", skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionConfig>,
    /// Devices with a fixed position (`[[device]]` tables).
    #[serde(rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
}

/// Where an event's location comes from, and what happens to events without one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeographyConfig {
    /// The gateway's own position `[lat, lon]`: the location of events that have none of
    /// their own and whose device has no known position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_position: Option<[f64; 2]>,
    /// A local topic on which a GPS publishes the gateway's position (JSON with the
    /// `location` pointers); the latest valid fix replaces `gateway_position`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gps_topic: Option<String>,
    /// Where a payload's coordinates are, for routes without their own `location`.
    pub location: LocationPointers,
    /// What happens to events without any location, when regions are configured:
    /// `local-only` (their outputs are published on the gateway's own broker, never upstream),
    /// `dead-letter` (reason `no-location`), or a region name (they get that region's tag).
    pub no_location: String,
    /// Topic template of enter/exit events (`{gateway}`, `{device}`); none: no such events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transitions_topic: Option<String>,
}

impl Default for GeographyConfig {
    fn default() -> Self {
        GeographyConfig {
            gateway_position: None,
            gps_topic: None,
            location: LocationPointers::default(),
            no_location: "local-only".to_string(),
            transitions_topic: None,
        }
    }
}

/// JSON pointers (RFC 6901) to an event's coordinates in its payload: `lat` and `lon`
/// (numbers in degrees), or `position` (a GeoJSON `[lon, lat]` array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationPointers {
    /// Pointer to the latitude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<String>,
    /// Pointer to the longitude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<String>,
    /// Pointer to a `[lon, lat]` or `[lon, lat, alt]` array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

impl Default for LocationPointers {
    fn default() -> Self {
        LocationPointers {
            lat: Some("/lat".to_string()),
            lon: Some("/lon".to_string()),
            position: None,
        }
    }
}

/// One `[[geofence]]`: the polygons of a GeoJSON file, or a circle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeofenceConfig {
    /// A circle's name, or the name of a file that is a bare Polygon/MultiPolygon geometry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GeoJSON file (relative to the configuration file): its Polygon and MultiPolygon
    /// features become fences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The feature property naming each fence (default `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_property: Option<String>,
    /// Only these features of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<String>>,
    /// A circle's centre `[lat, lon]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center: Option<[f64; 2]>,
    /// A circle's radius in metres (geodesic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<f64>,
}

/// One `[[region]]`: a name for a group of geofences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// The region's name (letters, digits, `-`, `_`, `.`), used in routes and upstreams.
    pub name: String,
    /// The geofences it is made of.
    pub fences: Vec<String>,
}

/// One `[[device]]` with a fixed position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device id, as routes derive it from topics.
    pub id: String,
    /// Its position `[lat, lon]`.
    pub position: [f64; 2],
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gateway_id: "outpost".to_string(),
            data_dir: PathBuf::from("outpost-data"),
            broker: BrokerConfig::default(),
            handlers: HandlerConfig::default(),
            store: StoreConfig::default(),
            deploy: DeployConfig::default(),
            upstreams: vec![UpstreamConfig::default()],
            modules: Vec::new(),
            routes: vec![RouteConfig::new("telemetry", "telemetry/#")],
            geography: GeographyConfig::default(),
            geofences: Vec::new(),
            regions: Vec::new(),
            devices: Vec::new(),
        }
    }
}

/// Caps on what the database holds, and what happens when they are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Largest database file, in MiB; 0: only the disk limits it. Reaching it (or a full disk)
    /// stops acknowledging devices until space is freed; nothing is lost or corrupted.
    pub max_db_mib: u64,
    /// Publishes waiting to be routed before devices stop being acknowledged.
    pub journal_max_rows: i64,
    /// Rows in the outbox.
    pub outbox_max_rows: i64,
    /// Payload MiB in the outbox.
    pub outbox_max_mib: i64,
    /// At the outbox cap: "reject-new" (hold new data back; devices stop being acknowledged
    /// once the journal is full too) or "drop-oldest" (oldest rows become dead letters,
    /// reason `evicted`).
    pub outbox_policy: crate::store::OutboxPolicy,
    /// Dead letters kept; beyond it the oldest are deleted (and counted).
    pub dead_letters_max_rows: i64,
    /// Payload MiB of dead letters kept.
    pub dead_letters_max_mib: i64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let limits = crate::store::StoreLimits::default();
        StoreConfig {
            max_db_mib: 0,
            journal_max_rows: limits.journal_max_rows,
            outbox_max_rows: limits.outbox_max_rows,
            outbox_max_mib: limits.outbox_max_bytes / (1024 * 1024),
            outbox_policy: limits.outbox_policy,
            dead_letters_max_rows: limits.dead_letters_max_rows,
            dead_letters_max_mib: limits.dead_letters_max_bytes / (1024 * 1024),
        }
    }
}

impl StoreConfig {
    /// The limits the store enforces.
    pub fn limits(&self) -> crate::store::StoreLimits {
        const MIB: i64 = 1024 * 1024;
        crate::store::StoreLimits {
            max_db_bytes: self.max_db_mib.saturating_mul(MIB as u64),
            journal_max_rows: self.journal_max_rows,
            outbox_max_rows: self.outbox_max_rows,
            outbox_max_bytes: self.outbox_max_mib.saturating_mul(MIB),
            outbox_policy: self.outbox_policy,
            dead_letters_max_rows: self.dead_letters_max_rows,
            dead_letters_max_bytes: self.dead_letters_max_mib.saturating_mul(MIB),
        }
    }
}

/// Deploying handler modules (invariant 7: only signed code runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// Public key files (`outpost-ed25519-public <hex>`, as written by `outpost keygen`) whose
    /// signatures are accepted on a module; relative paths are relative to the configuration
    /// file's directory. Empty: no deploy is accepted.
    pub trusted_keys: Vec<PathBuf>,
    /// Largest module accepted, in bytes. Deploys published on the embedded broker are also
    /// bound by `broker.max_payload_bytes`.
    pub max_module_bytes: u64,
    /// Fleet groups this gateway belongs to: deploys, rollbacks and removes published on an
    /// upstream under `<fleet_prefix>/<group>/modules/...` apply to it.
    pub groups: Vec<String>,
    /// The first levels of fleet topics on the upstream brokers.
    pub fleet_prefix: String,
    /// Whether the uplinks subscribe to this gateway's and its groups' module topics on their
    /// upstream brokers (deploys from the cloud). Off: only the embedded broker's topics work.
    pub via_upstream: bool,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            trusted_keys: Vec::new(),
            max_module_bytes: crate::signing::DEFAULT_MAX_MODULE_BYTES,
            groups: Vec::new(),
            fleet_prefix: "outpost/fleet".to_string(),
            via_upstream: true,
        }
    }
}

/// Largest configuration file [`Config::load`] reads (1 MiB; `config default` writes about 10 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Largest value of `deploy.max_module_bytes` (256 MiB, MQTT's largest packet).
pub const MAX_MODULE_BYTES_LIMIT: u64 = 256 * 1024 * 1024;

/// How a route retries an event its handler failed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Handler attempts per event before it becomes a dead letter (1: no retry).
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds; doubles each time, with jitter.
    pub backoff_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            backoff_ms: 1000,
            backoff_max_ms: 60_000,
        }
    }
}

/// What a route requires of payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// Any bytes.
    #[default]
    Any,
    /// A JSON document; anything else becomes a dead letter (reason `malformed`).
    Json,
}

/// The device-facing MQTT broker (outpost's own, `edge`): listeners and bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Device listeners; each serves MQTT 3.1.1 and 5 (the CONNECT's protocol level decides).
    pub listen: Vec<SocketAddr>,
    /// More device listeners, served exactly like [`BrokerConfig::listen`]; kept so that
    /// configurations written when MQTT 5 needed its own port keep working.
    pub listen_v5: Vec<SocketAddr>,
    /// Largest accepted publish payload, in bytes.
    pub max_payload_bytes: usize,
    /// Most simultaneous device connections.
    pub max_connections: usize,
    /// Most unacknowledged QoS1/2 messages per device connection.
    pub max_inflight: usize,
    /// How long a new connection may take to send CONNECT, in milliseconds.
    pub connect_timeout_ms: u16,
    /// Most bytes of device publishes received and not yet committed to the journal; beyond
    /// it the front stops reading from devices until commits catch up (backpressure).
    pub max_unjournaled_bytes: usize,
    /// Most messages waiting for one local subscriber behind its in-flight window; beyond it
    /// messages for it are dropped and counted (Mosquitto's `max_queued_messages`).
    pub max_queued_messages: usize,
    /// Most bytes (topics, payloads, properties) waiting for one local subscriber.
    pub max_queued_bytes: usize,
    /// Most bytes of messages held for all local subscribers together, queued or sent and
    /// not yet acknowledged; beyond it messages for them are dropped and counted.
    pub max_queued_bytes_total: usize,
    /// Most subscriptions of one client; beyond it SUBACK says "quota exceeded" (0x97; 0x80
    /// on 3.1.1).
    pub max_subscriptions_per_client: usize,
    /// Most subscriptions of all clients together.
    pub max_subscriptions: usize,
    /// Most bytes of topic filters of all subscriptions together.
    pub max_subscription_bytes: usize,
    /// Most retained messages; a retained publish on a new topic beyond it is delivered but
    /// not retained (counted).
    pub max_retained_messages: usize,
    /// Most bytes of retained messages (topics, payloads, properties).
    pub max_retained_bytes: usize,
    /// Most sessions kept for clients that are away (3.1.1 Clean Session 0, MQTT 5 Session
    /// Expiry above 0); a CONNECT that would keep one more is refused (0x03; 0x97 on 5).
    pub max_sessions: usize,
    /// The longest session expiry granted, in seconds; 0: as long as the client asks (a
    /// 3.1.1 persistent session never expires then).
    pub max_session_expiry_secs: u32,
    /// The longest keep-alive an MQTT 5 client may use, in seconds: one that asks for more,
    /// or for none (0), is told this one in CONNACK (Server Keep Alive) and held to it, as
    /// Mosquitto's `max_keepalive` does. 0: every client keeps the keep-alive it asks for,
    /// none included. MQTT 3.1.1 has no way to say it, so 3.1.1 clients keep theirs.
    pub max_keepalive_secs: u16,
    /// Usernames and password hashes in Mosquitto's format (`mosquitto_passwd`, or `outpost
    /// passwd`), relative to the configuration file; a client with a username must match it.
    /// Must not be readable by other users.
    pub password_file: Option<PathBuf>,
    /// Whether clients without a username may connect. Unset: yes without a password file,
    /// no with one. A listener that is not on loopback needs a password file or this set to
    /// `true` explicitly.
    pub allow_anonymous: Option<bool>,
    /// Who may publish, subscribe to and receive what, in Mosquitto's `acl_file` format,
    /// relative to the configuration file. Once set, whatever it does not grant is denied;
    /// the gateway's `outpost/` topics and `$SYS` only by rules that name them literally.
    /// Unset: every client may do everything.
    pub acl_file: Option<PathBuf>,
    /// Whether a device's client id must equal its username (then no device can take over
    /// another's session); a client without a username must then leave its client id empty
    /// (the broker assigns one). Refused: CONNACK "identifier rejected".
    pub require_client_id_match: bool,
    /// Usernames that may use this gateway's control topics (`outpost/<gateway_id>/...`:
    /// dead letters, modules, metrics), whatever the ACL says. Once set (or once there is an
    /// ACL), no one else may, unless an ACL rule names those topics.
    pub admins: Vec<String>,
    /// Most connections open at once from one IP address (0: no limit); one more is refused
    /// (CONNACK "server unavailable" on 3.1.1, "quota exceeded" on 5).
    pub max_connections_per_source: usize,
    /// Most new connections per second from one IP address, with bursts of as many (0: no
    /// limit); one more is refused (CONNACK "server unavailable" on 3.1.1, "connection rate
    /// exceeded" on 5).
    pub max_connection_rate_per_source: u32,
    /// TLS listeners for devices (`[broker.tls]`); none when absent.
    pub tls: Option<BrokerTlsConfig>,
}

/// TLS listeners for devices (`[broker.tls]`), with Mosquitto's listener options of the same
/// names. File paths are relative to the configuration file. [`Config::check`] guarantees:
/// at least one address; `crlfile` and `require_certificate` only with `cafile`;
/// `use_identity_as_username` only with `require_certificate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    /// Addresses of the TLS listeners; each serves MQTT 3.1.1 and 5 like the plain ones.
    #[serde(default = "BrokerTlsConfig::default_listen")]
    pub listen: Vec<SocketAddr>,
    /// The server's certificate chain (PEM, its own certificate first).
    pub certfile: PathBuf,
    /// The server certificate's private key (PEM); must not be readable by other users.
    pub keyfile: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to. Without it, devices are
    /// not asked for a certificate.
    #[serde(default)]
    pub cafile: Option<PathBuf>,
    /// Certificate revocation lists (PEM) of the `cafile` CAs: a client certificate listed
    /// in one is refused, and so is every client certificate once a list is past its
    /// nextUpdate (as Mosquitto, through OpenSSL, refuses them).
    #[serde(default)]
    pub crlfile: Option<PathBuf>,
    /// Whether a device must present a certificate (from `cafile`'s CAs) to connect. Without
    /// it, a certificate that is presented must still verify.
    #[serde(default)]
    pub require_certificate: bool,
    /// Whether the client certificate's subject CN is the device's username; the CONNECT's
    /// username and password are then ignored (no password check), as in Mosquitto.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

impl BrokerTlsConfig {
    fn default_listen() -> Vec<SocketAddr> {
        vec![SocketAddr::from(([0, 0, 0, 0], 8883))]
    }

    /// Whether this listener authenticates every device by itself (a verified client
    /// certificate whose CN is the username), so that no password file is needed for it.
    pub fn authenticates(&self) -> bool {
        self.require_certificate && self.use_identity_as_username
    }
}

impl BrokerConfig {
    /// Whether clients without a username may connect (see
    /// [`BrokerConfig::allow_anonymous`]).
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.password_file.is_none())
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            listen_v5: Vec::new(),
            max_payload_bytes: 256 * 1024,
            max_connections: 1024,
            max_inflight: 100,
            connect_timeout_ms: 5000,
            max_unjournaled_bytes: crate::journal::DEFAULT_MAX_QUEUED_BYTES,
            max_queued_messages: 1000,
            max_queued_bytes: 8 * 1024 * 1024,
            max_queued_bytes_total: 64 * 1024 * 1024,
            max_subscriptions_per_client: 1000,
            max_subscriptions: 100_000,
            max_subscription_bytes: 8 * 1024 * 1024,
            max_retained_messages: 10_000,
            max_retained_bytes: 32 * 1024 * 1024,
            max_sessions: 10_000,
            max_session_expiry_secs: 0,
            max_keepalive_secs: u16::MAX,
            password_file: None,
            allow_anonymous: None,
            acl_file: None,
            require_client_id_match: false,
            admins: Vec::new(),
            max_connections_per_source: 0,
            max_connection_rate_per_source: 0,
            tls: None,
        }
    }
}

/// Limits applied to every handler invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerConfig {
    /// Wall-clock deadline for one batch, in milliseconds.
    pub deadline_ms: u64,
    /// Linear memory cap per instance, in MiB.
    pub memory_limit_mib: usize,
    /// Most events given to a handler in one batch.
    pub max_batch: usize,
    /// Consecutive failed invocations after which a module is quarantined.
    pub breaker_failures: u32,
    /// How long a quarantine lasts, in milliseconds; then one invocation probes the module.
    pub breaker_cooldown_ms: u64,
    /// Handler invocations that may run at once, all modules together; 0: one per CPU.
    pub max_concurrent: usize,
    /// Invocations of one module that may run at once.
    pub max_concurrent_per_module: usize,
    /// How often the gateway publishes its metrics on `outpost/<gateway_id>/metrics`, in
    /// milliseconds; 0: never.
    pub metrics_interval_ms: u64,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            deadline_ms: 1000,
            memory_limit_mib: 32,
            max_batch: 64,
            breaker_failures: 10,
            breaker_cooldown_ms: 30_000,
            max_concurrent: 0,
            max_concurrent_per_module: 1,
            metrics_interval_ms: 10_000,
        }
    }
}

impl HandlerConfig {
    /// The deadline as a [`Duration`].
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

/// One upstream (cloud) broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The name routes use to refer to it.
    pub name: String,
    /// `mqtt://HOST[:PORT]` (port 1883 by default), or `mqtts://HOST[:PORT]` for TLS (8883 by
    /// default). With TLS the upstream's certificate must be valid for HOST (an IP address is
    /// checked against the certificate's IP addresses).
    pub url: String,
    /// `mqtts://` only: PEM file of the CA certificates the upstream's certificate must chain
    /// to. Without it, the system's CA certificates (Debian: `/etc/ssl/certs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cafile: Option<PathBuf>,
    /// `mqtts://` only: this gateway's client certificate (PEM, the chain to present), for
    /// brokers that authenticate devices by certificate (mutual TLS). Needs `keyfile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    /// `mqtts://` only: the client certificate's private key (PEM: PKCS#8, SEC1 or RSA). Must
    /// be readable by its owner only (mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// `mqtts://` only: ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core
    /// with certificates on port 443.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// MQTT user name, for brokers that want one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password (needs `username`). Prefer `password_file`, which keeps the secret out of
    /// this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// File whose first line is the MQTT password (needs `username`); must be readable by its
    /// owner only (mode 0600). Re-read when it changes, like the TLS files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Longest time, in seconds, from starting a connection (name resolution, TCP, TLS) to the
    /// upstream's CONNACK.
    pub connect_timeout_secs: u64,
    /// MQTT client id; defaults to `outpost-<gateway_id>-<name>`.
    pub client_id: Option<String>,
    /// MQTT keep-alive, in seconds (at least 5).
    pub keep_alive_secs: u64,
    /// Most publishes awaiting PUBACK at once (an MQTT 5 upstream's Receive Maximum may lower
    /// it).
    pub inflight: u16,
    /// Most bytes (payload and topic) awaiting PUBACK at once; a single row larger than this is
    /// still sent, alone. Bounds the memory a slow link holds and what a dropped connection
    /// sends twice.
    pub inflight_bytes: usize,
    /// First reconnect delay, in milliseconds; doubles up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    pub reconnect_max_ms: u64,
    /// MQTT version spoken to the upstream.
    pub protocol: MqttVersion,
    /// For MQTT 3.1.1 upstreams: wrap each payload in a JSON envelope carrying its message id
    /// (MQTT 5 upstreams get the id as a user property instead).
    pub envelope: bool,
    /// Outputs for this link not delivered within this many seconds of their event's arrival
    /// become dead letters (`expired`); 0: no limit. A route's own `ttl_secs`, when shorter,
    /// wins.
    pub ttl_secs: u64,
    /// How many times in a row the upstream may refuse one output (MQTT 5 PUBACK with an error
    /// reason code) before it becomes a dead letter (`rejected`) and the rows behind it move.
    pub max_refusals: u32,
    /// The regions whose data this link may carry (`"*"`: any). A row is sent only when all
    /// of its region tags are allowed; data without a region tag may go on any link.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// An MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    #[default]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: "cloud".to_string(),
            url: "mqtt://127.0.0.1:1884".to_string(),
            cafile: None,
            certfile: None,
            keyfile: None,
            alpn: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            connect_timeout_secs: 15,
            client_id: None,
            keep_alive_secs: 30,
            inflight: 1000,
            inflight_bytes: 1024 * 1024,
            reconnect_min_ms: 250,
            reconnect_max_ms: 10_000,
            protocol: MqttVersion::default(),
            envelope: false,
            ttl_secs: 0,
            max_refusals: 5,
            regions: Vec::new(),
        }
    }
}

/// A secret configuration value (a password): kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; use it only where it is needed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A parsed `mqtt://HOST:PORT` or `mqtts://HOST:PORT` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or IP address (without brackets for IPv6).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS (`mqtts://`).
    pub tls: bool,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Where an operator's command (`outpost deadletters`, `outpost module`) connects, and who it
/// says it is.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// `mqtt://HOST[:PORT]` (1883 by default), or `mqtts://HOST[:PORT]` (TLS, 8883 by default).
    pub url: &'a str,
    /// The username and password to log in with, if any.
    pub login: Option<(&'a str, &'a str)>,
    /// The TLS files, for an `mqtts://` URL only.
    pub tls: TlsFiles<'a>,
}

/// The TLS files an operator's command names (`--cafile`, `--certfile`, `--keyfile`). They
/// are read and checked as an upstream's `cafile`, `certfile` and `keyfile` are
/// ([`crate::uplink::credentials`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    /// PEM file of the CA certificates the broker's certificate must chain to; without it, the
    /// system's.
    pub cafile: Option<&'a Path>,
    /// The client certificate to present (PEM); needs `keyfile`.
    pub certfile: Option<&'a Path>,
    /// The client certificate's private key (PEM), readable by its owner only; needs
    /// `certfile`.
    pub keyfile: Option<&'a Path>,
}

impl TlsFiles<'_> {
    /// Whether no file is named.
    pub fn is_empty(&self) -> bool {
        self.cafile.is_none() && self.certfile.is_none() && self.keyfile.is_none()
    }
}

impl<'a> From<&'a str> for Endpoint<'a> {
    fn from(url: &'a str) -> Endpoint<'a> {
        Endpoint {
            url,
            login: None,
            tls: TlsFiles::default(),
        }
    }
}

impl<'a> From<&'a String> for Endpoint<'a> {
    fn from(url: &'a String) -> Endpoint<'a> {
        Endpoint::from(url.as_str())
    }
}

/// Parses `mqtt://HOST[:PORT]` (also `tcp://`) and `mqtts://HOST[:PORT]` (also `ssl://`); the
/// error says what is wrong in words.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (false, rest)
    } else if let Some(rest) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (true, rest)
    } else {
        return Err(match url.split_once("://") {
            Some((scheme, _)) => format!(
                "{url:?}: unknown URL scheme {scheme:?}; use mqtt:// (plain TCP) or mqtts:// (TLS)"
            ),
            None => format!("{url:?} must start with mqtt:// (plain TCP) or mqtts:// (TLS)"),
        });
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(format!(
            "{url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT with nothing after the port"
        ));
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '[' in IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url:?}: unexpected {after:?} after the address")),
        };
        (host, port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok(BrokerAddress {
        host: host.to_string(),
        port,
        tls,
    })
}

/// A handler module routes may use: loaded from a file at start-up, or deployed later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// The name routes use to refer to it.
    pub name: String,
    /// Path of the WebAssembly component, relative to the configuration file's directory.
    /// Without it the module exists only once deployed (`outpost module push`); until then
    /// its routes' events wait (or become dead letters, per the route's `on_quarantine`). A
    /// deployed version takes precedence over the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// What a route does with its events while its module is quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuarantinePolicy {
    /// They wait durably (as retries due when the cool-down ends), without spending attempts.
    #[default]
    Wait,
    /// They become dead letters with reason `quarantined` (replayable).
    DeadLetter,
}

/// One route: which events, which handler, which upstream, which output topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs and dead letters.
    pub name: String,
    /// MQTT topic filter (`+` and `#` allowed).
    pub filter: String,
    /// Which topic level (0-based) names the device; default 1 (`telemetry/<device>/...`).
    #[serde(default = "default_device_segment")]
    pub device_segment: usize,
    /// Handler module to run; without one the event itself is forwarded.
    pub handler: Option<String>,
    /// Upstream for the outputs; may be left out when exactly one upstream is configured.
    pub upstream: Option<String>,
    /// Output topic template: `{topic}`, `{device}`, `{gateway}`, `{output}`, `{N}`.
    pub topic: Option<String>,
    /// Retries of failed handler attempts.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Handler deadline for this route, in milliseconds (default: `handlers.deadline_ms`).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Memory cap per handler instance for this route, in MiB; can only lower
    /// `handlers.memory_limit_mib` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<usize>,
    /// Most outputs one invocation may return on this route (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outputs: Option<usize>,
    /// Most payload bytes of one invocation's outputs on this route (default 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
    /// Most of this route's invocations that run at once; can only lower
    /// `handlers.max_concurrent_per_module` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Outputs not delivered within this many seconds become dead letters (`expired`);
    /// 0: no limit.
    #[serde(default)]
    pub ttl_secs: u64,
    /// What payloads the route accepts.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// What happens to events while the route's module is quarantined.
    #[serde(default)]
    pub on_quarantine: QuarantinePolicy,
    /// Only events satisfying this condition take the route (geography and content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<crate::routing::predicate::PredicateConfig>,
    /// Where this route's payloads carry their coordinates (default: `geography.location`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<LocationPointers>,
}

impl RouteConfig {
    /// A route with every optional setting at its default: forwards what `filter` matches.
    pub fn new(name: &str, filter: &str) -> RouteConfig {
        RouteConfig {
            name: name.to_string(),
            filter: filter.to_string(),
            device_segment: default_device_segment(),
            handler: None,
            upstream: None,
            topic: None,
            retry: RetryConfig::default(),
            deadline_ms: None,
            memory_limit_mib: None,
            max_outputs: None,
            max_output_bytes: None,
            max_concurrent: None,
            ttl_secs: 0,
            payload: PayloadFormat::Any,
            on_quarantine: QuarantinePolicy::Wait,
            when: None,
            location: None,
        }
    }
}

fn default_device_segment() -> usize {
    1
}

/// Command-line values that replace parts of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces `broker.listen` with this one address.
    pub listen: Option<SocketAddr>,
    /// Replaces the first upstream's URL (or adds an upstream named `cloud`).
    pub upstream: Option<String>,
    /// Replaces `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// Replaces `gateway_id`.
    pub gateway_id: Option<String>,
}

impl Config {
    /// Parses TOML text; `origin` is used in messages only. Module paths stay as written.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })
    }

    /// Reads and parses a file, and makes relative module paths and trusted key paths relative
    /// to its directory. Does not check; call [`Config::check`], or build a [`crate::plan::Plan`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::files::read_regular_text(path, MAX_CONFIG_BYTES).map_err(|error| {
            ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }
        })?;
        let mut config = Config::from_toml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for module in &mut config.modules {
            if let Some(path) = &mut module.path {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        for key in &mut config.deploy.trusted_keys {
            if key.is_relative() {
                *key = base.join(&*key);
            }
        }
        for upstream in &mut config.upstreams {
            for file in [
                &mut upstream.cafile,
                &mut upstream.certfile,
                &mut upstream.keyfile,
                &mut upstream.password_file,
            ]
            .into_iter()
            .flatten()
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        for file in [
            &mut config.broker.password_file,
            &mut config.broker.acl_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        if let Some(tls) = &mut config.broker.tls {
            for file in [&mut tls.certfile, &mut tls.keyfile]
                .into_iter()
                .chain([&mut tls.cafile, &mut tls.crlfile].into_iter().flatten())
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        for fence in &mut config.geofences {
            if let Some(file) = &mut fence.file {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        Ok(config)
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(listen) = overrides.listen {
            self.broker.listen = vec![listen];
        }
        if let Some(url) = &overrides.upstream {
            match self.upstreams.first_mut() {
                Some(first) => first.url = url.clone(),
                None => self.upstreams.push(UpstreamConfig {
                    url: url.clone(),
                    ..UpstreamConfig::default()
                }),
            }
        }
        if let Some(dir) = &overrides.data_dir {
            self.data_dir = dir.clone();
        }
        if let Some(id) = &overrides.gateway_id {
            self.gateway_id = id.clone();
        }
    }

    /// Reads and parses the public keys of `deploy.trusted_keys`, in order. An error names the
    /// key (`deploy.trusted_keys[N]`) and the file, and says what is wrong with it.
    pub fn trusted_keys(&self) -> Result<Vec<crate::signing::VerifyingKey>, ConfigError> {
        self.deploy
            .trusted_keys
            .iter()
            .enumerate()
            .map(|(i, path)| {
                crate::signing::read_public_key(path)
                    .map_err(|e| invalid(format!("deploy.trusted_keys[{i}]"), e.to_string()))
            })
            .collect()
    }

    /// The time to live of `route`'s outputs: the shorter of the route's and its link's
    /// `ttl_secs`, where 0 means no limit; `None` when neither sets one.
    pub fn ttl_of(&self, route: &RouteConfig) -> Option<std::time::Duration> {
        let link = match &route.upstream {
            Some(name) => self.upstreams.iter().find(|u| &u.name == name),
            None => self.upstreams.first(),
        };
        let limits = [route.ttl_secs, link.map_or(0, |l| l.ttl_secs)];
        limits
            .into_iter()
            .filter(|&s| s > 0)
            .min()
            .map(std::time::Duration::from_secs)
    }

    /// The route specs with every route's upstream resolved (a route without `upstream` gets
    /// the only configured upstream).
    pub fn route_specs(&self) -> Result<Vec<RouteSpec>, ConfigError> {
        self.routes
            .iter()
            .map(|r| {
                let upstream = match (&r.upstream, self.upstreams.as_slice()) {
                    (Some(u), _) => u.clone(),
                    (None, [only]) => only.name.clone(),
                    (None, []) => {
                        return Err(invalid(
                            format!("route {:?}.upstream", r.name),
                            "no [[upstream]] is configured",
                        ))
                    }
                    (None, _) => {
                        return Err(invalid(
                            format!("route {:?}.upstream", r.name),
                            "required when more than one upstream is configured",
                        ))
                    }
                };
                Ok(RouteSpec {
                    name: r.name.clone(),
                    filter: r.filter.clone(),
                    device_segment: r.device_segment,
                    handler: r.handler.clone(),
                    upstream,
                    topic: r.topic.clone(),
                    when: r.when.clone(),
                })
            })
            .collect()
    }

    /// Checks every value and every cross-reference between the configuration's own fields,
    /// in a fixed order, and names the key of the first that is wrong: the broker, handler,
    /// upstream, module, deploy, store and route settings, that module files exist (their
    /// contents are checked when the runtime loads them), that the trusted keys read and
    /// differ, and that every route's handler and upstream are configured. It does not
    /// compile the route table or read the geofences: [`crate::plan`] does, after this.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_identity()?;
        self.broker.check()?;
        self.handlers.check()?;
        let upstream_names = self.check_upstreams()?;
        let module_names = self.check_modules()?;
        self.check_deploy()?;
        if self.handlers.max_concurrent_per_module == 0 {
            return Err(invalid(
                "handlers.max_concurrent_per_module",
                "must be at least 1",
            ));
        }
        self.store.check()?;
        for r in &self.routes {
            r.check(&self.handlers)?;
        }
        if self.routes.is_empty() {
            return Err(invalid(
                "route",
                "no routes are configured, so nothing would ever be forwarded",
            ));
        }
        for spec in &self.route_specs()? {
            if let Some(handler) = &spec.handler {
                if !module_names.contains(handler.as_str()) {
                    return Err(invalid(
                        format!("route {:?}.handler", spec.name),
                        format!("no [[module]] named {handler:?}"),
                    ));
                }
            }
            if !upstream_names.contains(spec.upstream.as_str()) {
                return Err(invalid(
                    format!("route {:?}.upstream", spec.name),
                    format!("no [[upstream]] named {:?}", spec.upstream),
                ));
            }
        }
        Ok(())
    }

    /// `gateway_id` and `data_dir`.
    fn check_identity(&self) -> Result<(), ConfigError> {
        if self.gateway_id.is_empty()
            || !self
                .gateway_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "gateway_id",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    self.gateway_id
                ),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        Ok(())
    }

    /// Every `[[upstream]]`, and that their names differ; returns the names.
    fn check_upstreams(&self) -> Result<HashSet<&str>, ConfigError> {
        let mut names = HashSet::new();
        for u in &self.upstreams {
            if u.name.is_empty() {
                return Err(invalid("upstream.name", "must not be empty"));
            }
            if u.name.starts_with('$') {
                return Err(invalid(
                    format!("upstream {:?}.name", u.name),
                    "must not start with '$' (reserved)",
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(invalid(
                    format!("upstream {:?}.name", u.name),
                    "is used by two upstreams",
                ));
            }
            u.check()?;
        }
        Ok(names)
    }

    /// Every `[[module]]`: names that differ, and files that exist; returns the names.
    fn check_modules(&self) -> Result<HashSet<&str>, ConfigError> {
        let mut names = HashSet::new();
        for m in &self.modules {
            if m.name.is_empty() {
                return Err(invalid("module.name", "must not be empty"));
            }
            if !names.insert(m.name.as_str()) {
                return Err(invalid(
                    format!("module {:?}.name", m.name),
                    "is used by two modules",
                ));
            }
            if let Some(path) = &m.path {
                if !path.is_file() {
                    return Err(invalid(
                        format!("module {:?}.path", m.name),
                        format!("{} does not exist or is not a file", path.display()),
                    ));
                }
            }
        }
        Ok(names)
    }

    /// `[deploy]`, reading the trusted keys.
    fn check_deploy(&self) -> Result<(), ConfigError> {
        let d = &self.deploy;
        if d.max_module_bytes == 0 || d.max_module_bytes > MAX_MODULE_BYTES_LIMIT {
            return Err(invalid(
                "deploy.max_module_bytes",
                format!("must be between 1 and {MAX_MODULE_BYTES_LIMIT}"),
            ));
        }
        let keys = self.trusted_keys()?;
        for (i, key) in keys.iter().enumerate() {
            if let Some(first) = keys[..i].iter().position(|k| k == key) {
                return Err(invalid(
                    format!("deploy.trusted_keys[{i}]"),
                    format!(
                        "{} is the same key as deploy.trusted_keys[{first}] (key id {})",
                        d.trusted_keys[i].display(),
                        crate::signing::KeyId::of(key)
                    ),
                ));
            }
        }
        for (i, group) in d.groups.iter().enumerate() {
            if group.is_empty() || group.contains(['+', '#', '/', '\0']) {
                return Err(invalid(
                    format!("deploy.groups[{i}]"),
                    "must be one topic level: not empty, without '/', '+', '#'",
                ));
            }
        }
        if d.fleet_prefix.is_empty()
            || d.fleet_prefix.contains(['+', '#', '\0'])
            || d.fleet_prefix.ends_with('/')
        {
            return Err(invalid(
                "deploy.fleet_prefix",
                "must be topic levels without wildcards or a trailing '/'",
            ));
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// `[broker]`: the listeners, the limits, and who may log in.
    fn check(&self) -> Result<(), ConfigError> {
        self.check_listeners()?;
        self.check_limits()?;
        if let Some(bad) = self.admins.iter().find(|name| name.is_empty()) {
            return Err(invalid(
                "broker.admins",
                format!("{bad:?}: an admin is a username, which cannot be empty"),
            ));
        }
        self.check_logins()
    }

    /// At least one listener, none listed twice, and `[broker.tls]`'s own rules.
    fn check_listeners(&self) -> Result<(), ConfigError> {
        let tls_listen = self.tls.iter().flat_map(|tls| &tls.listen);
        if self.listen.is_empty()
            && self.listen_v5.is_empty()
            && tls_listen.clone().next().is_none()
        {
            return Err(invalid(
                "broker.listen",
                "at least one listener (broker.listen, broker.listen_v5 or broker.tls.listen) \
                 is required",
            ));
        }
        let mut seen_addrs = HashSet::new();
        for addr in self.listen.iter().chain(&self.listen_v5).chain(tls_listen) {
            if addr.port() != 0 && !seen_addrs.insert(*addr) {
                return Err(invalid("broker.listen", format!("{addr} is listed twice")));
            }
        }
        if let Some(tls) = &self.tls {
            validate_broker_tls(tls)?;
        }
        Ok(())
    }

    /// The sizes, counts and timeouts.
    fn check_limits(&self) -> Result<(), ConfigError> {
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 256 * 1024 * 1024 {
            return Err(invalid(
                "broker.max_payload_bytes",
                "must be between 1 and 268435456",
            ));
        }
        if self.max_unjournaled_bytes < 64 * 1024 {
            return Err(invalid(
                "broker.max_unjournaled_bytes",
                "must be at least 65536 (64 KiB)",
            ));
        }
        if self.connect_timeout_ms < 100 {
            return Err(invalid(
                "broker.connect_timeout_ms",
                "must be at least 100 (a device needs time to send its CONNECT)",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("broker.max_connections", "must be at least 1"));
        }
        for (key, value) in [
            ("broker.max_queued_messages", self.max_queued_messages),
            ("broker.max_queued_bytes", self.max_queued_bytes),
            ("broker.max_queued_bytes_total", self.max_queued_bytes_total),
            (
                "broker.max_subscriptions_per_client",
                self.max_subscriptions_per_client,
            ),
            ("broker.max_subscriptions", self.max_subscriptions),
            ("broker.max_subscription_bytes", self.max_subscription_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            return Err(invalid(
                "broker.max_inflight",
                "must be between 1 and 65535",
            ));
        }
        Ok(())
    }

    /// Some device can log in, and no listener off loopback is open to anyone unless the
    /// operator said so.
    fn check_logins(&self) -> Result<(), ConfigError> {
        // A TLS listener that takes the username from a verified client certificate
        // authenticates its devices by itself.
        let certificates_authenticate = self
            .tls
            .as_ref()
            .is_some_and(BrokerTlsConfig::authenticates);
        if self.password_file.is_none()
            && self.allow_anonymous == Some(false)
            && !certificates_authenticate
        {
            return Err(invalid(
                "broker.allow_anonymous",
                "is false but there is no broker.password_file: no device could connect",
            ));
        }
        if self.password_file.is_some() || self.allow_anonymous.is_some() {
            return Ok(());
        }
        // Anyone who can reach a listener off loopback could read and write everything:
        // only when the operator says so.
        let unauthenticated_tls = self
            .tls
            .iter()
            .filter(|tls| !tls.authenticates())
            .flat_map(|tls| &tls.listen);
        let Some(open) = self
            .listen
            .iter()
            .chain(&self.listen_v5)
            .chain(unauthenticated_tls)
            .find(|addr| !addr.ip().is_loopback())
        else {
            return Ok(());
        };
        let certificates = if self.tls.as_ref().is_some_and(|t| t.listen.contains(open)) {
            " (or, for this TLS listener, require_certificate and \
             use_identity_as_username under [broker.tls])"
        } else {
            ""
        };
        Err(invalid(
            "broker.allow_anonymous",
            format!(
                "the listener {open} accepts devices from the network, and there is no \
                 broker.password_file: set one (see `outpost passwd`){certificates}, or \
                 write allow_anonymous = true under [broker] to let anyone connect"
            ),
        ))
    }
}

impl HandlerConfig {
    /// `[handlers]`, but `max_concurrent_per_module` (checked after `[deploy]`).
    fn check(&self) -> Result<(), ConfigError> {
        if self.deadline_ms == 0 || self.deadline_ms > 600_000 {
            return Err(invalid(
                "handlers.deadline_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.memory_limit_mib == 0 || self.memory_limit_mib > 4096 {
            return Err(invalid(
                "handlers.memory_limit_mib",
                "must be between 1 and 4096",
            ));
        }
        if self.max_batch == 0 || self.max_batch > 10_000 {
            return Err(invalid("handlers.max_batch", "must be between 1 and 10000"));
        }
        if self.breaker_failures == 0 {
            return Err(invalid("handlers.breaker_failures", "must be at least 1"));
        }
        if self.breaker_cooldown_ms == 0 || self.breaker_cooldown_ms > 86_400_000 {
            return Err(invalid(
                "handlers.breaker_cooldown_ms",
                "must be between 1 and 86400000 (one day)",
            ));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// The key `upstream "<name>".<field>`.
    fn key(&self, field: &str) -> String {
        format!("upstream {:?}.{field}", self.name)
    }

    /// One `[[upstream]]`'s own settings (its name is checked with the others').
    fn check(&self) -> Result<(), ConfigError> {
        let address = parse_broker_url(&self.url).map_err(|m| invalid(self.key("url"), m))?;
        self.check_tls(address.tls)?;
        self.check_login()?;
        self.check_session()
    }

    /// The TLS files and ALPN names: only for TLS, and a certificate with its key.
    fn check_tls(&self, tls: bool) -> Result<(), ConfigError> {
        if !tls {
            for (field, set) in [
                ("cafile", self.cafile.is_some()),
                ("certfile", self.certfile.is_some()),
                ("keyfile", self.keyfile.is_some()),
                ("alpn", !self.alpn.is_empty()),
            ] {
                if set {
                    return Err(invalid(
                        self.key(field),
                        "only for TLS upstreams: use an mqtts:// url",
                    ));
                }
            }
        }
        match (&self.certfile, &self.keyfile) {
            (Some(_), None) => {
                return Err(invalid(
                    self.key("keyfile"),
                    "required with certfile (the client certificate's private key)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    self.key("certfile"),
                    "required with keyfile (the certificate of that private key)",
                ))
            }
            _ => {}
        }
        for (i, protocol) in self.alpn.iter().enumerate() {
            if protocol.is_empty() || protocol.len() > 255 {
                return Err(invalid(
                    format!("upstream {:?}.alpn[{i}]", self.name),
                    "must be 1 to 255 bytes",
                ));
            }
        }
        Ok(())
    }

    /// The user name and password.
    fn check_login(&self) -> Result<(), ConfigError> {
        if self.password.is_some() && self.password_file.is_some() {
            return Err(invalid(
                self.key("password_file"),
                "set password or password_file, not both",
            ));
        }
        if self.username.is_none() && (self.password.is_some() || self.password_file.is_some()) {
            return Err(invalid(
                self.key("username"),
                "required with a password (MQTT sends a password only with a user name)",
            ));
        }
        if self.username.as_ref().is_some_and(|n| n.is_empty()) {
            return Err(invalid(self.key("username"), "must not be empty"));
        }
        Ok(())
    }

    /// The timeouts, the envelope, the window and the reconnection backoff.
    fn check_session(&self) -> Result<(), ConfigError> {
        if self.connect_timeout_secs == 0 || self.connect_timeout_secs > 600 {
            return Err(invalid(
                self.key("connect_timeout_secs"),
                "must be between 1 and 600",
            ));
        }
        if self.keep_alive_secs < 5 || self.keep_alive_secs > 65_535 {
            return Err(invalid(
                self.key("keep_alive_secs"),
                "must be between 5 and 65535",
            ));
        }
        if self.envelope && self.protocol == MqttVersion::V5 {
            return Err(invalid(
                self.key("envelope"),
                "only for protocol \"3.1.1\": MQTT 5 upstreams get the message id as a user property",
            ));
        }
        if self.inflight == 0 {
            return Err(invalid(self.key("inflight"), "must be at least 1"));
        }
        if self.inflight_bytes < 1024 {
            return Err(invalid(self.key("inflight_bytes"), "must be at least 1024"));
        }
        if self.max_refusals == 0 {
            return Err(invalid(self.key("max_refusals"), "must be at least 1"));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(invalid(
                self.key("reconnect_min_ms"),
                "must be at least 1 and not more than reconnect_max_ms",
            ));
        }
        Ok(())
    }
}

impl StoreConfig {
    /// `[store]`: every cap at least 1 (`max_db_mib`: or 0, no cap).
    fn check(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("store.journal_max_rows", self.journal_max_rows),
            ("store.outbox_max_rows", self.outbox_max_rows),
            ("store.outbox_max_mib", self.outbox_max_mib),
            ("store.dead_letters_max_rows", self.dead_letters_max_rows),
            ("store.dead_letters_max_mib", self.dead_letters_max_mib),
        ] {
            if value < 1 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_db_mib != 0 && self.max_db_mib < 1 {
            return Err(invalid(
                "store.max_db_mib",
                "must be 0 (no cap) or at least 1",
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    /// One `[[route]]`'s retries and handler limits, within `handlers`' (its references to
    /// modules and upstreams are checked with the others').
    fn check(&self, handlers: &HandlerConfig) -> Result<(), ConfigError> {
        let key = |field: &str| format!("route {:?}.{field}", self.name);
        if self.retry.max_attempts == 0 || self.retry.max_attempts > 1000 {
            return Err(invalid(
                key("retry.max_attempts"),
                "must be between 1 and 1000",
            ));
        }
        if self.retry.backoff_ms == 0 || self.retry.backoff_ms > self.retry.backoff_max_ms {
            return Err(invalid(
                key("retry.backoff_ms"),
                "must be at least 1 and not more than retry.backoff_max_ms",
            ));
        }
        for (name, set) in [
            ("memory_limit_mib", self.memory_limit_mib.is_some()),
            ("max_outputs", self.max_outputs.is_some()),
            ("max_output_bytes", self.max_output_bytes.is_some()),
            ("max_concurrent", self.max_concurrent.is_some()),
        ] {
            if set && self.handler.is_none() {
                return Err(invalid(key(name), "only applies to a route with a handler"));
            }
        }
        if let Some(m) = self.memory_limit_mib {
            if m == 0 || m > handlers.memory_limit_mib {
                return Err(invalid(
                    key("memory_limit_mib"),
                    format!(
                        "must be between 1 and handlers.memory_limit_mib ({})",
                        handlers.memory_limit_mib
                    ),
                ));
            }
        }
        if let Some(n) = self.max_concurrent {
            if n == 0 || n > handlers.max_concurrent_per_module {
                return Err(invalid(
                    key("max_concurrent"),
                    format!(
                        "must be between 1 and handlers.max_concurrent_per_module ({})",
                        handlers.max_concurrent_per_module
                    ),
                ));
            }
        }
        if let Some(d) = self.deadline_ms {
            if d == 0 || d > 600_000 {
                return Err(invalid(key("deadline_ms"), "must be between 1 and 600000"));
            }
            if self.handler.is_none() {
                return Err(invalid(
                    key("deadline_ms"),
                    "only applies to a route with a handler",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What these tests ask of a configuration: the whole validation before the gateway
    /// uses it, its own checks ([`Config::check`]) and then the route table and the
    /// geography ([`crate::plan::compile`]).
    trait Validate {
        fn validate(&self) -> Result<(), ConfigError>;
    }

    impl Validate for Config {
        fn validate(&self) -> Result<(), ConfigError> {
            crate::plan::compile(self).map(drop)
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn documented_default_equals_built_in_default() {
        let parsed = parse(DEFAULT_CONFIG_TOML).expect("default config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("default config is valid");
    }

    /// The Debian package's /etc/outpost/outpost.toml is the documented default with the
    /// package's state directory, and valid (the service checks it before starting).
    #[test]
    fn packaged_config_is_the_default_with_the_state_directory() {
        let text = include_str!("../packaging/debian/outpost.toml");
        // Word for word, so that the conffile documents every key `config default` does.
        let body = text.split_once("\n\n").map_or(text, |(_, body)| body);
        assert_eq!(
            body,
            DEFAULT_CONFIG_TOML.replacen(
                "data_dir = \"outpost-data\"",
                "data_dir = \"/var/lib/outpost\"",
                1
            ),
            "packaging/debian/outpost.toml is the default configuration with its header"
        );
        let parsed = parse(text).expect("packaged config parses");
        let expected = Config {
            data_dir: PathBuf::from("/var/lib/outpost"),
            ..Config::default()
        };
        assert_eq!(parsed, expected);
        parsed.validate().expect("packaged config is valid");
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[broker]\nlisten = []\nmax_payload = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_payload"), "{err}");
    }

    #[test]
    fn broker_limits_below_their_floor_are_named() {
        for (text, key) in [
            (
                "[broker]\nconnect_timeout_ms = 0\n",
                "broker.connect_timeout_ms",
            ),
            (
                "[broker]\nmax_unjournaled_bytes = 1000\n",
                "broker.max_unjournaled_bytes",
            ),
            ("[broker]\nmax_connections = 0\n", "broker.max_connections"),
            (
                "[broker]\nmax_queued_messages = 0\n",
                "broker.max_queued_messages",
            ),
            (
                "[broker]\nmax_subscriptions_per_client = 0\n",
                "broker.max_subscriptions_per_client",
            ),
        ] {
            let err = parse(text).unwrap().validate().unwrap_err();
            assert!(err.to_string().starts_with(key), "{text}: {err}");
        }
        assert!(
            parse("[broker]\nconnect_timeout_ms = 100\nmax_unjournaled_bytes = 65536\n")
                .unwrap()
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn upstream_windows_below_their_floor_are_named() {
        let upstream = |extra: &str| {
            parse(&format!(
                "[[upstream]]\nname = \"cloud\"\nurl = \"mqtt://h:1\"\n{extra}"
            ))
            .unwrap()
            .validate()
        };
        for (extra, key) in [
            ("inflight = 0\n", "upstream \"cloud\".inflight"),
            (
                "inflight_bytes = 1023\n",
                "upstream \"cloud\".inflight_bytes",
            ),
        ] {
            let err = upstream(extra).unwrap_err().to_string();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        assert!(upstream("inflight = 1\ninflight_bytes = 1024\n").is_ok());
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse("gateway_id = 5\n").unwrap_err();
        assert!(err.to_string().contains("gateway_id"), "{err}");
    }

    #[test]
    fn route_to_unknown_upstream_is_rejected() {
        let cfg = parse(
            "[[upstream]]\nname = \"a\"\nurl = \"mqtt://h:1\"\n[[upstream]]\nname = \"b\"\nurl = \"mqtt://h:2\"\n\
             [[route]]\nname = \"r\"\nfilter = \"x/#\"\nupstream = \"c\"\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("route \"r\".upstream"), "{err}");
    }

    #[test]
    fn route_needs_upstream_when_several() {
        let cfg = parse(
            "[[upstream]]\nname = \"a\"\nurl = \"mqtt://h:1\"\n[[upstream]]\nname = \"b\"\nurl = \"mqtt://h:2\"\n\
             [[route]]\nname = \"r\"\nfilter = \"x/#\"\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("required when more than one upstream"),
            "{err}"
        );
    }

    #[test]
    fn route_to_unknown_module_is_rejected() {
        let cfg = parse("[[route]]\nname = \"r\"\nfilter = \"x/#\"\nhandler = \"nope\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("route \"r\".handler"), "{err}");
    }

    #[test]
    fn missing_module_file_is_rejected() {
        let cfg = parse("[[module]]\nname = \"m\"\npath = \"/nonexistent/m.wasm\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("module \"m\".path"), "{err}");
    }

    /// A route may lower its module's concurrency, never raise it, and only with a handler.
    #[test]
    fn route_concurrency_is_within_the_module_cap() {
        let with = |route_extra: &str| {
            parse(&format!(
                "[handlers]\nmax_concurrent_per_module = 3\n[[module]]\nname = \"m\"\n\
                 [[route]]\nname = \"r\"\nfilter = \"x/#\"\n{route_extra}"
            ))
            .unwrap()
            .validate()
        };
        with("handler = \"m\"\nmax_concurrent = 3\n").unwrap();
        with("handler = \"m\"\nmax_concurrent = 1\n").unwrap();
        for bad in [0, 4] {
            let err = with(&format!("handler = \"m\"\nmax_concurrent = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("route \"r\".max_concurrent"), "{err}");
            assert!(
                err.contains("between 1 and handlers.max_concurrent_per_module (3)"),
                "{err}"
            );
        }
        let err = with("max_concurrent = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("only applies to a route with a handler"),
            "{err}"
        );
    }

    #[test]
    fn bad_filter_is_rejected_with_route_name() {
        let cfg = parse("[[route]]\nname = \"r\"\nfilter = \"a/#/b\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("\"r\""), "{err}");
    }

    #[test]
    fn trusted_keys_are_resolved_relative_to_the_file_and_checked() {
        use crate::signing::{write_key_pair, KeyId, SigningKey};
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let files = write_key_pair(&dir.path().join("keys"), "ops", &key).unwrap();
        let write = |text: &str| {
            let path = dir.path().join("outpost.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(&path).unwrap()
        };
        let cfg = write("[deploy]\ntrusted_keys = [\"keys/ops.pub\"]\nmax_module_bytes = 1000\n");
        assert_eq!(cfg.deploy.trusted_keys, vec![files.public.clone()]);
        assert_eq!(cfg.deploy.max_module_bytes, 1000);
        cfg.validate().unwrap();
        let keys = cfg.trusted_keys().unwrap();
        assert_eq!(keys, vec![key.verifying_key()]);
        assert_eq!(KeyId::of(&keys[0]), files.key_id);

        let err = |text: &str| write(text).validate().unwrap_err().to_string();
        let missing = err("[deploy]\ntrusted_keys = [\"keys/ops.pub\", \"keys/gone.pub\"]\n");
        assert!(
            missing.starts_with("deploy.trusted_keys[1]: cannot read")
                && missing.contains("gone.pub"),
            "{missing}"
        );
        let secret = err("[deploy]\ntrusted_keys = [\"keys/ops.key\"]\n");
        assert!(
            secret.starts_with("deploy.trusted_keys[0]:") && secret.contains("a secret key"),
            "{secret}"
        );
        std::fs::write(dir.path().join("junk.pub"), "hello\n").unwrap();
        let junk = err("[deploy]\ntrusted_keys = [\"junk.pub\"]\n");
        assert!(
            junk.starts_with("deploy.trusted_keys[0]:") && junk.contains("junk.pub"),
            "{junk}"
        );
        let twice = err("[deploy]\ntrusted_keys = [\"keys/ops.pub\", \"keys/../keys/ops.pub\"]\n");
        assert!(
            twice.starts_with("deploy.trusted_keys[1]:") && twice.contains("same key"),
            "{twice}"
        );
        for size in ["0", "268435457"] {
            let e = err(&format!("[deploy]\nmax_module_bytes = {size}\n"));
            assert!(e.starts_with("deploy.max_module_bytes"), "{e}");
        }
        let absolute = write(&format!(
            "[deploy]\ntrusted_keys = [{:?}]\n",
            files.public.display().to_string()
        ));
        assert_eq!(absolute.deploy.trusted_keys, vec![files.public]);
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut cfg = Config::default();
        cfg.apply(&Overrides {
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            upstream: Some("mqtt://10.0.0.1:1883".into()),
            data_dir: Some("/tmp/x".into()),
            gateway_id: Some("gw-7".into()),
        });
        assert_eq!(cfg.broker.listen, vec!["127.0.0.1:9999".parse().unwrap()]);
        assert_eq!(cfg.upstreams[0].url, "mqtt://10.0.0.1:1883");
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.gateway_id, "gw-7");
        cfg.validate().unwrap();
    }

    #[test]
    fn broker_urls() {
        let ok = |u: &str, h: &str, p: u16, tls: bool| {
            assert_eq!(
                parse_broker_url(u).unwrap(),
                BrokerAddress {
                    host: h.into(),
                    port: p,
                    tls,
                }
            )
        };
        ok("mqtt://example.com", "example.com", 1883, false);
        ok("mqtt://127.0.0.1:1884", "127.0.0.1", 1884, false);
        ok("mqtt://[::1]:1885", "::1", 1885, false);
        ok("tcp://h:7/", "h", 7, false);
        ok("mqtts://example.com", "example.com", 8883, true);
        ok("mqtts://example.com:443", "example.com", 443, true);
        ok("ssl://[::1]", "::1", 8883, true);
        assert_eq!(
            parse_broker_url("mqtts://h").unwrap().to_string(),
            "mqtts://h:8883"
        );
        let unknown = parse_broker_url("ws://h:80").unwrap_err();
        assert!(unknown.contains("unknown URL scheme \"ws\""), "{unknown}");
        for bad in [
            "http://h:1",
            "mqtts://",
            "mqtts://h:0",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://h:70000",
            "mqtt://h:1/path",
            "mqtt://[::1",
            "h:1883",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn bad_gateway_id_is_rejected() {
        let cfg = parse("gateway_id = \"a b\"\n").unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("gateway_id"));
    }

    #[test]
    fn ttl_is_the_shorter_of_route_and_link() {
        let text = r#"
            [[upstream]]
            name = "a"
            url = "mqtt://127.0.0.1:1"
            ttl_secs = 60
            [[upstream]]
            name = "b"
            url = "mqtt://127.0.0.1:2"
            [[route]]
            name = "link-only"
            filter = "x/#"
            upstream = "a"
            [[route]]
            name = "route-shorter"
            filter = "y/#"
            upstream = "a"
            ttl_secs = 5
            [[route]]
            name = "none"
            filter = "z/#"
            upstream = "b"
        "#;
        let cfg = Config::from_toml(text, Path::new("t.toml")).unwrap();
        let ttl = |i: usize| cfg.ttl_of(&cfg.routes[i]).map(|d| d.as_secs());
        assert_eq!(ttl(0), Some(60));
        assert_eq!(ttl(1), Some(5));
        assert_eq!(ttl(2), None);
    }

    #[test]
    fn device_tls_keys_are_checked_and_named() {
        let tls = |keys: &str| {
            parse(&format!(
                "[broker]\nlisten = [\"127.0.0.1:1883\"]\n[broker.tls]\nlisten = [\"127.0.0.1:8883\"]\n{keys}"
            ))
        };
        let files = "certfile = \"s.pem\"\nkeyfile = \"s.key\"\n";
        assert!(tls(files).unwrap().validate().is_ok());
        let missing = tls("certfile = \"s.pem\"\n").unwrap_err().to_string();
        assert!(missing.contains("keyfile"), "{missing}");
        for (keys, key) in [
            ("crlfile = \"c.crl\"\n", "broker.tls.cafile"),
            ("require_certificate = true\n", "broker.tls.cafile"),
            (
                "cafile = \"ca.pem\"\nuse_identity_as_username = true\n",
                "broker.tls.use_identity_as_username",
            ),
            ("certfile = \"\"\nkeyfile = \"k\"\n", "broker.tls.certfile"),
        ] {
            let text = if keys.starts_with("certfile") {
                keys.to_string()
            } else {
                format!("{files}{keys}")
            };
            let err = tls(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.starts_with(key), "{keys}: {err}");
        }
        let err = parse(&format!("[broker.tls]\nlisten = []\n{files}"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("broker.tls.listen"), "{err}");
        let err = parse(&format!(
            "[broker]\nlisten = [\"127.0.0.1:1883\"]\n[broker.tls]\nlisten = [\"127.0.0.1:1883\"]\n{files}"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("listed twice"), "{err}");
        // A TLS listener alone is enough.
        assert!(parse(&format!(
            "[broker]\nlisten = []\n[broker.tls]\nlisten = [\"127.0.0.1:8883\"]\n{files}"
        ))
        .unwrap()
        .validate()
        .is_ok());
    }

    #[test]
    fn device_tls_paths_are_relative_to_the_configuration_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outpost.toml");
        std::fs::write(
            &path,
            "[broker.tls]\nlisten = [\"127.0.0.1:8883\"]\ncertfile = \"s.pem\"\n\
             keyfile = \"/etc/k.key\"\ncafile = \"ca.pem\"\ncrlfile = \"c.crl\"\n",
        )
        .unwrap();
        let tls = Config::load(&path).unwrap().broker.tls.unwrap();
        assert_eq!(tls.certfile, dir.path().join("s.pem"));
        assert_eq!(tls.keyfile, PathBuf::from("/etc/k.key"));
        assert_eq!(tls.cafile, Some(dir.path().join("ca.pem")));
        assert_eq!(tls.crlfile, Some(dir.path().join("c.crl")));
        assert_eq!(tls.listen, vec![SocketAddr::from(([127, 0, 0, 1], 8883))]);
        assert!(!tls.require_certificate && !tls.use_identity_as_username);
    }

    #[test]
    fn a_tls_listener_off_loopback_needs_a_login_unless_certificates_are_the_login() {
        let config = |tls: &str, broker: &str| {
            parse(&format!(
                "[broker]\n{broker}\n[broker.tls]\nlisten = [\"0.0.0.0:8883\"]\n\
                 certfile = \"s.pem\"\nkeyfile = \"s.key\"\ncafile = \"ca.pem\"\n{tls}"
            ))
            .unwrap()
            .validate()
        };
        let err = config("", "").unwrap_err().to_string();
        assert!(
            err.starts_with("broker.allow_anonymous") && err.contains("0.0.0.0:8883"),
            "{err}"
        );
        let err = config("require_certificate = true\n", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("use_identity_as_username"), "{err}");
        let identity = "require_certificate = true\nuse_identity_as_username = true\n";
        assert!(config(identity, "").is_ok());
        // Only certificates let devices in: allow_anonymous = false needs no password file.
        assert!(config(identity, "allow_anonymous = false").is_ok());
        assert!(config("", "allow_anonymous = true").is_ok());
        assert!(config("", "password_file = \"p\"").is_ok());
        // The plain listener off loopback still needs a login.
        let err = config(identity, "listen = [\"0.0.0.0:1883\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("0.0.0.0:1883"), "{err}");
    }
}
