//! Deployed handler modules: for each name, the active version and the one before it (kept for
//! a rollback), each with its WebAssembly and its precompiled artifact; and the issue time of
//! the newest signed request (deploy, rollback or remove) accepted per name, so that a replayed
//! or out-of-order request is refused (replay protection: a captured deploy of an older version
//! cannot bring it back).
//!
//! Every change is one transaction, so a crash leaves either the old or the new state, never a
//! half-made deploy.

use rusqlite::{params, OptionalExtension, Row};

use super::{Store, StoreError};

/// One stored version of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModule {
    /// The name routes use.
    pub name: String,
    /// The version it was signed as.
    pub version: String,
    /// SHA-256 of the WebAssembly, hex.
    pub sha256: String,
    /// Id of the key that signed it.
    pub signer: String,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_ms: u64,
    /// The component's bytes.
    pub wasm: Vec<u8>,
    /// Native code compiled from it, if any, and the runtime key it was compiled under.
    pub artifact: Option<(String, Vec<u8>)>,
}

/// What a module looks like in a listing: no bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSummary {
    /// The name routes use.
    pub name: String,
    /// The active version.
    pub version: String,
    /// SHA-256 of its WebAssembly, hex.
    pub sha256: String,
    /// Id of the key that signed it.
    pub signer: String,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_ms: u64,
    /// The version a rollback would return to, if one is kept.
    pub previous_version: Option<String>,
}

/// Outcome of [`Store::deploy_module`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployed {
    /// The module is now active; the version it replaced (if any) is kept for a rollback.
    Activated {
        /// The version that was active before.
        previous: Option<String>,
    },
    /// The same bytes were already active: nothing changed.
    Unchanged,
}

/// Why a signed request (deploy, remove, rollback) was refused by the store.
#[derive(Debug, thiserror::Error)]
pub enum CommandRefused {
    /// A deploy or command with the same or a later issue time was already accepted for this
    /// module.
    #[error("replayed or stale: issued at {issued_ms} ms, but a deploy or command issued at {newest_ms} ms was already accepted for module {name:?}; sign it again")]
    Stale {
        /// The module.
        name: String,
        /// This command's issue time.
        issued_ms: u64,
        /// The newest accepted issue time.
        newest_ms: u64,
    },
    /// Nothing to act on: no deployed module of that name, or no previous version.
    #[error("{0}")]
    Nothing(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

const COLUMNS: &str = "name, version, sha256, signer, deployed_ms, wasm, artifact_key, artifact";

fn stored(row: &Row<'_>) -> rusqlite::Result<StoredModule> {
    let key: Option<String> = row.get(6)?;
    let artifact: Option<Vec<u8>> = row.get(7)?;
    Ok(StoredModule {
        name: row.get(0)?,
        version: row.get(1)?,
        sha256: row.get(2)?,
        signer: row.get(3)?,
        deployed_ms: row.get::<_, i64>(4)? as u64,
        wasm: row.get(5)?,
        artifact: key.zip(artifact),
    })
}

impl Store {
    /// Makes `module`, signed at `issued_ms`, the active version of its name, in one
    /// transaction: the version active until now becomes the previous one (replacing any older
    /// previous version). Nothing changes when the same bytes are already active (a redelivered
    /// deploy: [`Deployed::Unchanged`], whatever its issue time), and the deploy is refused
    /// ([`CommandRefused::Stale`]) unless it was issued after every deploy and command accepted
    /// for the name so far.
    pub fn deploy_module(
        &self,
        module: &StoredModule,
        issued_ms: u64,
    ) -> Result<Deployed, CommandRefused> {
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let active: Option<(String, String)> = tx
            .query_row(
                "SELECT version, sha256 FROM modules WHERE name = ?1 AND slot = 'active'",
                params![module.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some((_, sha256)) = &active {
            if *sha256 == module.sha256 {
                return Ok(Deployed::Unchanged);
            }
        }
        self.check_and_record_issued(&tx, &module.name, issued_ms)?;
        let (key, artifact) = module.artifact.clone().unzip();
        tx.execute(
            "DELETE FROM modules WHERE name = ?1 AND slot = 'previous'",
            params![module.name],
        )
        .and_then(|_| {
            tx.execute(
                "UPDATE modules SET slot = 'previous' WHERE name = ?1 AND slot = 'active'",
                params![module.name],
            )
        })
        .and_then(|_| {
            tx.execute(
                &format!("INSERT INTO modules (slot, {COLUMNS}) VALUES ('active', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    module.name,
                    module.version,
                    module.sha256,
                    module.signer,
                    module.deployed_ms as i64,
                    module.wasm,
                    key,
                    artifact
                ],
            )
        })
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Deployed::Activated {
            previous: active.map(|(version, _)| version),
        })
    }

    /// Swaps the active and the previous version of `name` (so a second rollback returns to
    /// where the first started), if the command issued at `issued_ms` is newer than every
    /// command accepted for `name` so far. Returns the version now active.
    pub fn rollback_module(&self, name: &str, issued_ms: u64) -> Result<String, CommandRefused> {
        self.with_command(name, issued_ms, |tx| {
            let previous: Option<String> = tx
                .query_row(
                    "SELECT version FROM modules WHERE name = ?1 AND slot = 'previous'",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(previous) = previous else {
                return Ok(Err(format!(
                    "module {name:?} has no previous version to roll back to"
                )));
            };
            // Three steps: SQLite checks the primary key row by row within one UPDATE.
            for (from, to) in [
                ("active", "swap"),
                ("previous", "active"),
                ("swap", "previous"),
            ] {
                tx.execute(
                    "UPDATE modules SET slot = ?3 WHERE name = ?1 AND slot = ?2",
                    params![name, from, to],
                )?;
            }
            Ok(Ok(previous))
        })
    }

    /// Deletes every stored version of `name`, if the command issued at `issued_ms` is newer
    /// than every command accepted for `name` so far. Returns the version that was active.
    pub fn remove_module(&self, name: &str, issued_ms: u64) -> Result<String, CommandRefused> {
        self.with_command(name, issued_ms, |tx| {
            let active: Option<String> = tx
                .query_row(
                    "SELECT version FROM modules WHERE name = ?1 AND slot = 'active'",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(active) = active else {
                return Ok(Err(format!("no deployed module {name:?}")));
            };
            tx.execute("DELETE FROM modules WHERE name = ?1", params![name])?;
            Ok(Ok(active))
        })
    }

    /// Runs `change` in a transaction after checking and recording the command's issue time;
    /// nothing is written when the command is stale or `change` finds nothing to do.
    fn with_command(
        &self,
        name: &str,
        issued_ms: u64,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<Result<String, String>>,
    ) -> Result<String, CommandRefused> {
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        self.check_and_record_issued(&tx, name, issued_ms)?;
        let outcome = change(&tx).map_err(|e| self.err(e))?;
        let version = outcome.map_err(CommandRefused::Nothing)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(version)
    }

    /// The issue time of the newest deploy or command accepted for `name`, if any. A deploy
    /// issued at or before it would be refused: the registry asks before compiling, so that a
    /// replayed deploy costs no compile.
    pub fn newest_issued_ms(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        conn.query_row(
            "SELECT issued_ms FROM module_commands WHERE name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|newest| newest.map(|ms| ms as u64))
        .map_err(|e| self.err(e))
    }

    /// Refuses `issued_ms` unless it is after the newest issue time accepted for `name`, and
    /// records it (the transaction `tx` decides whether the record stays).
    fn check_and_record_issued(
        &self,
        tx: &rusqlite::Transaction<'_>,
        name: &str,
        issued_ms: u64,
    ) -> Result<(), CommandRefused> {
        let newest: Option<i64> = tx
            .query_row(
                "SELECT issued_ms FROM module_commands WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(newest) = newest {
            if issued_ms <= newest as u64 {
                return Err(CommandRefused::Stale {
                    name: name.to_string(),
                    issued_ms,
                    newest_ms: newest as u64,
                });
            }
        }
        tx.execute(
            "INSERT INTO module_commands (name, issued_ms) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET issued_ms = excluded.issued_ms",
            params![name, issued_ms as i64],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The active version of every deployed module, with its bytes and artifact.
    pub fn active_modules(&self) -> Result<Vec<StoredModule>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut statement = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM modules WHERE slot = 'active' ORDER BY name"
            ))
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map([], stored)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The version of `name` in `slot` (`active` or `previous`), if there is one.
    pub fn module_in_slot(
        &self,
        name: &str,
        slot: &str,
    ) -> Result<Option<StoredModule>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM modules WHERE slot = ?2 AND name = ?1"),
            params![name, slot],
            stored,
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Every deployed module, without bytes, by name.
    pub fn module_summaries(&self) -> Result<Vec<ModuleSummary>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut statement = conn
            .prepare(
                "SELECT a.name, a.version, a.sha256, a.signer, a.deployed_ms, p.version
                 FROM modules a LEFT JOIN modules p ON p.name = a.name AND p.slot = 'previous'
                 WHERE a.slot = 'active' ORDER BY a.name",
            )
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map([], |r| {
                Ok(ModuleSummary {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    sha256: r.get(2)?,
                    signer: r.get(3)?,
                    deployed_ms: r.get::<_, i64>(4)? as u64,
                    previous_version: r.get(5)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Stores the precompiled artifact of the stored version of `name` whose bytes hash to
    /// `sha256`, if it is still stored (a concurrent deploy may have replaced it).
    pub fn set_module_artifact(
        &self,
        name: &str,
        sha256: &str,
        key: &str,
        artifact: &[u8],
    ) -> Result<(), StoreError> {
        let conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        conn.execute(
            "UPDATE modules SET artifact_key = ?3, artifact = ?4 WHERE name = ?1 AND sha256 = ?2",
            params![name, sha256, key, artifact],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }
}
