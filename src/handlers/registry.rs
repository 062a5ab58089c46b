//! The registry of handler modules: which [`Handler`] each module name runs now, where it came
//! from, and the operations that change it (deploy, rollback, remove).
//!
//! A module name gets its handler from one of two places: a file listed in the configuration
//! (`[[module]] path`, loaded at start), or a signed deploy (kept in the database with its
//! precompiled artifact). A deployed version takes precedence over the file; removing it falls
//! back to the file, if there is one.
//!
//! Guarantees:
//! - Only signed code is activated: a deploy, rollback or remove is applied only after its
//!   signature verified under one of the configured trusted keys (invariant 7); a deploy must
//!   also be signed for the name it is deployed as, be within the size limit, and be a
//!   component of the handler world. Every refusal has a reason.
//! - Requests for a name apply in the order they were signed: a deploy, rollback or remove is
//!   refused as stale unless it was issued after every one accepted for that name, so a
//!   captured request (say, the deploy of a version with a known flaw) cannot be replayed. A
//!   deploy of the bytes that are already active is answered `unchanged` whatever its issue
//!   time, so an MQTT redelivery or a retained deploy seen again at a reconnect is harmless.
//! - Activation is atomic: the database is changed first (one transaction), then the name is
//!   pointed at the new handler. An invocation that already holds the old handler finishes on
//!   it; every later lookup gets the new one. A crash in between leaves the database's state,
//!   which the next start loads.
//! - A restart does not compile a deployed module again when its artifact was made by the same
//!   runtime ([`Runtime::artifact_key`]); otherwise it compiles once and stores the new artifact.
//! - A deployed module that cannot be loaded at start (say, a wasmtime upgrade refuses it) does
//!   not stop the gateway: it is logged, and the name falls back to its file, if any.
//!
//! The registry does no networking and renders nothing: the control plane
//! ([`crate::control::modules`]) feeds it requests and turns its answers ([`Applied`],
//! [`ModuleEntry`], [`RegistryError`]) into status messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::config::ModuleConfig;
use crate::event::now_ms;
use crate::handlers::breaker::Breaker;
use crate::handlers::runtime::{Handler, LoadError, Runtime};
use crate::metrics::Metrics;
use crate::signing::{self, SignedCommand, SignedModule, VerifyError, VerifyingKey};
use crate::store::{CommandRefused, Deployed, Store, StoreError, StoredModule};

/// Why the registry refused a deploy, rollback, remove or list. The texts are what the
/// operator reads as a status's `"reason"`; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No key is trusted, so no signed request can be accepted.
    #[error(
        "no trusted keys are configured ([deploy] trusted_keys): this gateway accepts no {refused}"
    )]
    NoTrustedKeys {
        /// What is refused: `deploys` or `commands`.
        refused: &'static str,
    },
    /// The payload of a deploy is not a well-formed signed module (or is too large).
    #[error("not a signed module: {0}")]
    NotAModule(signing::EnvelopeError),
    /// The payload of a rollback or remove is not a well-formed signed command.
    #[error("not a signed command: {0}")]
    NotACommand(signing::CommandError),
    /// The signature does not verify under a trusted key, or is for another module or
    /// version.
    #[error("signature refused: {0}")]
    Signature(VerifyError),
    /// The command is signed for another module than the one on its topic.
    #[error("signature refused: command is signed for module {signed:?}, not {name:?}")]
    OtherModule {
        /// The module it is signed for.
        signed: String,
        /// The module on its topic.
        name: String,
    },
    /// The command is signed for another operation than the one on its topic.
    #[error("signature refused: command is signed as {signed:?}, not {asked:?}")]
    OtherOp {
        /// The operation it is signed for.
        signed: &'static str,
        /// The operation on its topic.
        asked: &'static str,
    },
    /// Issued before a request already accepted for the module, or too far in the future.
    #[error(transparent)]
    Order(VerifyError),
    /// The module does not compile or is not a handler component.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The verified module could not be stored.
    #[error("cannot store the module: {0}")]
    StoreModule(StoreError),
    /// The store refused the operation (stale, or nothing to act on) or failed.
    #[error(transparent)]
    Refused(#[from] CommandRefused),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rollback of a module that keeps no previous version.
    #[error("module {name:?} has no previous version to roll back to")]
    NoPrevious {
        /// The module.
        name: String,
    },
}

/// One module name the gateway knows, as a `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// The name routes use.
    pub name: String,
    /// Whether the configuration declares it (`[[module]]`).
    pub declared: bool,
    /// How long its circuit breaker keeps it quarantined still; `None`: not quarantined.
    pub quarantine_left: Option<Duration>,
    /// What it runs now; `None`: nothing (declared without a file, or removed).
    pub running: Option<Running>,
    /// Its deployment in the database, if it has one.
    pub deployment: Option<Deployment>,
}

/// What a module name runs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Where the handler came from.
    pub origin: Origin,
    /// The handler's version hash ([`Handler::version`]).
    pub module_hash: String,
    /// The fuel its invocations have used so far.
    pub fuel: u64,
}

/// A module's deployment, as the database keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// When the active version was deployed, ms since the Unix epoch.
    pub deployed_ms: u64,
    /// The version a rollback would return to, if one is kept.
    pub previous_version: Option<String>,
}

/// Where a module name's current handler came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file named in the configuration.
    File(PathBuf),
    /// A signed deploy.
    Deployed {
        /// The version it was signed as.
        version: String,
        /// SHA-256 of the component, hex.
        sha256: String,
        /// Id of the key that signed it.
        signer: String,
    },
}

/// A handler and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The compiled handler.
    pub handler: Handler,
    /// Its origin.
    pub origin: Origin,
}

/// What a successful operation did, for the status reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The module name.
    pub name: String,
    /// The version active now (`None` after a remove with no file to fall back to).
    pub version: Option<String>,
    /// SHA-256 of the component active now, hex.
    pub sha256: Option<String>,
    /// Id of the key that signed the request.
    pub key: String,
    /// The version that was active before.
    pub previous: Option<String>,
    /// The same module was already active: nothing changed.
    pub unchanged: bool,
    /// Time spent compiling (zero when an artifact was used or nothing changed).
    pub compile: Duration,
}

/// The live set of handlers. Share it behind an `Arc`.
pub struct Registry {
    runtime: Runtime,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    breaker: Arc<Breaker>,
    trusted: Vec<VerifyingKey>,
    max_module_bytes: u64,
    /// Handlers loaded from the configuration's files.
    files: HashMap<String, Loaded>,
    /// Names the configuration declares (with or without a file).
    declared: BTreeSet<String>,
    /// What each name runs now.
    live: RwLock<HashMap<String, Loaded>>,
}

impl Registry {
    /// Loads the configured files (a file that does not load is an error: the configuration is
    /// wrong) and then the deployed modules from the database (one that does not load is
    /// logged and skipped). CPU-heavy: compiles what has no usable artifact.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        runtime: Runtime,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        breaker: Arc<Breaker>,
        modules: &[ModuleConfig],
        trusted: Vec<VerifyingKey>,
        max_module_bytes: u64,
    ) -> anyhow::Result<Registry> {
        let mut files = HashMap::new();
        let mut declared = BTreeSet::new();
        for module in modules {
            declared.insert(module.name.clone());
            let Some(path) = &module.path else { continue };
            let wasm = crate::files::read_regular(path, crate::config::MAX_MODULE_BYTES_LIMIT)
                .map(|file| file.bytes)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "module {:?}: cannot read {}: {e}",
                        module.name,
                        path.display()
                    )
                })?;
            let started = Instant::now();
            let handler = runtime.load(&module.name, &wasm).map_err(|e| {
                anyhow::anyhow!("module {:?} ({}): {e}", module.name, path.display())
            })?;
            record_compile(&metrics, started.elapsed());
            info!(module = %module.name, path = %path.display(), "handler loaded");
            files.insert(
                module.name.clone(),
                Loaded {
                    handler,
                    origin: Origin::File(path.clone()),
                },
            );
        }
        let registry = Registry {
            runtime,
            store,
            metrics,
            breaker,
            trusted,
            max_module_bytes,
            live: RwLock::new(files.clone()),
            files,
            declared,
        };
        let deployed = registry.store.active_modules()?;
        for stored in deployed {
            match registry.load_stored(&stored) {
                Ok((loaded, compiled)) => {
                    info!(module = %stored.name, version = %stored.version, compiled = compiled.is_some(), "deployed handler loaded");
                    registry.set_live(&stored.name, Some(loaded));
                }
                Err(e) => {
                    error!(module = %stored.name, version = %stored.version, error = %e, "deployed module does not load; using its configured file, if any")
                }
            }
        }
        Ok(registry)
    }

    /// The handler module `name` runs now, if any.
    pub fn handler(&self, name: &str) -> Option<Handler> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|l| l.handler.clone())
    }

    /// The runtime the handlers run in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Verifies, compiles, stores and activates the signed module in `payload`, deployed as
    /// `name` (see the module guarantees). Blocking and CPU-heavy.
    pub fn deploy(&self, name: &str, payload: &[u8]) -> Result<Applied, RegistryError> {
        if self.trusted.is_empty() {
            return Err(RegistryError::NoTrustedKeys { refused: "deploys" });
        }
        let signed = SignedModule::from_bytes_limited(payload, self.max_module_bytes)
            .map_err(RegistryError::NotAModule)?;
        let key = signed
            .verify_against(&self.trusted)
            .map_err(RegistryError::Signature)?;
        signed
            .expect_identity(name, None)
            .map_err(RegistryError::Signature)?;
        let manifest = signed.manifest().clone();
        let issued_ms = manifest.issued_ms();
        if let Some(Origin::Deployed {
            version, sha256, ..
        }) = self.origin(name)
        {
            // A retained deploy comes again at every reconnect: no need to compile it again.
            if sha256 == manifest.sha256_hex() {
                return Ok(Applied {
                    name: name.to_string(),
                    version: Some(version),
                    sha256: Some(sha256),
                    key: key.to_string(),
                    previous: None,
                    unchanged: true,
                    compile: Duration::ZERO,
                });
            }
        }
        // A replayed older deploy is refused before it costs a compile; the store checks the
        // order again in the transaction that activates it.
        self.check_order(name, issued_ms)?;
        let started = Instant::now();
        let handler = self.runtime.load(name, signed.wasm())?;
        let compile = started.elapsed();
        record_compile(&self.metrics, compile);
        let artifact = match handler.artifact() {
            Ok(bytes) => Some((self.runtime.artifact_key().to_string(), bytes)),
            Err(e) => {
                warn!(module = %name, error = %e, "cannot make the precompiled artifact; the module will be compiled again at the next start");
                None
            }
        };
        let stored = StoredModule {
            name: name.to_string(),
            version: manifest.version().to_string(),
            sha256: manifest.sha256_hex(),
            signer: key.to_string(),
            deployed_ms: now_ms(),
            wasm: signed.into_wasm(),
            artifact,
        };
        let outcome = self
            .store
            .deploy_module(&stored, issued_ms)
            .map_err(|e| match e {
                CommandRefused::Store(e) => RegistryError::StoreModule(e),
                refused => RegistryError::Refused(refused),
            })?;
        let applied = |previous, unchanged| Applied {
            name: name.to_string(),
            version: Some(stored.version.clone()),
            sha256: Some(stored.sha256.clone()),
            key: key.to_string(),
            previous,
            unchanged,
            compile,
        };
        match outcome {
            Deployed::Unchanged => Ok(applied(None, true)),
            Deployed::Activated { previous } => {
                self.activate(&stored, handler);
                Metrics::add(&self.metrics.module_deploys, 1);
                info!(module = %name, version = %stored.version, sha256 = %stored.sha256, signer = %key, ?previous, "module deployed");
                Ok(applied(previous, false))
            }
        }
    }

    /// Verifies the signed remove or rollback command in `payload`, published for module
    /// `name` with verb `op`, and applies it. Blocking (a rollback may compile).
    pub fn command(
        &self,
        name: &str,
        op: signing::CommandOp,
        payload: &[u8],
    ) -> Result<Applied, RegistryError> {
        if self.trusted.is_empty() {
            return Err(RegistryError::NoTrustedKeys {
                refused: "commands",
            });
        }
        let command = SignedCommand::from_json(payload).map_err(RegistryError::NotACommand)?;
        let key = command
            .verify_against(&self.trusted)
            .map_err(RegistryError::Signature)?;
        if command.name != name {
            return Err(RegistryError::OtherModule {
                signed: command.name,
                name: name.to_string(),
            });
        }
        if command.op != op {
            return Err(RegistryError::OtherOp {
                signed: command.op.as_str(),
                asked: op.as_str(),
            });
        }
        self.check_order(name, command.issued_ms)?;
        match op {
            signing::CommandOp::Rollback => {
                let previous = self
                    .store
                    .module_in_slot(name, "previous")?
                    .ok_or_else(|| RegistryError::NoPrevious {
                        name: name.to_string(),
                    })?;
                let (loaded, compiled) = self.load_stored(&previous)?;
                self.store.rollback_module(name, command.issued_ms)?;
                let before = self.current_version(name);
                self.breaker.reset(name);
                self.set_live(name, Some(loaded));
                Metrics::add(&self.metrics.module_rollbacks, 1);
                info!(module = %name, version = %previous.version, "module rolled back");
                Ok(Applied {
                    name: name.to_string(),
                    version: Some(previous.version),
                    sha256: Some(previous.sha256),
                    key: key.to_string(),
                    previous: before,
                    unchanged: false,
                    compile: compiled.unwrap_or_default(),
                })
            }
            signing::CommandOp::Remove => {
                let removed = self.store.remove_module(name, command.issued_ms)?;
                let fallback = self.files.get(name).cloned();
                let now = fallback.as_ref().map(|l| version_of(&l.origin));
                self.breaker.reset(name);
                self.set_live(name, fallback);
                Metrics::add(&self.metrics.module_removals, 1);
                info!(module = %name, version = %removed, "module removed");
                Ok(Applied {
                    name: name.to_string(),
                    version: now,
                    sha256: None,
                    key: key.to_string(),
                    previous: Some(removed),
                    unchanged: false,
                    compile: Duration::ZERO,
                })
            }
        }
    }

    /// Refuses a request for `name` issued at `issued_ms` that is out of order (not after the
    /// last one accepted) or from the future ([`signing::check_issued`]).
    fn check_order(&self, name: &str, issued_ms: u64) -> Result<(), RegistryError> {
        let last = self.store.newest_issued_ms(name)?;
        signing::check_issued(name, issued_ms, last, now_ms()).map_err(RegistryError::Order)
    }

    /// Every module name the gateway knows (declared, from a file, or deployed), in name
    /// order, with what it runs now.
    pub fn list(&self) -> Result<Vec<ModuleEntry>, RegistryError> {
        let summaries = self.store.module_summaries()?;
        let quarantined: BTreeMap<String, Duration> = self
            .breaker
            .quarantined(Instant::now())
            .into_iter()
            .collect();
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: BTreeSet<String> = self.declared.clone();
        names.extend(live.keys().cloned());
        names.extend(summaries.iter().map(|s| s.name.clone()));
        let entries = names
            .into_iter()
            .map(|name| ModuleEntry {
                declared: self.declared.contains(&name),
                quarantine_left: quarantined.get(&name).copied(),
                running: live.get(&name).map(|l| Running {
                    origin: l.origin.clone(),
                    module_hash: l.handler.version().to_string(),
                    fuel: l.handler.total_fuel(),
                }),
                deployment: summaries
                    .iter()
                    .find(|s| s.name == name)
                    .map(|s| Deployment {
                        deployed_ms: s.deployed_ms,
                        previous_version: s.previous_version.clone(),
                    }),
                name,
            })
            .collect();
        Ok(entries)
    }

    fn origin(&self, name: &str) -> Option<Origin> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|l| l.origin.clone())
    }

    fn current_version(&self, name: &str) -> Option<String> {
        self.origin(name).as_ref().map(version_of)
    }

    /// Points `name` at `handler` (made from `stored`), clearing any quarantine of the old one.
    fn activate(&self, stored: &StoredModule, handler: Handler) {
        self.breaker.reset(&stored.name);
        self.set_live(
            &stored.name,
            Some(Loaded {
                handler,
                origin: origin_of(stored),
            }),
        );
    }

    fn set_live(&self, name: &str, loaded: Option<Loaded>) {
        let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Some(loaded) => live.insert(name.to_string(), loaded),
            None => live.remove(name),
        };
    }

    /// Loads a stored module from its artifact when the artifact was made by this runtime,
    /// otherwise compiles it (and stores the new artifact). Returns the compile time when it
    /// compiled.
    fn load_stored(
        &self,
        stored: &StoredModule,
    ) -> Result<(Loaded, Option<Duration>), RegistryError> {
        let origin = origin_of(stored);
        if let Some((key, artifact)) = &stored.artifact {
            if key == self.runtime.artifact_key() {
                let started = Instant::now();
                // SAFETY: the artifact comes from this gateway's own database, where only
                // `Registry::deploy` and `Registry::load_stored` write artifacts, both from
                // `Handler::artifact` (the contract of `load_precompiled`). The database is
                // the gateway's private state (mode of the data directory).
                match unsafe { self.runtime.load_precompiled(&stored.name, artifact) } {
                    Ok(handler) => {
                        Metrics::add(&self.metrics.module_artifact_loads, 1);
                        Metrics::add(
                            &self.metrics.module_artifact_load_us,
                            started.elapsed().as_micros() as u64,
                        );
                        return Ok((Loaded { handler, origin }, None));
                    }
                    Err(e) => {
                        warn!(module = %stored.name, error = %e, "stored artifact refused; compiling the module again")
                    }
                }
            }
        }
        let started = Instant::now();
        let handler = self.runtime.load(&stored.name, &stored.wasm)?;
        let compile = started.elapsed();
        record_compile(&self.metrics, compile);
        match handler.artifact() {
            Ok(bytes) => {
                if let Err(e) = self.store.set_module_artifact(
                    &stored.name,
                    &stored.sha256,
                    self.runtime.artifact_key(),
                    &bytes,
                ) {
                    warn!(module = %stored.name, error = %e, "cannot store the precompiled artifact");
                }
            }
            Err(e) => {
                warn!(module = %stored.name, error = %e, "cannot make the precompiled artifact")
            }
        }
        Ok((Loaded { handler, origin }, Some(compile)))
    }
}

fn origin_of(stored: &StoredModule) -> Origin {
    Origin::Deployed {
        version: stored.version.clone(),
        sha256: stored.sha256.clone(),
        signer: stored.signer.clone(),
    }
}

fn version_of(origin: &Origin) -> String {
    match origin {
        Origin::Deployed { version, .. } => version.clone(),
        Origin::File(path) => format!("file:{}", path.display()),
    }
}

fn record_compile(metrics: &Metrics, took: Duration) {
    Metrics::add(&metrics.module_compiles, 1);
    Metrics::add(&metrics.module_compile_us, took.as_micros() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_the_status_reasons_always_have() {
        for (error, text) in [
            (
                RegistryError::NoTrustedKeys { refused: "deploys" },
                "no trusted keys are configured ([deploy] trusted_keys): this gateway accepts no deploys",
            ),
            (
                RegistryError::NoTrustedKeys {
                    refused: "commands",
                },
                "no trusted keys are configured ([deploy] trusted_keys): this gateway accepts no commands",
            ),
            (
                RegistryError::OtherModule {
                    signed: "a".into(),
                    name: "b".into(),
                },
                r#"signature refused: command is signed for module "a", not "b""#,
            ),
            (
                RegistryError::OtherOp {
                    signed: signing::CommandOp::Remove.as_str(),
                    asked: signing::CommandOp::Rollback.as_str(),
                },
                r#"signature refused: command is signed as "remove", not "rollback""#,
            ),
            (
                RegistryError::NoPrevious { name: "m".into() },
                r#"module "m" has no previous version to roll back to"#,
            ),
            (
                RegistryError::Refused(CommandRefused::Nothing("no module \"m\"".into())),
                r#"no module "m""#,
            ),
        ] {
            assert_eq!(error.to_string(), text);
        }
        let order = signing::check_issued("m", 5, Some(5), 10).unwrap_err();
        assert_eq!(
            RegistryError::Order(order.clone()).to_string(),
            order.to_string()
        );
        assert_eq!(
            RegistryError::Signature(order.clone()).to_string(),
            format!("signature refused: {order}")
        );
        let envelope = SignedModule::from_bytes(b"not an envelope").unwrap_err();
        assert_eq!(
            RegistryError::NotAModule(envelope.clone()).to_string(),
            format!("not a signed module: {envelope}")
        );
        let command = SignedCommand::from_json(b"{}").unwrap_err();
        assert_eq!(
            RegistryError::NotACommand(command.clone()).to_string(),
            format!("not a signed command: {command}")
        );
    }
}
