//! The network round trip a synchronous write pays: one process sends a 4 KiB request over
//! TCP, another process on the far side of the veth answers with 16 bytes, and the sender
//! wakes. ICMP ping measures less than that (the far kernel answers in softirq, no process is
//! woken), so the export-latency scenario reports both. Both ends use the congestion control
//! the replicator's link uses by default (`replicator::link`), not the host's.
//!
//! The bench binary plays both ends, each in its namespace: `__round-trip-serve ADDR` and
//! `__round-trip-client ADDR` (hidden modes, dispatched before argument parsing).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use replicator::testbed::Lab;

/// The request: a 4 KiB block and a wire frame's header, as a synchronous write ships.
const REQUEST_BYTES: usize = 4096 + 32;
/// The reply: an acknowledgement's size.
const REPLY_BYTES: usize = 16;
/// Round trips measured (and as many before them, not counted, to warm up).
const ROUND_TRIPS: usize = 20_000;
/// The port the server listens on in the secondary's namespace.
const PORT: u16 = 17_999;
/// How long the client retries connecting while the server starts.
const CONNECT_TIMEOUT_MS: u64 = 5_000;

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct RoundTrip {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs a hidden mode if `args` name one; `None` when they do not.
pub fn dispatch(args: &[String]) -> Option<anyhow::Result<()>> {
    match args.get(1).map(String::as_str) {
        Some("__round-trip-serve") => Some(serve(args.get(2)?)),
        Some("__round-trip-client") => Some(client(args.get(2)?)),
        _ => None,
    }
}

/// Measures the round trip from the primary's namespace to the first secondary's address.
pub fn measure(lab: &Lab) -> anyhow::Result<RoundTrip> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let addr = SocketAddr::new(lab.secondary_addrs[0].ip(), PORT).to_string();
    let mut server = lab.secondary_ns[0]
        .command(&exe)
        .args(["__round-trip-serve", &addr])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the round-trip server")?;
    let output = lab.primary_ns.command(&exe).args(["__round-trip-client", &addr]).output();
    let _ = server.kill();
    let _ = server.wait();
    let output = output.context("running the round-trip client")?;
    anyhow::ensure!(
        output.status.success(),
        "round-trip client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).context("round-trip client output")
}

/// The congestion control the replicator's link uses by default, on both ends, as its own; an
/// error if the kernel lacks it (the link would then run the host's, which the table would not say).
fn link_congestion() -> anyhow::Result<replicator::link::Congestion> {
    let congestion = replicator::link::Congestion::resolve(None)?;
    anyhow::ensure!(
        congestion.name() == Some(replicator::link::CONGESTION_DEFAULT),
        "the kernel lacks TCP congestion control {}",
        replicator::link::CONGESTION_DEFAULT
    );
    Ok(congestion)
}

fn serve(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let (mut stream, _) = listener.accept().context("accepting the round-trip client")?;
    stream.set_nodelay(true)?;
    link_congestion()?.apply(&stream, "the round trip's socket")?;
    let mut request = vec![0u8; REQUEST_BYTES];
    while stream.read_exact(&mut request).is_ok() {
        stream.write_all(&[0u8; REPLY_BYTES])?;
    }
    Ok(())
}

fn client(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS);
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    };
    stream.set_nodelay(true)?;
    link_congestion()?.apply(&stream, "the round trip's socket")?;
    let request = vec![0x5au8; REQUEST_BYTES];
    let mut reply = [0u8; REPLY_BYTES];
    // Microseconds to a second at 3 significant digits, as the engine's own histograms.
    let mut latencies_ns = hdrhistogram::Histogram::<u64>::new_with_bounds(1_000, 1_000_000_000, 3)
        .context("a round-trip histogram")?;
    for i in 0..2 * ROUND_TRIPS {
        let start = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        if i >= ROUND_TRIPS {
            latencies_ns.saturating_record(start.elapsed().as_nanos() as u64);
        }
    }
    let at_us = |q: f64| latencies_ns.value_at_quantile(q) as f64 / 1000.0;
    println!("{}", serde_json::to_string(&RoundTrip { p50_us: at_us(0.50), p99_us: at_us(0.99) })?);
    Ok(())
}
