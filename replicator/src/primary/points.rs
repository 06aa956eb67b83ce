//! Consistency points (`checkpoint`): a point frame goes to each target secondary once it has
//! acknowledged every write drained before the point and applied a cut taken after the point
//! was asked for, and the operator is answered once every target recorded the point durably.
//!
//! Owns the points waiting (at most `POINTS_MAX`). Invariant: a target records the point only
//! once its image holds every write before the point: every extent frame queued to it before
//! the point frame is durable (the point frame is queued only once it is in sync), and applied
//! (a cut after the point was asked for is committed there, so nothing before it waits in its
//! journal).

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::peer::{InFlight, SendJob};
use super::peers::Peers;
use super::status::image_state;
use crate::control::{self, Reply};
use crate::model::{ImageState, SECONDARIES_MAX};
use crate::wire;

/// Most consistency points waiting at once: one, so a connection has one point frame queued.
const POINTS_MAX: usize = 1;

/// A consistency point waiting for its secondaries.
struct PendingPoint {
    reply: Sender<Reply>,
    deadline: Instant,
    /// When the first point frame was queued (the point's time), 0 before.
    point_unix_ms: u64,
    /// The epoch open when the point was asked for: a target's image holds everything before
    /// the point once it has applied a later cut. `None` with cuts off: once it has it all.
    epoch: Option<u64>,
    targets: [Option<PointTarget>; SECONDARIES_MAX],
}

#[derive(Clone, Copy, Debug)]
struct PointTarget {
    /// The connection it must be recorded over.
    generation: u32,
    /// The point frame's sequence, once queued.
    sequence: Option<u64>,
}

#[derive(Default)]
pub struct Points {
    waiting: Vec<PendingPoint>,
}

impl Points {
    /// A consistency point: its targets are the secondaries SYNCHRONIZED now, or when there is
    /// none, the connected ones catching up (a burst of writes put them behind their backlog
    /// limit a moment ago: with the application quiesced they catch up, and the point is
    /// recorded once they have everything, as on a SYNCHRONIZED one). It is answered by
    /// `advance` once each target has recorded it, or fails (at the timeout).
    pub fn start(&mut self, peers: &Peers, (timeout_ms, epoch): (u64, Option<u64>), reply: Sender<Reply>) {
        let mut targets = [None; SECONDARIES_MAX];
        for state in [ImageState::Synchronized, ImageState::Synchronizing] {
            for (i, peer) in peers.members() {
                if image_state(peer) == state && peer.conn.is_some() {
                    targets[i] = Some(PointTarget { generation: peer.generation, sequence: None });
                }
            }
            if targets.iter().any(Option::is_some) {
                break;
            }
        }
        let refusal = if targets.iter().all(Option::is_none) {
            Some(
                "no SYNCHRONIZED secondary (nor a connected one catching up) to record a consistency point on",
            )
        } else if self.waiting.len() >= POINTS_MAX {
            Some("a consistency point is already being taken; try again when it finishes")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(Err(refusal.to_owned()));
            return;
        }
        let timeout = Duration::from_millis(timeout_ms.min(control::CONSISTENCY_TIMEOUT_MS_MAX));
        self.waiting.push(PendingPoint {
            reply,
            deadline: Instant::now() + timeout,
            point_unix_ms: 0,
            epoch,
            targets,
        });
    }

    /// Moves every waiting point on: once a target has acknowledged everything (it is in
    /// sync), the point frame is queued to it; once every target acknowledged its point frame
    /// (recorded durably), the operator gets the answer.
    pub fn advance(&mut self, peers: &mut Peers, mirror_generation: u64) {
        let mut index = 0;
        while index < self.waiting.len() {
            match advance_one(&mut self.waiting[index], peers, mirror_generation) {
                None => index += 1,
                Some(answer) => {
                    let point = self.waiting.swap_remove(index);
                    if let Err(error) = &answer {
                        tracing::warn!(%error, "consistency point failed");
                    }
                    let _ = point.reply.send(answer);
                }
            }
        }
    }
}

fn advance_one(point: &mut PendingPoint, peers: &mut Peers, mirror_generation: u64) -> Option<Reply> {
    let mut done = true;
    for index in 0..peers.len() {
        let Some(target) = point.targets[index] else { continue };
        let peer = peers.get(index);
        if peer.conn.is_none() || peer.generation != target.generation {
            return Some(Err(format!("secondary {} disconnected before recording the point", peer.name)));
        }
        match target.sequence {
            None if peer.in_sync && point.epoch.is_none_or(|epoch| peer.cut.committed_cut > epoch) => {
                if point.point_unix_ms == 0 {
                    point.point_unix_ms = crate::logs::unix_ms_now();
                }
                let sequence = queue_point(peers, index, mirror_generation, point.point_unix_ms);
                point.targets[index] =
                    Some(PointTarget { generation: target.generation, sequence: Some(sequence) });
                done = false;
            }
            None => done = false,
            Some(sequence) if peer.conn.as_ref().is_some_and(|c| c.inflight.contains_key(&sequence)) => {
                done = false
            }
            Some(_) => {
                let peer = peers.get_mut(index);
                peer.consistency_point_unix_ms = point.point_unix_ms;
                // Frames queued behind the point frame are after the point.
                peer.written_since_point = peer.written_since_point_frame;
            }
        }
    }
    if done {
        let names: Vec<&str> = (0..peers.len())
            .filter(|&i| point.targets[i].is_some())
            .map(|i| peers.get(i).name.as_str())
            .collect();
        tracing::info!(point_unix_ms = point.point_unix_ms, secondaries = ?names, "consistency point recorded");
        return Some(Ok(serde_json::json!({
            "point_unix_ms": point.point_unix_ms,
            "generation": mirror_generation,
            "secondaries": names,
        })));
    }
    (Instant::now() > point.deadline).then(|| {
        Err("timed out: writes kept coming; freeze the filesystem (--freeze) or quiesce the application"
            .to_owned())
    })
}

/// Queues the point frame to slot `index` and tracks it until its ack; returns its sequence.
fn queue_point(peers: &mut Peers, index: usize, generation: u64, point_unix_ms: u64) -> u64 {
    let sequence = peers.next_sequence();
    let peer = peers.get_mut(index);
    let conn = peer.conn.as_mut().expect("a target is connected");
    let mut frame = Vec::with_capacity(conn.point_frame.len());
    wire::encode(&wire::Message::ConsistencyPoint { generation, point_unix_ms }, sequence, &mut frame);
    conn.point_frame.copy_from_slice(&frame);
    conn.queue.push_back(SendJob::Point { sent: 0 });
    conn.inflight.insert(sequence, InFlight::control());
    peer.written_since_point_frame = false;
    sequence
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::testing;

    /// A point waits until its target is in sync, then queues its frame, then waits for that
    /// frame's ack: only then is the operator answered, and the secondary CONSISTENT as of it.
    #[test]
    fn a_point_waits_for_sync_then_for_its_ack() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let mut points = Points::default();
        let (reply, answer) = std::sync::mpsc::channel();
        points.start(&peers, (10_000, Some(7)), reply);
        points.advance(&mut peers, 3);
        assert!(peers.get(0).conn.as_ref().expect("connected").queue.is_empty(), "not in sync yet: no frame");
        peers.get_mut(0).in_sync = true;
        points.advance(&mut peers, 3);
        assert!(
            peers.get(0).conn.as_ref().expect("connected").queue.is_empty(),
            "no cut after the point applied yet: no frame"
        );
        peers.get_mut(0).cut.committed_cut = 8;
        points.advance(&mut peers, 3);
        let conn = peers.get_mut(0).conn.as_mut().expect("connected");
        assert!(matches!(conn.queue.front(), Some(SendJob::Point { .. })));
        let mut frame = Vec::new();
        let (&sequence, _) = conn.inflight.iter().next().expect("the point frame waits for its ack");
        wire::encode(
            &wire::Message::ConsistencyPoint { generation: 3, point_unix_ms: 0 },
            sequence,
            &mut frame,
        );
        assert_eq!(conn.point_frame[..12], frame[..12], "a consistency point frame, by wire::encode");
        assert!(answer.try_recv().is_err());
        conn.inflight.remove(&sequence);
        points.advance(&mut peers, 3);
        let answered = answer.try_recv().expect("answered").expect("recorded");
        assert_eq!(answered["generation"], 3);
        assert!(peers.get(0).consistency_point_unix_ms > 0);
    }

    #[test]
    fn a_point_fails_when_its_target_disconnects_and_is_refused_without_one() {
        let (mut peers, _far) = testing::peers(1, &[0]);
        let mut points = Points::default();
        let (reply, answer) = std::sync::mpsc::channel();
        points.start(&peers, (10_000, Some(0)), reply);
        peers.get_mut(0).conn = None;
        peers.get_mut(0).generation += 1;
        points.advance(&mut peers, 1);
        assert!(answer.try_recv().expect("answered").expect_err("failed").contains("disconnected"));
        let (reply, answer) = std::sync::mpsc::channel();
        points.start(&peers, (10_000, Some(0)), reply);
        assert!(
            answer.try_recv().expect("answered").expect_err("refused").contains("no SYNCHRONIZED secondary")
        );
    }
}
