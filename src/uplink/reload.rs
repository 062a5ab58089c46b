//! Re-reads an uplink's credential files (CA, client certificate and key, password file) when
//! the operator rotates them: on request (`SIGHUP`, through the gateway's reload counter) and
//! when a change is seen on disk.
//!
//! Guarantees:
//! - The files are looked at every [`FILE_CHECK_INTERVAL`](crate::files::FILE_CHECK_INTERVAL) (their size, times and inode, which
//!   costs a `stat` each); a change is read after [`SETTLE`](crate::files::SETTLE), so that a rotation that writes the
//!   certificate and then the key is read once both are there.
//! - New credentials are handed to the uplink only when they load completely ([`load`]) and
//!   differ in content from the ones in use. A file that does not parse, a key that does not
//!   match its certificate or a secret other users can read keeps the credentials in use, and
//!   says so: one warning naming the file and the problem, and the link's metrics count it.
//! - A reload request with unchanged files changes nothing (and says so).
//!
//! [`load`]: super::credentials::load

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{info, warn};

use super::credentials::{self, Credentials};
use crate::config::UpstreamConfig;
use crate::files::Rereads;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Starts watching `config`'s credential files; `initial` is what the uplink starts with.
/// `reloads` counts reload requests (a new value is one request). The task ends at `shutdown`.
/// The returned receiver always holds the credentials to use.
pub fn watch(
    config: UpstreamConfig,
    initial: Credentials,
    reloads: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> (
    watch::Receiver<Arc<Credentials>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = tokio::spawn(async move {
        let name = config.name.clone();
        let paths = credentials::files(&config);
        let has_files = !paths.is_empty();
        let mut rereads = Rereads::new(paths, reloads, shutdown);
        while let Some(requested) = rereads.next().await {
            if !has_files {
                if requested {
                    info!(link = %name, "reload: this link has no credential files");
                }
                continue;
            }
            let load_config = config.clone();
            let loaded =
                match tokio::task::spawn_blocking(move || credentials::load(&load_config)).await {
                    Ok(result) => result,
                    Err(e) => {
                        warn!(link = %name, error = %e, "credential reload task failed");
                        continue;
                    }
                };
            match loaded {
                Ok(new) => {
                    if new.digest == tx.borrow().digest {
                        if requested {
                            info!(link = %name, "reload: the credential files are unchanged");
                        }
                        continue;
                    }
                    let certificate = new
                        .client_certificate
                        .as_ref()
                        .map(|c| {
                            format!(
                                "{} (expires {})",
                                c.subject,
                                humantime::format_rfc3339_seconds(c.not_after)
                            )
                        })
                        .unwrap_or_else(|| "none".to_string());
                    info!(link = %name, client_certificate = %certificate, "credential files reloaded; the link reconnects with them");
                    for warning in new.warnings(SystemTime::now()) {
                        warn!(link = %name, "{warning}");
                    }
                    metrics.record_credential_reload(&name, None);
                    if tx.send(Arc::new(new)).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    warn!(link = %name, %error, "the new credential files cannot be used; the link keeps the ones it has");
                    metrics.record_credential_reload(&name, Some(&error.to_string()));
                }
            }
        }
    });
    (rx, task)
}
