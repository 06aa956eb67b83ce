//! The control socket: `STATE_DIR/control.sock`, a unix socket (mode 0600, bound under a
//! temporary name and linked into place once its mode is set, so it is never reachable with
//! a wider one) on which the CLI's operator commands (`fracture`, `restore`, `verify`, `sync`,
//! `set`, `status`) reach a running primary. Only root, or the user the primary runs as, is
//! answered (checked with `SO_PEERCRED` on every connection).
//!
//! One JSON request per connection, one JSON reply: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`. Owns the listening thread; requests are handed to the engine,
//! which applies them between two turns of its loop, so no lock is shared with the data path.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

pub const SOCKET_FILE: &str = "control.sock";
/// Longest request accepted.
const REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// How long a client waits for the engine's answer (a consistency point may take its own
/// timeout, up to `CONSISTENCY_TIMEOUT_MS_MAX`).
const REPLY_TIMEOUT_MS: u64 = 30_000;
/// Requests answered at once, each on a thread of its own: a `checkpoint` waiting minutes for
/// its point does not hold up `status` or an urgent `fracture`. Past it, a request is refused
/// at once as busy.
const REQUESTS_IN_FLIGHT_MAX: usize = 8;
pub const CONSISTENCY_TIMEOUT_MS_MAX: u64 = 300_000;
/// How long the request of a caller refused by its uid is read before the refusal is sent.
const REFUSED_READ_MS: u64 = 200;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Stop replicating to a secondary and keep its fracture log until `restore`.
    Fracture {
        secondary: String,
    },
    /// Let a fractured secondary reconnect and resync from its fracture log.
    Restore {
        secondary: String,
    },
    /// Hash every extent on both sides; ship only those that differ.
    Verify {
        secondary: String,
    },
    /// Copy every extent to the secondary (a full sync).
    Sync {
        secondary: String,
    },
    /// Change a setting at run time: `sync-rate` (bytes/s, 0 unlimited), `recovery-policy`.
    Set {
        secondary: Option<String>,
        key: String,
        value: String,
    },
    /// Wait until every SYNCHRONIZED secondary has acknowledged every extent written so far,
    /// then have each record that its image is consistent as of now.
    ConsistencyPoint {
        timeout_ms: u64,
    },
    /// Add a secondary to the mirror: SYNCHRONIZED (its image is known identical) or
    /// UNSYNCHRONIZED (it gets a full sync).
    AddSecondary {
        name: String,
        address: std::net::SocketAddr,
        synchronized: bool,
    },
    /// Remove a secondary: gracefully (what is in flight finishes) or `force`d.
    RemoveSecondary {
        name: String,
        force: bool,
    },
    Activate,
    Deactivate {
        force: bool,
    },
}

pub type Reply = Result<serde_json::Value, String>;

/// A request and where its reply goes.
pub struct Call {
    pub request: Request,
    pub reply: Sender<Reply>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("another replicator is running with this state directory ({path} answers)")]
    InUse { path: PathBuf },
    #[error("no replicator is running with state directory {dir} ({path}: {source})")]
    NotRunning { dir: PathBuf, path: PathBuf, source: std::io::Error },
    #[error("reply from {path}: {reason}")]
    Reply { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
}

/// The listening socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `state_dir/control.sock` and answers requests, each on a thread of its own (at most
/// `REQUESTS_IN_FLIGHT_MAX`), handing each to the receiver returned.
pub fn serve(state_dir: &Path) -> Result<(ControlServer, Receiver<Call>), ControlError> {
    let path = state_dir.join(SOCKET_FILE);
    let io = |source| ControlError::Io { path: path.clone(), source };
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse { path });
        }
        std::fs::remove_file(&path).map_err(io)?;
    }
    // Staged under a name no longer than the socket's (the path limit of a unix socket), and
    // linked into place: a link fails where something is there already (another primary that
    // started at the same moment), where a rename would replace it.
    let staged = state_dir.join(format!(".c{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let listener = UnixListener::bind(&staged).map_err(io)?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::hard_link(&staged, &path));
    let _ = std::fs::remove_file(&staged);
    match placed {
        Ok(()) => {}
        Err(source) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ControlError::InUse { path });
        }
        Err(source) => return Err(io(source)),
    }
    let own_uid = nix::unistd::Uid::effective().as_raw();
    let (calls, receiver) = mpsc::channel();
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for mut stream in listener.incoming().flatten() {
                use std::sync::atomic::Ordering;
                if let Err(refused) = check_peer(&stream, own_uid) {
                    tracing::warn!(%refused, "control: connection refused");
                    // Its request is read (and dropped) first, so that the caller is not cut
                    // off in the middle of sending it and gets the reason.
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(REFUSED_READ_MS)));
                    let _ = BufReader::new((&stream).take(REQUEST_BYTES_MAX)).read_line(&mut String::new());
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = writeln!(stream, "{}", serde_json::json!({ "ok": false, "error": refused }));
                    continue;
                }
                if in_flight.fetch_add(1, Ordering::AcqRel) >= REQUESTS_IN_FLIGHT_MAX {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    let busy = serde_json::json!({ "ok": false, "error": format!(
                        "busy: {REQUESTS_IN_FLIGHT_MAX} requests are being answered; try again") });
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = writeln!(stream, "{busy}");
                    continue;
                }
                let (calls, in_flight) = (calls.clone(), std::sync::Arc::clone(&in_flight));
                let spawned = std::thread::Builder::new().name("control-request".into()).spawn(move || {
                    if let Err(error) = answer(stream, &calls) {
                        tracing::warn!(%error, "control request failed");
                    }
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                });
                if let Err(error) = spawned {
                    tracing::warn!(%error, "control: starting a request thread failed");
                }
            }
        })
        .map_err(io)?;
    Ok((ControlServer { path }, receiver))
}

/// Root, or the user this process runs as: anyone else is refused, whatever the socket's mode.
fn check_peer(stream: &UnixStream, own_uid: u32) -> Result<(), String> {
    let credentials = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("reading the caller's credentials: {e}"))?;
    match credentials.uid() {
        0 => Ok(()),
        uid if uid == own_uid => Ok(()),
        uid => Err(format!("uid {uid} may not operate this mirror: only root (or uid {own_uid})")),
    }
}

fn answer(stream: UnixStream, calls: &Sender<Call>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(REQUEST_BYTES_MAX)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Err(format!("malformed request: {e}")),
        Ok(request) => {
            let wait_ms = match &request {
                Request::ConsistencyPoint { timeout_ms } => {
                    (*timeout_ms).min(CONSISTENCY_TIMEOUT_MS_MAX) + 5000
                }
                _ => REPLY_TIMEOUT_MS,
            };
            let (reply, answer) = mpsc::channel();
            if calls.send(Call { request, reply }).is_err() {
                Err("the engine has stopped".to_owned())
            } else {
                answer.recv_timeout(Duration::from_millis(wait_ms)).unwrap_or_else(|_| {
                    Err("the engine did not answer in time; the request may still take effect: \
                             check `status`"
                        .to_owned())
                })
            }
        }
    };
    let body = match reply {
        Ok(result) => serde_json::json!({ "ok": true, "result": result }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let mut stream = stream;
    writeln!(stream, "{body}")
}

/// Sends `request` to the primary running with `state_dir` and returns its result.
pub fn call(state_dir: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    let path = state_dir.join(SOCKET_FILE);
    let mut stream = UnixStream::connect(&path).map_err(|source| ControlError::NotRunning {
        dir: state_dir.into(),
        path: path.clone(),
        source,
    })?;
    let io = |source| ControlError::Io { path: path.clone(), source };
    let wait_ms = CONSISTENCY_TIMEOUT_MS_MAX + 10_000;
    stream.set_read_timeout(Some(Duration::from_millis(wait_ms))).map_err(io)?;
    let text = serde_json::to_string(request).expect("requests serialize");
    writeln!(stream, "{text}").map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    let reply: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| ControlError::Reply { path: path.clone(), reason: e.to_string() })?;
    if reply["ok"].as_bool() == Some(true) {
        Ok(reply["result"].clone())
    } else {
        Err(ControlError::Refused(reply["error"].as_str().unwrap_or("no reason given").to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_are_answered() {
        let dir = std::env::temp_dir().join(format!("replicator-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, calls) = serve(&dir).expect("bind");
        assert!(matches!(serve(&dir), Err(ControlError::InUse { .. })));
        let engine = std::thread::spawn(move || {
            for call in calls.iter().take(2) {
                let reply = match call.request {
                    Request::Fracture { secondary } => Ok(serde_json::json!({ "fractured": secondary })),
                    _ => Err("no".to_owned()),
                };
                call.reply.send(reply).unwrap();
            }
        });
        let result = call(&dir, &Request::Fracture { secondary: "b".into() }).expect("answered");
        assert_eq!(result["fractured"], "b");
        assert!(matches!(call(&dir, &Request::Status), Err(ControlError::Refused(_))));
        engine.join().unwrap();
        drop(server);
        assert!(matches!(call(&dir, &Request::Status), Err(ControlError::NotRunning { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The socket is in place with mode 0600 and nothing of its staging is left behind.
    #[test]
    fn the_socket_is_owner_only_from_the_start() {
        let dir = std::env::temp_dir().join(format!("replicator-control-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, _calls) = serve(&dir).expect("bind");
        let mode = std::fs::metadata(dir.join(SOCKET_FILE)).expect("the socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, [SOCKET_FILE], "only the socket is there");
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A request the engine holds (a consistency point waiting) does not hold up the next.
    #[test]
    fn a_waiting_request_does_not_hold_up_others() {
        let dir = std::env::temp_dir().join(format!("replicator-control-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, calls) = serve(&dir).expect("bind");
        let engine = std::thread::spawn(move || {
            let held = calls.recv().unwrap(); // the point: answered last
            let status = calls.recv().unwrap();
            status.reply.send(Ok(serde_json::json!("status"))).unwrap();
            held.reply.send(Ok(serde_json::json!("point"))).unwrap();
        });
        let point_dir = dir.clone();
        let point =
            std::thread::spawn(move || call(&point_dir, &Request::ConsistencyPoint { timeout_ms: 10_000 }));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(call(&dir, &Request::Status).expect("status while the point waits"), "status");
        assert_eq!(point.join().unwrap().expect("the point"), "point");
        engine.join().unwrap();
        drop(server);
        assert!(matches!(call(&dir, &Request::Status), Err(ControlError::NotRunning { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
