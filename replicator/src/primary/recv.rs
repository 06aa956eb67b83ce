//! The ack stage: one receive in flight per connection, and what the secondary's frames say:
//! acks (frames durable: they leave `inflight` and the backlog, and the lag is recorded),
//! keepalives, verify hashes, the cut its image holds after a commit, a failing-back former
//! primary's divergent extents, and errors.
//!
//! Owns nothing of its own: it fills each connection's receive buffer (`peer::Conn::recv`,
//! fixed while a receive is in flight) and parses it. Invariant: a frame from a secondary acts
//! only once it decoded cleanly (`wire::parse_frame`); anything else ends the connection with
//! the reason (`Disconnect`), and its unacknowledged frames go back to pending.

use std::os::fd::AsRawFd as _;
use std::time::Instant;

use io_uring::{opcode, types};

use super::Op;
use super::buffers::Buffers;
use super::export::ExportState;
use super::peer::{Conn, Latency, PeerStats};
use super::peers::{Disconnect, Peers};
use super::resync::Verify;
use crate::extent_set::ExtentSet;
use crate::uring::Ring;
use crate::wire::{self, Limits, Message};

/// What a secondary may send: acks, keepalives, verify hashes, errors with their message.
pub const FROM_SECONDARY: Limits = Limits {
    image_bytes: 0,
    extent_bytes: 1,
    payload_bytes_max: if 4 + wire::ERROR_MESSAGE_BYTES_MAX > wire::VERIFY_HASHES_BYTES_MAX {
        (4 + wire::ERROR_MESSAGE_BYTES_MAX) as u32
    } else {
        wire::VERIFY_HASHES_BYTES_MAX as u32
    },
};

/// Keeps a receive in flight on every connection.
pub fn post(ring: &mut Ring<Op>, peers: &mut Peers) {
    for (index, peer) in peers.iter_mut().enumerate() {
        let generation = peer.generation;
        let Some(conn) = peer.conn.as_mut().filter(|c| !c.recv_in_flight) else { continue };
        conn.compact_recv();
        let free = &mut conn.recv[conn.recv_len..];
        let entry =
            opcode::Recv::new(types::Fd(conn.stream.as_raw_fd()), free.as_mut_ptr(), free.len() as u32)
                .build();
        conn.recv_in_flight = true;
        // SAFETY: the receive buffer is boxed in the connection, which is retired (kept) until
        // this op completes if it is dropped meanwhile.
        unsafe { ring.push(Op::Recv { peer: index, generation }, entry) };
    }
}

/// What a batch of received frames told the engine beyond acks.
#[derive(Debug, Default)]
pub struct Received {
    /// Extents a failing-back secondary (a former primary) wrote that this primary may lack.
    pub divergent_extents: u64,
    /// The secondary's image after a commit (its `CutState`).
    pub cut: Option<crate::auth::SecondaryCut>,
}

/// A receive of connection `generation` of slot `index` completed with `result` bytes: the
/// whole frames received are applied. Returns what they told beyond acks, or none if the
/// connection is gone.
pub fn complete(
    index: usize,
    generation: u32,
    result: i32,
    peers: &mut Peers,
    buffers: &mut Buffers,
    export: Option<&mut ExportState>,
) -> Option<Received> {
    if peers.get(index).generation != generation {
        peers.retired_op_done(index, generation, true, export);
        return None;
    }
    let peer = peers.get_mut(index);
    let conn = peer.conn.as_mut().expect("same generation is connected");
    conn.recv_in_flight = false;
    let reason = match result {
        0 => Disconnect::Closed,
        r if r < 0 => Disconnect::RecvFailed(std::io::Error::from_raw_os_error(-r)),
        r => {
            conn.recv_len += r as usize;
            conn.last_heard = Instant::now();
            match parse(conn, &mut peer.stats, peer.log.verify.as_mut(), &mut peer.pending, &mut peer.latency)
            {
                Ok(received) => return Some(received),
                Err(reason) => reason,
            }
        }
    };
    peers.disconnect(index, reason, buffers, export);
    None
}

/// Applies the whole frames received so far (acks release backlog), or says why the
/// connection must close.
pub fn parse(
    conn: &mut Conn,
    stats: &mut PeerStats,
    mut verify: Option<&mut Verify>,
    pending: &mut ExtentSet,
    latency: &mut Latency,
) -> Result<Received, Disconnect> {
    let mut received = Received::default();
    loop {
        let bytes = &conn.recv[conn.recv_start..conn.recv_len];
        let Some((used, _, message)) = wire::parse_frame(bytes, &FROM_SECONDARY)? else {
            return Ok(received);
        };
        match message {
            Message::Ack { first_sequence, last_sequence } => {
                acked(conn, stats, latency, first_sequence..=last_sequence)
            }
            Message::Keepalive => {}
            Message::CutState { committed_cut, committed_unix_ms, staged_cut_max, flags } => {
                received.cut = Some(crate::auth::SecondaryCut {
                    committed_cut,
                    committed_unix_ms,
                    staged_cut_max,
                    consistent: flags & wire::CUT_STATE_CONSISTENT != 0,
                });
            }
            Message::DivergentRuns { runs } => received.divergent_extents += divergent(pending, runs)?,
            Message::VerifyHashes { first_extent, hashes } => match verify.as_deref_mut() {
                Some(verify) => verify
                    .take_reply(first_extent, hashes)
                    .map_err(|count| Disconnect::VerifyReply { first_extent, count })?,
                // A batch of a verify cancelled since (`sync` during a verify): dropped.
                None => tracing::debug!(first_extent, "verify hashes of a cancelled verify: dropped"),
            },
            Message::Error { code, message } => {
                return Err(Disconnect::Reported { code, message: message.to_owned() });
            }
            other => return Err(Disconnect::Unexpected(other.kind())),
        }
        conn.recv_start += used;
    }
}

/// The frames `sequences` are durable on the secondary: they leave `inflight` and the backlog,
/// and the data frames' lag (from the write's drain) and round trip (from the frame's send) are
/// recorded.
fn acked(
    conn: &mut Conn,
    stats: &mut PeerStats,
    latency: &mut Latency,
    sequences: std::ops::RangeInclusive<u64>,
) {
    let micros = |since: Instant| since.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
    while let Some((&sequence, _)) = conn.inflight.range(sequences.clone()).next() {
        let done = conn.inflight.remove(&sequence).expect("key just found");
        conn.backlog_bytes -= done.bytes;
        stats.acked_frames += 1;
        if done.bytes > 0 {
            let _ = latency.lag_us.record(micros(done.written_at));
            if let Some(sent_at) = done.sent_at {
                let _ = latency.rtt_us.record(micros(sent_at));
            }
        }
    }
}

/// A failing-back secondary's runs (decoded: whole, first < end) become pending; returns how
/// many extents they cover.
fn divergent(pending: &mut ExtentSet, runs: &[u8]) -> Result<u64, Disconnect> {
    let mut reader = crate::envelope::Reader::new(runs);
    let mut extents = 0;
    while reader.remaining() > 0 {
        let (first, end) = (reader.u64().expect("whole runs"), reader.u64().expect("whole runs"));
        if end > pending.len() as u64 {
            return Err(Disconnect::DivergentPastImage { first, end });
        }
        pending.insert_range(first as usize..end as usize);
        extents += end - first;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::peer::InFlight;
    use crate::primary::testing;
    use crate::wire::{ErrorCode, MessageKind};

    /// `frames` (encoded one after the other) arrive on slot 0's connection, with two data
    /// frames in flight (sequences 10 and 11, 4 KiB each) and one control frame (12).
    fn parse_after(frames: &[Message]) -> (Result<Received, Disconnect>, Peers) {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let peer = peers.get_mut(0);
        let conn = peer.conn.as_mut().expect("connected");
        for (sequence, run) in [(10, 0..1), (11, 1..2)] {
            let now = Instant::now();
            conn.inflight.insert(
                sequence,
                InFlight { run, bytes: 4096, queued_at: now, written_at: now, sent_at: Some(now) },
            );
            conn.backlog_bytes += 4096;
        }
        conn.inflight.insert(12, InFlight::control());
        let mut frame = Vec::new();
        for (sequence, message) in frames.iter().enumerate() {
            wire::encode(message, sequence as u64, &mut frame);
            conn.recv[conn.recv_len..conn.recv_len + frame.len()].copy_from_slice(&frame);
            conn.recv_len += frame.len();
        }
        let peer = peers.get_mut(0);
        let conn = peer.conn.as_mut().expect("connected");
        let parsed =
            parse(conn, &mut peer.stats, peer.log.verify.as_mut(), &mut peer.pending, &mut peer.latency);
        (parsed, peers)
    }

    #[test]
    fn acks_release_their_frames_and_backlog() {
        let (parsed, peers) =
            parse_after(&[Message::Ack { first_sequence: 10, last_sequence: 10 }, Message::Keepalive]);
        assert!(parsed.is_ok());
        let conn = peers.get(0).conn.as_ref().expect("connected");
        assert_eq!(conn.inflight.keys().copied().collect::<Vec<_>>(), [11, 12]);
        assert_eq!(conn.backlog_bytes, 4096);
        assert_eq!(peers.get(0).stats.acked_frames, 1);
        let (parsed, peers) = parse_after(&[Message::Ack { first_sequence: 5, last_sequence: 12 }]);
        assert!(parsed.is_ok());
        let conn = peers.get(0).conn.as_ref().expect("connected");
        assert!(conn.inflight.is_empty() && conn.backlog_bytes == 0, "a range acks every frame in it");
    }

    /// Decisions follow the code: a secondary's `Error` frame is reported with its code, and
    /// what a secondary never sends ends the connection.
    #[test]
    fn errors_and_frames_a_primary_never_takes_end_the_connection() {
        let error = Message::Error { code: ErrorCode::SplitBrain, message: "apart" };
        let (parsed, _) = parse_after(&[error]);
        let reason = parsed.expect_err("an error frame ends the session");
        assert!(reason.split_brain() && !reason.write_failed(), "{reason}");
        let (parsed, _) =
            parse_after(&[Message::Error { code: ErrorCode::Protocol, message: "split brain" }]);
        assert!(!parsed.expect_err("ends it").split_brain(), "the text decides nothing");
        let (parsed, _) = parse_after(&[Message::MirrorDbCommit { revision: 1 }]);
        assert!(matches!(parsed, Err(Disconnect::Unexpected(MessageKind::MirrorDbCommit))));
        let (parsed, _) = parse_after(&[Message::VerifyHashes { first_extent: 0, hashes: &[0; 16] }]);
        assert!(parsed.is_ok(), "hashes of a cancelled verify are dropped");
    }

    /// A failing-back former primary's runs become pending; one past the image is refused.
    #[test]
    fn divergent_runs_become_pending_inside_the_image_only() {
        let runs: Vec<u8> = [2u64, 5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let (parsed, peers) = parse_after(&[Message::DivergentRuns { runs: &runs }]);
        assert_eq!(parsed.expect("inside the image").divergent_extents, 3);
        assert_eq!(peers.get(0).pending.bits().iter_ones().collect::<Vec<_>>(), [2, 3, 4]);
        let past = testing::EXTENTS as u64 + 1;
        let runs: Vec<u8> = [2u64, past].iter().flat_map(|v| v.to_le_bytes()).collect();
        let (parsed, _) = parse_after(&[Message::DivergentRuns { runs: &runs }]);
        assert!(matches!(parsed, Err(Disconnect::DivergentPastImage { end, .. }) if end == past));
    }
}
