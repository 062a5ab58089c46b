//! The handlers' key-value state, kept in the gateway's [`Store`]: one key space per module;
//! what one invocation of a module writes, its later invocations read.

use super::runtime::KvBackend;
use crate::store::Store;

impl KvBackend for Store {
    fn get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.kv_get(module, key)
    }

    fn set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.kv_set(module, key, value)
    }
}
