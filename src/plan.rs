//! The step between the configuration and the running gateway (Vector's topology builder is
//! the model): [`Plan::new`] turns a [`Config`] into everything the gateway wires, checked
//! and compiled, with every file it needs already read.
//!
//! Guarantees:
//! - A plan exists only for a configuration that passed [`Config::check`], whose route table
//!   compiled and whose geography ([`GeoPlan`]) is valid; every upstream's credential files,
//!   the broker's password and ACL files and the device listeners' TLS files loaded. So a bad
//!   value or file fails before anything runs, with the first error in a fixed order (the
//!   configuration's checks, the route table, the geography, each upstream's credentials in
//!   configuration order, the password file, the ACL file, the TLS files): the error that
//!   `outpost config check` prints is the one the start would fail with.
//! - Errors name the key and, for files, the file; their text is that of the part that found
//!   them ([`ConfigError`], [`CredentialError`], [`AuthFileError`], [`AclFileError`]).
//! - [`Plan::warnings`] is what `outpost config check` points out without refusing, in the
//!   order it prints it.
//!
//! This module does not open the database, load handler modules, bind sockets or start tasks:
//! that is [`crate::gateway`]'s, from the plan.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::config::{BrokerConfig, BrokerTlsConfig, Config, ConfigError, MqttVersion};
use crate::config::{HandlerConfig, RouteConfig, UpstreamConfig};
use crate::control::modules as deploy;
use crate::edge::acl::Acl;
use crate::edge::auth::{AclFileError, AuthFileError};
use crate::edge::passwords::PasswordFile;
use crate::edge::tls::ServerFiles;
use crate::geo::locator::{GeoPlan, NoLocation, LOCAL_LINK};
use crate::handlers::runtime::RuntimeConfig;
use crate::pem::CredentialError;
use crate::pipeline::RoutePolicy;
use crate::routing::RouteTable;
use crate::signing::VerifyingKey;
use crate::uplink::credentials::{self, Credentials};

/// Why a configuration cannot be planned. Each variant shows its cause's message unchanged.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A value, a cross-reference, the route table or the geography is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An upstream's credential files, or the device listeners' TLS files, cannot be used.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// The broker's password file cannot be used.
    #[error(transparent)]
    Passwords(#[from] AuthFileError),
    /// The broker's ACL file cannot be used.
    #[error(transparent)]
    Acl(#[from] AclFileError),
}

/// The compiled parts of a configuration: what [`compile`] gives.
#[derive(Debug)]
pub struct Compiled {
    /// The route table.
    pub routes: RouteTable,
    /// The geography: geofences, regions, location sources, residency.
    pub geo: GeoPlan,
}

/// Checks `config` ([`Config::check`]), compiles its route table and reads its geofence files
/// into its geography. Reads no other file than those and the trusted keys.
pub fn compile(config: &Config) -> Result<Compiled, ConfigError> {
    config.check()?;
    let specs = config.route_specs()?;
    let routes = RouteTable::compile(&specs).map_err(|e| ConfigError::Invalid {
        key: "route".to_string(),
        message: e.to_string(),
    })?;
    let geo = GeoPlan::from_config(config, &routes)?;
    Ok(Compiled { routes, geo })
}

/// One configured upstream, with its credentials loaded.
pub struct LinkPlan {
    /// Its configuration.
    pub config: UpstreamConfig,
    /// Its certificates, key and password, as read at planning.
    pub credentials: Credentials,
}

/// The circuit breaker's settings (`handlers.breaker_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that quarantine a module.
    pub failures: u32,
    /// How long a quarantine lasts.
    pub cooldown: Duration,
}

/// The broker's files, each with where it came from, as read at planning.
#[derive(Default)]
pub struct EdgeFiles {
    /// `broker.password_file`.
    pub passwords: Option<(PathBuf, PasswordFile)>,
    /// `broker.acl_file`.
    pub acl: Option<(PathBuf, Acl)>,
    /// `[broker.tls]`'s certificate, key, CA and CRL files.
    pub tls: Option<(BrokerTlsConfig, ServerFiles)>,
}

impl EdgeFiles {
    /// Reads `broker`'s password, ACL and TLS files, in that order.
    fn load(broker: &BrokerConfig) -> Result<EdgeFiles, PlanError> {
        let passwords = match &broker.password_file {
            Some(path) => Some((path.clone(), crate::edge::auth::load_password_file(path)?)),
            None => None,
        };
        let acl = match &broker.acl_file {
            Some(path) => Some((path.clone(), crate::edge::auth::load_acl_file(path)?)),
            None => None,
        };
        let tls = match &broker.tls {
            Some(tls) => Some((tls.clone(), crate::edge::tls::load(tls)?)),
            None => None,
        };
        Ok(EdgeFiles {
            passwords,
            acl,
            tls,
        })
    }
}

/// The module control plane's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlan {
    /// Bases of the module topics the uplinks accept (this gateway's and its fleet groups');
    /// empty unless `deploy.via_upstream`.
    pub upstream_bases: Vec<String>,
    /// How often the metrics are published; `None`: never.
    pub metrics_interval: Option<Duration>,
    /// Largest packet an uplink accepts from its upstream when it carries module requests.
    pub max_remote_packet: usize,
}

impl ControlPlan {
    fn new(config: &Config) -> ControlPlan {
        let mut upstream_bases = Vec::new();
        if config.deploy.via_upstream {
            upstream_bases.push(deploy::base(&config.gateway_id));
            for group in &config.deploy.groups {
                upstream_bases.push(deploy::fleet_base(&config.deploy.fleet_prefix, group));
            }
        }
        ControlPlan {
            upstream_bases,
            metrics_interval: match config.handlers.metrics_interval_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            max_remote_packet: config.deploy.max_module_bytes as usize
                + crate::signing::MAX_HEADER_BYTES
                + 64 * 1024,
        }
    }
}

/// Everything the gateway wires, from one configuration.
pub struct Plan {
    /// The configuration it was made from; it passed [`Config::check`].
    pub config: Config,
    /// The route table.
    pub routes: RouteTable,
    /// The geography.
    pub geo: GeoPlan,
    /// Per route name: retries, deadline, time to live, payload format, handler limits.
    pub policies: HashMap<String, RoutePolicy>,
    /// The handler runtime's settings.
    pub runtime: RuntimeConfig,
    /// The circuit breaker's settings.
    pub breaker: BreakerSettings,
    /// The keys module deploys must be signed with (`deploy.trusted_keys`, in order).
    pub trusted_keys: Vec<VerifyingKey>,
    /// The configured upstreams, in configuration order.
    pub links: Vec<LinkPlan>,
    /// The link to the gateway's own broker that carries the outputs of `local-only` events;
    /// only when regions are configured with `no_location = "local-only"`.
    pub local_link: Option<UpstreamConfig>,
    /// The broker's password, ACL and TLS files.
    pub edge_files: EdgeFiles,
    /// The module control plane's settings.
    pub control: ControlPlan,
}

impl Plan {
    /// Checks and compiles `config` ([`compile`]) and reads every file it names; see the
    /// module's guarantees for the order of the errors.
    pub fn new(config: Config) -> Result<Plan, PlanError> {
        let Compiled { routes, geo } = compile(&config)?;
        let links = config
            .upstreams
            .iter()
            .map(|upstream| {
                Ok(LinkPlan {
                    config: upstream.clone(),
                    credentials: credentials::load(upstream)?,
                })
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        let edge_files = EdgeFiles::load(&config.broker)?;
        Ok(Plan {
            policies: route_policies(&config),
            runtime: runtime_config(&config.handlers),
            breaker: BreakerSettings {
                failures: config.handlers.breaker_failures,
                cooldown: Duration::from_millis(config.handlers.breaker_cooldown_ms),
            },
            trusted_keys: config.trusted_keys()?,
            local_link: local_link(&config.gateway_id, &geo),
            control: ControlPlan::new(&config),
            routes,
            geo,
            links,
            edge_files,
            config,
        })
    }

    /// What `outpost config check` points out without refusing, in this order: routes whose
    /// events in some region would be dead letters, each upstream's expiring certificates and
    /// passwords sent in the clear, unusable password-file entries, control topics open to
    /// the network, an ACL without rules, and expiring device TLS certificates or stale
    /// revocation lists. `now` dates the certificates.
    pub fn warnings(&self, now: SystemTime) -> Vec<String> {
        let mut warnings = self.geo.warnings(&self.routes);
        for link in &self.links {
            warnings.extend(link.credentials.warnings(now));
            if link.credentials.tls.is_none() && link.credentials.login.is_some() {
                warnings.push(format!(
                    "upstream {:?}: the password goes to {} in the clear; use an mqtts:// url",
                    link.config.name, link.config.url
                ));
            }
        }
        if let Some((path, passwords)) = &self.edge_files.passwords {
            warnings.extend(password_warnings(path, passwords));
        }
        warnings.extend(self.open_control_warning());
        if let Some((path, acl)) = &self.edge_files.acl {
            if acl.rules() == 0 {
                warnings.push(format!(
                    "{}: no rules; every device publish, subscription and delivery is refused",
                    path.display()
                ));
            }
        }
        if let Some((_, files)) = &self.edge_files.tls {
            warnings.extend(files.warnings(now));
        }
        warnings
    }

    /// The control topics are open to every device that can connect, unless access control
    /// is configured: worth a word when devices connect from the network.
    fn open_control_warning(&self) -> Option<String> {
        let broker = &self.config.broker;
        if broker.acl_file.is_some() || !broker.admins.is_empty() {
            return None;
        }
        let addr = broker
            .listen
            .iter()
            .chain(&broker.listen_v5)
            .chain(broker.tls.iter().flat_map(|tls| &tls.listen))
            .find(|addr| !addr.ip().is_loopback())?;
        Some(format!(
            "the listener {addr} accepts devices from the network and there is neither \
             broker.admins nor broker.acl_file: any device that connects may list, replay \
             and purge dead letters and read the metrics"
        ))
    }
}

/// The password file's entries that cannot be used (with their line), or that none can.
fn password_warnings(path: &std::path::Path, passwords: &PasswordFile) -> Vec<String> {
    let mut warnings: Vec<String> = passwords
        .skipped()
        .iter()
        .map(|skipped| {
            format!(
                "{} line {}: the entry of {:?} cannot be used ({}); that user is refused",
                path.display(),
                skipped.line,
                skipped.username,
                skipped.reason
            )
        })
        .collect();
    if passwords.users() == 0 {
        warnings.push(format!(
            "{}: no usable entry; every client with a username is refused",
            path.display()
        ));
    }
    warnings
}

/// The handler runtime's settings: `[handlers]` over the runtime's defaults, where
/// `max_concurrent = 0` means the default (one per CPU).
pub fn runtime_config(handlers: &HandlerConfig) -> RuntimeConfig {
    let defaults = RuntimeConfig::default();
    RuntimeConfig {
        deadline: handlers.deadline(),
        memory_limit_bytes: handlers.memory_limit_mib * 1024 * 1024,
        max_concurrent: match handlers.max_concurrent {
            0 => defaults.max_concurrent,
            n => n,
        },
        max_concurrent_per_module: handlers.max_concurrent_per_module,
        ..defaults
    }
}

/// Every route's policy, by route name.
pub fn route_policies(config: &Config) -> HashMap<String, RoutePolicy> {
    config
        .routes
        .iter()
        .map(|r| (r.name.clone(), route_policy(config, r)))
        .collect()
}

/// `route`'s policy; its time to live is the shorter of the route's and its link's.
fn route_policy(config: &Config, route: &RouteConfig) -> RoutePolicy {
    RoutePolicy {
        retry: route.retry.clone(),
        deadline: route.deadline_ms.map(Duration::from_millis),
        ttl: config.ttl_of(route),
        payload: route.payload,
        on_quarantine: route.on_quarantine,
        memory_limit_bytes: route.memory_limit_mib.map(|m| m * 1024 * 1024),
        max_outputs: route.max_outputs,
        max_output_bytes: route.max_output_bytes,
        max_concurrent: route.max_concurrent,
    }
}

/// The local link's configuration, when the geography sends events without a location to
/// the gateway's own broker.
fn local_link(gateway_id: &str, geo: &GeoPlan) -> Option<UpstreamConfig> {
    (geo.residency && geo.no_location == NoLocation::LocalOnly).then(|| UpstreamConfig {
        name: LOCAL_LINK.to_string(),
        // Not dialled: the link reaches the broker in process; the name is what logs and
        // metrics show.
        url: "mqtt://in-process:1883".to_string(),
        client_id: Some(format!("outpost-{gateway_id}-local")),
        protocol: MqttVersion::V5,
        regions: vec!["*".to_string()],
        ..UpstreamConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::from_toml(text, Path::new("test.toml")).expect("parses")
    }

    const ONE_ROUTE: &str = r#"
        [[upstream]]
        name = "cloud"
        url = "mqtt://127.0.0.1:1"
        ttl_secs = 60
        [[route]]
        name = "r"
        filter = "t/#"
    "#;

    #[test]
    fn a_plan_holds_the_compiled_configuration() {
        let plan = Plan::new(config(ONE_ROUTE)).expect("plans");
        assert_eq!(plan.routes.routes().len(), 1);
        assert_eq!(plan.links.len(), 1);
        assert_eq!(plan.links[0].config.name, "cloud");
        assert!(plan.local_link.is_none());
        assert_eq!(plan.policies["r"].ttl, Some(Duration::from_secs(60)));
        assert_eq!(
            plan.breaker,
            BreakerSettings {
                failures: 10,
                cooldown: Duration::from_millis(30_000)
            }
        );
        // By default module requests also come from the upstreams, for this gateway only.
        assert_eq!(plan.control.upstream_bases, [deploy::base("outpost")]);
        assert_eq!(plan.control.metrics_interval, Some(Duration::from_secs(10)));
    }

    #[test]
    fn errors_come_in_order_with_their_own_text() {
        // A bad value and a missing credential file: the value's error, as `check` says it.
        let text = ONE_ROUTE.replace(
            "ttl_secs = 60",
            "ttl_secs = 60\ninflight = 0\nusername = \"u\"\npassword_file = \"/nonexistent/p\"",
        );
        let err = Plan::new(config(&text)).err().expect("refused");
        assert_eq!(
            err.to_string(),
            config(&text).check().unwrap_err().to_string()
        );
        assert!(err.to_string().contains("inflight"), "{err}");
        // Then the credential file, naming the key.
        let text = text.replace("inflight = 0\n", "");
        let err = Plan::new(config(&text)).err().expect("refused");
        assert!(matches!(err, PlanError::Credentials(_)), "{err:?}");
        assert!(err.to_string().contains("password_file"), "{err}");
        // A route table that does not compile comes before any file.
        let text = text.replace("\"t/#\"", "\"t/#/x\"");
        let err = Plan::new(config(&text)).err().expect("refused");
        assert!(err.to_string().starts_with("route:"), "{err}");
    }

    #[test]
    fn the_local_link_exists_only_for_local_only_residency() {
        let regions = r#"
            [[geofence]]
            name = "c"
            center = [0.0, 0.0]
            radius_m = 10.0
            [[region]]
            name = "here"
            fences = ["c"]
        "#;
        let plan = Plan::new(config(&format!("{ONE_ROUTE}{regions}"))).expect("plans");
        let local = plan.local_link.expect("a local link");
        assert_eq!(local.name, LOCAL_LINK);
        assert_eq!(local.client_id.as_deref(), Some("outpost-outpost-local"));
        assert_eq!(local.regions, ["*"]);
        let dead = format!("{ONE_ROUTE}{regions}\n[geography]\nno_location = \"dead-letter\"\n");
        assert!(Plan::new(config(&dead))
            .expect("plans")
            .local_link
            .is_none());
    }

    #[test]
    fn module_topics_from_upstreams_follow_the_deploy_settings() {
        let off = format!("{ONE_ROUTE}\n[deploy]\nvia_upstream = false\n");
        let plan = Plan::new(config(&off)).expect("plans");
        assert!(plan.control.upstream_bases.is_empty());
        let text = format!(
            "{ONE_ROUTE}\n[deploy]\nvia_upstream = true\ngroups = [\"a\", \"b\"]\nfleet_prefix = \"f\"\n"
        );
        let plan = Plan::new(config(&text)).expect("plans");
        let id = &plan.config.gateway_id;
        assert_eq!(
            plan.control.upstream_bases,
            [
                deploy::base(id),
                deploy::fleet_base("f", "a"),
                deploy::fleet_base("f", "b")
            ]
        );
    }

    #[test]
    fn an_open_network_listener_without_access_control_is_a_warning() {
        let open =
            format!("{ONE_ROUTE}\n[broker]\nlisten = [\"0.0.0.0:1883\"]\nallow_anonymous = true\n");
        let plan = Plan::new(config(&open)).expect("plans");
        let warnings = plan.warnings(SystemTime::now());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("0.0.0.0:1883"), "{warnings:?}");
        let admins = open.replace("allow_anonymous", "admins = [\"ops\"]\nallow_anonymous");
        let plan = Plan::new(config(&admins)).expect("plans");
        assert!(plan.warnings(SystemTime::now()).is_empty());
    }

    proptest! {
        #[test]
        fn route_policies_carry_every_route_setting(
            mib in proptest::option::of(1usize..64),
            deadline in proptest::option::of(1u64..600_000),
            route_ttl in 0u64..1000,
            link_ttl in 0u64..1000,
        ) {
            let mut config = config(ONE_ROUTE);
            config.upstreams[0].ttl_secs = link_ttl;
            let route = &mut config.routes[0];
            route.memory_limit_mib = mib;
            route.deadline_ms = deadline;
            route.ttl_secs = route_ttl;
            let policies = route_policies(&config);
            let policy = &policies["r"];
            prop_assert_eq!(policy.memory_limit_bytes, mib.map(|m| m << 20));
            prop_assert_eq!(policy.deadline, deadline.map(Duration::from_millis));
            let shorter = [route_ttl, link_ttl].into_iter().filter(|&s| s > 0).min();
            prop_assert_eq!(policy.ttl, shorter.map(Duration::from_secs));
        }

        #[test]
        fn the_runtime_gets_the_handler_settings(
            deadline_ms in 1u64..600_000,
            mib in 1usize..4096,
            max_concurrent in 0usize..64,
            per_module in 1usize..16,
        ) {
            let handlers = HandlerConfig {
                deadline_ms,
                memory_limit_mib: mib,
                max_concurrent,
                max_concurrent_per_module: per_module,
                ..HandlerConfig::default()
            };
            let runtime = runtime_config(&handlers);
            let defaults = RuntimeConfig::default();
            prop_assert_eq!(runtime.deadline, Duration::from_millis(deadline_ms));
            prop_assert_eq!(runtime.memory_limit_bytes, mib << 20);
            prop_assert_eq!(runtime.max_concurrent_per_module, per_module);
            let expected = if max_concurrent == 0 { defaults.max_concurrent } else { max_concurrent };
            prop_assert_eq!(runtime.max_concurrent, expected);
            prop_assert_eq!(runtime.max_outputs, defaults.max_outputs);
            prop_assert_eq!(runtime.meter_fuel, defaults.meter_fuel);
        }
    }
}
