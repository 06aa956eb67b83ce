//! The kernel program is a binary (`src/main.rs`); this empty library keeps cargo from warning
//! that the package has no library target.
#![no_std]
