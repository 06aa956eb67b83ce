//! What the engine's unit tests build their parts from, as a normal user and without a kernel
//! tracker: secondaries connected over loopback sockets (no connector threads), a read side
//! over a plain file, buffers, metrics.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use super::buffers::Buffers;
use super::peer::{Conn, Peer};
use super::peers::{Peers, Reach};
use super::read::Source;
use super::resync::PeerLog;
use crate::extent_set::ExtentSet;
use crate::model::RecoveryPolicy;

pub const EXTENT_BYTES: u64 = 4096;
pub const EXTENTS: usize = 64;
pub const RUN_BYTES_MAX: usize = 4 * EXTENT_BYTES as usize;
pub const BUFFERS: u16 = 8;

pub fn metrics() -> Arc<crate::metrics::PrimaryMetrics> {
    Arc::new(crate::metrics::PrimaryMetrics::default())
}

/// A connected socket pair on loopback: the engine's end and the secondary's.
pub fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let ours = TcpStream::connect(listener.local_addr().expect("its address")).expect("connecting");
    let (theirs, _) = listener.accept().expect("accepting");
    (ours, theirs)
}

/// Secondaries `s0..s<count>` with nothing pending; those in `connected` have a connection,
/// whose far ends are returned (kept open, so the connections stay up).
pub fn peers(count: usize, connected: &[usize]) -> (Peers, Vec<TcpStream>) {
    let reach = Reach {
        key: Arc::new(crate::auth::Key::from_bytes(&[7; 32])),
        params: crate::auth::Params {
            mirror_id: 1,
            image_bytes: EXTENTS as u64 * EXTENT_BYTES,
            extent_bytes: EXTENT_BYTES,
        },
        timeout_ms: 1000,
        retry_max_ms: 1000,
        zero_copy: false,
        congestion: crate::link::Congestion::resolve(Some("system")).expect("the host's congestion control"),
    };
    let metrics = metrics();
    let mut far_ends = Vec::new();
    let slots = (0..count)
        .map(|i| {
            let name = format!("s{i}");
            let log = PeerLog::new(&name, 0, RecoveryPolicy::Automatic);
            let (want, _) = std::sync::mpsc::channel();
            let addr = "127.0.0.1:9".parse().expect("an address");
            let mut peer = Peer::new(
                &name,
                addr,
                ExtentSet::new(EXTENTS),
                log,
                0,
                0,
                want,
                false,
                metrics.peer(&name),
                EXTENTS,
            );
            if connected.contains(&i) {
                let (ours, theirs) = socket_pair();
                peer.conn = Some(Conn::new(ours));
                far_ends.push(theirs);
            }
            peer
        })
        .collect();
    (Peers::with_slots(reach, metrics, slots), far_ends)
}

/// A read side over a plain file of `EXTENTS` extents (no read is submitted by the tests that
/// use it unless they say so).
pub fn source() -> Source {
    let file = tempfile_of(EXTENTS as u64 * EXTENT_BYTES);
    Source::new(
        file,
        "test-device".into(),
        EXTENTS as u64 * EXTENT_BYTES,
        EXTENT_BYTES,
        RUN_BYTES_MAX,
        BUFFERS,
    )
}

/// A ring with `buffers` registered (the caller keeps them alive as long as the ring).
pub fn ring(buffers: &Buffers) -> crate::uring::Ring<super::Op> {
    let ring = crate::uring::Ring::new(32).expect("a ring");
    // SAFETY: the tests drop the ring before the buffers (declared after them, or explicitly).
    unsafe { ring.register_buffers(buffers.pool()) }.expect("registering the buffers");
    ring
}

pub fn buffers() -> Buffers {
    Buffers::new(BUFFERS, RUN_BYTES_MAX).expect("a buffer pool")
}

/// An unlinked temporary file of `bytes` zeroes.
fn tempfile_of(bytes: u64) -> std::fs::File {
    let path =
        std::env::temp_dir().join(format!("replicator-engine-test-{}-{}", std::process::id(), unique()));
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("a temp file");
    std::fs::remove_file(&path).expect("unlinked");
    file.set_len(bytes).expect("sized");
    file
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
