//! The block cache: verified plain blocks in memory, bounded by bytes (LRU), in front of
//! the store on both the read path (fetch + verify once) and the write path (newly
//! written blocks stay hot), with an optional bounded disk tier behind it.

mod disk;
pub use disk::DiskCache;

use crate::block::{self, BlockError, BlockId};
use crate::store::{ObjectStore, StoreError};
use lru::LruCache;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Corrupt(#[from] BlockError),
}

pub type Block = Arc<Vec<u8>>;

/// Block buffers kept for reuse. Fetches and new dirty blocks take one instead of
/// asking malloc for fresh pages: each MiB from the kernel costs 256 page faults,
/// and giving it back (an munmap) interrupts every core running our threads.
/// Bounded in bytes (part of the memory budget's overhead), so large block sizes
/// simply pool fewer buffers.
const POOL_BYTES: usize = 16 << 20;
/// Smaller buffers are not worth keeping.
const POOLED_MIN: usize = 64 << 10;
/// Shared blocks waiting for their readers to let go (see `Free::held`).
const HELD_MAX: usize = 32;

#[derive(Default)]
struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    /// Blocks given back while a reader still held them (a reply being sent): their
    /// buffers are taken once the last reader lets go.
    held: Vec<Block>,
}

impl Free {
    fn bytes(&self) -> usize {
        let held: usize = self.held.iter().map(|b| b.capacity()).sum();
        held + self.buffers.iter().map(Vec::capacity).sum::<usize>()
    }
}

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        let mut free = self.free.lock().unwrap();
        if let Some(buf) = free.buffers.pop() {
            return buf;
        }
        let released = free.held.iter().position(|b| Arc::strong_count(b) == 1);
        match released.map(|i| Arc::try_unwrap(free.held.swap_remove(i))) {
            Some(Ok(mut buf)) => {
                buf.clear();
                buf
            }
            _ => Vec::new(),
        }
    }

    /// Keeps the block's buffer for reuse, now or once no one else holds the block.
    fn give(&self, block: Block) {
        if block.capacity() < POOLED_MIN {
            return;
        }
        let mut free = self.free.lock().unwrap();
        if free.bytes() + block.capacity() > POOL_BYTES {
            return;
        }
        match Arc::try_unwrap(block) {
            Ok(mut buf) => {
                buf.clear();
                free.buffers.push(buf);
            }
            Err(block) => {
                // One held for long (a reader that keeps it) ages out.
                if free.held.len() >= HELD_MAX {
                    free.held.remove(0);
                }
                free.held.push(block);
            }
        }
    }
}

struct Lru {
    map: LruCache<BlockId, Block>,
    bytes: u64,
    /// Blocks a sequential stream has read whole and dropped (newest last). A fetch
    /// that finishes after that (a prefetch the reader overtook) does not put one back.
    behind: VecDeque<BlockId>,
}

/// Blocks remembered in `Lru::behind`.
const BEHIND: usize = 128;

/// Who fetches a block: a reader that needs it now, or a prefetch worker ahead of one.
#[derive(Clone, Copy)]
enum Fetcher {
    Reader,
    Ahead,
}

/// One fetch in progress; others asking for the same block wait for it.
#[derive(Default)]
struct Flight {
    /// Some(Some(block)) once fetched, Some(None) if the fetch failed.
    done: Mutex<Option<Option<Block>>>,
    cv: Condvar,
}

pub struct BlockCache {
    store: Arc<dyn ObjectStore>,
    lru: Mutex<Lru>,
    capacity: u64,
    inflight: Mutex<HashMap<BlockId, Arc<Flight>>>,
    disk: Option<DiskCache>,
    pool: BufferPool,
    compression: block::Compression,
    /// The filesystem's block size: no stored block may expand past it.
    max_plain: usize,
}

/// Expansion buffers from the pool, and stored bytes back to it.
impl block::Buffers for BlockCache {
    fn take(&self, capacity: usize) -> Vec<u8> {
        self.buffer(capacity)
    }
    fn give_back(&self, buf: Vec<u8>) {
        self.pool.give(Arc::new(buf));
    }
}

impl BlockCache {
    pub fn new(store: Arc<dyn ObjectStore>, capacity: u64) -> BlockCache {
        BlockCache {
            store,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
                behind: VecDeque::new(),
            }),
            capacity,
            inflight: Mutex::new(HashMap::new()),
            disk: None,
            pool: BufferPool::default(),
            compression: block::Compression::None,
            max_plain: block::MAX_PLAIN,
        }
    }

    /// Adds a disk tier behind the memory cache.
    pub fn with_disk(mut self, disk: DiskCache) -> BlockCache {
        self.disk = Some(disk);
        self
    }

    /// New blocks are stored compressed this way (when it saves space); no block
    /// is larger than `block_size`.
    pub fn with_format(mut self, compression: block::Compression, block_size: u32) -> BlockCache {
        self.compression = compression;
        self.max_plain = block_size as usize;
        self
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The block's plain bytes, from memory or fetched from the store and verified.
    /// Concurrent requests for the same block share one fetch.
    pub fn get(&self, id: BlockId) -> Result<Block, CacheError> {
        self.get_for(id, Fetcher::Reader)
    }

    /// Fetches a block ahead of a reader. One a stream has already left behind (the
    /// reader overtook this request) is neither fetched again nor put back.
    pub fn prefetch(&self, id: BlockId) {
        if self.cached(&id).is_none() && !self.lru.lock().unwrap().behind.contains(&id) {
            let _ = self.get_for(id, Fetcher::Ahead);
        }
    }

    fn get_for(&self, id: BlockId, fetcher: Fetcher) -> Result<Block, CacheError> {
        if let Some(b) = self.cached(&id) {
            return Ok(b);
        }
        let (flight, leader) = {
            let mut inflight = self.inflight.lock().unwrap();
            match inflight.get(&id) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(id, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock().unwrap();
            while done.is_none() {
                done = flight.cv.wait(done).unwrap();
            }
            if let Some(Some(b)) = done.as_ref() {
                return Ok(b.clone());
            }
            drop(done);
            // The shared fetch failed: try once more ourselves for our own error.
            return self.fetch(id, fetcher);
        }
        let result = self.fetch(id, fetcher);
        *flight.done.lock().unwrap() = Some(result.as_ref().ok().cloned());
        flight.cv.notify_all();
        self.inflight.lock().unwrap().remove(&id);
        result
    }

    /// Whether the block is in memory, without fetching it.
    pub fn cached(&self, id: &BlockId) -> Option<Block> {
        self.lru.lock().unwrap().map.get(id).cloned()
    }

    fn fetch(&self, id: BlockId, fetcher: Fetcher) -> Result<Block, CacheError> {
        if let Some(plain) = self.disk.as_ref().and_then(|d| d.get(&id)) {
            let plain = Arc::new(plain);
            self.insert_fetched(id, plain.clone(), fetcher);
            return Ok(plain);
        }
        let mut stored = self.pool.take();
        self.store.get_into(&id.key(), &mut stored)?;
        let plain = match block::decode_with(id, stored, self.max_plain, self) {
            Ok(p) => Arc::new(self.fit(p)),
            Err(e) => {
                log::error!("{e}");
                return Err(e.into());
            }
        };
        self.insert_fetched(id, plain.clone(), fetcher);
        if let Some(d) = &self.disk {
            d.put(&id, &plain);
        }
        Ok(plain)
    }

    /// Uploads a plain block, compressed if the filesystem says so and it pays
    /// (otherwise without copying it); durable after the store's next sync.
    pub fn upload_plain(&self, id: BlockId, plain: &[u8]) -> Result<(), CacheError> {
        let mut packed = match self.compression {
            block::Compression::None => Vec::new(),
            block::Compression::Zstd => self.buffer(plain.len()),
        };
        let put = if self.compression.compress_into(plain, &mut packed) {
            self.store.put_parts_unsynced(&id.key(), &[&packed])
        } else {
            let trailer = block::trailer(block::CODEC_NONE);
            self.store.put_parts_unsynced(&id.key(), &[plain, &trailer])
        };
        self.pool.give(Arc::new(packed));
        put?;
        // Only once the store has it: the cache never holds the only copy.
        if let Some(d) = &self.disk {
            d.put(&id, plain);
        }
        Ok(())
    }

    pub fn insert(&self, id: BlockId, plain: Block) {
        self.insert_fetched(id, plain, Fetcher::Reader);
    }

    /// A reader (or writer) wanting the block again takes it off the left-behind list;
    /// a late prefetch does not put it back.
    fn insert_fetched(&self, id: BlockId, plain: Block, fetcher: Fetcher) {
        let len = plain.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut lru = self.lru.lock().unwrap();
            if let Some(i) = lru.behind.iter().position(|b| *b == id) {
                match fetcher {
                    Fetcher::Ahead => return,
                    Fetcher::Reader => drop(lru.behind.remove(i)),
                }
            }
            if let Some(old) = lru.map.put(id, plain.clone()) {
                lru.bytes -= old.len() as u64;
                // The very same block put again is still cached: not for the pool.
                if !Arc::ptr_eq(&old, &plain) {
                    evicted.push(old);
                }
            }
            lru.bytes += len;
            while lru.bytes > self.capacity {
                match lru.map.pop_lru() {
                    Some((_, b)) => {
                        lru.bytes -= b.len() as u64;
                        evicted.push(b);
                    }
                    None => break,
                }
            }
        }
        for b in evicted {
            self.pool.give(b);
        }
    }

    pub fn forget(&self, id: &BlockId) {
        self.remove(id, false);
    }

    /// Drops a block a sequential stream has read whole and will not read again, and
    /// keeps late fetches of it out (see `Lru::behind`).
    pub fn drop_behind(&self, id: &BlockId) {
        self.remove(id, true);
    }

    fn remove(&self, id: &BlockId, behind: bool) {
        let popped = {
            let mut lru = self.lru.lock().unwrap();
            if behind && !lru.behind.contains(id) {
                if lru.behind.len() >= BEHIND {
                    lru.behind.pop_front();
                }
                lru.behind.push_back(*id);
            }
            let popped = lru.map.pop(id);
            if let Some(b) = &popped {
                lru.bytes -= b.len() as u64;
            }
            popped
        };
        if let Some(b) = popped {
            self.pool.give(b);
        }
    }

    /// A small block in a big (pooled, fully resident) buffer would hold far more
    /// memory than the cache counts: copy it out and keep the buffer.
    fn fit(&self, plain: Vec<u8>) -> Vec<u8> {
        if plain.len() >= plain.capacity() / 2 {
            return plain;
        }
        let small = plain.clone();
        self.pool.give(Arc::new(plain));
        small
    }

    /// A buffer its owner is done with, for `buffer` to hand out again (its pages
    /// are already mapped). One still shared is reused once the others let go.
    pub fn recycle(&self, buf: Block) {
        self.pool.give(buf);
    }

    /// An empty buffer with room for at least `capacity` bytes, reused if one is free.
    pub fn buffer(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self.pool.take();
        buf.reserve_exact(capacity);
        buf
    }

    pub fn cached_bytes(&self) -> u64 {
        self.lru.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn fetches_verifies_and_bounds() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let cache = BlockCache::new(store.clone(), 10);
        let id = BlockId::of(b"12345678");
        cache.upload_plain(id, b"12345678").unwrap();
        assert_eq!(&**cache.get(id).unwrap(), b"12345678");
        assert_eq!(cache.cached_bytes(), 8);
        let id2 = BlockId::of(b"abcdef");
        cache.upload_plain(id2, b"abcdef").unwrap();
        cache.get(id2).unwrap();
        assert!(cache.cached_bytes() <= 10);
        // A corrupted object is an error, never wrong bytes.
        let (id3, mut bad) = block::encode(b"zzz");
        bad[1] ^= 1;
        store.put(&id3.key(), &bad).unwrap();
        assert!(matches!(cache.get(id3), Err(CacheError::Corrupt(_))));
        assert!(matches!(
            cache.get(BlockId::of(b"missing")),
            Err(CacheError::Store(StoreError::NotFound(_)))
        ));
    }

    #[test]
    fn evicted_buffers_are_reused_but_never_while_shared() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let cache = BlockCache::new(store, 2 * POOLED_MIN as u64);
        let block = |byte: u8| Arc::new(vec![byte; POOLED_MIN]);
        let held = block(1);
        cache.insert(BlockId::of(&held), held.clone());
        cache.insert(BlockId::of(&[2]), block(2));
        // Evicts the first two: one still held by a reader, one free.
        cache.insert(BlockId::of(&[3]), block(3));
        cache.insert(BlockId::of(&[4]), block(4));
        let mut reused = cache.buffer(POOLED_MIN);
        assert!(reused.is_empty() && reused.capacity() >= POOLED_MIN);
        reused.resize(POOLED_MIN, 9);
        assert!(held.iter().all(|&b| b == 1), "a held block was handed out");
        // The held one waits: the next buffer is new, and so on while it is held.
        assert_eq!(cache.buffer(0).capacity(), 0);
        assert_eq!(cache.pool.free.lock().unwrap().held.len(), 1);
        // Once the reader lets go, its buffer is the next one handed out.
        let held_ptr = held.as_ptr();
        drop(held);
        let recycled = cache.buffer(0);
        assert_eq!(recycled.as_ptr(), held_ptr);
        assert!(recycled.is_empty());
        // The pool is bounded in bytes.
        for _ in 0..(POOL_BYTES / POOLED_MIN + 8) {
            cache.pool.give(Arc::new(Vec::with_capacity(POOLED_MIN)));
        }
        let pooled = cache.pool.free.lock().unwrap().bytes();
        assert!(pooled <= POOL_BYTES && pooled > POOL_BYTES - POOLED_MIN * 2);
    }

    #[test]
    fn a_small_block_never_pins_a_big_pooled_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(crate::store::LocalStore::open(dir.path(), true).unwrap());
        let cache = BlockCache::new(store, 1 << 30);
        let small = b"ten bytes!";
        let id = BlockId::of(small);
        cache.upload_plain(id, small).unwrap();
        cache
            .pool
            .give(Arc::new(Vec::with_capacity(4 * POOLED_MIN)));
        let got = cache.get(id).unwrap();
        assert_eq!(&got[..], small);
        assert!(got.capacity() < POOLED_MIN, "{}", got.capacity());
        // The big buffer went back to the pool.
        assert_eq!(cache.buffer(0).capacity(), 4 * POOLED_MIN);
    }
}
