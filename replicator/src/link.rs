//! The replication link's TCP settings: which congestion control the primary's connections to
//! its secondaries use (set on both ends, since the acks flow back on the secondary's side).
//!
//! Why not the system's default: hosts often run BBR, which paces every send with a timer and,
//! every ten seconds, shrinks the window to four packets for 200 ms to measure the path's
//! round trip. That suits a bulk transfer over a WAN; on the low-latency link a mirror runs on,
//! it stalls the synchronous writes that wait on it (measured on veth, 4 KiB sync writes at
//! queue depth 32: BBR 71k-78k IOPS with p99.9 1.4-5.2 ms, CUBIC 81k-85k with 1.2-1.7 ms). So
//! the link uses CUBIC, the kernel's own default, unless the operator names another
//! (`--tcp-congestion`), or `system` to leave the host's choice alone.
//!
//! Invariant: a congestion control named by the operator is checked once at start-up, so a
//! name the kernel does not have stops the start instead of every later connection.

use std::ffi::OsString;
use std::os::fd::AsFd;

/// What `--tcp-congestion` takes when it is not given.
pub const CONGESTION_DEFAULT: &str = "cubic";
/// What `--tcp-congestion` takes to leave the host's default in place.
pub const CONGESTION_SYSTEM: &str = "system";
/// Where the kernel lists the congestion controls it has loaded (for the error message).
const AVAILABLE_PATH: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
/// The kernel's `TCP_CA_NAME_MAX` less its terminating zero.
const NAME_BYTES_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "TCP congestion control {name:?} is not usable here: {error} (loaded: {available}; \
         `--tcp-congestion system` keeps the host's default)"
    )]
    Congestion { name: String, available: String, error: std::io::Error },
}

/// The congestion control of every replication connection, checked by [`Congestion::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// The host's default (`net.ipv4.tcp_congestion_control`): the socket is not touched.
    System,
    /// Set on each connection with `TCP_CONGESTION`.
    Named(String),
}

impl Congestion {
    /// Checks the operator's choice (`None`: the default) by setting it on a scratch socket.
    /// An explicit name that fails is an error; the default that fails (a kernel built without
    /// CUBIC) falls back to the host's with a warning, as a default must not stop a start.
    pub fn resolve(choice: Option<&str>) -> Result<Self, LinkError> {
        let name = match choice {
            Some(CONGESTION_SYSTEM) => return Ok(Self::System),
            Some(name) => name,
            None => CONGESTION_DEFAULT,
        };
        let congestion = Self::Named(name.to_owned());
        match congestion.probe() {
            Ok(()) => Ok(congestion),
            Err(error) if choice.is_none() => {
                tracing::warn!(tcp_congestion = name, %error, "TCP congestion control unavailable; the link keeps the host's default");
                Ok(Self::System)
            }
            Err(error) => Err(LinkError::Congestion { name: name.to_owned(), available: available(), error }),
        }
    }

    /// Sets this congestion control on `socket` (a connected one is switched at once).
    pub fn apply(&self, socket: &impl AsFd) -> std::io::Result<()> {
        let Self::Named(name) = self else { return Ok(()) };
        if name.is_empty() || name.len() > NAME_BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a congestion control's name is 1 to {NAME_BYTES_MAX} bytes"),
            ));
        }
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::TcpCongestion, &OsString::from(name))
            .map_err(std::io::Error::from)
    }

    /// On a fresh TCP socket, neither bound nor connected: it needs no address, so it works in
    /// a namespace whose loopback is down.
    fn probe(&self) -> std::io::Result<()> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        let socket = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        self.apply(&socket)
    }
}

/// The name set on each connection, or `system` (as `--tcp-congestion` takes it).
impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::System => f.write_str(CONGESTION_SYSTEM),
            Self::Named(name) => f.write_str(name),
        }
    }
}

fn available() -> String {
    std::fs::read_to_string(AVAILABLE_PATH)
        .map_or_else(|e| format!("unknown ({AVAILABLE_PATH}: {e})"), |s| s.trim().to_owned())
}

/// The congestion control a socket uses, as the kernel reports it.
pub fn congestion_of(socket: &impl AsFd) -> std::io::Result<String> {
    let name = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::TcpCongestion)?;
    Ok(name.to_string_lossy().trim_end_matches('\0').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real sockets on loopback: the default and an explicit name reach the kernel, on both
    /// ends of a connection; a name it does not have is refused at once, naming it.
    #[test]
    fn the_links_congestion_control_reaches_the_socket() {
        let default = Congestion::resolve(None).expect("the default resolves");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listening on loopback");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connecting");
        let (server, _) = listener.accept().expect("accepting");
        for socket in [&client, &server] {
            default.apply(socket).expect("setting the default");
            if let Congestion::Named(name) = &default {
                assert_eq!(&congestion_of(socket).expect("reading it back"), name);
            }
        }
        let reno = Congestion::resolve(Some("reno")).expect("reno is built into every kernel");
        reno.apply(&client).expect("switching a connected socket");
        assert_eq!(congestion_of(&client).expect("reading it back"), "reno");

        assert_eq!(Congestion::resolve(Some(CONGESTION_SYSTEM)).expect("system"), Congestion::System);
        let error = Congestion::resolve(Some("no-such-cc")).expect_err("an unknown name is refused");
        assert!(error.to_string().contains("\"no-such-cc\""), "{error}");
        let error = Congestion::resolve(Some("a-name-longer-than-the-kernels")).expect_err("too long");
        assert!(error.to_string().contains("1 to 15 bytes"), "{error}");
    }
}
