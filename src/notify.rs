//! systemd's readiness protocol (`sd_notify`), for `Type=notify` services: the gateway says
//! `READY=1` once its listeners serve devices, and `STOPPING=1` when it begins to stop.
//! Without `$NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to the socket named by `$NOTIFY_SOCKET`. Returns whether a
/// socket was named (and so the message sent).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(&socket.to_string_lossy(), state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the datagram socket `socket`: a path, or a Linux abstract name written
/// with a leading `@`.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let address = match socket.strip_prefix('@') {
        Some(name) => abstract_address(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    let sender = UnixDatagram::unbound()?;
    sender.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        notify_to(&path.display().to_string(), "READY=1").expect("sent");
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).expect("received");
        assert_eq!(&buffer[..n], b"READY=1");
    }

    #[test]
    fn readiness_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("outpost-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("address");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind");
        notify_to(&format!("@{name}"), "STOPPING=1").expect("sent");
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).expect("received");
        assert_eq!(&buffer[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        assert!(notify_to("/nonexistent/notify.sock", "READY=1").is_err());
    }
}
