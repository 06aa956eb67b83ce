//! The engine's buffers: the registered pool and a reference count per buffer.
//!
//! Ownership, in order: free in the pool -> a read (`read::Source` holds it by index) -> after
//! the read, one reference per secondary whose queue holds its frame (`SendJob::Extent`) plus
//! one per zero-copy send whose notification is outstanding -> back to the pool when the count
//! reaches zero. A zero-copy send releases its buffer only on its notification, never on its
//! first completion. A verify read holds its buffer alone until it is hashed.

use crate::pool::BufferPool;

pub struct Buffers {
    pool: BufferPool,
    /// Per buffer: references from queued frames and outstanding zero-copy sends.
    refs: Vec<u16>,
}

impl Buffers {
    pub fn new(count: u16, data_bytes_max: usize) -> nix::Result<Self> {
        Ok(Self {
            pool: BufferPool::new(usize::from(count), data_bytes_max)?,
            refs: vec![0; usize::from(count)],
        })
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BufferPool {
        &mut self.pool
    }

    pub fn free_count(&self) -> usize {
        self.pool.free_count()
    }

    /// A free buffer, now owned by the caller alone.
    pub fn take(&mut self) -> Option<u16> {
        self.pool.take()
    }

    /// A buffer owned by its taker alone goes back.
    pub fn give_back(&mut self, buffer: u16) {
        assert_eq!(self.refs[usize::from(buffer)], 0, "buffer {buffer} given back while shared");
        self.pool.give_back(buffer);
    }

    /// The taker hands its buffer to `count` holders, each of which `release`s it.
    pub fn share(&mut self, buffer: u16, count: u16) {
        assert!(count > 0);
        let refs = &mut self.refs[usize::from(buffer)];
        assert_eq!(*refs, 0, "buffer {buffer} shared twice");
        *refs = count;
    }

    /// One more holder of a shared buffer (a zero-copy send until its notification).
    pub fn add_ref(&mut self, buffer: u16) {
        let refs = &mut self.refs[usize::from(buffer)];
        assert!(*refs > 0, "a reference to buffer {buffer}, which is not shared");
        *refs += 1;
    }

    /// A holder is done with a shared buffer; the last one gives it back to the pool.
    pub fn release(&mut self, buffer: u16) {
        let refs = &mut self.refs[usize::from(buffer)];
        assert!(*refs > 0, "buffer {buffer} released more often than referenced");
        *refs -= 1;
        if *refs == 0 {
            self.pool.give_back(buffer);
        }
    }
}
