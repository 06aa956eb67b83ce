//! The journal against a model of the primary, on simulated disks that lose power at random
//! moments: after every crash, opening the journal must leave the image at exactly the last
//! committed cut that any acknowledgement promised or later (J2), with every acknowledged
//! frame of a later cut still staged (J1), and opening twice must end the same (J3).
//!
//! The model primary writes extents, starts epochs (keeping the image as it was at each start:
//! the cut), ships extents the secondary lacks for the open cut (tagged with the open epoch
//! when the extent was not written since the flip, else with the next), and commits a cut once
//! every extent the secondary will hold at it is the cut's, as the engine does.

use std::cell::RefCell;
use std::rc::Rc;

use super::format::RecordKind;
use super::*;

const SECTOR: usize = 512;
const EXTENT: usize = 1024;
const EXTENTS: usize = 8;
const IMAGE: usize = EXTENT * EXTENTS;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Counts down the disks' writes and syncs; at zero the power goes.
struct Power {
    events_left: u64,
    rng: Rng,
}

/// A disk: what is durable, and the writes since the last sync (lost, kept or torn at a
/// crash, each on its own, as a disk's cache may).
struct SimDisk {
    durable: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
    power: Rc<RefCell<Power>>,
}

#[derive(Clone)]
struct Disk(Rc<RefCell<SimDisk>>);

impl Disk {
    fn new(bytes: usize, power: &Rc<RefCell<Power>>) -> Self {
        Self(Rc::new(RefCell::new(SimDisk {
            durable: vec![0; bytes],
            unsynced: Vec::new(),
            power: Rc::clone(power),
        })))
    }

    fn view(&self) -> Vec<u8> {
        let disk = self.0.borrow();
        let mut view = disk.durable.clone();
        for (at, bytes) in &disk.unsynced {
            view[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        view
    }

    /// The disk after the power came back: each unsynced write kept, lost, or torn.
    fn after_crash(&self, rng: &mut Rng, power: &Rc<RefCell<Power>>) -> Self {
        let disk = self.0.borrow();
        let mut durable = disk.durable.clone();
        for (at, bytes) in &disk.unsynced {
            let sectors = bytes.len().div_ceil(SECTOR) as u64;
            let kept = match rng.below(3) {
                0 => 0,
                1 => bytes.len(),
                _ => (rng.below(sectors + 1) as usize * SECTOR).min(bytes.len()),
            };
            durable[*at as usize..*at as usize + kept].copy_from_slice(&bytes[..kept]);
        }
        Self(Rc::new(RefCell::new(SimDisk { durable, unsynced: Vec::new(), power: Rc::clone(power) })))
    }

    /// One event of the power budget; `false`: the power is gone.
    fn spend(&self) -> bool {
        let disk = self.0.borrow();
        let mut power = disk.power.borrow_mut();
        if power.events_left == 0 {
            return false;
        }
        power.events_left -= 1;
        true
    }
}

fn power_gone() -> std::io::Error {
    std::io::Error::other("power gone")
}

impl Storage for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let view = self.view();
        let end = offset as usize + buf.len();
        if end > view.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&view[offset as usize..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(offset as usize + buf.len() <= self.0.borrow().durable.len(), "write past the disk");
        if !self.spend() {
            // The write the power went in: some sectors of it, as an unsynced write.
            let kept = {
                let disk = self.0.borrow();
                let mut power = disk.power.borrow_mut();
                (power.rng.below(buf.len().div_ceil(SECTOR) as u64 + 1) as usize * SECTOR).min(buf.len())
            };
            self.0.borrow_mut().unsynced.push((offset, buf[..kept].to_vec()));
            return Err(power_gone());
        }
        self.0.borrow_mut().unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        if !self.spend() {
            return Err(power_gone());
        }
        let view = self.view();
        let mut disk = self.0.borrow_mut();
        disk.durable = view;
        disk.unsynced.clear();
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
}

/// A frame as the model primary sent it.
#[derive(Clone, Debug)]
struct Sent {
    extent: usize,
    tag: u64,
    data: Vec<u8>,
}

/// The model primary.
struct Primary {
    image: Vec<u8>,
    epoch: u64,
    /// The image at the start of each epoch: cut `e` is `cuts[e]`.
    cuts: Vec<Vec<u8>>,
    written_this_epoch: [bool; EXTENTS],
    sent: Vec<Sent>,
    /// Commits issued, and the last one the secondary acknowledged.
    issued: Vec<u64>,
    acked_commit: u64,
    /// Seqs of staged frames the secondary acknowledged, with their tags.
    acked_staged: Vec<(u64, u64)>,
    /// Commits acknowledged whose frames the applier has not written yet.
    jobs: std::collections::VecDeque<ApplyJob>,
    counter: u64,
}

impl Primary {
    fn new() -> Self {
        Self {
            image: vec![0; IMAGE],
            epoch: 1,
            cuts: vec![vec![0; IMAGE], vec![0; IMAGE]],
            written_this_epoch: [false; EXTENTS],
            sent: Vec::new(),
            issued: vec![0],
            acked_commit: 0,
            acked_staged: Vec::new(),
            jobs: std::collections::VecDeque::new(),
            counter: 0,
        }
    }

    fn extent(image: &[u8], x: usize) -> &[u8] {
        &image[x * EXTENT..(x + 1) * EXTENT]
    }

    fn write(&mut self, rng: &mut Rng) {
        let x = rng.below(EXTENTS as u64) as usize;
        self.counter += 1;
        let fill = if rng.below(8) == 0 { 0 } else { (self.counter % 251 + 1) as u8 };
        self.image[x * EXTENT..(x + 1) * EXTENT].fill(fill);
        self.written_this_epoch[x] = true;
    }

    fn flip(&mut self) {
        self.epoch += 1;
        self.cuts.push(self.image.clone());
        self.written_this_epoch = [false; EXTENTS];
    }

    /// What the secondary will hold at cut `cut` from the frames sent so far.
    fn projected(&self, cut: u64) -> Vec<u8> {
        let mut image = vec![0; IMAGE];
        for frame in self.sent.iter().filter(|f| f.tag <= cut) {
            image[frame.extent * EXTENT..(frame.extent + 1) * EXTENT].copy_from_slice(&frame.data);
        }
        image
    }

    /// Extents the secondary lacks for the open cut.
    fn needed(&self) -> Vec<usize> {
        let projected = self.projected(self.epoch);
        let cut = &self.cuts[self.epoch as usize];
        (0..EXTENTS).filter(|&x| Self::extent(&projected, x) != Self::extent(cut, x)).collect()
    }

    /// A frame of extent `x` as read now: of the open cut if `x` was not written since it began.
    fn read(&mut self, x: usize) -> Sent {
        let tag = if self.written_this_epoch[x] { self.epoch + 1 } else { self.epoch };
        let frame = Sent { extent: x, tag, data: Self::extent(&self.image, x).to_vec() };
        self.sent.push(frame.clone());
        frame
    }
}

fn geometry(capacity: u64) -> Geometry {
    Geometry {
        capacity,
        payload_bytes_max: EXTENT as u32,
        extent_bytes: EXTENT as u64,
        image_bytes: IMAGE as u64,
    }
}

fn journal_disk_bytes(capacity: u64) -> usize {
    (format::RING_START + capacity) as usize
}

/// The secondary's side of one frame: routed, written in place or staged, acknowledged.
fn receive(
    journal: &mut Journal<Disk>,
    image: &Disk,
    frame: &Sent,
    primary: &mut Primary,
    buffer: &mut [u8],
) -> std::io::Result<()> {
    let info = FrameInfo {
        tag: frame.tag,
        in_order: false,
        client: false,
        image_offset: (frame.extent * EXTENT) as u64,
        image_len: EXTENT as u64,
    };
    let to_io = |e: JournalError| std::io::Error::other(e.to_string());
    if journal.route(&info) == Route::InPlace {
        image.write_at(&frame.data, info.image_offset)?;
        return image.sync();
    }
    let placement = loop {
        match journal.stage(RecordKind::Data, 0, &info, EXTENT as u32).map_err(to_io)? {
            Some(placement) => break placement,
            None => {
                // The jobs out first (the session waits for its applier), then applied in
                // place from here: durable on the image, not staged any more.
                while let Some(job) = primary.jobs.pop_front() {
                    apply_job(journal.file(), &job, image, buffer).map_err(to_io)?;
                    journal.applied(&job).map_err(to_io)?;
                }
                primary.acked_staged.clear();
                journal.overflow(image, buffer).map_err(to_io)?;
            }
        }
    };
    let header = journal.data_record_header(&placement, &info, &frame.data);
    let mut record = header.to_vec();
    record.extend_from_slice(&frame.data);
    journal.file.write_at(&record, placement.file_offset)?;
    journal.file.sync()?;
    primary.acked_staged.push((placement.seq, frame.tag));
    Ok(())
}

/// One step of the workload; an error is the power going.
fn step(
    journal: &mut Journal<Disk>,
    image: &Disk,
    primary: &mut Primary,
    rng: &mut Rng,
    buffer: &mut [u8],
) -> std::io::Result<()> {
    let to_io = |e: JournalError| std::io::Error::other(e.to_string());
    match rng.below(12) {
        0..=3 => primary.write(rng),
        10 | 11 => {
            // The applier: the oldest job handed out, applied on its own handles.
            if let Some(job) = primary.jobs.pop_front() {
                apply_job(journal.file(), &job, image, buffer).map_err(to_io)?;
                journal.applied(&job).map_err(to_io)?;
            }
        }
        4..=6 => {
            let needed = primary.needed();
            if let Some(&x) = needed.get(rng.below(needed.len().max(1) as u64) as usize) {
                let frame = primary.read(x);
                receive(journal, image, &frame, primary, buffer)?;
            }
        }
        7 => primary.flip(),
        _ => {
            let cut = primary.epoch;
            let clean = !primary.written_this_epoch.iter().any(|&w| w) || rng.below(2) == 0;
            if primary.needed().is_empty() && clean && primary.issued.last() != Some(&cut) {
                primary.issued.push(cut);
                if rng.below(2) == 0 && primary.jobs.is_empty() {
                    journal.commit(cut, cut * 1000, image, buffer).map_err(to_io)?;
                } else if let Some(job) = journal.commit_record(cut, cut * 1000).map_err(to_io)? {
                    primary.jobs.push_back(job); // acknowledged now, applied later
                }
                primary.acked_commit = cut;
            }
        }
    }
    Ok(())
}

/// Checks J1 and J2 on a journal just opened after a crash.
fn check_recovered(journal: &Journal<Disk>, image: &Disk, primary: &Primary) {
    let state = journal.cut_state();
    let cut = state.committed_cut;
    assert!(primary.issued.contains(&cut), "cut {cut} was never committed");
    if state.consistent {
        // Exactly a committed cut, no older than the last acknowledged; the superblock may
        // name an older one whose bytes are the same but for cuts that applied nothing.
        let view = image.view();
        let held =
            primary.issued.iter().copied().filter(|&c| c >= cut && view == primary.cuts[c as usize]).max();
        let held = held.unwrap_or_else(|| panic!("the image is no cut from {cut} on"));
        assert!(
            held >= primary.acked_commit,
            "cut {held} is before the acknowledged commit {}",
            primary.acked_commit
        );
    }
    let staged: Vec<u64> = journal.staged().map(|s| s.seq).collect();
    for &(seq, tag) in primary.acked_staged.iter().filter(|&&(_, tag)| tag > cut) {
        assert!(staged.contains(&seq), "acknowledged frame {seq} of cut {tag} lost after cut {cut}");
    }
}

fn run_round(seed: u64, capacity: u64) {
    let mut rng = Rng(seed | 1);
    let events = 20 + rng.below(400);
    let power = Rc::new(RefCell::new(Power { events_left: events, rng: Rng(seed.rotate_left(17) | 1) }));
    let (file, image) = (Disk::new(journal_disk_bytes(capacity), &power), Disk::new(IMAGE, &power));
    let mut buffer = vec![0u8; EXTENT];
    let mut primary = Primary::new();
    let opened = Journal::open(file.clone(), geometry(capacity), &image, &mut buffer);
    let Ok(mut journal) = opened else { return };
    for _ in 0..2000 {
        if step(&mut journal, &image, &mut primary, &mut rng, &mut buffer).is_err() {
            break;
        }
    }
    drop(journal);
    // Power back: open (J2), crash again while opening sometimes, open once more (J3).
    let power = Rc::new(RefCell::new(Power { events_left: u64::MAX, rng: Rng(seed ^ 0x5555) }));
    let (file, image) = (file.after_crash(&mut rng, &power), image.after_crash(&mut rng, &power));
    if rng.below(2) == 0 {
        power.borrow_mut().events_left = rng.below(20);
        let _ = Journal::open(file.clone(), geometry(capacity), &image, &mut buffer);
        power.borrow_mut().events_left = u64::MAX;
    }
    let (file, image) = (file.after_crash(&mut rng, &power), image.after_crash(&mut rng, &power));
    let journal =
        Journal::open(file, geometry(capacity), &image, &mut buffer).expect("opening after a crash");
    check_recovered(&journal, &image, &primary);
}

#[test]
fn every_crash_leaves_the_last_committed_cut() {
    for seed in 1..600 {
        run_round(seed * 0x9e37_79b9, 64 * 1024);
    }
}

#[test]
fn a_small_ring_overflows_and_still_never_loses_an_acknowledged_frame() {
    // Room for a handful of frames: overflows happen, the image is then not consistent until
    // a later cut, and acknowledged frames are still never lost.
    for seed in 1..400 {
        run_round(seed * 0x2545_f491, 8 * 1024);
    }
}
