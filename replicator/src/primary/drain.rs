//! The drain stage: the extents whose writes completed, taken from the tracker, become pending
//! for every secondary and dirty in the intent log's quiet clock.
//!
//! Owns nothing: it moves marks from the tracker (`Tracker::drain_completed`) into the
//! secondaries' pending sets. With an export, the export's own writes are left out (it ships
//! them itself): `ExportState::mask` names the extents it is writing or wrote since the last
//! drain. Invariant: an extent drained is pending for every secondary in the mirror before the
//! engine's next read is scheduled; a removed secondary's slot gets nothing (its pending set
//! would keep the extents dirty, and the intent log from ever clearing them).

use super::Clock;
use super::export::ExportState;
use super::peers::Peers;
use crate::logs::IntentQuiet;
use crate::tracker::Tracker;

pub fn drain(
    tracker: &mut Tracker,
    export: Option<&mut ExportState>,
    quiet: &mut IntentQuiet,
    peers: &mut Peers,
    clock: &Clock,
) {
    let now_ms = clock.now_ms();
    let runs = match export {
        Some(export) => {
            let runs = tracker.drain_completed_except(export.mask());
            export.drained();
            runs
        }
        None => tracker.drain_completed(),
    };
    for run in runs {
        let run = run.start as usize..run.end as usize;
        quiet.note_dirty_run(run.clone());
        for peer in peers.iter_mut().filter(|p| !p.removed) {
            peer.pending_write(run.clone(), now_ms);
        }
    }
}
