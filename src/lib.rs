//! objfs: a POSIX filesystem whose data and metadata live in a flat object store.
//!
//! Layers, top to bottom: `cli` -> `fuse` (thin adapter) -> `fs` (POSIX semantics,
//! plain Rust API) -> `index` (metadata, journal, snapshots) -> `cache` (block cache)
//! -> `block` (content-addressed codec) -> `store` (object stores).

pub mod alloc;
pub mod block;
pub mod cache;
pub mod cli;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod index;
pub mod lease;
pub mod store;
pub mod tools;
pub mod util;

// Unit tests run on the daemon's allocator too (the binary sets it in main.rs).
#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::PageAlignedLarge = alloc::PageAlignedLarge;
