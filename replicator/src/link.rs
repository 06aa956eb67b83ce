//! The replication link's TCP settings: which congestion control the primary's connections to
//! its secondaries use. The primary sets it on its socket before connecting; the secondary on
//! its listening socket, whose accepted connections inherit it (the acks flow on its side).
//!
//! Why not the system's default: hosts often run BBR, which paces every send with a timer and,
//! every ten seconds, shrinks the window to four packets for 200 ms to measure the path's
//! round trip. That suits a bulk transfer over a WAN; on the low-latency link a mirror runs on,
//! it stalls the synchronous writes that wait on it (docs/operating.md, "TCP congestion
//! control", has the measurements). So the link uses CUBIC, the kernel's own default, unless
//! the operator names another (`--tcp-congestion`), or `system` to leave the host's choice.
//!
//! Invariant: a `Congestion` holds a name that is well formed and that the kernel accepted on a
//! scratch socket at start-up (`resolve` is the only way to make one), so a name the kernel
//! does not have, or will not let this process use, stops the start instead of every later
//! connection.

use std::os::fd::AsFd;

/// What `--tcp-congestion` takes when it is not given.
pub const CONGESTION_DEFAULT: &str = "cubic";
/// What `--tcp-congestion` takes to leave the host's default in place.
pub const CONGESTION_SYSTEM: &str = "system";
/// Where the kernel lists the congestion controls it has loaded, and those a process without
/// CAP_NET_ADMIN may choose (for the error message).
const AVAILABLE_PATH: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
const ALLOWED_PATH: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
/// The kernel's `TCP_CA_NAME_MAX` less its terminating zero.
const NAME_BYTES_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "--tcp-congestion {name:?}: a congestion control's name is 1 to {NAME_BYTES_MAX} of a-z, 0-9 and _"
    )]
    Name { name: String },
    #[error(
        "TCP congestion control {name:?} is not usable here (loaded: {available}; allowed without \
         CAP_NET_ADMIN: {allowed}; `--tcp-congestion system` keeps the host's default)"
    )]
    Congestion { name: String, available: String, allowed: String, source: std::io::Error },
    #[error("setting TCP congestion control {name:?} on {what}: {error}")]
    Apply { name: String, what: String, error: std::io::Error },
}

/// The congestion control of every replication connection, made by [`Congestion::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Congestion {
    /// `None`: the host's default (`net.ipv4.tcp_congestion_control`); the socket is not touched.
    name: Option<String>,
}

impl Congestion {
    /// Checks the operator's choice (`None`: the default) by setting it on a scratch socket.
    /// An explicit name that fails is an error. The default falls back to the host's, with a
    /// warning, only when the kernel lacks it (built without CUBIC): a default must not stop a
    /// start, but one the host forbids (EPERM) is a setting to fix, not to run without.
    pub fn resolve(choice: Option<&str>) -> Result<Self, LinkError> {
        let name = match choice {
            Some(CONGESTION_SYSTEM) => return Ok(Self { name: None }),
            Some(name) => name,
            None => CONGESTION_DEFAULT,
        };
        if !well_formed(name) {
            return Err(LinkError::Name { name: name.to_owned() });
        }
        let congestion = Self { name: Some(name.to_owned()) };
        match congestion.probe() {
            Ok(()) => Ok(congestion),
            Err(source) if choice.is_none() && source.raw_os_error() == Some(libc::ENOENT) => {
                tracing::warn!(tcp_congestion = name, error = %source, "the kernel lacks this congestion control; the link keeps the host's default");
                Ok(Self { name: None })
            }
            Err(source) => Err(LinkError::Congestion {
                name: name.to_owned(),
                available: read_list(AVAILABLE_PATH),
                allowed: read_list(ALLOWED_PATH),
                source,
            }),
        }
    }

    /// The name set on each connection; `None` when the host's default is kept.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Sets this congestion control on `socket`, named `what` in the error. On a listening
    /// socket it is inherited by the connections accepted from it.
    pub fn apply(&self, socket: &impl AsFd, what: &str) -> Result<(), LinkError> {
        let Some(name) = &self.name else { return Ok(()) };
        assert!(well_formed(name), "a Congestion holds a checked name");
        set(socket, name).map_err(|error| LinkError::Apply {
            name: name.clone(),
            what: what.to_owned(),
            error,
        })
    }

    /// On a fresh TCP socket, neither bound nor connected: it needs no address, so it works in
    /// a namespace whose loopback is down.
    fn probe(&self) -> std::io::Result<()> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        let socket = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        self.name.as_deref().map_or(Ok(()), |name| set(&socket, name))
    }
}

/// The name set on each connection, or `system` (as `--tcp-congestion` takes it).
impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name().unwrap_or(CONGESTION_SYSTEM))
    }
}

/// The congestion control a socket uses, as the kernel reports it.
pub fn congestion_of(socket: &impl AsFd) -> std::io::Result<String> {
    let name = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::TcpCongestion)?;
    Ok(name.to_string_lossy().trim_end_matches('\0').to_owned())
}

/// What a connection of the link runs, for its log line: the kernel's word, with a warning when
/// it is not the one asked for (a route that locks its own, `ip route ... congctl lock NAME`).
pub fn connection_congestion(socket: &impl AsFd, asked: &Congestion, peer: &str) -> String {
    match congestion_of(socket) {
        Ok(actual) => {
            if asked.name().is_some_and(|name| name != actual) {
                tracing::warn!(peer, asked = %asked, actual, "the connection runs another TCP congestion control than asked (does its route lock one?)");
            }
            actual
        }
        Err(error) => format!("unknown ({error})"),
    }
}

/// What the kernel's congestion controls are called: `TCP_CONGESTION` takes the bytes up to
/// the first zero, so anything else could set another control than the one logged.
fn well_formed(name: &str) -> bool {
    (1..=NAME_BYTES_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn set(socket: &impl AsFd, name: &str) -> std::io::Result<()> {
    let name = std::ffi::OsString::from(name);
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::TcpCongestion, &name)
        .map_err(std::io::Error::from)
}

fn read_list(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|e| format!("unknown ({path}: {e})"), |s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real sockets on loopback: the default and an explicit name reach the kernel; a listening
    /// socket passes its choice to the connections it accepts; names the kernel does not have,
    /// or that are not names, are refused at once, naming them.
    #[test]
    fn the_links_congestion_control_reaches_the_socket() {
        let default = Congestion::resolve(None).expect("the default resolves");
        let reno = Congestion::resolve(Some("reno")).expect("reno is built into every kernel");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listening on loopback");
        reno.apply(&listener, "the listener").expect("setting reno on the listener");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connecting");
        let (server, _) = listener.accept().expect("accepting");
        assert_eq!(congestion_of(&server).expect("reading it back"), "reno", "inherited from the listener");
        default.apply(&client, "the client").expect("switching a connected socket");
        if let Some(name) = default.name() {
            assert_eq!(congestion_of(&client).expect("reading it back"), name);
        }

        assert_eq!(Congestion::resolve(Some(CONGESTION_SYSTEM)).expect("system").name(), None);
        // As root this asks modprobe for tcp_no_such_cc first, which finds nothing.
        let error = Congestion::resolve(Some("no_such_cc")).expect_err("an unknown name is refused");
        assert!(error.to_string().contains("\"no_such_cc\" is not usable here"), "{error}");
        for bad in ["", "cubic\0bbr", "a_name_longer_than_15", "Cubic", "cu bic"] {
            let error = Congestion::resolve(Some(bad)).expect_err("not a name");
            assert!(matches!(error, LinkError::Name { .. }), "{bad:?}: {error}");
        }
    }
}
