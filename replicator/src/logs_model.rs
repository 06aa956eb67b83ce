//! A model of the log rules, driven by random operations: writes (queued, then completed), the
//! engine's drains, ships and acks, disconnects and reconnects, checkpoints, process crashes and
//! host crashes, in any order. It keeps the rules the engine follows (`shipper`): drained
//! extents are re-marked in the pinned intent map; a disconnect fractures and persists at once;
//! a checkpoint persists fractured secondaries' logs before it clears quiet extents from the
//! intent log (with the real `IntentQuiet`), and files go through the real encoder and decoder.
//!
//! The invariant, checked after every step: every extent whose data on the primary differs
//! from a secondary's is
//! - live: pending, in flight to it, or completed and not yet drained;
//! - after a process crash (what recovery reads: the pinned maps and the files): in the pinned
//!   intent or completed map, that secondary's fracture log, or the intent log's checkpoint;
//! - after a host crash (the files only): in its fracture log or the intent checkpoint, or
//!   written (completed) since the last checkpoint: the documented window that the verify
//!   closes.

use bitvec::prelude::*;
use proptest::prelude::*;

use super::*;

const EXTENTS: usize = 24;
const PEERS: usize = 2;

#[derive(Clone, Debug)]
enum Step {
    Queue(usize),
    Complete,
    Drain,
    Ship(usize, usize),
    Ack(usize),
    Disconnect(usize),
    Reconnect(usize),
    Checkpoint,
    ProcessCrash,
    HostCrash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..EXTENTS).prop_map(Step::Queue),
        4 => Just(Step::Complete),
        3 => Just(Step::Drain),
        6 => (0..PEERS, 0..EXTENTS).prop_map(|(p, e)| Step::Ship(p, e)),
        5 => (0..PEERS).prop_map(Step::Ack),
        1 => (0..PEERS).prop_map(Step::Disconnect),
        2 => (0..PEERS).prop_map(Step::Reconnect),
        3 => Just(Step::Checkpoint),
        1 => Just(Step::ProcessCrash),
        1 => Just(Step::HostCrash),
    ]
}

type Bits = BitVec<u64, Lsb0>;

fn empty() -> Bits {
    bitvec![u64, Lsb0; 0; EXTENTS]
}

struct Peer {
    /// Data version of each extent on the secondary.
    image: Vec<u32>,
    pending: Bits,
    /// Frames sent, unacknowledged: (extent, version read).
    inflight: std::collections::VecDeque<(usize, u32)>,
    connected: bool,
    fractured: bool,
    /// The fracture log file's bytes.
    file: Option<Vec<u8>>,
}

struct Model {
    primary: Vec<u32>,
    queued: std::collections::VecDeque<usize>,
    kernel_intent: Bits,
    kernel_completed: Bits,
    intent_file: Option<Vec<u8>>,
    written_since_checkpoint: Bits,
    quiet: IntentQuiet,
    persisted_intent: Option<Bits>,
    peers: Vec<Peer>,
}

fn header(kind: LogKind, flags: u32) -> LogHeader {
    LogHeader {
        kind,
        flags,
        mirror_id: 1,
        secondary_id: 0,
        generation: 1,
        sequence: 0,
        extent_bytes: 4096,
        image_bytes: EXTENTS as u64 * 4096,
        resync_bytes_done: 0,
        verify_next_extent: 0,
        saved_unix_ms: 0,
        resync_rate_bytes_per_s: 0,
    }
}

fn file_bits(file: &Option<Vec<u8>>) -> Bits {
    file.as_ref().map_or_else(empty, |bytes| decode(bytes).expect("files the model wrote decode").1)
}

impl Model {
    fn new() -> Self {
        let peer = || Peer {
            image: vec![0; EXTENTS],
            pending: empty(),
            inflight: Default::default(),
            connected: true,
            fractured: false,
            file: None,
        };
        Self {
            primary: vec![0; EXTENTS],
            queued: Default::default(),
            kernel_intent: empty(),
            kernel_completed: empty(),
            intent_file: None,
            written_since_checkpoint: empty(),
            quiet: IntentQuiet::new(EXTENTS),
            persisted_intent: None,
            peers: (0..PEERS).map(|_| peer()).collect(),
        }
    }

    fn dirty(&self, p: usize) -> Bits {
        let mut dirty = self.peers[p].pending.clone();
        for &(e, _) in &self.peers[p].inflight {
            dirty.set(e, true);
        }
        dirty
    }

    fn persist_peer(&mut self, p: usize) {
        let bits = if self.peers[p].fractured { self.dirty(p) } else { empty() };
        let flags = if self.peers[p].fractured { FLAG_FRACTURED } else { 0 };
        self.peers[p].file = Some(encode(&header(LogKind::Fracture, flags), &bits));
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Queue(e) => {
                self.kernel_intent.set(e, true);
                self.queued.push_back(e);
            }
            Step::Complete => {
                if let Some(e) = self.queued.pop_front() {
                    self.primary[e] += 1;
                    self.kernel_completed.set(e, true);
                    self.written_since_checkpoint.set(e, true);
                }
            }
            Step::Drain => {
                let taken = std::mem::replace(&mut self.kernel_completed, empty());
                *self.kernel_intent |= taken.as_bitslice();
                self.quiet.note_dirty(&taken);
                for peer in &mut self.peers {
                    *peer.pending |= taken.as_bitslice();
                }
            }
            Step::Ship(p, e) => {
                let version = self.primary[e];
                let peer = &mut self.peers[p];
                if peer.connected && peer.pending[e] {
                    peer.pending.set(e, false);
                    peer.inflight.push_back((e, version));
                }
            }
            Step::Ack(p) => {
                let peer = &mut self.peers[p];
                if let Some((e, version)) = peer.inflight.pop_front() {
                    peer.image[e] = version;
                }
                let synchronized =
                    peer.connected && peer.fractured && peer.pending.not_any() && peer.inflight.is_empty();
                if synchronized {
                    peer.fractured = false;
                    self.persist_peer(p);
                }
            }
            Step::Disconnect(p) => self.disconnect(p),
            Step::Reconnect(p) => self.peers[p].connected = true,
            Step::Checkpoint => self.checkpoint(),
            Step::ProcessCrash => self.process_crash(),
            Step::HostCrash => self.host_crash(),
        }
    }

    fn disconnect(&mut self, p: usize) {
        let peer = &mut self.peers[p];
        if !peer.connected {
            return;
        }
        for (e, _) in std::mem::take(&mut peer.inflight) {
            peer.pending.set(e, true);
        }
        peer.connected = false;
        peer.fractured = true;
        self.persist_peer(p);
    }

    fn checkpoint(&mut self) {
        // The engine drains first.
        self.apply(&Step::Drain);
        for p in 0..PEERS {
            if self.peers[p].fractured {
                self.persist_peer(p);
            } else {
                let dirty = self.dirty(p);
                self.quiet.note_dirty(&dirty);
            }
        }
        let mut intent = self.kernel_intent.clone();
        let mut clearable = Bits::new();
        self.quiet.end_interval(&mut intent, self.persisted_intent.as_ref(), &mut clearable);
        for e in clearable.iter_ones() {
            self.kernel_intent.set(e, false);
        }
        self.intent_file = Some(encode(&header(LogKind::Intent, 0), &intent));
        self.persisted_intent = Some(intent);
        self.written_since_checkpoint = empty();
    }

    /// Memory is lost; frames in flight may or may not have been written (here: they were).
    /// Recovery reads the pinned maps and the files, as `recover_intent` and `recover_peer` do.
    fn process_crash(&mut self) {
        let mut recovered = file_bits(&self.intent_file);
        *recovered |= self.kernel_intent.as_bitslice();
        self.kernel_intent = recovered.clone();
        self.recover_peers(&recovered);
    }

    /// The pinned maps are lost too, and queued writes reach the disk untracked. Recovery reads
    /// the files and verifies every secondary (every differing extent becomes pending).
    fn host_crash(&mut self) {
        while let Some(e) = self.queued.pop_front() {
            self.primary[e] += 1;
        }
        self.kernel_completed = empty();
        let recovered = file_bits(&self.intent_file);
        self.kernel_intent = recovered.clone();
        self.recover_peers(&recovered);
        // The verify: as the engine persists the verify's progress with the fractured log, a
        // crash during it restarts it; the model runs it to the end at once.
        for p in 0..PEERS {
            for e in 0..EXTENTS {
                if self.peers[p].image[e] != self.primary[e] {
                    self.peers[p].pending.set(e, true);
                }
            }
            self.peers[p].fractured = true;
            self.persist_peer(p);
        }
        self.written_since_checkpoint = empty();
    }

    fn recover_peers(&mut self, recovered: &Bits) {
        for peer in &mut self.peers {
            for (e, version) in std::mem::take(&mut peer.inflight) {
                peer.image[e] = version;
            }
            let (flags, bits) = match &peer.file {
                Some(bytes) => {
                    let (header, bits) = decode(bytes).expect("the model's files decode");
                    (header.flags, bits)
                }
                None => (0, empty()),
            };
            peer.pending = recovered.clone();
            *peer.pending |= bits.as_bitslice();
            peer.fractured = flags != 0;
            peer.connected = false;
        }
        self.quiet = IntentQuiet::new(EXTENTS);
        self.persisted_intent = None;
        // Start-up persists every secondary's log before anything else happens.
        for p in 0..PEERS {
            self.persist_peer(p);
        }
    }

    fn check(&self, history: &[Step]) -> Result<(), TestCaseError> {
        let intent_file = file_bits(&self.intent_file);
        for (p, peer) in self.peers.iter().enumerate() {
            let in_flight: Bits = {
                let mut bits = empty();
                for &(e, _) in &peer.inflight {
                    bits.set(e, true);
                }
                bits
            };
            let fracture_file = file_bits(&peer.file);
            for e in (0..EXTENTS).filter(|&e| peer.image[e] != self.primary[e]) {
                prop_assert!(
                    peer.pending[e] || in_flight[e] || self.kernel_completed[e],
                    "extent {e} differs on secondary {p} and the engine does not know: {history:?}"
                );
                prop_assert!(
                    self.kernel_intent[e] || self.kernel_completed[e] || fracture_file[e] || intent_file[e],
                    "extent {e} differs on secondary {p} and a process crash now would lose it: {history:?}"
                );
                prop_assert!(
                    fracture_file[e] || intent_file[e] || self.written_since_checkpoint[e],
                    "extent {e} differs on secondary {p} outside the host-crash window: {history:?}"
                );
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_differing_extent_is_ever_forgotten(steps in proptest::collection::vec(step(), 1..120)) {
        let mut model = Model::new();
        for (i, step) in steps.iter().enumerate() {
            model.apply(step);
            model.check(&steps[..=i])?;
        }
    }
}
