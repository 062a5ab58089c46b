//! Starts the stages of a [`Plan`] (edge -> journal -> pipeline -> outbox -> uplinks) and owns
//! their lifecycle.
//!
//! [`Gateway::start`] either returns a running gateway or a clear error (bad configuration,
//! unusable data directory, a module that does not load, a port in use); it never leaves half
//! a gateway running: a start that fails stops what it had started, on the same path as
//! [`Gateway::shutdown`]. The stages start in the order links, pipeline, journal, edge, and
//! stop in reverse: [`Gateway::shutdown`] stops the listeners first, lets the journal commit
//! what it was given and the pipeline move the journal to the outbox, then stops the uplinks:
//! rows not yet acknowledged by an upstream stay in the outbox for the next start.
//! The dead-letter control plane ([`Control`]) answers on the embedded broker from start-up
//! until shutdown.
//!
//! This module does not check or compile the configuration ([`crate::plan`] does), nor
//! decide what any stage does with an event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{BrokerConfig, Config, UpstreamConfig};
use crate::control::dead_letters::{self as control, Control};
use crate::control::modules::RemoteRequest;
use crate::control::modules::{self as deploy, ModuleControl};
use crate::edge::acl::Acl;
use crate::edge::auth::Authenticator;
use crate::edge::tls::DeviceTls;
use crate::edge::Edge;
use crate::geo::locator::{GeoPlan, Locator, LOCAL_LINK};
use crate::handlers::breaker::Breaker;
use crate::handlers::registry::Registry;
use crate::handlers::runtime::{Runtime, RuntimeConfig};
use crate::journal::{Journal, JournalThread};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineParts, RoutePolicy};
use crate::plan::{BreakerSettings, ControlPlan, EdgeFiles, LinkPlan, Plan};
use crate::routing::RouteTable;
use crate::shutdown::{Shutdown, Trigger};
use crate::signing::VerifyingKey;
use crate::store::Store;
use crate::uplink::credentials::Credentials;
use crate::uplink::{Uplink, UplinkControl};

/// A running gateway.
pub struct Gateway {
    /// Counters of everything the gateway did.
    pub metrics: Arc<Metrics>,
    /// The database.
    pub store: Arc<Store>,
    stages: Stages,
    reloads: watch::Sender<u64>,
}

impl Gateway {
    /// Plans the configuration ([`Plan::new`]: checks it and reads its files), then starts
    /// it as [`Gateway::start_planned`] does. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        Gateway::start_planned(Plan::new(config)?).await
    }

    /// Opens the database, loads the handler modules, connects the uplinks and opens the
    /// listeners of `plan`. Must be called inside a tokio runtime.
    pub async fn start_planned(plan: Plan) -> anyhow::Result<Gateway> {
        for link in &plan.links {
            for warning in link.credentials.warnings(SystemTime::now()) {
                warn!(link = %link.config.name, "{warning}");
            }
        }
        let (reloads, _) = watch::channel(0u64);
        let mut stages = Stages::default();
        match stages.start(plan, &reloads).await {
            Ok(core) => Ok(Gateway {
                metrics: core.metrics,
                store: core.store,
                stages,
                reloads,
            }),
            Err(e) => {
                stages.stop(Ending::Abandon).await;
                Err(e)
            }
        }
    }

    /// Re-reads every uplink's credential files (TLS certificates, keys, CA, password files),
    /// and the broker's password, ACL and TLS files; what `SIGHUP` does. A link whose files
    /// changed and load reconnects with them; one whose new files do not load keeps its old
    /// ones and says why.
    pub fn reload(&self) {
        self.reloads.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stops accepting publishes, commits what was received, moves the journal to the outbox,
    /// and disconnects the uplinks.
    pub async fn shutdown(self) {
        self.stages.stop(Ending::Drain).await;
        info!("gateway stopped");
    }
}

/// What the stages share, made before any of them runs.
struct Core {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    breaker: Arc<Breaker>,
    locator: Arc<Locator>,
}

impl Core {
    /// Opens the database, reads the device registry and loads the handler modules.
    async fn open(
        config: &Config,
        geo: GeoPlan,
        runtime: RuntimeConfig,
        breaker: BreakerSettings,
        trusted_keys: Vec<VerifyingKey>,
    ) -> anyhow::Result<Core> {
        let store = Arc::new(Store::open_with(&config.data_dir, config.store.limits())?);
        let locator = Arc::new(Locator::new(
            Arc::new(geo),
            &config.gateway_id,
            store
                .device_positions()
                .context("cannot read the device registry")?,
        ));
        let metrics = Arc::new(Metrics::default());
        let runtime =
            Runtime::new(runtime, store.clone()).context("cannot start the WebAssembly runtime")?;
        let breaker = Arc::new(Breaker::new(breaker.failures, breaker.cooldown));
        let registry = {
            let (store, metrics, breaker) = (store.clone(), metrics.clone(), breaker.clone());
            let modules = config.modules.clone();
            let max_module_bytes = config.deploy.max_module_bytes;
            tokio::task::spawn_blocking(move || {
                Registry::load(
                    runtime,
                    store,
                    metrics,
                    breaker,
                    &modules,
                    trusted_keys,
                    max_module_bytes,
                )
            })
            .await
            .context("module loading failed")??
        };
        Ok(Core {
            store,
            metrics,
            registry: Arc::new(registry),
            breaker,
            locator,
        })
    }
}

/// The module control plane, and what the uplinks need to hand it upstream requests.
fn module_control(
    config: &Config,
    plan: ControlPlan,
    core: &Core,
) -> (
    ModuleControl,
    Option<UplinkControl>,
    mpsc::Receiver<RemoteRequest>,
) {
    let module_control = ModuleControl {
        gateway_id: config.gateway_id.clone(),
        registry: core.registry.clone(),
        metrics: core.metrics.clone(),
        upstream_bases: plan.upstream_bases,
        metrics_interval: plan.metrics_interval,
    };
    let (remote_tx, remote_rx) = mpsc::channel(deploy::REMOTE_QUEUE);
    let uplink_control = (!module_control.upstream_bases.is_empty()).then(|| UplinkControl {
        filters: module_control.upstream_filters(),
        requests: remote_tx,
        max_packet: plan.max_remote_packet,
    });
    (module_control, uplink_control, remote_rx)
}

/// How the stages end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A shutdown: the pipeline moves the whole journal to the outbox before the links stop.
    Drain,
    /// A start that failed: the pipeline stops at once; the journal stays for the next start.
    Abandon,
}

/// The running stages, in the order they start. Each is there once it runs;
/// [`Stages::stop`] stops those that are, in reverse order.
#[derive(Default)]
struct Stages {
    links: Links,
    pipeline: Option<PipelineStage>,
    journal: Option<JournalThread>,
    edge: Option<EdgeStage>,
}

/// The uplinks (the local one included) and the watchers of the files the operator may
/// change: the first to start and the last to stop, so that what the pipeline committed last
/// can still leave.
#[derive(Default)]
struct Links {
    stop: Trigger,
    tasks: Vec<JoinHandle<()>>,
}

/// The pipeline's task, which finishes once its trigger fires.
struct PipelineStage {
    finish: Trigger,
    task: JoinHandle<()>,
}

/// The broker and its listeners, with the control planes answering on it.
struct EdgeStage {
    edge: Edge,
    controls: Vec<JoinHandle<()>>,
}

/// How the broker lets devices in: logins, TLS, and the ACL with its file.
struct Access {
    auth: Authenticator,
    tls: Option<DeviceTls>,
    acl: Option<(PathBuf, Acl)>,
}

impl Stages {
    /// Starts every stage of `plan`, in order; on an error, what started is in `self`.
    async fn start(&mut self, plan: Plan, reloads: &watch::Sender<u64>) -> anyhow::Result<Core> {
        let Plan {
            config,
            routes,
            geo,
            policies,
            runtime,
            breaker,
            trusted_keys,
            links,
            local_link,
            edge_files,
            control,
        } = plan;
        let core = Core::open(&config, geo, runtime, breaker, trusted_keys).await?;
        let (module_control, uplink_control, requests) = module_control(&config, control, &core);
        let mut wakes = HashMap::new();
        for link in links {
            let name = link.config.name.clone();
            let wake = self
                .links
                .start_uplink(link, &config, &core, &uplink_control, reloads);
            wakes.insert(name, wake);
        }
        let access = self
            .links
            .watch_edge_files(edge_files, &config.broker, reloads);
        // Notified after every journal commit: the pipeline's wake-up.
        let committed = Arc::new(Notify::new());
        // Outputs of `local-only` events: a link to the gateway's own broker, started once
        // the broker is up.
        let local_link = local_link.map(|local| {
            let wake = Arc::new(Notify::new());
            wakes.insert(LOCAL_LINK.to_string(), wake.clone());
            (local, wake)
        });
        let dead_letters = Control {
            gateway_id: config.gateway_id.clone(),
            store: core.store.clone(),
            pipeline: committed.clone(),
            uplinks: wakes.values().cloned().collect(),
        };
        // The pipeline starts before the journal, so that it stops after it.
        self.start_pipeline(&config, &core, routes, policies, wakes, &committed);
        let (journal, thread) = Journal::start(
            &core.store,
            committed,
            core.metrics.clone(),
            config.broker.max_unjournaled_bytes,
        )?;
        self.journal = Some(thread);
        let shutdown = self.links.stop.subscribe();
        let edge = EdgeStage::start(&config, journal, &core, access, reloads, shutdown).await?;
        let edge = self.edge.insert(edge);
        edge.start_controls(dead_letters, module_control, requests)
            .await?;
        if let Some((local, wake)) = local_link {
            self.links
                .start_local(local, &config, &core, wake, &edge.edge);
        }
        // Devices are served only now that every control topic is listened to.
        edge.edge.open();
        info!(
            gateway = %config.gateway_id,
            data = %config.data_dir.display(),
            listen = ?config.broker.listen,
            "gateway running"
        );
        Ok(core)
    }

    /// Starts the pipeline on the planned routes and policies; it processes what a previous
    /// run left in the journal at once, then each commit (`committed` is notified).
    fn start_pipeline(
        &mut self,
        config: &Config,
        core: &Core,
        routes: RouteTable,
        policies: HashMap<String, RoutePolicy>,
        wakes: HashMap<String, Arc<Notify>>,
        committed: &Arc<Notify>,
    ) {
        let finish = Trigger::new();
        let pipeline = Pipeline::new(PipelineParts {
            routes: Arc::new(routes),
            policies,
            registry: core.registry.clone(),
            store: core.store.clone(),
            wakes,
            metrics: core.metrics.clone(),
            gateway_id: config.gateway_id.clone(),
            max_batch: config.handlers.max_batch,
            max_concurrent_per_module: config.handlers.max_concurrent_per_module,
            breaker: core.breaker.clone(),
            locator: core.locator.clone(),
        });
        let finish_rx = finish.subscribe();
        let task = tokio::spawn(pipeline.run(committed.clone(), finish_rx));
        self.pipeline = Some(PipelineStage { finish, task });
    }

    /// Stops the running stages in reverse order of their start: the listeners (and the
    /// control planes), the journal once it committed what it was given, the pipeline (which
    /// first moves the journal to the outbox, unless the start is abandoned), then the links.
    async fn stop(self, ending: Ending) {
        let Stages {
            links,
            pipeline,
            journal,
            mut edge,
        } = self;
        if let Some(edge) = &mut edge {
            edge.edge.stop();
            for control in &edge.controls {
                control.abort();
            }
        }
        // The edge's connections held the only journal handles; once they are gone the journal
        // thread commits what it has and ends.
        if let Some(journal) = journal {
            let _ = tokio::task::spawn_blocking(move || journal.join()).await;
        }
        if let Some(pipeline) = pipeline {
            pipeline.finish.fire();
            if ending == Ending::Abandon {
                pipeline.task.abort();
            }
            let _ = pipeline.task.await;
        }
        links.stop.fire();
        for task in links.tasks {
            let _ = task.await;
        }
        // The local link reaches the broker through the edge, which therefore goes last.
        drop(edge);
    }
}

impl Links {
    /// Starts `link`'s uplink and the watcher of its credential files; returns its wake-up.
    fn start_uplink(
        &mut self,
        link: LinkPlan,
        config: &Config,
        core: &Core,
        control: &Option<UplinkControl>,
        reloads: &watch::Sender<u64>,
    ) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        core.metrics.set_link_connected(&link.config.name, false);
        let (credentials, watcher) = crate::uplink::reload::watch(
            link.config.clone(),
            link.credentials,
            reloads.subscribe(),
            core.metrics.clone(),
            self.stop.subscribe(),
        );
        self.tasks.push(watcher);
        let uplink = Uplink {
            config: link.config,
            gateway_id: config.gateway_id.clone(),
            store: core.store.clone(),
            wake: wake.clone(),
            metrics: core.metrics.clone(),
            control: control.clone(),
            credentials,
            dial: None,
        };
        self.tasks
            .push(tokio::spawn(uplink.run(self.stop.subscribe())));
        wake
    }

    /// Starts the local link: the outputs of `local-only` events, published on `edge`'s
    /// broker in process.
    fn start_local(
        &mut self,
        local: UpstreamConfig,
        config: &Config,
        core: &Core,
        wake: Arc<Notify>,
        edge: &Edge,
    ) {
        core.metrics.set_link_connected(LOCAL_LINK, false);
        // Plain TCP on loopback, no files: nothing to reload.
        let credentials = watch::channel(Arc::new(Credentials::none())).1;
        let local = Uplink {
            config: local,
            gateway_id: config.gateway_id.clone(),
            store: core.store.clone(),
            wake,
            metrics: core.metrics.clone(),
            control: None,
            credentials,
            dial: Some(edge.local_dialer()),
        };
        self.tasks
            .push(tokio::spawn(local.run(self.stop.subscribe())));
    }

    /// Serves the broker's password and TLS files as planned, each read again when it changes
    /// or on a reload; the ACL is handed on to [`Edge::enforce_access`].
    fn watch_edge_files(
        &mut self,
        files: EdgeFiles,
        broker: &BrokerConfig,
        reloads: &watch::Sender<u64>,
    ) -> Access {
        let passwords = files.passwords.map(|(path, file)| {
            let (passwords, watcher) = crate::edge::auth::watch_password_file(
                path,
                file,
                reloads.subscribe(),
                self.stop.subscribe(),
            );
            self.tasks.push(watcher);
            passwords
        });
        let tls = files.tls.map(|(tls, files)| {
            let (files, watcher) = crate::edge::tls::watch_tls_files(
                tls.clone(),
                files,
                reloads.subscribe(),
                self.stop.subscribe(),
            );
            self.tasks.push(watcher);
            // The handshake gets the CONNECT's deadline, and the CONNECT its own after it.
            let deadline = std::time::Duration::from_millis(u64::from(broker.connect_timeout_ms));
            DeviceTls::new(&tls, files, deadline)
        });
        Access {
            auth: Authenticator::new(passwords, broker.anonymous_allowed()),
            tls,
            acl: files.acl,
        }
    }
}

impl EdgeStage {
    /// Starts the broker on the journal, with the access rules in force (the ACL file is
    /// watched until `shutdown`); its listeners open only with [`Edge::open`].
    async fn start(
        config: &Config,
        journal: Journal,
        core: &Core,
        access: Access,
        reloads: &watch::Sender<u64>,
        shutdown: Shutdown,
    ) -> anyhow::Result<EdgeStage> {
        let mut edge = Edge::start_durable(
            &config.broker,
            &config.data_dir,
            journal,
            core.metrics.clone(),
            access.auth,
            access.tls,
        )
        .await?;
        // Before the listeners open: no device is ever served without the rules.
        edge.enforce_access(
            &config.gateway_id,
            &config.broker.admins,
            access.acl,
            reloads.subscribe(),
            shutdown,
        );
        Ok(EdgeStage {
            edge,
            controls: Vec::new(),
        })
    }

    /// Starts the dead-letter and the module control planes on the broker, each on a link of
    /// its own; each is in `controls` once it runs.
    async fn start_controls(
        &mut self,
        dead_letters: Control,
        modules: ModuleControl,
        requests: mpsc::Receiver<RemoteRequest>,
    ) -> anyhow::Result<()> {
        let link = self.edge.local_link(control::CLIENT_ID)?;
        self.controls.push(dead_letters.start(link).await?);
        let link = self.edge.local_link(deploy::CLIENT_ID)?;
        self.controls.push(modules.start(link, requests).await?);
        Ok(())
    }
}
