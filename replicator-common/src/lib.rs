//! What the kernel program and userspace agree on: the layout of the tracker's maps, the
//! configuration handed to the program at load time, and the extent arithmetic both sides use.
//!
//! Invariant kept here: one function maps a sector range to extents, and both the kernel program
//! and userspace call it, so what the program marks and what userspace expects can never drift.
//! Everything is `no_std` and allocation-free so that it compiles for `bpfel-unknown-none`.
#![no_std]

pub mod extent;
pub mod layout;

pub use extent::{ExtentGeometry, ExtentSpan, SECTOR_BYTES, SECTOR_SHIFT};
pub use layout::*;
