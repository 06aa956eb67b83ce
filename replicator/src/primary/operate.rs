//! The control plane: operator requests from the control socket (`replicator status`,
//! `fracture`, `restore`, `verify`, `sync`, `set`, `checkpoint`, `add-secondary`, ...), applied
//! between two turns of the engine's loop, so no lock is shared with the data path.
//!
//! Owns nothing but the request channel: each request is routed to the part it concerns
//! (a secondary's log, the consistency points, the mirror database's changes). Invariant: a
//! request that changed a fracture log is answered only once the log is on disk.

use std::sync::mpsc::Sender;

use super::Engine;
use super::connector;
use super::membership::{Answer, Report, Teardown};
use super::peers::{Disconnect, Peers};
use crate::control::{Reply, Request};
use crate::logs;

impl Engine {
    /// Applies every request waiting; those that wait for the mirror (a point, a change) are
    /// answered later by the stage that finishes them.
    pub(super) fn handle_control(&mut self) {
        while let Ok(call) = self.control.try_recv() {
            tracing::info!(request = ?call.request, "operator request");
            let answer = self.route(call.request, call.reply);
            if let Some(answer) = answer {
                self.answer(answer);
            }
        }
    }

    fn route(&mut self, request: Request, reply: Sender<Reply>) -> Option<Answer> {
        let extents = self.source.extents();
        let mut teardown = Teardown {
            buffers: &mut self.buffers,
            export: self.export.as_mut(),
            state_dir: &self.settings.state_dir,
        };
        let peers = &mut self.peers;
        let membership = &mut self.membership;
        match request {
            Request::Status => Some(Answer { reply, outcome: Ok(Report::Status) }),
            Request::ConsistencyPoint { timeout_ms } => {
                let epoch = self.cuts.enabled().then(|| self.tracker.epoch());
                self.points.start(peers, (timeout_ms, epoch), reply);
                None
            }
            Request::AddSecondary { name, address, synchronized } => {
                membership.add_secondary(peers, extents, (&name, address, synchronized), reply, &mut teardown)
            }
            Request::RemoveSecondary { name, force } => {
                membership.remove_secondary(peers, &name, force, reply, &mut teardown)
            }
            Request::Activate => membership.set_activation(peers, true, false, reply, &mut teardown),
            Request::Deactivate { force } => {
                membership.set_activation(peers, false, force, reply, &mut teardown)
            }
            Request::Set { secondary, key, value } => {
                match secondary.as_deref().map(|s| peers.index_of(s)).transpose() {
                    Ok(index) => membership.set(peers, index, (&key, &value), reply, &mut teardown),
                    Err(error) => Answer::refuse(reply, error),
                }
            }
            Request::Fracture { secondary } => {
                operate_on(peers, &secondary, Operation::Fracture, reply, &mut teardown)
            }
            Request::Restore { secondary } => {
                operate_on(peers, &secondary, Operation::Restore, reply, &mut teardown)
            }
            Request::Verify { secondary } => {
                operate_on(peers, &secondary, Operation::Verify, reply, &mut teardown)
            }
            Request::Sync { secondary } => {
                operate_on(peers, &secondary, Operation::Sync, reply, &mut teardown)
            }
        }
    }

    /// Answers an operator: with the full status for `status` and the mirror's changes, with
    /// the secondaries' for the per-secondary operations. Fracture logs changed by the request
    /// are persisted first.
    pub(super) fn answer(&mut self, answer: Answer) {
        self.persist_fracture_logs();
        let reply = answer.outcome.map(|report| match report {
            Report::Status => self.status_json(),
            Report::Secondaries => serde_json::to_value(super::status::statuses(&self.peers, &self.source))
                .expect("status serializes"),
        });
        if let Err(error) = &reply {
            tracing::warn!(%error, "operator request refused");
        }
        let _ = answer.reply.send(reply);
    }
}

/// A per-secondary operation.
enum Operation {
    Fracture,
    Restore,
    Verify,
    Sync,
}

/// Applies `operation` to secondary `name`; answered with the secondaries' status.
fn operate_on(
    peers: &mut Peers,
    name: &str,
    operation: Operation,
    reply: Sender<Reply>,
    teardown: &mut Teardown,
) -> Option<Answer> {
    let outcome = peers.index_of(name).and_then(|index| operate(peers, index, &operation, teardown));
    Some(Answer { reply, outcome: outcome.map(|()| Report::Secondaries) })
}

/// Applies `operation` to slot `index`.
fn operate(
    peers: &mut Peers,
    index: usize,
    operation: &Operation,
    teardown: &mut Teardown,
) -> Result<(), String> {
    let name = peers.get(index).name.clone();
    match operation {
        Operation::Fracture => {
            if peers.get(index).log.admin_fractured() {
                return Err(format!("{name} is already fractured; `restore {name}` brings it back"));
            }
            tracing::warn!(secondary = %name, "fractured by the administrator: the extents it misses are kept in its fracture log until restore");
            let peer = peers.get_mut(index);
            peer.metrics.fractures.inc();
            peer.log.admin_fracture();
            teardown.disconnect(peers, index, Disconnect::AdminFracture);
        }
        Operation::Restore => {
            let peer = peers.get_mut(index);
            if !peer.log.held {
                return Err(format!("{name} is not fractured and held; nothing to restore"));
            }
            peer.log.restore();
            if peer.conn.is_none()
                && let Some(want) = &peer.want_connection
            {
                let _ = want.send(connector::Want::Now);
            }
        }
        Operation::Verify => {
            let log = &mut peers.get_mut(index).log;
            if log.full_sync() {
                return Err(format!("{name} is in a full sync; a verify would not shorten it"));
            }
            if log.verify.is_some() {
                return Err(format!("{name} is already being verified"));
            }
            log.start_verify(0);
        }
        Operation::Sync => {
            let peer = peers.get_mut(index);
            peer.pending.insert_all();
            peer.log.fall_behind();
            peer.log.verify = None;
            peer.log.flags = (peer.log.flags & !logs::FLAG_VERIFY) | logs::FLAG_FULL_SYNC;
            peer.log.throttled = true;
        }
    }
    // Persisted before the answer (`Engine::answer`).
    peers.get_mut(index).log.persist_now = true;
    Ok(())
}
