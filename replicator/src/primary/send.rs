//! The send stage: one send at a time per connection, of the frame at its queue's front (or a
//! batch of export frames), and what each completion means for the queue and the buffers.
//!
//! Owns nothing of its own: it works on each connection's queue and fixed frame buffers
//! (`peer::Conn`) and on the buffer references (`buffers`). Invariants:
//! - frames leave a connection in queue order (one send in flight per connection; a partial
//!   send leaves its frame at the front, and the rest goes next);
//! - an extent frame's buffer is referenced by the queued job until the frame is sent, and by
//!   each zero-copy send until that send's notification;
//! - at most `NOTIFICATIONS_PER_SECONDARY_MAX` zero-copy sends to one secondary await their
//!   notification (`Peers::notifications`): the ring budget counts on it.

use std::os::fd::AsRawFd as _;
use std::time::Instant;

use io_uring::{opcode, types};

use super::Op;
use super::buffers::Buffers;
use super::config::NOTIFICATIONS_PER_SECONDARY_MAX;
use super::export::ExportState;
use super::peer::{self, Conn, SendJob};
use super::peers::{Disconnect, Peers};
use crate::uring::{Completion, Ring};
use crate::wire;

/// `IORING_SEND_ZC_REPORT_USAGE` and `IORING_NOTIF_USAGE_ZC_COPIED` from the kernel's uapi
/// (`io_uring.h`); the io-uring crate keeps its `sys` module private.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

/// Starts a send on every connection with a queued frame and no send in flight.
pub fn start(ring: &mut Ring<Op>, buffers: &mut Buffers, peers: &mut Peers, export: Option<&ExportState>) {
    for index in 0..peers.len() {
        if peers.get(index).conn.as_ref().is_none_or(|c| c.sending || c.queue.is_empty()) {
            continue;
        }
        let sequence = match peers.get(index).conn.as_ref().and_then(|c| c.queue.front()) {
            Some(SendJob::Keepalive { sent: 0 } | SendJob::VerifyRequest { sent: 0, .. }) => {
                Some(peers.next_sequence())
            }
            _ => None,
        };
        let notifications = peers.notifications(index);
        let peer = peers.get_mut(index);
        let generation = peer.generation;
        let zero_copy = peer.zero_copy && notifications < NOTIFICATIONS_PER_SECONDARY_MAX;
        let conn = peer.conn.as_mut().expect("checked above");
        if let Some(sequence) = sequence {
            encode_front(conn, sequence);
        }
        let is_extent = matches!(conn.queue.front(), Some(SendJob::Extent { .. }));
        if is_extent && peer.zero_copy && !zero_copy {
            continue; // its zero-copy notifications are at their limit: the next one frees a place
        }
        let (entry, zero_copy_buffer) = entry(conn, buffers, export, zero_copy);
        conn.sending = true;
        conn.last_sent = Instant::now();
        if let Some(buffer) = zero_copy_buffer {
            // The send op's own reference, dropped on its notification.
            buffers.add_ref(buffer);
            peers.notification_started(index);
        }
        let op = Op::Send { peer: index, generation, zero_copy_buffer, notification: false };
        // SAFETY: the frame's bytes are the connection's fixed buffers, a pool buffer it holds
        // a reference to, or an export slot's buffer held until `send_done` (see `entry`); none
        // moves or is freed before this op's last completion (a dropped connection is retired
        // until then).
        unsafe { ring.push(op, entry) };
    }
}

/// Encodes the front frame of `conn` that is encoded only when its send starts (a keepalive,
/// a verify request), with `sequence`.
fn encode_front(conn: &mut Conn, sequence: u64) {
    match conn.queue.front() {
        Some(&SendJob::Keepalive { sent: 0 }) => {
            *conn.keepalive = wire::encode_header(wire::MessageKind::Keepalive, sequence, &[]);
        }
        Some(&SendJob::VerifyRequest { first_extent, count, sent: 0 }) => {
            let mut frame = Vec::with_capacity(conn.verify_frame.len());
            wire::encode(&wire::Message::VerifyRequest { first_extent, count }, sequence, &mut frame);
            conn.verify_frame.copy_from_slice(&frame);
        }
        _ => unreachable!("only keepalives and verify requests are encoded as their send starts"),
    }
}

/// The send entry of `conn`'s front frame, and the pool buffer a zero-copy send of it holds.
fn entry(
    conn: &mut Conn,
    buffers: &Buffers,
    export: Option<&ExportState>,
    zero_copy: bool,
) -> (io_uring::squeue::Entry, Option<u16>) {
    let fd = types::Fd(conn.stream.as_raw_fd());
    let plain = |bytes: &[u8]| opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32).build();
    match conn.queue.front().expect("a queued frame") {
        SendJob::VerifyRequest { sent, .. } => (plain(&conn.verify_frame[*sent..]), None),
        SendJob::Db { sent } => (plain(&conn.db_frame[*sent..]), None),
        SendJob::Point { sent } => (plain(&conn.point_frame[*sent..]), None),
        SendJob::Commit { sent } => (plain(&conn.commit_frame[*sent..]), None),
        SendJob::Keepalive { sent } => (plain(&conn.keepalive[*sent..]), None),
        SendJob::Export { .. } => (export_entry(conn, export.expect("an export frame's export")), None),
        &SendJob::Extent { buffer, frame_bytes, sent, .. } => {
            // SAFETY: the frame starts EXTENT_PREFIX_BYTES before the data, in the prefix.
            let start = unsafe { buffers.pool().data_ptr(buffer).sub(wire::EXTENT_PREFIX_BYTES).add(sent) };
            let len = (frame_bytes - sent) as u32;
            if zero_copy {
                let entry = opcode::SendZc::new(fd, start, len)
                    .buf_index(Some(buffer))
                    .zc_flags(SEND_ZC_REPORT_USAGE)
                    .build();
                (entry, Some(buffer))
            } else {
                (opcode::Send::new(fd, start, len).build(), None)
            }
        }
    }
}

/// The export frames at the queue's front, up to `EXPORT_IOVECS_MAX`, in one plain sendmsg:
/// they are mostly a few KiB, where a copy costs less than a zero-copy send's page pinning and
/// notification, and one syscall less per frame.
fn export_entry(conn: &mut Conn, export: &ExportState) -> io_uring::squeue::Entry {
    let mut count = 0;
    for job in conn.queue.iter().take(peer::EXPORT_IOVECS_MAX) {
        let &SendJob::Export { slot, frame_bytes, sent, .. } = job else { break };
        conn.export_iovecs[count] = libc::iovec {
            iov_base: export.frame_ptr(slot, sent).cast_mut().cast(),
            iov_len: frame_bytes - sent,
        };
        count += 1;
    }
    // SAFETY: a zeroed msghdr is valid; it points at the connection's iovecs, which stay put
    // (boxed) and unchanged until this send completes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = conn.export_iovecs.as_mut_ptr();
    msg.msg_iovlen = count;
    *conn.export_msg = msg;
    conn.export_sending = count;
    opcode::SendMsg::new(types::Fd(conn.stream.as_raw_fd()), &*conn.export_msg).build()
}

/// A send op's completion: its first (the bytes sent), after which a zero-copy send stays in
/// the ring for its notification, or the notification.
pub fn complete(
    ring: &mut Ring<Op>,
    completion: Completion,
    buffers: &mut Buffers,
    peers: &mut Peers,
    export: Option<&mut ExportState>,
    extent_bytes: u64,
) {
    let Op::Send { peer, generation, zero_copy_buffer, notification } = *ring.op_mut(completion.slot) else {
        unreachable!("a send's completion")
    };
    if notification {
        assert!(completion.notification(), "the second completion of a zero-copy send is its notification");
        ring.take(completion.slot);
        notified(peers, peer, generation, completion.result & NOTIF_USAGE_ZC_COPIED != 0);
        buffers.release(zero_copy_buffer.expect("zero-copy sends carry a buffer"));
        return;
    }
    if zero_copy_buffer.is_some() && completion.more() {
        let Op::Send { notification, .. } = ring.op_mut(completion.slot) else { unreachable!() };
        *notification = true;
    } else {
        ring.take(completion.slot);
        if let Some(buffer) = zero_copy_buffer {
            peers.notification_done(peer);
            buffers.release(buffer);
        }
    }
    sent(
        peers,
        peer,
        generation,
        zero_copy_buffer.is_some(),
        completion.result,
        buffers,
        export,
        extent_bytes,
    );
}

/// A zero-copy send's notification: counts the kernel's copies and, if it copied every send
/// of the probe, turns zero-copy off for that secondary.
fn notified(peers: &mut Peers, index: usize, generation: u32, copied: bool) {
    peers.notification_done(index);
    let target = peers.get_mut(index);
    if target.generation != generation {
        return;
    }
    if copied {
        target.stats.copied_sends += 1;
        target.metrics.copied_sends.inc();
    }
    if target.zero_copy_probe.copied_throughout(copied) {
        tracing::info!(
            secondary = %target.name,
            sends = peer::ZERO_COPY_PROBE_SENDS,
            "the kernel copied every zero-copy send to this secondary (veth, loopback, or a NIC \
             without scatter-gather); using plain sends"
        );
        target.zero_copy = false;
    }
}

/// A send of connection `generation` of slot `index` sent `result` bytes (or failed).
#[allow(clippy::too_many_arguments)]
fn sent(
    peers: &mut Peers,
    index: usize,
    generation: u32,
    zero_copy: bool,
    result: i32,
    buffers: &mut Buffers,
    export: Option<&mut ExportState>,
    extent_bytes: u64,
) {
    if peers.get(index).generation != generation {
        peers.retired_op_done(index, generation, false, export);
        return;
    }
    let peer = peers.get_mut(index);
    let conn = peer.conn.as_mut().expect("same generation is connected");
    conn.sending = false;
    if zero_copy && (result == -libc::EOPNOTSUPP || result == -libc::EINVAL) {
        tracing::warn!(secondary = %peer.name, "zero-copy send not supported on this socket; using plain send");
        peer.zero_copy = false;
        return;
    }
    if result < 0 {
        // This send is over: the dropped connection waits for nothing but its receive.
        let reason = Disconnect::SendFailed(std::io::Error::from_raw_os_error(-result));
        peers.disconnect(index, reason, buffers, export);
        return;
    }
    if matches!(conn.queue.front(), Some(SendJob::Export { .. })) {
        peer.stats.plain_sends += 1;
        export_frames_sent(peers, index, result as usize, export.expect("an export frame's export"));
        return;
    }
    if zero_copy {
        peer.stats.zero_copy_sends += 1;
        peer.metrics.zero_copy_sends.inc();
    } else {
        peer.stats.plain_sends += 1;
    }
    if let Some((buffer, data_bytes)) = front_sent(conn, result as usize) {
        peer.counts_shipped(data_bytes, extent_bytes);
        buffers.release(buffer);
    }
}

/// `sent` more bytes of `conn`'s front frame went out. When that finishes an extent frame, it
/// leaves the queue (its ack's round trip is timed from now) and its buffer and data bytes are
/// returned; any other finished frame just leaves the queue.
fn front_sent(conn: &mut Conn, sent_now: usize) -> Option<(u16, u64)> {
    let (sent, frame_bytes) = match conn.queue.front_mut().expect("a send completes the front job") {
        SendJob::Keepalive { sent } => (sent, wire::HEADER_BYTES),
        SendJob::VerifyRequest { sent, .. } => (sent, wire::HEADER_BYTES + wire::VERIFY_FIXED_BYTES),
        SendJob::Db { sent } => (sent, conn.db_frame.len()),
        SendJob::Point { sent } => (sent, wire::HEADER_BYTES + wire::POINT_PAYLOAD_BYTES),
        SendJob::Commit { sent } => (sent, wire::HEADER_BYTES + wire::COMMIT_PAYLOAD_BYTES),
        SendJob::Extent { frame_bytes, sent, .. } => (sent, *frame_bytes),
        SendJob::Export { .. } => unreachable!("export sends complete in export_frames_sent"),
    };
    *sent += sent_now;
    assert!(*sent <= frame_bytes, "sent past the frame's end");
    if *sent < frame_bytes {
        return None;
    }
    match conn.queue.pop_front().expect("front job") {
        SendJob::Extent { buffer, frame_bytes, sequence, .. } => {
            if let Some(frame) = conn.inflight.get_mut(&sequence) {
                frame.sent_at = Some(Instant::now());
            }
            Some((buffer, (frame_bytes - wire::EXTENT_PREFIX_BYTES) as u64))
        }
        _ => None,
    }
}

/// A sendmsg of the export frames at the queue's front sent `sent_bytes`: the frames it
/// finished leave the queue (their slots learn it), a partly sent one stays at the front.
fn export_frames_sent(peers: &mut Peers, index: usize, mut sent_bytes: usize, export: &mut ExportState) {
    let peer = peers.get_mut(index);
    let conn = peer.conn.as_mut().expect("a send completed on this connection");
    conn.export_sending = 0;
    while sent_bytes > 0 {
        let Some(SendJob::Export { frame_bytes, sent, .. }) = conn.queue.front_mut() else {
            unreachable!("a sendmsg of export frames sent more than those frames")
        };
        let take = sent_bytes.min(*frame_bytes - *sent);
        *sent += take;
        sent_bytes -= take;
        if *sent < *frame_bytes {
            break;
        }
        let Some(SendJob::Export { slot, sequence, .. }) = conn.queue.pop_front() else { unreachable!() };
        if let Some(frame) = conn.inflight.get_mut(&sequence) {
            frame.sent_at = Some(Instant::now());
            peer.stats.shipped_bytes += frame.bytes;
            peer.metrics.shipped_bytes.inc_by(frame.bytes);
        }
        export.send_done(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::peer::InFlight;
    use crate::primary::testing;

    /// Partial sends leave the frame at the front; the one that finishes it pops it, stamps
    /// its send time (the ack's round trip is timed from there) and returns its buffer.
    #[test]
    fn a_frame_leaves_the_queue_once_its_last_byte_is_sent() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let conn = peers.get_mut(0).conn.as_mut().expect("connected");
        let now = Instant::now();
        conn.inflight
            .insert(9, InFlight { run: 0..1, bytes: 4096, queued_at: now, written_at: now, sent_at: None });
        let frame_bytes = wire::EXTENT_PREFIX_BYTES + 4096;
        conn.queue.push_back(SendJob::Extent { buffer: 3, frame_bytes, sent: 0, sequence: 9 });
        conn.queue.push_back(SendJob::Keepalive { sent: 0 });
        assert_eq!(front_sent(conn, 1000), None);
        assert_eq!(front_sent(conn, frame_bytes - 1001), None);
        assert_eq!(front_sent(conn, 1), Some((3, 4096)));
        assert!(conn.inflight[&9].sent_at.is_some());
        assert!(matches!(conn.queue.front(), Some(SendJob::Keepalive { .. })));
        assert_eq!(front_sent(conn, wire::HEADER_BYTES), None, "a control frame returns no buffer");
        assert!(conn.queue.is_empty());
    }

    /// Sends go out in queue order over a real socket: the secondary's end reads the frames
    /// whole and in sequence, and a finished frame's buffer goes back.
    #[test]
    fn queued_frames_reach_the_socket_in_order() {
        let (mut peers, mut far) = testing::peers(1, &[0]);
        let mut buffers = testing::buffers();
        let mut ring = testing::ring(&buffers);
        let buffer = buffers.take().expect("a buffer");
        buffers.pool_mut().data_mut(buffer, 4096).fill(0xab);
        let prefix = wire::encode_extent_prefix(5, 8192, buffers.pool().data(buffer, 4096), 0);
        buffers.pool_mut().prefix_tail_mut(buffer, wire::EXTENT_PREFIX_BYTES).copy_from_slice(&prefix);
        buffers.share(buffer, 1);
        let conn = peers.get_mut(0).conn.as_mut().expect("connected");
        conn.queue.push_back(SendJob::Extent {
            buffer,
            frame_bytes: wire::EXTENT_PREFIX_BYTES + 4096,
            sent: 0,
            sequence: 5,
        });
        conn.queue.push_back(SendJob::Keepalive { sent: 0 });
        while peers.get(0).conn.as_ref().is_some_and(|c| !c.queue.is_empty()) {
            start(&mut ring, &mut buffers, &mut peers, None);
            ring.submit_and_wait().expect("waiting");
            for completion in ring.reap() {
                complete(&mut ring, completion, &mut buffers, &mut peers, None, 4096);
            }
        }
        assert_eq!(buffers.free_count(), usize::from(testing::BUFFERS), "the extent frame's buffer is back");
        let limits = wire::Limits { image_bytes: 1 << 20, extent_bytes: 4096, payload_bytes_max: 8 + 4096 };
        let mut scratch = Vec::new();
        let (sequence, message) =
            wire::read_frame(&mut far[0], &limits, &mut scratch).expect("the extent frame");
        assert_eq!(sequence, 5);
        assert!(
            matches!(message, wire::Message::ExtentData { offset_bytes: 8192, data } if data == [0xab; 4096])
        );
        let (_, message) = wire::read_frame(&mut far[0], &limits, &mut scratch).expect("then the keepalive");
        assert_eq!(message, wire::Message::Keepalive);
        assert_eq!(peers.get(0).stats.shipped_bytes, 4096);
    }
}
