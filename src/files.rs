//! Reading the files an operator names (configuration, geofences, modules, credentials).
//!
//! A path in a configuration is input like any other: it may name a FIFO nobody writes to, a
//! device such as `/dev/zero`, or a file far larger than the gateway can hold. [`read_regular`]
//! never waits for a writer, never reads more than the bound its caller gives, and accepts
//! regular files only, so a wrong path is a clear error instead of a hang at start-up or an
//! out-of-memory kill on a 512 MiB board.
//!
//! [`Rereads`] says when files an operator rotates (credentials, password files) should be
//! read again: on request (`SIGHUP`) or when they change on disk.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What a file held, and its permission bits.
#[derive(Debug)]
pub struct FileContents {
    /// The whole file (never more than the bound asked for).
    pub bytes: Vec<u8>,
    /// The permission bits (`mode & 0o777`), for callers that refuse secrets others can read.
    pub mode: u32,
}

/// Why a file was not read. The messages do not repeat the path: callers name it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be opened or read (missing, permissions, I/O error).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The path names a directory, FIFO, socket or device.
    #[error("is not a regular file (it is a {kind})")]
    NotRegular {
        /// What the path names instead.
        kind: &'static str,
    },
    /// The caller asked for text and the file is not UTF-8.
    #[error("is not UTF-8 text (from byte {valid_up_to})")]
    NotText {
        /// How many bytes from the start are valid UTF-8.
        valid_up_to: usize,
    },
    /// The file is larger than the caller's bound.
    #[error("is larger than {max_bytes} bytes ({size} bytes)")]
    TooLarge {
        /// The caller's bound.
        max_bytes: u64,
        /// The file's size (as it was when the file was opened, or what was read past the bound).
        size: u64,
    },
}

/// Reads a regular file whole, at most `max_bytes` of it.
///
/// Guarantees: returns without waiting on a FIFO or device, reads at most `max_bytes + 1`
/// bytes even when the file grows while it is read, and never panics.
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<FileContents, FileError> {
    // Non-blocking, so that opening a FIFO named by mistake does not wait for a writer; a
    // regular file reads the same either way.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(FileError::NotRegular {
            kind: kind_of(&meta.file_type()),
        });
    }
    if meta.len() > max_bytes {
        return Err(FileError::TooLarge {
            max_bytes,
            size: meta.len(),
        });
    }
    // The size is at most max_bytes here; a file that grows while read is cut by take().
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(FileError::TooLarge {
            max_bytes,
            size: bytes.len() as u64,
        });
    }
    Ok(FileContents {
        bytes,
        mode: meta.permissions().mode() & 0o777,
    })
}

/// [`read_regular`] for a text file: the same guarantees, and UTF-8 or [`FileError::NotText`].
pub fn read_regular_text(path: &Path, max_bytes: u64) -> Result<String, FileError> {
    String::from_utf8(read_regular(path, max_bytes)?.bytes).map_err(|e| FileError::NotText {
        valid_up_to: e.utf8_error().valid_up_to(),
    })
}

fn kind_of(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Makes a FIFO at `path` (mode 0600), for tests of readers that must not wait on one.
#[cfg(test)]
pub(crate) fn make_fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// How often [`Rereads`] looks at its files for changes (a `stat` each).
pub const FILE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long after a change is seen [`Rereads`] says so, so that a rotation written in steps
/// (a certificate, then its key) is read once it is whole.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a file looked like: size, modification and change times, inode (`None`: missing).
type Stamp = Option<(u64, i64, i64, i64, i64, u64)>;

fn stamps(paths: &[std::path::PathBuf]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// When to read a set of files again: each new value of a reload counter (a `SIGHUP`), and
/// each change seen on disk (looked at every [`FILE_CHECK_INTERVAL`], reported [`SETTLE`]
/// after it is seen).
pub struct Rereads {
    paths: Vec<std::path::PathBuf>,
    seen: Vec<Stamp>,
    checks: tokio::time::Interval,
    reloads: tokio::sync::watch::Receiver<u64>,
    shutdown: crate::shutdown::Shutdown,
}

impl Rereads {
    /// Watches `paths` as they are now; requests are new values of `reloads`; ends when
    /// `shutdown` fires. Must be called inside a tokio runtime.
    pub fn new(
        paths: Vec<std::path::PathBuf>,
        mut reloads: tokio::sync::watch::Receiver<u64>,
        shutdown: crate::shutdown::Shutdown,
    ) -> Rereads {
        let mut checks = tokio::time::interval(FILE_CHECK_INTERVAL);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checks.reset();
        reloads.mark_unchanged();
        Rereads {
            seen: stamps(&paths),
            paths,
            checks,
            reloads,
            shutdown,
        }
    }

    /// Waits for the next reason to read the files: `Some(true)` when asked to, `Some(false)`
    /// when they changed on disk; `None` at shutdown or when the reload counter is gone.
    pub async fn next(&mut self) -> Option<bool> {
        loop {
            let requested = tokio::select! {
                _ = self.checks.tick() => false,
                changed = self.reloads.changed() => {
                    changed.ok()?;
                    true
                }
                _ = self.shutdown.recv() => return None,
            };
            if !requested {
                if self.paths.is_empty() || stamps(&self.paths) == self.seen {
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
            }
            self.seen = stamps(&self.paths);
            return Some(requested);
        }
    }
}

/// Keeps files the operator may change in use: when one of `paths` changes, or at each
/// `SIGHUP` ([`Rereads`]), `load`s them again (on the blocking pool) and hands every version
/// that loads to `take`. A version that does not load is logged once, naming `what`, and
/// what is in use stays. The task ends at shutdown, when the reload counter is gone, or when
/// `take` returns false. Must be called inside a tokio runtime.
pub fn keep_reading<T, E, L>(
    what: &'static str,
    paths: Vec<std::path::PathBuf>,
    reloads: tokio::sync::watch::Receiver<u64>,
    shutdown: crate::shutdown::Shutdown,
    load: L,
    mut take: impl FnMut(T) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
    L: Fn() -> Result<T, E> + Clone + Send + 'static,
{
    tokio::spawn(async move {
        let mut rereads = Rereads::new(paths, reloads, shutdown);
        while rereads.next().await.is_some() {
            match tokio::task::spawn_blocking(load.clone()).await {
                Ok(Ok(loaded)) => {
                    if !take(loaded) {
                        return;
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "the {what} cannot be read again; what is in use stays");
                }
                Err(error) => tracing::warn!(%error, "reading the {what} again failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_and_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let read = read_regular(&path, 5).unwrap();
        assert_eq!(read.bytes, b"hello");
        assert_eq!(read.mode, 0o640);
    }

    #[test]
    fn refuses_a_file_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello!").unwrap();
        let e = read_regular(&path, 5).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::TooLarge {
                    max_bytes: 5,
                    size: 6
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_devices_directories_and_fifos_without_waiting() {
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is not a regular file (it is a character device)"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = read_regular(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is not a regular file (it is a directory)");
        let fifo = dir.path().join("fifo");
        make_fifo(&fifo);
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is not a regular file (it is a FIFO)");
    }

    #[test]
    fn text_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"ok \xff").unwrap();
        let e = read_regular_text(&path, 10).unwrap_err();
        assert!(matches!(e, FileError::NotText { valid_up_to: 3 }), "{e:?}");
        std::fs::write(&path, "grüß").unwrap();
        assert_eq!(read_regular_text(&path, 10).unwrap(), "grüß");
    }

    #[test]
    fn a_missing_file_says_what_the_system_said() {
        let e = read_regular(Path::new("/nonexistent/outpost"), 10).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
