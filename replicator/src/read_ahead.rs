//! A socket's read-ahead buffer, for the io_uring readers of framed streams: the export's client
//! connections (NBD requests) and the secondary's session (frames from the primary).
//!
//! Owns the bytes received and not yet used, `bytes[start..end]`. A recv op writes at the end
//! (`recv_room`; the address stays fixed while the op is in flight, and nothing moves the
//! bytes until `received`); the decoder takes from the front. A long payload with nothing of
//! it read ahead skips the buffer (`direct`): it is received straight into its own buffer, so
//! the kernel copies it once. Small frames that arrive together cost one recv together. After
//! a long payload, the next header is received alone (`header_room`): in a stream of long
//! frames (a resync, a sequential rewrite) a recv into the buffer would otherwise take up to
//! `READ_AHEAD_BYTES` of the payload behind the header, to be copied again in userspace (1.5%
//! of the CPU of a secondary at full speed here), and the rest of the payload would be too
//! short to go direct.

/// Bytes of a read-ahead buffer.
pub const READ_AHEAD_BYTES: usize = 256 * 1024;
/// A payload at least this long, with nothing read ahead, is received straight into its buffer
/// rather than through the read-ahead buffer.
pub const DIRECT_RECV_BYTES_MIN: usize = 16 * 1024;

pub struct ReadAhead {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last payload taken was long: the next header is received alone.
    header_alone: bool,
}

impl Default for ReadAhead {
    fn default() -> Self {
        Self { bytes: vec![0; READ_AHEAD_BYTES].into_boxed_slice(), start: 0, end: 0, header_alone: false }
    }
}

impl ReadAhead {
    /// The bytes received and not used yet.
    pub fn unread(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks the first `count` unread bytes used.
    pub fn consume(&mut self, count: usize) {
        assert!(count <= self.end - self.start, "consumed {count} bytes of {}", self.end - self.start);
        self.start += count;
    }

    /// Copies as many unread bytes as fit into `part` and consumes them; returns how many.
    pub fn copy_into(&mut self, part: &mut [u8]) -> usize {
        let count = part.len().min(self.end - self.start);
        part[..count].copy_from_slice(&self.bytes[self.start..self.start + count]);
        self.start += count;
        count
    }

    /// Whether the rest of a payload, `missing` bytes, should be received straight into its
    /// own buffer: nothing is read ahead and much of it is missing.
    pub fn direct(&self, missing: usize) -> bool {
        self.is_empty() && missing >= DIRECT_RECV_BYTES_MIN
    }

    /// Where a recv into the buffer writes, and how much room it has: after the unread bytes,
    /// which are first moved to the front when they sit past its middle or at its very end.
    /// `None` when the buffer is full of unread bytes.
    pub fn recv_room(&mut self) -> Option<(*mut u8, u32)> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && (self.end == self.bytes.len() || self.start >= self.bytes.len() / 2) {
            self.bytes.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let room = self.bytes.len() - self.end;
        if room == 0 {
            return None;
        }
        // SAFETY: `end < bytes.len()`.
        Some((unsafe { self.bytes.as_mut_ptr().add(self.end) }, room as u32))
    }

    /// `recv_room` for a reader waiting for a header, `header_missing` (> 0) bytes of which
    /// have not arrived: only those bytes when the last payload was long (see the module
    /// header), else all the room there is.
    pub fn header_room(&mut self, header_missing: usize) -> Option<(*mut u8, u32)> {
        assert!(header_missing > 0, "a header to wait for");
        if self.header_alone { self.room_at_most(header_missing) } else { self.recv_room() }
    }

    /// `recv_room`, at most `count` (> 0) bytes of it: for the end of a long payload that
    /// arrived in pieces, so the recv stops where the payload does and the next header is
    /// received alone.
    pub fn room_at_most(&mut self, count: usize) -> Option<(*mut u8, u32)> {
        assert!(count > 0, "a recv of nothing");
        let (at, room) = self.recv_room()?;
        Some((at, room.min(count.min(u32::MAX as usize) as u32)))
    }

    /// A frame's payload of `len` bytes (0: none) has been taken whole: decides how the next
    /// header is received.
    pub fn payload_taken(&mut self, len: usize) {
        self.header_alone = len >= DIRECT_RECV_BYTES_MIN;
    }

    /// A recv posted at `recv_room` wrote `count` bytes.
    pub fn received(&mut self, count: usize) {
        assert!(self.end + count <= self.bytes.len(), "a recv wrote past the read-ahead buffer");
        self.end += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the sizes of the recvs and of the parts taken, the bytes come out in the
        /// order they went in.
        #[test]
        fn bytes_come_out_in_order(
            steps in proptest::collection::vec((any::<bool>(), 1usize..100_000), 1..60)
        ) {
            let mut ahead = ReadAhead::default();
            let (mut sent, mut taken) = (0u64, 0u64);
            for (is_recv, size) in steps {
                if is_recv {
                    let Some((at, room)) = ahead.recv_room() else { continue };
                    let count = size.min(room as usize);
                    // SAFETY: `at..at + room` is the buffer's free room.
                    let room = unsafe { std::slice::from_raw_parts_mut(at, count) };
                    for byte in room.iter_mut() {
                        *byte = (sent % 251) as u8;
                        sent += 1;
                    }
                    ahead.received(count);
                } else {
                    let mut part = vec![0u8; size];
                    let count = ahead.copy_into(&mut part);
                    for byte in &part[..count] {
                        prop_assert_eq!(*byte, (taken % 251) as u8);
                        taken += 1;
                    }
                }
            }
            prop_assert_eq!(ahead.unread().len() as u64, sent - taken);
        }
    }

    #[test]
    fn after_a_long_payload_the_header_comes_alone() {
        let mut ahead = ReadAhead::default();
        assert_eq!(ahead.header_room(32).expect("room").1 as usize, READ_AHEAD_BYTES, "small frames batch");
        ahead.payload_taken(DIRECT_RECV_BYTES_MIN);
        assert_eq!(ahead.header_room(32).expect("room").1, 32);
        assert_eq!(
            ahead.recv_room().expect("room").1 as usize,
            READ_AHEAD_BYTES,
            "a payload's recv is not cut"
        );
        ahead.payload_taken(4096);
        assert_eq!(ahead.header_room(32).expect("room").1 as usize, READ_AHEAD_BYTES);
        assert_eq!(ahead.room_at_most(100).expect("room").1, 100);
    }
}
