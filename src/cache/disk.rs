//! The disk tier of the block cache: plain blocks as files under a local directory,
//! bounded by bytes (least recently used go first), kept across mounts. Best effort:
//! a failure here only costs a refetch from the store, never an error to the user.
//! Blocks are verified again when read back, since local disks rot too.

use crate::block::BlockId;
use lru::LruCache;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct Entries {
    map: LruCache<BlockId, u64>,
    bytes: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    entries: Mutex<Entries>,
}

impl DiskCache {
    /// Opens (creating) the cache directory and indexes what a previous mount left,
    /// oldest first, so eviction order survives a remount roughly.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        let mut found: Vec<(std::time::SystemTime, BlockId, u64)> = Vec::new();
        for fan in fs::read_dir(dir)?.flatten() {
            if !fan.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(fan.path())?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                match (BlockId::from_hex(&name), f.metadata()) {
                    (Some(id), Ok(m)) => {
                        found.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), id, m.len()))
                    }
                    // Temp files of an interrupted write.
                    _ => drop(fs::remove_file(f.path())),
                }
            }
        }
        found.sort();
        let mut entries = Entries {
            map: LruCache::unbounded(),
            bytes: 0,
        };
        for (_, id, len) in found {
            entries.map.put(id, len);
            entries.bytes += len;
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            capacity,
            entries: Mutex::new(entries),
        };
        cache.evict();
        Ok(cache)
    }

    fn path(&self, id: &BlockId) -> PathBuf {
        let h = id.to_hex();
        self.dir.join(&h[..2]).join(h)
    }

    pub fn get(&self, id: &BlockId) -> Option<Vec<u8>> {
        self.entries.lock().unwrap().map.get(id)?;
        let data = fs::read(self.path(id)).ok();
        match data {
            Some(d) if BlockId::of(&d) == *id => Some(d),
            _ => {
                // Gone (evicted by another mount) or damaged: forget it.
                self.remove(id);
                None
            }
        }
    }

    pub fn put(&self, id: &BlockId, plain: &[u8]) {
        if plain.len() as u64 > self.capacity || self.entries.lock().unwrap().map.contains(id) {
            return;
        }
        let path = self.path(id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = (|| {
            fs::create_dir_all(path.parent().expect("has a parent"))?;
            let mut f = fs::File::create(&tmp)?;
            f.write_all(plain)?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            log::debug!("disk cache: not caching block {id:?}: {e}");
            return;
        }
        {
            let mut entries = self.entries.lock().unwrap();
            if entries.map.put(*id, plain.len() as u64).is_none() {
                entries.bytes += plain.len() as u64;
            }
        }
        self.evict();
    }

    fn remove(&self, id: &BlockId) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(len) = entries.map.pop(id) {
            entries.bytes -= len;
        }
        drop(entries);
        let _ = fs::remove_file(self.path(id));
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut entries = self.entries.lock().unwrap();
                if entries.bytes <= self.capacity {
                    return;
                }
                match entries.map.pop_lru() {
                    Some((id, len)) => {
                        entries.bytes -= len;
                        id
                    }
                    None => return,
                }
            };
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_verified_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 250).unwrap();
        let blocks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100]).collect();
        let ids: Vec<BlockId> = blocks.iter().map(|b| BlockId::of(b)).collect();
        for (id, b) in ids.iter().zip(&blocks) {
            c.put(id, b);
        }
        assert!(c.bytes() <= 250);
        assert_eq!(c.get(&ids[0]), None, "oldest evicted");
        assert_eq!(c.get(&ids[3]).as_deref(), Some(&blocks[3][..]));
        drop(c);
        let c = DiskCache::open(dir.path(), 250).unwrap();
        assert_eq!(c.get(&ids[3]).as_deref(), Some(&blocks[3][..]));
        // A damaged file is a miss, not wrong bytes.
        fs::write(c.path(&ids[2]), b"rotten").unwrap();
        assert_eq!(c.get(&ids[2]), None);
        // Shrinking the capacity on reopen evicts.
        drop(c);
        let c = DiskCache::open(dir.path(), 100).unwrap();
        assert!(c.bytes() <= 100);
    }
}
