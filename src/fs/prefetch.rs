//! Sequential-read detection per file: a stream that keeps reading where it left off
//! gets the blocks ahead of it fetched in the background, the window doubling up to
//! a bound, so a large sequential read is not one store round trip at a time.

use crate::block::BlockId;
use crate::cache::BlockCache;
use crate::index::Ino;
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, Weak};

/// Blocks fetched ahead of a reader at most.
pub const MAX_WINDOW: u64 = 16;
/// How far from the stream's head a read may land and still count as sequential.
pub const SLACK_BLOCKS: u64 = 8;
/// Fetches running in the background at once on a local store: enough to spread
/// hashing over the cores; more only compete for them (16 read 1 GiB 5-25% slower
/// than 8 on 2 cores).
pub const LOCAL_PREFETCH_WORKERS: usize = 8;
/// On a remote store each fetch mostly waits on the network: one per block of the
/// readahead window (16 read 5-20% faster than 8 from a local Garage).
pub const REMOTE_PREFETCH_WORKERS: usize = MAX_WINDOW as usize;
/// Requests waiting for a worker; beyond this, readers fetch for themselves.
const QUEUE: usize = 64;

#[derive(Default)]
pub struct Readahead {
    streams: Mutex<HashMap<Ino, Stream>>,
}

struct Stream {
    /// Where the next sequential read would start.
    next: u64,
    window: u64,
    /// Slots below this were already asked for.
    fetched_until: u64,
}

/// What a read means for the blocks around it.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadPlan {
    /// Block slots to fetch in the background.
    pub prefetch: std::ops::Range<u64>,
    /// The read continues a sequential stream (not merely the first read at 0).
    pub streaming: bool,
}

impl Readahead {
    /// Records a read of [offset, end) and returns what to prefetch.
    pub fn on_read(&self, ino: Ino, offset: u64, end: u64, block_size: u64) -> ReadPlan {
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
            return ReadPlan {
                prefetch: 0..0,
                streaming: false,
            };
        }
        s.next = if near { s.next.max(end) } else { end };
        let last_slot = s.next.saturating_sub(1) / block_size;
        s.window = (s.window * 2).clamp(2, MAX_WINDOW);
        let from = (last_slot + 1).max(s.fetched_until);
        let to = last_slot + 1 + s.window;
        let range = if from >= to {
            0..0
        } else {
            s.fetched_until = to;
            from..to
        };
        ReadPlan {
            prefetch: range,
            streaming: near,
        }
    }

    pub fn forget(&self, ino: Ino) {
        self.streams.lock().unwrap().remove(&ino);
    }
}

/// Long-lived background fetchers fed by a bounded queue. (A thread per batch cost
/// two thread creations, and their stack mappings, per MiB read.) Started on first
/// use; they exit once the `Prefetcher` or the cache is dropped.
pub struct Prefetcher {
    queue: Mutex<Option<SyncSender<BlockId>>>,
    workers: usize,
}

impl Prefetcher {
    pub fn new(workers: usize) -> Prefetcher {
        Prefetcher {
            queue: Mutex::new(None),
            workers: workers.max(1),
        }
    }

    /// Queues fetches into the cache. Best effort: a full queue drops the rest, and a
    /// failed fetch is reported when the reader gets to that block.
    pub fn request(&self, cache: &Arc<BlockCache>, ids: impl IntoIterator<Item = BlockId>) {
        let mut queue = self.queue.lock().unwrap();
        if queue.is_none() {
            *queue = start_workers(cache, self.workers);
        }
        let Some(tx) = queue.as_ref() else {
            return;
        };
        for id in ids {
            if tx.try_send(id).is_err() {
                return;
            }
        }
    }
}

fn start_workers(cache: &Arc<BlockCache>, workers: usize) -> Option<SyncSender<BlockId>> {
    let (tx, rx) = sync_channel(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let mut started = 0;
    for i in 0..workers {
        let (cache, rx) = (Arc::downgrade(cache), rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("objfs-prefetch-{i}"))
            .spawn(move || fetch_loop(&cache, &rx));
        match spawned {
            Ok(_) => started += 1,
            Err(e) => log::warn!("starting a prefetch thread: {e}"),
        }
    }
    (started > 0).then_some(tx)
}

fn fetch_loop(cache: &Weak<BlockCache>, rx: &Mutex<Receiver<BlockId>>) {
    loop {
        let next = rx.lock().unwrap().recv();
        // Nothing queued is fetched for a volume that is gone.
        let (Ok(id), Some(cache)) = (next, cache.upgrade()) else {
            return;
        };
        cache.prefetch(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_grow_the_window_random_reads_reset_it() {
        let r = Readahead::default();
        let bs = 100;
        let on_read = |ino, offset, end| r.on_read(ino, offset, end, bs).prefetch;
        assert_eq!(on_read(1, 0, 50), 1..3);
        assert_eq!(on_read(1, 50, 100), 3..5);
        assert_eq!(on_read(1, 100, 200), 5..10);
        assert_eq!(on_read(1, 5000, 5100), 0..0);
        assert_eq!(on_read(1, 5100, 5200), 52..54);
        // Slightly out of order still counts.
        assert_eq!(on_read(1, 5300, 5400), 54..58);
        assert_eq!(on_read(1, 5200, 5300), 58..62);
        assert_eq!(on_read(2, 300, 400), 0..0);
        // Only a read that continues a stream is streaming, not the first one at 0.
        assert!(!r.on_read(3, 0, 100, bs).streaming);
        assert!(r.on_read(3, 100, 200, bs).streaming);
        assert!(!r.on_read(3, 9000, 9100, bs).streaming);
    }
}
