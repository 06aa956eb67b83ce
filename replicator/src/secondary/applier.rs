//! The applier: writes committed cuts' frames from the journal to the image on a thread of its
//! own, so that a session keeps receiving, journaling and acknowledging while a cut is applied
//! (applied in the session, a cut of 60 MiB stalled it for tens of milliseconds every commit and
//! more than halved what a mirror sustained).
//!
//! Owns its own handles on the journal file and the image (`try_clone`) and a buffer aligned for
//! the image's O_DIRECT writes. Jobs are applied in the order handed, and reported back in that
//! order, done or failed. Invariant: the session writes the image only where no staged frame
//! lies, these jobs' included (`Journal::route`), so the two never write the same bytes at once;
//! a job's frames stay staged until the session hears it is done (`Journal::applied`).

use std::fs::File;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use super::journal::{ApplyJob, JournalError, apply_job};

/// A job's outcome, in the order the jobs were handed.
pub type Done = (ApplyJob, Result<(), JournalError>);

pub struct Applier {
    jobs: Option<Sender<ApplyJob>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Jobs handed and not reported yet.
    out: usize,
}

impl Applier {
    /// Starts the thread with its own handles on `journal` and `image`, and a buffer of
    /// `buffer_bytes` (a frame's largest payload).
    pub fn start(journal: &File, image: &File, buffer_bytes: usize) -> std::io::Result<Self> {
        let (journal, image) = (journal.try_clone()?, image.try_clone()?);
        let mut pool = crate::pool::BufferPool::new(1, buffer_bytes).map_err(std::io::Error::from)?;
        let (jobs, inbox) = std::sync::mpsc::channel::<ApplyJob>();
        let (outbox, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("applier".into()).spawn(move || {
            let buffer = pool.take().expect("one buffer");
            for job in inbox {
                let outcome = apply_job(&journal, &job, &image, pool.data_mut(buffer, buffer_bytes));
                if outbox.send((job, outcome)).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { jobs: Some(jobs), done, thread: Some(thread), out: 0 })
    }

    pub fn hand(&mut self, job: ApplyJob) {
        self.jobs
            .as_ref()
            .expect("handing before stop")
            .send(job)
            .expect("the applier runs while handed jobs");
        self.out += 1;
    }

    /// No job handed out is unreported.
    pub fn idle(&self) -> bool {
        self.out == 0
    }

    /// The next job reported, if one is.
    pub fn take_done(&mut self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(done) => {
                self.out -= 1;
                Some(done)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Takes no more jobs, and waits for those out: their outcomes, in order.
    pub fn stop(&mut self) -> Vec<Done> {
        self.jobs = None;
        let mut reported = Vec::new();
        while self.out > 0 {
            match self.done.recv() {
                Ok(done) => {
                    self.out -= 1;
                    reported.push(done);
                }
                Err(_) => break, // the thread is gone (it panicked): nothing more comes
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        reported
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop();
    }
}
