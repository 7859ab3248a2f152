//! Sequential-read detection per file: a stream that keeps reading where it left off
//! gets the blocks ahead of it fetched in the background, the window doubling up to
//! a bound, so a large sequential read is not one store round trip at a time.

use crate::index::Ino;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks fetched ahead of a reader at most.
pub const MAX_WINDOW: u64 = 16;
/// How far from the stream's head a read may land and still count as sequential.
pub const SLACK_BLOCKS: u64 = 8;
/// Background prefetch batches running at once at most.
pub const MAX_ACTIVE: usize = 4;

#[derive(Default)]
pub struct Readahead {
    streams: Mutex<HashMap<Ino, Stream>>,
    pub active: AtomicUsize,
}

struct Stream {
    /// Where the next sequential read would start.
    next: u64,
    window: u64,
    /// Slots below this were already asked for.
    fetched_until: u64,
}

impl Readahead {
    /// Records a read of [offset, end) and returns the block slots to prefetch.
    pub fn on_read(
        &self,
        ino: Ino,
        offset: u64,
        end: u64,
        block_size: u64,
    ) -> std::ops::Range<u64> {
        let mut streams = self.streams.lock().unwrap();
        if streams.len() > 4096 {
            streams.clear();
        }
        let s = streams.entry(ino).or_insert(Stream {
            next: u64::MAX,
            window: 0,
            fetched_until: 0,
        });
        // The kernel's readahead sends several requests at once, so they may arrive a
        // little out of order: anything near the stream's head continues the stream.
        let slack = SLACK_BLOCKS * block_size;
        let near = s.next != u64::MAX && offset.abs_diff(s.next) <= slack;
        let sequential = near || (offset == 0 && s.next == u64::MAX);
        if !sequential {
            s.window = 0;
            s.fetched_until = 0;
            s.next = end;
            return 0..0;
        }
        s.next = if near { s.next.max(end) } else { end };
        let last_slot = s.next.saturating_sub(1) / block_size;
        s.window = (s.window * 2).clamp(2, MAX_WINDOW);
        let from = (last_slot + 1).max(s.fetched_until);
        let to = last_slot + 1 + s.window;
        if from >= to {
            return 0..0;
        }
        s.fetched_until = to;
        from..to
    }

    pub fn forget(&self, ino: Ino) {
        self.streams.lock().unwrap().remove(&ino);
    }

    /// Claims a slot for a background batch, if fewer than MAX_ACTIVE run.
    pub fn try_start(&self) -> bool {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_ACTIVE).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn finish(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_grow_the_window_random_reads_reset_it() {
        let r = Readahead::default();
        let bs = 100;
        assert_eq!(r.on_read(1, 0, 50, bs), 1..3);
        assert_eq!(r.on_read(1, 50, 100, bs), 3..5);
        assert_eq!(r.on_read(1, 100, 200, bs), 5..10);
        assert_eq!(r.on_read(1, 5000, 5100, bs), 0..0);
        assert_eq!(r.on_read(1, 5100, 5200, bs), 52..54);
        // Slightly out of order still counts.
        assert_eq!(r.on_read(1, 5300, 5400, bs), 54..58);
        assert_eq!(r.on_read(1, 5200, 5300, bs), 58..62);
        assert_eq!(r.on_read(2, 300, 400, bs), 0..0);
    }
}
