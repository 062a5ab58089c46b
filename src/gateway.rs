//! Wires the stages together (edge -> journal -> pipeline -> outbox -> uplinks) and owns their
//! lifecycle.
//!
//! [`Gateway::start`] either returns a running gateway or a clear error (bad configuration,
//! unusable data directory, a module that does not load, a port in use); it never leaves half
//! a gateway running. [`Gateway::shutdown`] stops the listeners first, lets the journal commit
//! what it was given and the pipeline move the journal to the outbox, then stops the uplinks:
//! rows not yet acknowledged by an upstream stay in the outbox for the next start.
//! The dead-letter control plane ([`Control`]) answers on the embedded broker from start-up
//! until shutdown.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::Config;
use crate::control::dead_letters::{self as control, Control};
use crate::control::modules::{self as deploy, ModuleControl};
use crate::edge::auth::Authenticator;
use crate::edge::Edge;
use crate::handlers::registry::Registry;
use crate::handlers::runtime::{Runtime, RuntimeConfig};
use crate::journal::{Journal, JournalThread};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineParts, RoutePolicy};
use crate::store::Store;
use crate::uplink::{Uplink, UplinkControl};

/// A running gateway.
pub struct Gateway {
    /// Counters of everything the gateway did.
    pub metrics: Arc<Metrics>,
    /// The database.
    pub store: Arc<Store>,
    edge: Edge,
    journal: JournalThread,
    control: JoinHandle<()>,
    module_control: JoinHandle<()>,
    pipeline: JoinHandle<()>,
    finish_pipeline: watch::Sender<bool>,
    uplinks: Vec<JoinHandle<()>>,
    stop_uplinks: watch::Sender<bool>,
    reloads: watch::Sender<u64>,
}

impl Gateway {
    /// Validates the configuration, opens the database, loads the handler modules, connects
    /// the uplinks and opens the listeners. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let validated = config.validate()?;
        // The uplinks' credentials first: a missing or bad certificate, key or password file
        // fails the start before anything runs, with the key and the file in the message.
        let mut credentials = Vec::new();
        for upstream in &config.upstreams {
            let loaded = crate::uplink::credentials::load(upstream)?;
            for warning in loaded.warnings(std::time::SystemTime::now()) {
                tracing::warn!(link = %upstream.name, "{warning}");
            }
            credentials.push(loaded);
        }
        // The broker's password and ACL files: likewise, before anything runs.
        let passwords = match &config.broker.password_file {
            Some(path) => Some((path.clone(), crate::edge::auth::load_password_file(path)?)),
            None => None,
        };
        let acl = match &config.broker.acl_file {
            Some(path) => Some((path.clone(), crate::edge::auth::load_acl_file(path)?)),
            None => None,
        };
        // The device listeners' TLS files: likewise.
        let device_tls = match &config.broker.tls {
            Some(tls) => Some((tls.clone(), crate::edge::tls::load(tls)?)),
            None => None,
        };
        let routes = Arc::new(validated.routes);
        let store = Arc::new(Store::open_with(&config.data_dir, config.store.limits())?);
        let geo = Arc::new(validated.geo);
        let local_link =
            geo.residency && geo.no_location == crate::geo::locator::NoLocation::LocalOnly;
        let locator = Arc::new(crate::geo::locator::Locator::new(
            geo,
            &config.gateway_id,
            store
                .device_positions()
                .context("cannot read the device registry")?,
        ));
        let metrics = Arc::new(Metrics::default());

        let defaults = RuntimeConfig::default();
        let runtime = Runtime::new(
            RuntimeConfig {
                deadline: config.handlers.deadline(),
                memory_limit_bytes: config.handlers.memory_limit_mib * 1024 * 1024,
                max_concurrent: match config.handlers.max_concurrent {
                    0 => defaults.max_concurrent,
                    n => n,
                },
                max_concurrent_per_module: config.handlers.max_concurrent_per_module,
                ..defaults
            },
            store.clone(),
        )
        .context("cannot start the WebAssembly runtime")?;
        let breaker = Arc::new(crate::handlers::breaker::Breaker::new(
            config.handlers.breaker_failures,
            std::time::Duration::from_millis(config.handlers.breaker_cooldown_ms),
        ));
        let registry = {
            let (store, metrics, breaker) = (store.clone(), metrics.clone(), breaker.clone());
            let modules = config.modules.clone();
            let trusted = config.trusted_keys()?;
            let max_module_bytes = config.deploy.max_module_bytes;
            tokio::task::spawn_blocking(move || {
                Registry::load(
                    runtime,
                    store,
                    metrics,
                    breaker,
                    &modules,
                    trusted,
                    max_module_bytes,
                )
            })
            .await
            .context("module loading failed")??
        };
        let registry = Arc::new(registry);

        let mut upstream_bases = Vec::new();
        if config.deploy.via_upstream {
            upstream_bases.push(deploy::base(&config.gateway_id));
            for group in &config.deploy.groups {
                upstream_bases.push(deploy::fleet_base(&config.deploy.fleet_prefix, group));
            }
        }
        let module_control = ModuleControl {
            gateway_id: config.gateway_id.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            upstream_bases,
            metrics_interval: match config.handlers.metrics_interval_ms {
                0 => None,
                ms => Some(std::time::Duration::from_millis(ms)),
            },
        };
        let (remote_tx, remote_rx) = tokio::sync::mpsc::channel(deploy::REMOTE_QUEUE);
        let uplink_control = (!module_control.upstream_bases.is_empty()).then(|| UplinkControl {
            filters: module_control.upstream_filters(),
            requests: remote_tx.clone(),
            max_packet: config.deploy.max_module_bytes as usize
                + crate::signing::MAX_HEADER_BYTES
                + 64 * 1024,
        });
        drop(remote_tx);

        let (stop_uplinks, stop_rx) = watch::channel(false);
        let (reloads, reload_rx) = watch::channel(0u64);
        let mut wakes = HashMap::new();
        let mut uplinks = Vec::new();
        for (upstream, credentials) in config.upstreams.iter().zip(credentials) {
            let wake = Arc::new(Notify::new());
            wakes.insert(upstream.name.clone(), wake.clone());
            metrics.set_link_connected(&upstream.name, false);
            let (credentials, watcher) = crate::uplink::reload::watch(
                upstream.clone(),
                credentials,
                reload_rx.clone(),
                metrics.clone(),
                stop_rx.clone(),
            );
            uplinks.push(watcher);
            let uplink = Uplink {
                config: upstream.clone(),
                gateway_id: config.gateway_id.clone(),
                store: store.clone(),
                wake,
                metrics: metrics.clone(),
                control: uplink_control.clone(),
                credentials,
                dial: None,
            };
            uplinks.push(tokio::spawn(uplink.run(stop_rx.clone())));
        }
        let passwords = passwords.map(|(path, file)| {
            let (passwords, watcher) = crate::edge::auth::watch_password_file(
                path,
                file,
                reload_rx.clone(),
                stop_rx.clone(),
            );
            uplinks.push(watcher);
            passwords
        });
        let auth = Authenticator::new(passwords, config.broker.anonymous_allowed());
        let device_tls = device_tls.map(|(tls, files)| {
            let (files, watcher) = crate::edge::tls::watch_tls_files(
                tls.clone(),
                files,
                reload_rx.clone(),
                stop_rx.clone(),
            );
            uplinks.push(watcher);
            // The handshake gets the CONNECT's deadline, and the CONNECT its own after it.
            let deadline =
                std::time::Duration::from_millis(u64::from(config.broker.connect_timeout_ms));
            crate::edge::tls::DeviceTls::new(&tls, files, deadline)
        });

        // Outputs of `local-only` events: a link to the gateway's own broker, started once
        // the broker is up.
        let local_wake = local_link.then(|| {
            let wake = Arc::new(Notify::new());
            wakes.insert(crate::geo::locator::LOCAL_LINK.to_string(), wake.clone());
            wake
        });
        let uplink_wakes: Vec<Arc<Notify>> = wakes.values().cloned().collect();
        let committed = Arc::new(Notify::new());
        let (journal, journal_thread) = Journal::start(
            &store,
            committed.clone(),
            metrics.clone(),
            config.broker.max_unjournaled_bytes,
        )?;
        let (finish_pipeline, finish_rx) = watch::channel(false);
        let policies = config
            .routes
            .iter()
            .map(|r| {
                let policy = RoutePolicy {
                    retry: r.retry.clone(),
                    deadline: r.deadline_ms.map(std::time::Duration::from_millis),
                    ttl: config.ttl_of(r),
                    payload: r.payload,
                    on_quarantine: r.on_quarantine,
                    memory_limit_bytes: r.memory_limit_mib.map(|m| m * 1024 * 1024),
                    max_outputs: r.max_outputs,
                    max_output_bytes: r.max_output_bytes,
                    max_concurrent: r.max_concurrent,
                };
                (r.name.clone(), policy)
            })
            .collect();
        let pipeline = Pipeline::new(PipelineParts {
            routes,
            policies,
            registry,
            store: store.clone(),
            wakes,
            metrics: metrics.clone(),
            gateway_id: config.gateway_id.clone(),
            max_batch: config.handlers.max_batch,
            max_concurrent_per_module: config.handlers.max_concurrent_per_module,
            breaker,
            locator,
        });
        let pipeline = tokio::spawn(pipeline.run(committed.clone(), finish_rx));

        let mut edge = match Edge::start_durable(
            &config.broker,
            &config.data_dir,
            journal,
            metrics.clone(),
            auth,
            device_tls,
        )
        .await
        {
            Ok(edge) => edge,
            Err(e) => {
                let _ = stop_uplinks.send(true);
                let _ = finish_pipeline.send(true);
                pipeline.abort();
                return Err(e.into());
            }
        };
        // Before the listeners open: no device is ever served without the rules.
        edge.enforce_access(
            &config.gateway_id,
            &config.broker.admins,
            acl,
            reload_rx.clone(),
            stop_rx.clone(),
        );
        let control = Control {
            gateway_id: config.gateway_id.clone(),
            store: store.clone(),
            pipeline: committed,
            uplinks: uplink_wakes,
        };
        let control = match edge.local_link(control::CLIENT_ID) {
            Ok(link) => control.start(link).await.map_err(Into::into),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        let module_control = match (control, edge.local_link(deploy::CLIENT_ID)) {
            (Ok(control), Ok(link)) => match module_control.start(link, remote_rx).await {
                Ok(task) => Ok((control, task)),
                Err(e) => {
                    control.abort();
                    Err(e)
                }
            },
            (Ok(control), Err(e)) => {
                control.abort();
                Err(anyhow::Error::from(e))
            }
            (Err(e), _) => Err(e),
        };
        let (control, module_control) = match module_control {
            Ok(tasks) => tasks,
            Err(e) => {
                edge.stop();
                let _ = stop_uplinks.send(true);
                let _ = finish_pipeline.send(true);
                pipeline.abort();
                return Err(e);
            }
        };
        let mut uplinks = uplinks;
        if let Some(wake) = local_wake {
            metrics.set_link_connected(crate::geo::locator::LOCAL_LINK, false);
            let local_config = crate::config::UpstreamConfig {
                name: crate::geo::locator::LOCAL_LINK.to_string(),
                // Not dialled: the link reaches the broker in process (`dial` below); the
                // name is what logs and metrics show.
                url: "mqtt://in-process:1883".to_string(),
                client_id: Some(format!("outpost-{}-local", config.gateway_id)),
                protocol: crate::config::MqttVersion::V5,
                regions: vec!["*".to_string()],
                ..crate::config::UpstreamConfig::default()
            };
            // Plain TCP on loopback, no files: nothing to reload.
            let local_credentials = crate::uplink::credentials::Credentials::none();
            let local = Uplink {
                config: local_config,
                gateway_id: config.gateway_id.clone(),
                store: store.clone(),
                wake,
                metrics: metrics.clone(),
                control: None,
                credentials: watch::channel(Arc::new(local_credentials)).1,
                dial: Some(edge.local_dialer()),
            };
            uplinks.push(tokio::spawn(local.run(stop_rx.clone())));
        }
        // Devices are served only now that every control topic is listened to.
        edge.open();
        info!(
            gateway = %config.gateway_id,
            data = %config.data_dir.display(),
            listen = ?config.broker.listen,
            "gateway running"
        );
        Ok(Gateway {
            metrics,
            store,
            edge,
            journal: journal_thread,
            control,
            module_control,
            pipeline,
            finish_pipeline,
            uplinks,
            stop_uplinks,
            reloads,
        })
    }

    /// Re-reads every uplink's credential files (TLS certificates, keys, CA, password files),
    /// and the broker's password file and TLS files; what `SIGHUP` does. A link whose files changed and load reconnects with them; one whose
    /// new files do not load keeps its old ones and says why.
    pub fn reload(&self) {
        self.reloads.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stops accepting publishes, commits what was received, moves the journal to the outbox,
    /// and disconnects the uplinks.
    pub async fn shutdown(mut self) {
        self.edge.stop();
        self.control.abort();
        self.module_control.abort();
        // The edge's connections held the only journal handles; once they are gone the journal
        // thread commits what it has and ends.
        let journal = self.journal;
        let _ = tokio::task::spawn_blocking(move || journal.join()).await;
        let _ = self.finish_pipeline.send(true);
        let _ = self.pipeline.await;
        let _ = self.stop_uplinks.send(true);
        for uplink in self.uplinks {
            let _ = uplink.await;
        }
        info!("gateway stopped");
    }
}
