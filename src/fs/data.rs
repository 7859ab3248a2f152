//! File contents: dirty block buffers (write-back), reads that merge dirty and stored
//! blocks, truncation, and sealing dirty blocks into the store.

use super::patch::Patchable;
use super::{Ctx, FsError, FsResult, MAX_FILE_SIZE, Volume};
use crate::block::BlockId;
use crate::index::{Extent, Ino, Kind, Timestamp, UploadStart};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One block slot with bytes not yet in the store. `version` changes on every
/// modification, so a flush only installs what it actually uploaded.
pub(super) struct DirtyBlock {
    pub(super) data: Arc<Vec<u8>>,
    pub(super) version: u64,
    /// Set while the change can be stored as patches over the slot's stored
    /// content (see `patch`); None: the buffer is uploaded whole.
    pub(super) patchable: Option<Patchable>,
}

#[derive(Default)]
pub(super) struct FileData {
    pub(super) dirty: BTreeMap<u64, DirtyBlock>,
    /// The latest write-back failure and its sequence number: every descriptor open
    /// when it happened reports it once (fsync or close), as Linux's errseq does.
    pub(super) error: Option<(u64, FsError)>,
    /// The last write-back of this file failed (cleared by one that succeeds).
    pub(super) failing: bool,
}

impl FileData {
    fn dirty_len(&self) -> u64 {
        self.dirty.values().map(|b| b.data.len() as u64).sum()
    }

    /// Drops all dirty data; returns its size.
    pub(super) fn discard(&mut self) -> u64 {
        let n = self.dirty_len();
        self.dirty.clear();
        n
    }
}

/// The bytes of a read: assembled, or a range of one cached block.
pub enum ReadData {
    Owned(Vec<u8>),
    Shared(crate::cache::Block, std::ops::Range<usize>),
}

impl ReadData {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Shared(b, r) => &b[r.clone()],
        }
    }
}

/// One slot's worth of a read plan.
enum Piece {
    Bytes(Vec<u8>),
    Block { id: BlockId, len: u64 },
    Patched(Extent),
    Zeros,
}

/// A dirty block captured for upload.
struct Sealed {
    slot: u64,
    version: u64,
    data: Arc<Vec<u8>>,
    /// Store it as these patches instead, if the slot still holds the base they
    /// were made against (the second extent; None: a hole).
    patch: Option<(Extent, Option<Extent>)>,
}

impl Volume {
    fn file_data(&self, ino: Ino, create: bool) -> Option<Arc<Mutex<FileData>>> {
        if create {
            return Some(self.file_data_or_new(ino));
        }
        self.files.lock().unwrap().get(&ino).cloned()
    }

    pub(super) fn file_data_of(&self, ino: Ino) -> Option<Arc<Mutex<FileData>>> {
        self.file_data(ino, false)
    }

    pub(super) fn file_data_or_new(&self, ino: Ino) -> Arc<Mutex<FileData>> {
        self.files.lock().unwrap().entry(ino).or_default().clone()
    }

    pub(super) fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed)
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        Ok(self.read_shared(ino, offset, size)?.as_slice().to_vec())
    }

    /// Like `read`, but a read inside one cached block is answered from the block
    /// itself, without copying it.
    pub fn read_shared(&self, ino: Ino, offset: u64, size: u32) -> FsResult<ReadData> {
        let bs = self.block_size;
        let fd = self.file_data(ino, false);
        let guard = fd.as_ref().map(|f| f.lock().unwrap());
        let (start, end, plan, ahead, behind) = {
            let mut state = self.state();
            let inode = Self::inode(&state, ino)?;
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            let end = inode.size.min(offset.saturating_add(u64::from(size)));
            if offset >= end {
                return Ok(ReadData::Owned(Vec::new()));
            }
            let mut plan = Vec::new();
            for slot in offset / bs..end.div_ceil(bs) {
                let dirty = guard.as_ref().and_then(|g| g.dirty.get(&slot));
                let piece = match (dirty, inode.extents.get(&slot)) {
                    (Some(d), _) => {
                        // Only the part of the block this read needs.
                        let lo = (offset.max(slot * bs) - slot * bs) as usize;
                        let hi = ((end - slot * bs).min(bs) as usize).min(d.data.len());
                        let mut bytes = vec![0; lo];
                        bytes.extend_from_slice(d.data.get(lo..hi).unwrap_or(&[]));
                        Piece::Bytes(bytes)
                    }
                    (None, Some(Extent::Inline(b))) => Piece::Bytes(b.clone()),
                    (None, Some(Extent::Block { id, len })) => Piece::Block {
                        id: *id,
                        len: u64::from(*len),
                    },
                    (None, Some(e @ Extent::Patched { .. })) => Piece::Patched(e.clone()),
                    (None, None) => Piece::Zeros,
                };
                plan.push((slot, piece));
            }
            let dirty = |slot: &u64| guard.as_ref().is_some_and(|g| g.dirty.contains_key(slot));
            let read_plan = self.readahead.on_read(ino, offset, end, bs);
            let ahead: Vec<BlockId> = read_plan
                .prefetch
                .filter(|slot| !dirty(slot))
                .filter_map(|slot| inode.extents.get(&slot).and_then(Extent::block_id))
                .collect();
            self.touch_atime(&mut state, ino);
            let behind = match read_plan.streaming {
                true => self.left_behind(&state, &plan, (offset, end)),
                false => Vec::new(),
            };
            (offset, end, plan, ahead, behind)
        };
        drop(guard);
        self.prefetch(ahead);
        let blocks = self.fetch_all(plan.iter().filter_map(|(_, p)| match p {
            Piece::Block { id, .. } => Some(*id),
            Piece::Patched(e) => e.block_id(),
            _ => None,
        }))?;
        for id in &behind {
            self.cache.drop_behind(id);
        }
        if let [(slot, Piece::Block { id, len })] = plan.as_slice() {
            let block = &blocks[id];
            let valid = (*len as usize).min(block.len()) as u64;
            let (lo, hi) = (start - slot * bs, end - slot * bs);
            if hi <= valid {
                return Ok(ReadData::Shared(block.clone(), lo as usize..hi as usize));
            }
        }
        let mut out = vec![0u8; (end - start) as usize];
        for (slot, piece) in &plan {
            let slot_start = slot * bs;
            let valid: &[u8] = match piece {
                Piece::Bytes(b) => b,
                Piece::Block { id, len } => {
                    let b = &blocks[id];
                    &b[..(*len as usize).min(b.len())]
                }
                Piece::Patched(e) => {
                    let lo = start.max(slot_start);
                    let hi = end.min(slot_start + e.len());
                    if lo < hi {
                        let base = e.block_id().map(|id| blocks[&id].as_slice());
                        let dst = &mut out[(lo - start) as usize..(hi - start) as usize];
                        e.read_into(
                            base,
                            (lo - slot_start) as usize,
                            (hi - slot_start) as usize,
                            dst,
                        );
                    }
                    continue;
                }
                Piece::Zeros => &[],
            };
            let lo = start.max(slot_start);
            let hi = end.min(slot_start + valid.len() as u64);
            if lo < hi {
                let src = &valid[(lo - slot_start) as usize..(hi - slot_start) as usize];
                out[(lo - start) as usize..(hi - start) as usize].copy_from_slice(src);
            }
        }
        Ok(ReadData::Owned(out))
    }

    /// A stream that has read a whole block will not read it again, and the kernel's
    /// page cache keeps what it read: the block can leave the memory cache, so a long
    /// sequential read neither pushes out everything else nor needs a fresh buffer per
    /// block (its buffer is reused once the reply is sent). Not a block other extents
    /// share (dedup: a file of zeros is one block, read again and again), and not on a
    /// read-only mount, whose page cache is dropped at every open.
    fn left_behind(
        &self,
        state: &super::State,
        plan: &[(u64, Piece)],
        (start, end): (u64, u64),
    ) -> Vec<BlockId> {
        if self.config.read_only {
            return Vec::new();
        }
        let bs = self.block_size;
        plan.iter()
            .filter_map(|(slot, piece)| match piece {
                Piece::Block { id, len }
                    if start <= slot * bs
                        && end >= slot * bs + len
                        && state.index.ledger().refs(id) == 1 =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect()
    }

    /// Fetches blocks into the cache in the background.
    fn prefetch(&self, ids: Vec<BlockId>) {
        let missing = ids.into_iter().filter(|id| self.cache.cached(id).is_none());
        self.prefetcher.request(&self.cache, missing);
    }

    /// relatime: atime moves only when it is older than mtime/ctime or a day old.
    fn touch_atime(&self, state: &mut super::State, ino: Ino) {
        if self.config.read_only {
            return;
        }
        let Some(inode) = state.index.get(ino) else {
            return;
        };
        let now = Timestamp::now();
        let stale = inode.atime <= inode.mtime
            || inode.atime <= inode.ctime
            || now.sec - inode.atime.sec >= 24 * 3600;
        if stale && let Some(i) = state.index.get_mut(ino) {
            i.atime = now;
        }
    }

    /// Fetches distinct blocks: cached ones at once, missing ones all at the same
    /// time (`util::in_parallel`).
    pub(super) fn fetch_all(
        &self,
        ids: impl Iterator<Item = BlockId>,
    ) -> FsResult<std::collections::HashMap<BlockId, crate::cache::Block>> {
        let mut ids: Vec<BlockId> = ids.collect();
        ids.sort_unstable();
        ids.dedup();
        let mut out = std::collections::HashMap::new();
        let mut missing = Vec::new();
        for id in ids {
            match self.cache.cached(&id) {
                Some(block) => {
                    out.insert(id, block);
                }
                None => missing.push(id),
            }
        }
        let fetched = crate::util::in_parallel(
            &missing,
            |&id| self.cache.get(id).map_err(FsError::from),
            |id| Err(FsError::Io(format!("fetching block {id:?} failed"))),
        );
        for (id, r) in missing.into_iter().zip(fetched) {
            out.insert(id, r?);
        }
        Ok(out)
    }

    /// The current bytes of one slot, for a partial overwrite that will fill it up
    /// to `hi`, and the extent they came from.
    fn slot_base(&self, ino: Ino, slot: u64, hi: usize) -> FsResult<(Vec<u8>, Option<Extent>)> {
        let extent = {
            let state = self.state();
            Self::inode(&state, ino)?.extents.get(&slot).cloned()
        };
        let bytes = match &extent {
            None => self.slot_buffer(hi),
            Some(e) => self.slot_content(e, hi)?,
        };
        Ok((bytes, extent))
    }

    /// What a slot with this extent holds, in a buffer with room for `hi` bytes.
    pub(super) fn slot_content(&self, extent: &Extent, hi: usize) -> FsResult<Vec<u8>> {
        if let Extent::Inline(b) = extent {
            return Ok(b.clone());
        }
        let block = match extent.block_id() {
            Some(id) => Some(self.cache.get(id)?),
            None => None,
        };
        let len = extent.len() as usize;
        let mut buf = self.slot_buffer(len.max(hi));
        buf.resize(len, 0);
        extent.read_into(block.as_ref().map(|b| b.as_slice()), 0, len, &mut buf);
        Ok(buf)
    }

    /// A buffer for a slot about to hold `filled` bytes. A mostly full one reuses a
    /// pooled whole-block buffer (room for the stored trailer too, so it can serve a
    /// fetch later; all its pages get touched anyway). A small one starts small and
    /// grows by doubling: a small file must neither pin a whole recycled block nor
    /// cost a mapping of its own (thousands of dirty small files would each hold one,
    /// against the kernel's limit on mappings).
    fn slot_buffer(&self, filled: usize) -> Vec<u8> {
        if filled as u64 >= self.block_size / 2 {
            self.cache
                .buffer(self.block_size as usize + crate::block::TRAILER_LEN)
        } else {
            Vec::with_capacity(filled.next_power_of_two())
        }
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_dropping_setid(ino, offset, data, None)
            .map(|(n, _)| n)
    }

    /// `drop_setid_for`: the kernel asks us to drop set-ID bits as a write by a
    /// process without CAP_FSETID must (FUSE_HANDLE_KILLPRIV_V2); it carries that
    /// process. Also returns whether the mode changed, so the caller can tell the
    /// kernel to forget the mode it cached.
    pub fn write_dropping_setid(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        drop_setid_for: Option<Ctx>,
    ) -> FsResult<(u32, bool)> {
        self.writable()?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        if data.is_empty() {
            return Ok((0, false));
        }
        {
            let state = self.state();
            match Self::inode(&state, ino)?.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
        }
        let bs = self.block_size;
        let fd = self.file_data(ino, true).expect("created");
        let mut file = fd.lock().unwrap();
        let mut added = 0i64;
        let mut full = Vec::new();
        for slot in offset / bs..end.div_ceil(bs) {
            let slot_start = slot * bs;
            let lo = (offset.max(slot_start) - slot_start) as usize;
            let hi = (end.min(slot_start + bs) - slot_start) as usize;
            if let std::collections::btree_map::Entry::Vacant(e) = file.dirty.entry(slot) {
                let whole = lo == 0 && hi as u64 == bs;
                let (base, patchable) = if whole {
                    (self.slot_buffer(hi), None)
                } else {
                    let (bytes, extent) = self.slot_base(ino, slot, hi)?;
                    (bytes, Patchable::over(extent))
                };
                added += base.len() as i64;
                e.insert(DirtyBlock {
                    data: Arc::new(base),
                    version: 0,
                    patchable,
                });
            }
            let version = self.next_version();
            let block = file.dirty.get_mut(&slot).expect("inserted above");
            block.version = version;
            if let Some(p) = &mut block.patchable
                && !p.note(lo, hi)
            {
                block.patchable = None;
            }
            let buf = Arc::make_mut(&mut block.data);
            if buf.len() < hi {
                added += (hi - buf.len()) as i64;
                buf.resize(hi, 0);
            }
            let src = (slot_start + lo as u64 - offset) as usize;
            buf[lo..hi].copy_from_slice(&data[src..src + (hi - lo)]);
            // A block whose last byte this write reached is one a stream has just
            // filled: upload it now. A write inside a full block (an overwrite) waits
            // for the next flush instead, or each small write would upload the whole
            // block again.
            if hi as u64 == bs && buf.len() as u64 == bs && self.uploader.running() {
                full.push(super::upload::Job { ino, slot, version });
            }
        }
        self.account_dirty(added);
        let mut mode_changed = false;
        let many =
            !self.uploader.running() && file.dirty.len() as u64 * bs >= self.config.dirty_limit / 4;
        {
            let mut state = self.state();
            state.index.mark_data_pending(ino);
            let inode = Self::inode_mut(&mut state, ino)?;
            inode.size = inode.size.max(end);
            let now = Timestamp::now();
            inode.mtime = now;
            inode.ctime = now;
            if let Some(caller) = &drop_setid_for {
                mode_changed = drop_setid(inode, caller);
            }
        }
        drop(file);
        // Outside the file lock: a full queue blocks here until workers catch up.
        self.uploader.submit(full);
        if many {
            self.flush_file(ino)?;
        } else if self.dirty_bytes() > self.config.dirty_limit {
            self.relieve_dirty_limit(ino)?;
        }
        Ok((data.len() as u32, mode_changed))
    }

    /// All files' unwritten data together passed `dirty_limit`: files go to the store,
    /// this one first, until at most half the limit is left. Flushing only as much
    /// as gets back under the limit would pass it again a few writes later, and each
    /// time upload the writer's partial last block anew; flushing down to half makes
    /// that happen at most once per half a limit written. Another file's failure is
    /// that file's own (its descriptors hear of it).
    fn relieve_dirty_limit(&self, ino: Ino) -> FsResult<()> {
        let low = self.config.dirty_limit / 2;
        self.flush_file(ino)?;
        let others: Vec<Ino> = self.files.lock().unwrap().keys().copied().collect();
        for other in others.into_iter().filter(|&o| o != ino) {
            if self.dirty_bytes() <= low {
                break;
            }
            // A file whose write-back is failing is retried by the background
            // commit, not by every write of every other file (each try may wait out
            // the store's retry budget).
            let failing = self
                .file_data_of(other)
                .is_some_and(|f| f.lock().unwrap().failing);
            if failing {
                continue;
            }
            let _ = self.flush_file(other);
        }
        Ok(())
    }

    pub(super) fn account_dirty(&self, delta: i64) {
        if delta >= 0 {
            self.dirty_bytes.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.dirty_bytes
                .fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn truncate(&self, ino: Ino, size: u64) -> FsResult<()> {
        if size > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        let bs = self.block_size;
        // Under the file's data lock even when it has no dirty data: a fold
        // (`fold_file`) copying the slots out meanwhile must see the cut. (The data
        // state made for this goes at the next `flush_all`, which first ends any
        // pending size.)
        let fd = Some(self.file_data_or_new(ino));
        let mut guard = fd.as_ref().map(|f| f.lock().unwrap());
        let mut state = self.state();
        match Self::inode(&state, ino)?.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid),
        }
        if let Some(file) = guard.as_mut() {
            let mut removed = 0u64;
            for (_, b) in file.dirty.split_off(&size.div_ceil(bs)) {
                removed += b.data.len() as u64;
            }
            let keep = (size % bs) as usize;
            if keep != 0 {
                let version = self.next_version();
                if let Some(b) = file.dirty.get_mut(&(size / bs))
                    && b.data.len() > keep
                {
                    removed += (b.data.len() - keep) as u64;
                    Arc::make_mut(&mut b.data).truncate(keep);
                    b.version = version;
                    b.patchable = None;
                }
            }
            self.account_dirty(-(removed as i64));
        }
        state.index.set_size(ino, size);
        let now = Timestamp::now();
        let inode = Self::inode_mut(&mut state, ino)?;
        inode.mtime = now;
        inode.ctime = now;
        Ok(())
    }

    /// Drops set-ID bits as a change by `caller` must (see `drop_setid`); returns
    /// whether the mode changed.
    pub fn drop_setid_for(&self, ino: Ino, caller: &Ctx) -> FsResult<bool> {
        self.writable()?;
        let mut state = self.state();
        let inode = Self::inode_mut(&mut state, ino)?;
        if inode.kind != Kind::File || caller.privileged() {
            return Ok(false);
        }
        let changed = drop_setid(inode, caller);
        if changed {
            inode.ctime = Timestamp::now();
        }
        Ok(changed)
    }

    /// fallocate(2): plain allocation extends the size (space is not reserved: the
    /// store grows on demand), KEEP_SIZE is a no-op, PUNCH_HOLE and ZERO_RANGE zero a
    /// range (whole blocks become holes). Other modes are EOPNOTSUPP.
    pub fn fallocate(&self, ino: Ino, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        self.writable()?;
        if length == 0 {
            return Err(FsError::Invalid);
        }
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let size = {
            let state = self.state();
            let inode = Self::inode(&state, ino)?;
            match inode.kind {
                Kind::File => inode.size,
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::NotSupported),
            }
        };
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        match mode {
            0 if end > size => self.truncate(ino, end),
            0 | KEEP => Ok(()),
            m if m == PUNCH | KEEP => self.zero_range(ino, offset, end.min(size)),
            m if m == ZERO || m == ZERO | KEEP => {
                self.zero_range(ino, offset, end.min(size))?;
                if m == ZERO && end > size {
                    self.truncate(ino, end)?;
                }
                Ok(())
            }
            _ => Err(FsError::NotSupported),
        }
    }

    fn zero_range(&self, ino: Ino, start: u64, end: u64) -> FsResult<()> {
        if start >= end {
            return Ok(());
        }
        let bs = self.block_size;
        let first_whole = start.div_ceil(bs);
        let last_whole = end / bs; // exclusive
        if first_whole >= last_whole {
            return self
                .write(ino, start, &vec![0; (end - start) as usize])
                .map(|_| ());
        }
        if start < first_whole * bs {
            self.write(ino, start, &vec![0; (first_whole * bs - start) as usize])?;
        }
        if last_whole * bs < end {
            self.write(
                ino,
                last_whole * bs,
                &vec![0; (end - last_whole * bs) as usize],
            )?;
        }
        // Under the file's data lock even without dirty data (see `truncate`).
        let fd = self.file_data_or_new(ino);
        let mut file = fd.lock().unwrap();
        let mut state = self.state();
        let mut removed = 0u64;
        for slot in first_whole..last_whole {
            if let Some(b) = file.dirty.remove(&slot) {
                removed += b.data.len() as u64;
            }
            state.index.remove_extent(ino, slot);
        }
        self.account_dirty(-(removed as i64));
        let now = Timestamp::now();
        let inode = Self::inode_mut(&mut state, ino)?;
        inode.mtime = now;
        inode.ctime = now;
        Ok(())
    }

    /// Uploads the file's dirty blocks and points the index at them. Small files
    /// go inline into the index instead.
    pub fn flush_file(&self, ino: Ino) -> FsResult<()> {
        let Some(fd) = self.file_data(ino, false) else {
            return Ok(());
        };
        // Blocks already on their way are not uploaded twice.
        self.uploader.wait_for(ino);
        let (sealed, size) = {
            let file = fd.lock().unwrap();
            if file.dirty.is_empty() {
                // Truncation may have removed the last dirty block.
                self.state().index.mark_data_flushed(ino);
                return Ok(());
            }
            // Which dirty slots still hold the base their patches would go over:
            // compared under the state lock, the patches made after it.
            let (unmoved, size) = {
                let state = self.state();
                let inode = state.index.get(ino);
                let unmoved: Vec<bool> = file
                    .dirty
                    .iter()
                    .map(|(slot, b)| {
                        b.patchable.as_ref().is_some_and(|p| {
                            inode.and_then(|i| i.extents.get(slot)) == p.base.as_ref()
                        })
                    })
                    .collect();
                (unmoved, inode.map_or(0, |i| i.size))
            };
            let sealed: Vec<Sealed> = file
                .dirty
                .iter()
                .zip(unmoved)
                .map(|((&slot, b), unmoved)| Sealed {
                    slot,
                    version: b.version,
                    data: b.data.clone(),
                    patch: b
                        .patchable
                        .as_ref()
                        .filter(|_| unmoved)
                        .and_then(|p| self.patch_for(p, &b.data)),
                })
                .collect();
            (sealed, size)
        };
        let inline_max = u64::from(self.superblock.inline_max);
        let results = self.seal_all(&sealed, size <= inline_max);
        let mut file = fd.lock().unwrap();
        let mut state = self.state();
        let mut first_error = None;
        let mut cleaned = 0u64;
        let mut again = false;
        // Buffers of slots stored as patches or inline: the cache has no hold on
        // them, so the next slot loaded can reuse them.
        let mut spare = Vec::new();
        for (s, result) in sealed.iter().zip(results) {
            match result {
                Ok(extent) => {
                    let uploaded = match &extent {
                        Extent::Block { id, .. } => Some(*id),
                        _ => None,
                    };
                    let block = file
                        .dirty
                        .get_mut(&s.slot)
                        .filter(|b| b.version == s.version);
                    let now = state.index.get(ino).and_then(|i| i.extents.get(&s.slot));
                    let moved = s
                        .patch
                        .as_ref()
                        .is_some_and(|(_, base)| now != base.as_ref());
                    if let Some(block) = block {
                        if moved {
                            // The patches were made against what the slot held
                            // before: upload the whole block instead.
                            block.patchable = None;
                            again = true;
                        } else {
                            let old = now.map_or(0, Extent::patch_bytes);
                            self.patched
                                .lock()
                                .unwrap()
                                .note(ino, old, extent.patch_bytes());
                            state.index.set_extent(ino, s.slot, extent);
                            let done = file.dirty.remove(&s.slot);
                            cleaned += s.data.len() as u64;
                            if uploaded.is_none() {
                                spare.extend(done.map(|b| b.data));
                            }
                        }
                    }
                    if let Some(id) = uploaded {
                        state.index.end_upload(id);
                    }
                }
                Err(e) => {
                    log::error!("write-back of inode {ino} block {}: {e}", s.slot);
                    first_error.get_or_insert(e);
                }
            }
        }
        self.account_dirty(-(cleaned as i64));
        if file.dirty.is_empty() {
            state.index.mark_data_flushed(ino);
        }
        file.failing = first_error.is_some();
        if let Some(e) = first_error {
            file.error = Some((self.next_error_seq(), e.clone()));
            return Err(e);
        }
        drop(state);
        drop(file);
        drop(sealed);
        for buf in spare {
            self.cache.recycle(buf);
        }
        if again {
            return self.flush_file(ino);
        }
        Ok(())
    }

    /// The patches to store a dirty slot as (over its base, which the slot still
    /// holds), if they fit the budget; with the base they need.
    fn patch_for(&self, p: &Patchable, data: &[u8]) -> Option<(Extent, Option<Extent>)> {
        let patch = p.patch(data)?;
        let more = patch
            .patch_bytes()
            .saturating_sub(p.base.as_ref().map_or(0, Extent::patch_bytes));
        self.patched
            .lock()
            .unwrap()
            .room_for(more)
            .then(|| (patch, p.base.clone()))
    }

    /// Encodes and uploads blocks in parallel, bounded by `upload_threads`.
    fn seal_all(&self, sealed: &[Sealed], inline: bool) -> Vec<FsResult<Extent>> {
        let seal = |s: &Sealed| -> FsResult<Extent> {
            if inline && s.slot == 0 {
                return Ok(Extent::Inline(s.data.to_vec()));
            }
            if let Some((patch, _)) = &s.patch {
                return Ok(patch.clone());
            }
            let id = self.upload_block(&s.data)?;
            Ok(Extent::Block {
                id,
                len: s.data.len() as u32,
            })
        };
        let threads = self.config.upload_threads.max(1);
        let mut results = Vec::with_capacity(sealed.len());
        for chunk in sealed.chunks(threads) {
            results.extend(crate::util::in_parallel(chunk, seal, |_| {
                Err(FsError::Io("upload thread panicked".into()))
            }));
        }
        results
    }

    /// Puts one block in the store unless an identical one is already referenced.
    /// The caller must `end_upload` the returned id once the index points at it.
    pub(super) fn upload_block(&self, plain: &Arc<Vec<u8>>) -> FsResult<BlockId> {
        let id = BlockId::of(plain);
        loop {
            let start = self.state().index.begin_upload(id);
            match start {
                UploadStart::Present => break,
                UploadStart::Busy => std::thread::sleep(Duration::from_millis(5)),
                UploadStart::Needed => {
                    if let Err(e) = self.cache.upload_plain(id, plain) {
                        self.state().index.end_upload(id);
                        return Err(e.into());
                    }
                    break;
                }
            }
        }
        self.cache.insert(id, plain.clone());
        Ok(id)
    }

    /// Flushes every file with dirty data.
    pub fn flush_all(&self) -> FsResult<()> {
        let inos: Vec<Ino> = self.files.lock().unwrap().keys().copied().collect();
        let mut first_error = None;
        for ino in inos {
            if let Err(e) = self.flush_file(ino) {
                first_error.get_or_insert(e);
            }
            self.drop_clean_file_data(ino);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Forgets a file's data state once nothing is dirty and no writer holds it.
    pub(super) fn drop_clean_file_data(&self, ino: Ino) {
        let mut files = self.files.lock().unwrap();
        let removable = files.get(&ino).is_some_and(|fd| {
            Arc::strong_count(fd) == 1
                && fd
                    .try_lock()
                    .is_ok_and(|f| f.dirty.is_empty() && f.error.is_none())
        });
        if removable {
            files.remove(&ino);
        }
    }

    pub(super) fn next_error_seq(&self) -> u64 {
        self.error_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The file's latest write-back error, if it is newer than `seen`.
    pub(super) fn write_error_since(&self, ino: Ino, seen: u64) -> Option<(u64, FsError)> {
        let fd = self.file_data(ino, false)?;
        let file = fd.lock().unwrap();
        file.error.clone().filter(|(seq, _)| *seq > seen)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }
}

/// Linux's rule for dropping set-ID bits when a file is written, truncated or
/// chowned (`setattr_should_drop_sgid`): set-user-ID always goes; set-group-ID goes
/// with group-execute, or when the caller is neither in the file's group nor
/// privileged (without group-execute it marks mandatory locking). Returns whether
/// the mode changed.
pub(super) fn drop_setid(inode: &mut crate::index::Inode, caller: &Ctx) -> bool {
    let before = inode.perm;
    inode.perm &= !0o4000;
    let group_exec = inode.perm & 0o010 != 0;
    if inode.perm & 0o2000 != 0
        && (group_exec || !(caller.privileged() || caller.in_group(inode.gid)))
    {
        inode.perm &= !0o2000;
    }
    inode.perm != before
}
