//! Real peers for the integration tests: a Mosquitto broker as the upstream, the `outpost`
//! binary as a child process, and rumqttc clients as devices and as the upstream's subscriber.
//! Everything binds to 127.0.0.1 on free ports and is stopped when dropped.

#![allow(dead_code)]

pub mod harness;
#[macro_use]
pub mod mqtt;
pub mod net;
pub mod pki;

pub use net::free_port;

#[allow(unused_imports)]
pub use harness::Harness;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Generous bound for anything that should happen "soon" on a slow shared machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Waits until `check` returns true, polling; panics with `what` after `PATIENCE`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for tests without a runtime: blocks the thread between polls.
#[allow(dead_code)]
pub fn block_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "process exited ({status}) before listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {}", child.id());
}

/// A Mosquitto broker on a free port, with persistence so that a subscriber's queued messages
/// survive a restart (the upstream "going away" and coming back).
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn new(dir: &Path) -> Mosquitto {
        Mosquitto::with_config(dir, "")
    }

    /// Like [`Mosquitto::new`], with `extra` appended to its configuration (more listeners:
    /// TLS, password files), each listener with its own settings (`per_listener_settings`).
    /// The first listener, on [`Mosquitto::port`], stays plain and anonymous, for the tests'
    /// subscribers.
    pub fn with_config(dir: &Path, extra: &str) -> Mosquitto {
        let port = free_port();
        let dir = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        let mosquitto = Mosquitto {
            port,
            dir,
            child: None,
        };
        mosquitto.set_config(extra);
        mosquitto
    }

    /// A Mosquitto as shipped: its configuration is only `listener PORT 127.0.0.1`,
    /// `allow_anonymous true`, every packet logged (to stderr, unbuffered, which goes to its
    /// log file), and `extra`; no persistence, every other setting Mosquitto's default (for
    /// tests that compare outpost's broker with it).
    pub fn plain(dir: &Path, extra: &str) -> Mosquitto {
        let port = free_port();
        let dir = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n\
             log_dest stderr\nlog_type all\n{extra}"
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        Mosquitto {
            port,
            dir,
            child: None,
        }
    }

    /// Rewrites the configuration's `extra` part (it applies at the next start).
    pub fn set_config(&self, extra: &str) {
        let mut conf = String::new();
        if !extra.is_empty() {
            conf.push_str("per_listener_settings true\n");
        }
        conf.push_str(&format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 100\n\
             log_dest stdout\n",
            self.port,
            self.dir.display()
        ));
        // Started as root, Mosquitto switches to the `mosquitto` user, which cannot write its
        // persistence file into our private temporary directory.
        if running_as_root() {
            conf.push_str("user root\n");
        }
        conf.push_str(extra);
        std::fs::write(self.dir.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the broker and waits until it listens.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let log_path = self.dir.join("mosquitto.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("mosquitto log");
        let mut child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        wait_for_port(self.port, &mut child, &log_path);
        self.child = Some(child);
    }

    /// Stops the broker cleanly (it saves its persistent sessions).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn mosquitto_binary() -> PathBuf {
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("mosquitto")
}

/// The `outpost` binary running as a child process.
pub struct Gateway {
    pub port: u16,
    pub data: PathBuf,
    /// The program and the arguments before `run` (an emulator and its options, then the
    /// binary); the test's own `outpost` by default.
    program: Vec<String>,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    /// `outpost run --listen 127.0.0.1:<free> --data <dir>/gw-data <extra args>`.
    pub fn new(dir: &Path, extra: &[&str]) -> Gateway {
        let port = free_port();
        let data = dir.join("gw-data");
        let mut args = vec![
            "run".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--data".to_string(),
            data.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Gateway {
            port,
            data,
            program: vec![env!("CARGO_BIN_EXE_outpost").to_string()],
            args,
            log: dir.join("gateway.log"),
            child: None,
        }
    }

    /// Like [`Gateway::new`], but runs `program` (e.g. `qemu-aarch64-static -L <sysroot>
    /// <cross-built outpost>`) instead of the test's own binary.
    #[allow(dead_code)]
    pub fn with_program(dir: &Path, program: &[String], extra: &[&str]) -> Gateway {
        let mut gateway = Gateway::new(dir, extra);
        gateway.program = program.to_vec();
        gateway
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "gateway already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("gateway log");
        let mut child = Command::new(&self.program[0])
            .args(&self.program[1..])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start outpost");
        wait_for_port(self.port, &mut child, &self.log);
        self.child = Some(child);
    }

    /// SIGTERM, and wait for a clean exit; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        match self.child.take() {
            Some(mut child) => {
                terminate(&mut child);
                child.wait().map(|s| s.success()).unwrap_or(false)
            }
            None => true,
        }
    }

    /// The running gateway's process id.
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The running gateway's peak resident memory (VmHWM), in MiB.
    #[allow(dead_code)]
    pub fn peak_rss_mib(&self) -> f64 {
        let pid = self.pid().expect("the gateway runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib / 1024.0
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP, and waits until every thread of the gateway has stopped: from then on its
    /// database holds exactly what a SIGKILL would leave behind, and a test can look at it
    /// before deciding to kill or to [`Gateway::thaw`].
    pub fn freeze(&self) {
        let Some(child) = &self.child else {
            return;
        };
        signal(child, "-STOP");
        let tasks = PathBuf::from(format!("/proc/{}/task", child.id()));
        let deadline = Instant::now() + PATIENCE;
        let stopped = |stat: String| {
            // "<tid> (<comm>) <state> ...": the state follows the last parenthesis.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't', 'Z', 'X']))
        };
        loop {
            let all_stopped = std::fs::read_dir(&tasks)
                .map(|dir| {
                    dir.filter_map(Result::ok).all(|task| {
                        std::fs::read_to_string(task.path().join("stat"))
                            .map(stopped)
                            .unwrap_or(true)
                    })
                })
                .unwrap_or(true);
            if all_stopped {
                return;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGSTOP");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGHUP: the gateway re-reads its uplinks' credential files.
    pub fn reload(&self) {
        if let Some(child) = &self.child {
            signal(child, "-HUP");
        }
    }

    /// SIGCONT: a frozen gateway goes on where it stopped.
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            signal(child, "-CONT");
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Rows waiting in the outbox, read from the gateway's database.
    pub fn outbox_depth(&self) -> u64 {
        self.count("SELECT COUNT(*) FROM outbox")
    }

    /// Dead letters per reason.
    pub fn dead_letters(&self) -> HashMap<String, u64> {
        let Ok(conn) = self.db() else {
            return HashMap::new();
        };
        let Ok(mut stmt) =
            conn.prepare("SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason")
        else {
            return HashMap::new();
        };
        stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
    }

    /// Rows waiting in the outbox for one upstream link.
    pub fn outbox_depth_of(&self, link: &str) -> u64 {
        self.db()
            .and_then(|c| {
                c.query_row("SELECT COUNT(*) FROM outbox WHERE link = ?1", [link], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .map(|n| n as u64)
            .unwrap_or(0)
    }

    /// Device publishes not yet taken from the journal by the pipeline.
    pub fn journal_depth(&self) -> u64 {
        self.count("SELECT COUNT(*) FROM journal")
    }

    /// Every dead letter, oldest first.
    pub fn dead_letter_rows(&self) -> Vec<DeadLetterRow> {
        let Ok(conn) = self.db() else {
            return Vec::new();
        };
        let Ok(mut stmt) =
            conn.prepare("SELECT route, reason, topic, payload FROM dead_letters ORDER BY id")
        else {
            return Vec::new();
        };
        stmt.query_map([], |r| {
            Ok(DeadLetterRow {
                route: r.get(0)?,
                reason: r.get(1)?,
                topic: r.get(2)?,
                payload: r.get(3)?,
            })
        })
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
    }

    fn db(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            self.data.join("outpost.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    fn count(&self, sql: &str) -> u64 {
        self.db()
            .and_then(|c| c.query_row(sql, [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .unwrap_or(0)
    }
}

/// One dead letter as stored: the route it failed on, the reason, and the event.
#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    pub route: String,
    pub reason: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log());
        }
    }
}

/// A device: an MQTT client that publishes with QoS 1 and counts the acknowledgements.
pub struct Device {
    client: AsyncClient,
    acked: Arc<Mutex<u64>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(port: u16, id: &str) -> Device {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let acked = Arc::new(Mutex::new(0u64));
        let counter = acked.clone();
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        *counter.lock().unwrap() += 1;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Device {
            client,
            acked,
            driver,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue publish");
    }

    /// A handle that publishes on this device's connection from another task.
    pub fn handle(&self) -> AsyncClient {
        self.client.clone()
    }

    pub fn acked(&self) -> u64 {
        *self.acked.lock().unwrap()
    }

    /// Waits until `n` publishes were acknowledged by the gateway.
    pub async fn wait_acked(&self, n: u64) {
        eventually(&format!("{n} PUBACKs"), || self.acked() >= n).await;
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What the upstream subscriber received, in arrival order.
#[derive(Clone)]
pub struct Received(Option<Arc<Mutex<Vec<Message>>>>);

/// A received message: topic and payload.
pub type Message = (String, Vec<u8>);

impl Default for Received {
    fn default() -> Received {
        Received(Some(Arc::default()))
    }
}

impl Received {
    /// What a [`Harness`] built without a subscriber has: reading it fails the test, so that
    /// "nothing arrived" cannot pass for want of a subscriber.
    pub fn nobody() -> Received {
        Received(None)
    }

    fn messages(&self) -> std::sync::MutexGuard<'_, Vec<Message>> {
        self.0
            .as_ref()
            .expect("nobody subscribed: ask the harness builder for a subscriber")
            .lock()
            .unwrap()
    }

    fn push(&self, message: Message) {
        self.messages().push(message);
    }

    pub fn len(&self) -> usize {
        self.messages().len()
    }
    pub fn all(&self) -> Vec<Message> {
        self.messages().clone()
    }
}

/// A subscriber on the upstream broker with a persistent session (clean_session = false,
/// QoS 1), so messages published while it is away, or while the broker restarts, wait for it.
pub struct Subscriber {
    pub received: Received,
    client: AsyncClient,
    driver: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn connect(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        let received = Received::default();
        let sink = received.clone();
        let (client, driver) = subscribe_with(options, filter, move |p| {
            sink.push((p.topic.clone(), p.payload.to_vec()));
        })
        .await;
        Subscriber {
            received,
            client,
            driver,
        }
    }
}

/// Connects an MQTT 3.1.1 client with `options`, subscribes to `filter` with QoS 1 and waits
/// for the SUBACK; every PUBLISH that arrives then goes to `on_publish`. The returned task
/// drives the connection (reconnecting after an error); abort it to end the client.
pub async fn subscribe_with(
    options: MqttOptions,
    filter: &str,
    mut on_publish: impl FnMut(rumqttc::Publish) + Send + 'static,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(p),
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(PATIENCE, subscribed_rx)
        .await
        .expect("SUBACK in time")
        .expect("subscriber alive");
    (client, driver)
}

/// [`subscribe_with`] for an MQTT 5 client (rumqttc's v5 client): subscribes to `filter`
/// with QoS 1 and waits for the SUBACK; every PUBLISH that arrives then goes to `on_publish`,
/// with its properties. A connection error is printed (the test's output says why a later
/// wait timed out) and the client reconnects.
pub async fn subscribe_v5_with(
    options: rumqttc::v5::MqttOptions,
    filter: &str,
    mut on_publish: impl FnMut(rumqttc::v5::mqttbytes::v5::Publish) + Send + 'static,
) -> (rumqttc::v5::AsyncClient, tokio::task::JoinHandle<()>) {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::Event as Event5;

    let id = options.client_id();
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event5::Incoming(Packet5::Publish(p))) => on_publish(p),
                Ok(Event5::Incoming(Packet5::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("MQTT 5 subscriber {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio::time::timeout(PATIENCE, subscribed_rx)
        .await
        .expect("SUBACK in time")
        .expect("subscriber alive");
    (client, driver)
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Makes a FIFO at `path` (mode 0600), for tests of readers that must not wait on one.
pub fn make_fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Writes a configuration file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("outpost.toml");
    let mut file = std::fs::File::create(&path).expect("create config");
    file.write_all(text.as_bytes()).expect("write config");
    path
}

/// Runs `outpost <args>` to its end with `RUST_LOG=warn` (only warnings and errors logged,
/// so that a command's own lines are all there is besides them).
pub fn outpost(args: &[&str]) -> std::process::Output {
    outpost_command(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outpost")
}

/// Runs `outpost <args>` to its end in the test's own environment: `RUST_LOG` as the test was
/// given it, or, where it is unset, each command's own default level.
pub fn outpost_in_test_env(args: &[&str]) -> std::process::Output {
    outpost_command(args).output().expect("run outpost")
}

fn outpost_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outpost"));
    command.args(args);
    command
}

/// What a command printed on its standard output.
pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a command printed on its standard error.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `outpost passwd FILE USER` with `password` on its standard input.
pub fn outpost_passwd(file: &Path, user: &str, password: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["passwd", file.to_str().expect("UTF-8 path"), user])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outpost passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    child.wait_with_output().expect("outpost passwd ends")
}
