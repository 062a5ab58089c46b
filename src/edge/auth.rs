//! Who may connect: every device CONNECT is checked against the broker's password file
//! (`broker.password_file`, Mosquitto's format: [`super::passwords`]) and
//! `broker.allow_anonymous`, before it reaches the broker.
//!
//! Guarantees:
//! - A client without a username is let in only when anonymous clients are allowed. A client
//!   with a username is let in only when the password file has that username with a hash of
//!   the password it sent; without a password file (anonymous clients allowed then) a username
//!   is taken as given, as Mosquitto does.
//! - Password checks run on the blocking pool, at most [`MAX_CONCURRENT_CHECKS`] at once:
//!   a reconnect storm waits its turn (within the connection's CONNECT deadline) instead of
//!   taking the async workers or one thread per device.
//! - The file is read at start ([`load_password_file`]: a missing, unreadable, oversized file,
//!   or one other users can read, fails the start with the path in the message). It is read
//!   again on `SIGHUP` and when it changes on disk ([`watch_password_file`]); a new version
//!   that cannot be read keeps the one in use, with one warning. Entries that cannot be used
//!   are named (line and username) in a warning each time the file is read, and refuse their
//!   user.
//! - Connections already open stay open when the file changes (Mosquitto 2.0 checks them
//!   again and closes those that no longer pass; outpost does not yet).
//!
//! What a client may do once in is the ACL's (`broker.acl_file`, [`super::acl`]):
//! [`load_acl_file`] reads it at start (a missing or unreadable file, or a line it cannot
//! parse, fails the start naming the file and the line), and [`super::Edge::enforce_acl`]
//! reads it again on `SIGHUP` and when it changes, keeping the rules in force when a new
//! version does not parse.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use super::acl::{Acl, AclError};
use super::passwords::PasswordFile;
use crate::files::{self, FileError};

/// Password checks that run at once; the rest wait. Two: one per core of the smallest boards
/// the gateway runs on is what they can give without starving the data path.
pub const MAX_CONCURRENT_CHECKS: usize = 2;

/// The largest password file read (about 100,000 users).
pub const MAX_PASSWORD_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why a password file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// Missing, not a regular file, too large, not text, or unreadable.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: FileError,
    },
    /// Other users can read it: the hashes are secrets (a stolen file can be attacked
    /// offline).
    #[error("{}: other users can read it (mode {mode:03o}); chmod 600 it", path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads a password file for the broker; see the module's guarantees.
pub fn load_password_file(path: &Path) -> Result<PasswordFile, AuthFileError> {
    let read_error = |source| AuthFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (text, mode) = load_password_text(path).map_err(read_error)?;
    if mode & 0o077 != 0 {
        return Err(AuthFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(PasswordFile::parse(&text))
}

/// A password file's text and permission bits, read with the bounds of [`files::read_regular`]
/// (for `outpost passwd`, which keeps the mode when it rewrites the file).
pub fn load_password_text(path: &Path) -> Result<(String, u32), FileError> {
    let contents = files::read_regular(path, MAX_PASSWORD_FILE_BYTES)?;
    let text = String::from_utf8(contents.bytes).map_err(|e| FileError::NotText {
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    Ok((text, contents.mode))
}

/// The largest ACL file read (about 200,000 rules).
pub const MAX_ACL_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why an ACL file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclFileError {
    /// Missing, not a regular file, too large, not text, or unreadable.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: FileError,
    },
    /// A line cannot be parsed (the broker does not start on rules it does not understand).
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line and what is wrong with it.
        source: AclError,
    },
}

/// Reads and parses an ACL file in Mosquitto's `acl_file` format.
pub fn load_acl_file(path: &Path) -> Result<Acl, AclFileError> {
    let text = files::read_regular_text(path, MAX_ACL_FILE_BYTES).map_err(|source| {
        AclFileError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Acl::parse(&text).map_err(|source| AclFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Logs what a freshly read password file holds and what in it cannot be used.
fn report(path: &Path, file: &PasswordFile) {
    for skipped in file.skipped() {
        warn!(file = %path.display(), line = skipped.line, username = %skipped.username, reason = %skipped.reason, "a password file entry cannot be used; that user is refused");
    }
}

/// Who a connection is, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No username.
    Anonymous,
    /// The username it gave (checked against the password file when there is one).
    User(String),
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No username, and anonymous clients are not allowed.
    Anonymous,
    /// The username is unknown, or the password is missing or wrong (deliberately not told
    /// apart, to the client or in the counters).
    BadCredentials {
        /// The username given.
        username: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Anonymous => f.write_str("no username, and broker.allow_anonymous is false"),
            Refusal::BadCredentials { username } => {
                write!(f, "wrong username or password (username {username:?})")
            }
        }
    }
}

/// The broker's login check, shared by every listener.
#[derive(Clone)]
pub struct Authenticator {
    passwords: Option<watch::Receiver<Arc<PasswordFile>>>,
    allow_anonymous: bool,
    checks: Arc<Semaphore>,
}

impl Authenticator {
    /// Lets every client in, as given (no password file, anonymous clients allowed).
    pub fn open() -> Authenticator {
        Authenticator::new(None, true)
    }

    /// Checks against the password file `passwords` holds (when there is one), letting
    /// clients without a username in only if `allow_anonymous`.
    pub fn new(
        passwords: Option<watch::Receiver<Arc<PasswordFile>>>,
        allow_anonymous: bool,
    ) -> Authenticator {
        Authenticator {
            passwords,
            allow_anonymous,
            checks: Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS)),
        }
    }

    /// Whether a CONNECT with this username and password may connect.
    pub async fn check(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
    ) -> Result<Identity, Refusal> {
        let Some(username) = username else {
            return if self.allow_anonymous {
                Ok(Identity::Anonymous)
            } else {
                Err(Refusal::Anonymous)
            };
        };
        let Some(passwords) = &self.passwords else {
            return Ok(Identity::User(username.to_string()));
        };
        let refused = || Refusal::BadCredentials {
            username: username.to_string(),
        };
        let Some(password) = password.cloned() else {
            return Err(refused());
        };
        let file = passwords.borrow().clone();
        // A closed semaphore cannot happen (it is never closed); refuse rather than panic.
        let permit = self
            .checks
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| refused())?;
        let name = username.to_string();
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            file.verify(&name, &password)
        })
        .await
        .unwrap_or(false);
        if verified {
            Ok(Identity::User(username.to_string()))
        } else {
            Err(refused())
        }
    }
}

/// Serves `initial` (read from `path` by [`load_password_file`]) and reads the file again when
/// `reloads` changes (a `SIGHUP`) or the file changes on disk; the task ends when `shutdown`
/// fires or the gateway is gone. The receiver always holds the file to check against.
pub fn watch_password_file(
    path: PathBuf,
    initial: PasswordFile,
    reloads: watch::Receiver<u64>,
    shutdown: crate::shutdown::Shutdown,
) -> (
    watch::Receiver<Arc<PasswordFile>>,
    tokio::task::JoinHandle<()>,
) {
    report(&path, &initial);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let shown = path.clone();
    let task = files::keep_reading(
        "password file",
        vec![path.clone()],
        reloads,
        shutdown,
        move || load_password_file(&path),
        move |file| {
            report(&shown, &file);
            info!(file = %shown.display(), users = file.users(), "password file read again");
            tx.send(Arc::new(file)).is_ok()
        },
    );
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::passwords::set_password;

    fn file_with(users: &[(&str, &str)]) -> PasswordFile {
        let mut text = String::new();
        for (user, password) in users {
            text = set_password(&text, user, password.as_bytes()).unwrap().0;
        }
        PasswordFile::parse(&text)
    }

    fn with_file(file: PasswordFile, allow_anonymous: bool) -> Authenticator {
        let (tx, rx) = watch::channel(Arc::new(file));
        // The sender may go; the receiver keeps the last value.
        drop(tx);
        Authenticator::new(Some(rx), allow_anonymous)
    }

    #[tokio::test]
    async fn the_password_file_decides_for_users() {
        let auth = with_file(file_with(&[("alice", "pw-a")]), false);
        let pw = |s: &str| Some(Bytes::from(s.to_string()));
        assert_eq!(
            auth.check(Some("alice"), pw("pw-a").as_ref()).await,
            Ok(Identity::User("alice".into()))
        );
        for (user, password) in [
            (Some("alice"), pw("wrong")),
            (Some("alice"), None),
            (Some("bob"), pw("pw-a")),
        ] {
            assert!(
                matches!(
                    auth.check(user, password.as_ref()).await,
                    Err(Refusal::BadCredentials { .. })
                ),
                "{user:?} {password:?}"
            );
        }
        assert_eq!(auth.check(None, None).await, Err(Refusal::Anonymous));
    }

    #[tokio::test]
    async fn anonymous_clients_next_to_a_password_file_when_allowed() {
        let auth = with_file(file_with(&[("alice", "pw-a")]), true);
        assert_eq!(auth.check(None, None).await, Ok(Identity::Anonymous));
        let wrong = Bytes::from_static(b"wrong");
        assert!(auth.check(Some("alice"), Some(&wrong)).await.is_err());
    }

    #[tokio::test]
    async fn without_a_password_file_a_username_is_taken_as_given() {
        let auth = Authenticator::open();
        assert_eq!(
            auth.check(Some("anyone"), None).await,
            Ok(Identity::User("anyone".into()))
        );
        assert_eq!(auth.check(None, None).await, Ok(Identity::Anonymous));
    }

    #[test]
    fn files_others_can_read_or_that_are_missing_are_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwords");
        let missing = load_password_file(&path).unwrap_err().to_string();
        assert!(missing.contains("passwords"), "{missing}");
        std::fs::write(&path, set_password("", "a", b"b").unwrap().0).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let exposed = load_password_file(&path).unwrap_err().to_string();
        assert!(exposed.contains("mode 644"), "{exposed}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_password_file(&path).unwrap().users(), 1);
    }
}
