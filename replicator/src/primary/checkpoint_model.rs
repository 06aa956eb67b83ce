//! A model that drives the real log code with random operations: writes (queued, then
//! completed), drains, ships and acks, disconnects and reconnects, checkpoints, process crashes
//! and host crashes, in any order. The checkpoints, the fracture logs' persistence and the
//! recovery after a crash are the engine's own (`Checkpointer`, `PeerLog`, `recover_peer`),
//! over state files in memory; the model supplies only the kernel's marks and the secondaries'
//! images, which it follows as the tracker and the wire do.
//!
//! The invariant, checked after every step: every extent whose data on the primary differs
//! from a secondary's is
//! - live: pending, in flight to it, or completed and not yet drained;
//! - after a process crash (what recovery reads: the pinned maps and the files): in the pinned
//!   intent or completed map, that secondary's fracture log, or the intent log's checkpoint;
//! - after a host crash (the files only): in its fracture log or the intent checkpoint, or
//!   written (completed) since the last checkpoint: the window the verify after a host restart
//!   closes (see `recover`).

use std::sync::Arc;
use std::time::Duration;

use bitvec::prelude::*;
use proptest::prelude::*;

use super::*;
use crate::envelope::MemoryFiles;
use crate::logs::{self, INTENT_LOG_FILE};
use crate::model::{ExtentBytes, RecoveryPolicy};
use crate::primary::recover::{self, PeerDefaults, Recovered};

const EXTENTS: usize = 24;
const PEERS: usize = 2;
const EXTENT_BYTES: u64 = 4096;
const GENERATION: u64 = 1;

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

/// The kernel's side: the pinned maps and the writes queued.
struct Kernel {
    intent: Bits,
    completed: Bits,
    queued: std::collections::VecDeque<usize>,
}

impl IntentMap for Kernel {
    fn intent_into(&mut self, out: &mut Bits) {
        out.clear();
        out.extend_from_bitslice(&self.intent);
    }

    fn clear_intent(&mut self, extents: &BitSlice<u64, Lsb0>) {
        for e in extents.iter_ones() {
            self.intent.set(e, false);
        }
    }

    fn note_awaiting(&self, quiet: &mut IntentQuiet) {
        for &e in &self.queued {
            quiet.note_dirty_run(e..e + 1);
        }
    }
}

struct Peer {
    name: String,
    /// Data version of each extent on the secondary.
    image: Vec<u32>,
    pending: Bits,
    /// Frames sent, unacknowledged: (extent, version read).
    inflight: std::collections::VecDeque<(usize, u32)>,
    connected: bool,
    log: PeerLog,
}

struct ModelPeers(Vec<Peer>);

impl Secondaries for ModelPeers {
    fn slots(&self) -> usize {
        self.0.len()
    }

    fn member(&self, _index: usize) -> bool {
        true
    }

    fn dirty_into(&self, index: usize, out: &mut Bits) {
        let peer = &self.0[index];
        out.clear();
        out.extend_from_bitslice(&peer.pending);
        for &(e, _) in &peer.inflight {
            out.set(e, true);
        }
    }

    fn log(&mut self, index: usize) -> &mut PeerLog {
        &mut self.0[index].log
    }
}

struct Model {
    primary: Vec<u32>,
    kernel: Kernel,
    written_since_checkpoint: Bits,
    logs: Checkpointer<MemoryFiles>,
    peers: ModelPeers,
}

fn checkpointer(files: MemoryFiles) -> Checkpointer<MemoryFiles> {
    let extent_bytes = ExtentBytes::new(EXTENT_BYTES).expect("4 KiB");
    let metrics = Arc::new(crate::metrics::PrimaryMetrics::default());
    Checkpointer::new(files, 1, extent_bytes, EXTENTS as u64 * EXTENT_BYTES, Duration::ZERO, metrics)
}

fn defaults() -> PeerDefaults {
    PeerDefaults { sync_rate_bytes_per_s: 0, recovery_policy: RecoveryPolicy::Automatic, initial_sync: false }
}

impl Model {
    fn new() -> Self {
        let peer = |p: usize| Peer {
            name: format!("s{p}"),
            image: vec![0; EXTENTS],
            pending: empty(),
            inflight: Default::default(),
            connected: true,
            log: PeerLog::new(&format!("s{p}"), 0, RecoveryPolicy::Automatic),
        };
        Self {
            primary: vec![0; EXTENTS],
            kernel: Kernel { intent: empty(), completed: empty(), queued: Default::default() },
            written_since_checkpoint: empty(),
            logs: checkpointer(MemoryFiles::default()),
            peers: ModelPeers((0..PEERS).map(peer).collect()),
        }
    }

    /// The end of an engine turn: fracture logs changed in it reach the disk.
    fn end_turn(&mut self) {
        self.logs.persist_changed(&mut self.peers, GENERATION);
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Queue(e) => {
                self.kernel.intent.set(e, true);
                self.kernel.queued.push_back(e);
            }
            Step::Complete => {
                if let Some(e) = self.kernel.queued.pop_front() {
                    self.primary[e] += 1;
                    self.kernel.completed.set(e, true);
                    self.written_since_checkpoint.set(e, true);
                }
            }
            Step::Drain => self.drain(),
            Step::Ship(p, e) => {
                let version = self.primary[e];
                let peer = &mut self.peers.0[p];
                if peer.connected && peer.pending[e] {
                    peer.pending.set(e, false);
                    peer.inflight.push_back((e, version));
                }
            }
            Step::Ack(p) => self.ack(p),
            Step::Disconnect(p) => self.disconnect(p),
            Step::Reconnect(p) => self.peers.0[p].connected = true,
            Step::Checkpoint => {
                self.drain();
                self.logs.checkpoint(&mut self.kernel, &mut self.peers, GENERATION);
                self.written_since_checkpoint = empty();
            }
            Step::ProcessCrash => self.process_crash(),
            Step::HostCrash => self.host_crash(),
        }
        self.end_turn();
    }

    /// As `drain::drain`: completions become pending everywhere and dirty in the quiet clock
    /// (the tracker re-marks them in the pinned intent map as it hands them out).
    fn drain(&mut self) {
        let taken = std::mem::replace(&mut self.kernel.completed, empty());
        *self.kernel.intent |= taken.as_bitslice();
        self.logs.quiet.note_dirty(&taken);
        for peer in &mut self.peers.0 {
            *peer.pending |= taken.as_bitslice();
        }
    }

    /// As `recv` and `status::update_in_sync`: the oldest frame is durable; a fractured
    /// secondary with nothing left is SYNCHRONIZED.
    fn ack(&mut self, p: usize) {
        let peer = &mut self.peers.0[p];
        if let Some((e, version)) = peer.inflight.pop_front() {
            peer.image[e] = version;
        }
        if peer.connected && peer.log.fractured() && peer.pending.not_any() && peer.inflight.is_empty() {
            peer.log.synchronized();
        }
    }

    /// As `Peers::disconnect`: what was in flight is pending again, and it is fractured.
    fn disconnect(&mut self, p: usize) {
        let peer = &mut self.peers.0[p];
        if !peer.connected {
            return;
        }
        for (e, _) in std::mem::take(&mut peer.inflight) {
            peer.pending.set(e, true);
        }
        peer.connected = false;
        peer.log.fracture();
    }

    /// Memory is lost; frames in flight may or may not have been written (here: they were).
    /// Recovery reads the pinned maps and the files, as `recover_intent` and `recover_peer` do.
    fn process_crash(&mut self) {
        let mut intent = file_bits(self.logs.files(), INTENT_LOG_FILE);
        *intent |= self.kernel.intent.as_bitslice();
        self.kernel.intent = intent.clone();
        self.recover(Recovered { intent, verify_all: false });
    }

    /// The pinned maps are lost too, and queued writes reach the disk untracked. Recovery reads
    /// the files and verifies every secondary.
    fn host_crash(&mut self) {
        while let Some(e) = self.kernel.queued.pop_front() {
            self.primary[e] += 1;
        }
        self.kernel.completed = empty();
        let intent = file_bits(self.logs.files(), INTENT_LOG_FILE);
        self.kernel.intent = intent.clone();
        self.recover(Recovered { intent, verify_all: true });
        // The verify: its progress is persisted with the fractured log, so a crash during it
        // restarts it; the model runs it to the end at once.
        for peer in &mut self.peers.0 {
            assert!(peer.log.verify.is_some(), "a host restart verifies every secondary");
            for e in (0..EXTENTS).filter(|&e| peer.image[e] != self.primary[e]) {
                peer.pending.set(e, true);
            }
            peer.log.finish_verify();
        }
        self.written_since_checkpoint = empty();
    }

    fn recover(&mut self, recovered: Recovered) {
        let files = self.logs.files().clone();
        let identity = self.logs.identity(LogKind::Intent, 0);
        for peer in &mut self.peers.0 {
            for (e, version) in std::mem::take(&mut peer.inflight) {
                peer.image[e] = version;
            }
            let (pending, log) = recover::recover_peer(&files, &identity, &peer.name, &recovered, defaults());
            peer.pending = pending.bits().to_bitvec();
            peer.log = log;
            peer.connected = false;
        }
        self.logs = checkpointer(files);
    }

    fn check(&self, history: &[Step]) -> Result<(), TestCaseError> {
        let intent_file = file_bits(self.logs.files(), INTENT_LOG_FILE);
        for (p, peer) in self.peers.0.iter().enumerate() {
            let mut in_flight = empty();
            for &(e, _) in &peer.inflight {
                in_flight.set(e, true);
            }
            let fracture_file = file_bits(self.logs.files(), &peer.log.file_name);
            for e in (0..EXTENTS).filter(|&e| peer.image[e] != self.primary[e]) {
                prop_assert!(
                    peer.pending[e] || in_flight[e] || self.kernel.completed[e],
                    "extent {e} differs on secondary {p} and the engine does not know: {history:?}"
                );
                prop_assert!(
                    self.kernel.intent[e] || self.kernel.completed[e] || fracture_file[e] || intent_file[e],
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

fn file_bits(files: &MemoryFiles, name: &str) -> Bits {
    files
        .files
        .get(name)
        .map_or_else(empty, |bytes| logs::decode(bytes).expect("files the engine wrote decode").1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_differing_extent_is_ever_forgotten(steps in proptest::collection::vec(step(), 1..120)) {
        let mut model = Model::new();
        model.end_turn();
        for (i, step) in steps.iter().enumerate() {
            model.apply(step);
            model.check(&steps[..=i])?;
        }
    }
}
