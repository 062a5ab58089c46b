//! The handlers' key-value state, one key space per module (the rows only; the handlers reach
//! it through `crate::handlers::kv`).

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

impl Store {
    /// The value a module stored under `key`, if any.
    pub fn kv_get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let value = conn
            .query_row(
                "SELECT value FROM kv WHERE module = ?1 AND key = ?2",
                params![module, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Stores `value` under `key` in `module`'s key space, replacing what was there.
    pub fn kv_set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        conn.execute(
            "INSERT INTO kv (module, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (module, key) DO UPDATE SET value = excluded.value",
            params![module, key, value],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }
}
