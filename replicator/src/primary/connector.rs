//! One thread per secondary that (re)connects and authenticates, off the engine's thread: a
//! slow connect or handshake never stalls shipping to the others.
//!
//! Owns nothing shared: it hands each authenticated stream to the engine over a channel, then
//! waits for the engine to ask for a new one. Retries back off from 100 ms to `retry_max_ms`.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::auth::{self, Key, Params};

/// The first retry delay; it doubles up to `retry_max_ms`.
const RETRY_FIRST_MS: u64 = 100;

pub struct Connected {
    pub peer: usize,
    pub connector: u32,
    pub stream: TcpStream,
    pub next_sequence: u64,
    /// The cut the secondary's image holds, and the highest of a frame staged there.
    pub cut: auth::SecondaryCut,
}

/// What a connector tells the engine.
pub enum Event {
    Connected(Connected),
    /// A connection attempt failed (said once per distinct error).
    Failed {
        peer: usize,
        connector: u32,
        error: ConnectFailure,
    },
}

/// Why a connection to a secondary could not be made. Decisions are made on the variant (a
/// secondary being added that refuses the handshake ends the add); the text is the log's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    /// No TCP connection (refused, unreachable, timed out), or its socket could not be set up.
    #[error("{0}")]
    Connect(String),
    /// Connected, but the handshake failed: the secondary refused us, or we refused it.
    #[error("handshake: {0}")]
    Handshake(String),
}

pub struct ConnectorConfig {
    pub metrics: crate::metrics::PeerMetrics,
    pub peer: usize,
    pub connector: u32,
    pub name: String,
    pub addr: SocketAddr,
    pub key: Arc<Key>,
    pub params: Params,
    pub timeout_ms: u64,
    pub retry_max_ms: u64,
    pub congestion: crate::link::Congestion,
}

/// Why the engine asks for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// After a failure: back off if the last connection was short-lived.
    Reconnect,
    /// The operator restored the secondary: connect now.
    Now,
}

/// Runs until `stop`. `wanted` receives a message each time the engine needs a connection.
pub fn run(config: ConnectorConfig, wanted: Receiver<Want>, connected: Sender<Event>, stop: Arc<AtomicBool>) {
    let mut last_error: Option<ConnectFailure> = None;
    let mut delay_ms = RETRY_FIRST_MS;
    let mut last_connected: Option<Instant> = None;
    'wait: while !stop.load(Ordering::Relaxed) {
        let want = match wanted.recv_timeout(Duration::from_millis(200)) {
            Ok(want) => want,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // A connection that failed soon after it was made (refused by the secondary, say) backs
        // off like a failed connect, so a persistent problem cannot become a reconnect storm.
        let short_lived =
            last_connected.is_some_and(|at| at.elapsed() < Duration::from_millis(config.retry_max_ms));
        if want == Want::Reconnect && short_lived {
            std::thread::sleep(Duration::from_millis(delay_ms));
            delay_ms = (delay_ms * 2).min(config.retry_max_ms);
        } else {
            delay_ms = RETRY_FIRST_MS;
        }
        while !stop.load(Ordering::Relaxed) {
            // Wants that came while retrying are met by this attempt; none left (the secondary
            // was removed): stop retrying.
            loop {
                match wanted.try_recv() {
                    Ok(_) => {}
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            config.metrics.connection_attempts.inc();
            match connect(&config) {
                Ok(made) => {
                    last_error = None;
                    last_connected = Some(Instant::now());
                    if connected.send(Event::Connected(connected_event(&config, made))).is_err() {
                        return;
                    }
                    continue 'wait;
                }
                Err(error) => {
                    if matches!(error, ConnectFailure::Handshake(_)) {
                        config.metrics.auth_failures.inc();
                    }
                    // Say it once per distinct failure, not once per retry.
                    if last_error.as_ref() != Some(&error) {
                        tracing::warn!(secondary = %config.name, addr = %config.addr, %error, "cannot reach secondary; retrying");
                        let event = Event::Failed {
                            peer: config.peer,
                            connector: config.connector,
                            error: error.clone(),
                        };
                        if connected.send(event).is_err() {
                            return;
                        }
                        last_error = Some(error);
                    }
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    delay_ms = (delay_ms * 2).min(config.retry_max_ms);
                }
            }
        }
    }
}

/// The engine's event for a connection made and authenticated.
fn connected_event(
    config: &ConnectorConfig,
    (stream, next_sequence, cut): (TcpStream, u64, auth::SecondaryCut),
) -> Connected {
    let tcp_congestion = crate::link::connection_congestion(&stream, &config.congestion, &config.name);
    tracing::info!(secondary = %config.name, addr = %config.addr, tcp_congestion, "connected and authenticated");
    Connected { peer: config.peer, connector: config.connector, stream, next_sequence, cut }
}

/// A TCP connection to the secondary whose congestion control is set before the SYN, so the
/// handshake already runs under it (an ECN-based control negotiates there).
fn connect_with_congestion(config: &ConnectorConfig, timeout: Duration) -> Result<TcpStream, ConnectFailure> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(config.addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ConnectFailure::Connect(format!("socket: {e}")))?;
    config
        .congestion
        .apply(&socket, "the connection's socket")
        .map_err(|e| ConnectFailure::Connect(e.to_string()))?;
    socket
        .connect_timeout(&config.addr.into(), timeout)
        .map_err(|e| ConnectFailure::Connect(format!("connect: {e}")))?;
    Ok(socket.into())
}

fn connect(config: &ConnectorConfig) -> Result<(TcpStream, u64, auth::SecondaryCut), ConnectFailure> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let stream = connect_with_congestion(config, timeout)?;
    let setup = |e: std::io::Error| ConnectFailure::Connect(e.to_string());
    stream.set_nodelay(true).map_err(setup)?;
    // The whole handshake within the timeout, however the secondary's bytes trickle in.
    let mut deadline = auth::Deadline::new(&stream, config.timeout_ms);
    let next_sequence = auth::primary_handshake(&mut deadline, &config.key, &config.params)
        .map_err(|e| ConnectFailure::Handshake(e.to_string()))?;
    let cut =
        auth::primary_read_cut_state(&mut deadline).map_err(|e| ConnectFailure::Handshake(e.to_string()))?;
    // The engine drives the socket with io_uring from here on; blocking timeouts do not apply.
    stream.set_read_timeout(None).map_err(setup)?;
    stream.set_write_timeout(None).map_err(setup)?;
    Ok((stream, next_sequence, cut))
}
