//! copy_file_range(2) and lseek(2)'s SEEK_DATA / SEEK_HOLE: what the extent map
//! answers without moving data.
//!
//! A copy between equally aligned offsets shares whole blocks: the destination's
//! slots point at the source's blocks (the store holds each block once), so copying a
//! file within the filesystem costs index entries, not bytes, on any store. Holes stay
//! holes. The unaligned edges, blocks not yet in the store and inline extents are
//! copied as bytes through the ordinary read and write paths.

use super::data::FileData;
use super::{FsError, FsResult, MAX_FILE_SIZE, State, Volume};
use crate::index::{Extent, Ino, Kind, Timestamp};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most bytes one call copies when it must copy bytes, and when it shares blocks
/// (at most `SHARE_SLOTS` slots, all under the state lock); the caller gets a short
/// count and asks again, as copy_file_range allows.
const BYTE_COPY_MAX: u64 = 64 << 20;
const SHARE_MAX: u64 = 1 << 30;
const SHARE_SLOTS: u64 = 1024;

/// Where lseek looks from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// A destination slot to point at what the source's slot holds.
#[derive(Clone, Copy)]
struct Share {
    dst_slot: u64,
    src_slot: u64,
    /// The destination keeps this many bytes of the source's slot (the copy ends
    /// inside the slot at both files' ends).
    keep: u64,
}

impl Volume {
    /// Copies `len` bytes of `src` at `src_off` to `dst` at `dst_off`; returns how
    /// many it copied (0 at or past the source's end, fewer than asked for a long
    /// copy: call again).
    pub fn copy_range(
        &self,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    ) -> FsResult<u64> {
        self.writable()?;
        let (src_size, dst_size) = {
            let state = self.state();
            let dst_size = Self::regular_file(&state, dst)?.size;
            (Self::regular_file(&state, src)?.size, dst_size)
        };
        if src_off >= src_size || len == 0 {
            return Ok(0);
        }
        let bs = self.block_size;
        let aligned = src_off % bs == dst_off % bs;
        let most = if aligned {
            SHARE_MAX.min(SHARE_SLOTS * bs)
        } else {
            BYTE_COPY_MAX
        };
        let len = len.min(src_size - src_off).min(most);
        let dst_end = dst_off
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        if src == dst && src_off < dst_end && dst_off < src_off + len {
            return Err(FsError::Invalid);
        }
        if !aligned {
            return self.copy_bytes(src, src_off, dst, dst_off, len);
        }
        // Destination slots the copy covers whole, and the one it ends in when that
        // is the end of both files (the source's last block, shared as it is).
        let first = dst_off.div_ceil(bs);
        let mut end = dst_end / bs;
        // (Checked again under the locks when the slot is shared.)
        let at_both_ends = src_off + len == src_size && dst_end >= dst_size;
        if at_both_ends && !dst_end.is_multiple_of(bs) {
            end += 1;
        }
        if first >= end {
            return self.copy_bytes(src, src_off, dst, dst_off, len);
        }
        let to_src = |dst_pos: u64| dst_pos - dst_off + src_off;
        // Head, shared slots, tail, in order: a source that shrinks meanwhile cuts
        // the copy short where its bytes end, and the destination changes only up to
        // the count returned, as with a native copy. Until the call returns, a crash
        // may leave parts of the range as zeros, as for any write not yet fsynced;
        // never bytes from anywhere else.
        let head_end = first * bs;
        let head = self.copy_bytes(src, src_off, dst, dst_off, head_end - dst_off)?;
        if head < head_end - dst_off {
            return Ok(head);
        }
        // Source bytes still in memory go to the store, so whole slots are blocks
        // that can be shared.
        self.flush_file(src)?;
        let mut slot = first;
        while slot < end {
            let shares: Vec<Share> = (slot..end)
                .map(|d| Share {
                    dst_slot: d,
                    src_slot: to_src(d * bs) / bs,
                    keep: (dst_end - d * bs).min(bs),
                })
                .collect();
            let Some(s) = self.share_slots(src, dst, &shares, dst_end)? else {
                break;
            };
            let at = s.dst_slot * bs;
            let n = self.copy_bytes(src, to_src(at), dst, at, s.keep)?;
            if n < s.keep {
                return Ok(at + n - dst_off);
            }
            slot = s.dst_slot + 1;
        }
        let tail_start = (end * bs).min(dst_end);
        let tail = self.copy_bytes(
            src,
            to_src(tail_start),
            dst,
            tail_start,
            dst_end - tail_start,
        )?;
        Ok(tail_start + tail - dst_off)
    }

    /// Points destination slots, in order, at the source slots' blocks (or makes
    /// them holes where the source has holes), dropping whatever the destination
    /// held there, and grows the destination to the end of what it shared. Stops at
    /// the first slot that must be copied as bytes, and returns it: inline data, a
    /// block a writer dirtied again since the flush, bytes the source no longer has,
    /// or the destination's last slot when something now follows the copy in it.
    fn share_slots(
        &self,
        src: Ino,
        dst: Ino,
        shares: &[Share],
        dst_end: u64,
    ) -> FsResult<Option<Share>> {
        let dst_data = self.file_data_or_new(dst);
        let src_data = (src != dst).then(|| self.file_data_of(src)).flatten();
        let (mut dst_file, src_file) = lock_both(&dst_data, src_data.as_ref(), dst < src);
        let mut state = self.state();
        let bs = self.block_size;
        let mut stopped = None;
        let mut shared_end = None;
        let mut removed = 0u64;
        for s in shares {
            // A slot the copy ends inside is shared only while nothing follows the
            // copy in the destination (checked again under the locks: a write past the
            // copy's end since would be cut off).
            let dst_size = Self::inode(&state, dst)?.size;
            let ends_inside = s.keep < bs && dst_size > dst_end;
            // The source may have shrunk since its size was read: what it no longer
            // has is not shared as a hole (or a clipped block) but left to the byte
            // copy, which stops at the source's end.
            let src_inode = Self::inode(&state, src)?;
            let gone = s.src_slot * bs + s.keep > src_inode.size;
            let src_dirty = match &src_file {
                Some(f) => f.dirty.contains_key(&s.src_slot),
                None => src == dst && dst_file.dirty.contains_key(&s.src_slot),
            };
            let extent = match src_inode.extents.get(&s.src_slot) {
                _ if ends_inside || gone || src_dirty => None,
                Some(Extent::Inline(_)) => None,
                Some(e) => {
                    let mut e = e.clone();
                    e.clip(s.keep);
                    Some(Some(e))
                }
                None => Some(None),
            };
            let Some(extent) = extent else {
                stopped = Some(*s);
                break;
            };
            if let Some(b) = dst_file.dirty.remove(&s.dst_slot) {
                removed += b.data.len() as u64;
            }
            let patched = extent.as_ref().map_or(0, Extent::patch_bytes);
            if patched > 0 {
                self.patched.lock().unwrap().note(dst, 0, patched);
            }
            match extent {
                Some(e) => state.index.set_extent(dst, s.dst_slot, e),
                None => state.index.remove_extent(dst, s.dst_slot),
            }
            shared_end = Some(s.dst_slot * bs + s.keep);
        }
        self.account_dirty(-(removed as i64));
        if let Some(end) = shared_end {
            let now = Timestamp::now();
            let inode = Self::inode_mut(&mut state, dst)?;
            inode.size = inode.size.max(end);
            inode.mtime = now;
            inode.ctime = now;
        }
        Ok(stopped)
    }

    /// Copies bytes through the read and write paths, a block at a time; returns how
    /// many. Stops early if the source shrank meanwhile.
    fn copy_bytes(
        &self,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    ) -> FsResult<u64> {
        let step = self.block_size.max(1 << 20);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step) as u32;
            let data = self.read_shared(src, src_off + done, n)?;
            if data.as_slice().is_empty() {
                break;
            }
            self.write(dst, dst_off + done, data.as_slice())?;
            done += data.as_slice().len() as u64;
        }
        Ok(done)
    }

    /// lseek's SEEK_DATA and SEEK_HOLE, at block granularity: a slot with stored or
    /// unflushed bytes is data, a missing one a hole, and the end of the file is a
    /// hole. Past the end: ENXIO.
    pub fn seek(&self, ino: Ino, offset: u64, what: Seek) -> FsResult<u64> {
        let fd = self.file_data_of(ino);
        let file = fd.as_ref().map(|f| f.lock().unwrap());
        let state = self.state();
        let inode = Self::regular_file(&state, ino)?;
        if offset >= inode.size {
            return Err(FsError::NoSuchOffset);
        }
        if state.writers.contains_key(&ino) {
            // Open for writing: dirty shared-mapping pages may hold data we have not
            // seen (the kernel does not write them back before asking), so all of
            // it is data.
            return Ok(match what {
                Seek::Data => offset,
                Seek::Hole => inode.size,
            });
        }
        let bs = self.block_size;
        let last = inode.size.div_ceil(bs);
        let mut slot = offset / bs;
        match what {
            Seek::Data => {
                let next_extent = inode
                    .extents
                    .range(slot..)
                    .find(|(_, e)| !e.is_empty())
                    .map(|(&s, _)| s);
                let next_dirty = file
                    .as_ref()
                    .and_then(|f| f.dirty.range(slot..).next().map(|(&s, _)| s));
                slot = match (next_extent, next_dirty) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(last),
                };
                if slot >= last {
                    return Err(FsError::NoSuchOffset);
                }
            }
            Seek::Hole => {
                // The first slot from here in neither the map nor the dirty buffers:
                // both walked in order, not looked up slot by slot.
                let mut stored = inode
                    .extents
                    .range(slot..)
                    .filter(|(_, e)| !e.is_empty())
                    .map(|(&s, _)| s)
                    .peekable();
                let from = slot;
                let mut dirty = file
                    .as_ref()
                    .map(|f| f.dirty.range(from..).map(|(&s, _)| s).peekable());
                while slot < last {
                    while stored.next_if(|&s| s < slot).is_some() {}
                    let in_dirty = dirty.as_mut().is_some_and(|d| {
                        while d.next_if(|&s| s < slot).is_some() {}
                        d.peek() == Some(&slot)
                    });
                    if stored.peek() != Some(&slot) && !in_dirty {
                        break;
                    }
                    slot += 1;
                }
            }
        }
        Ok((slot * bs).max(offset).min(inode.size))
    }

    fn regular_file(state: &State, ino: Ino) -> FsResult<&crate::index::Inode> {
        let inode = Self::inode(state, ino)?;
        match inode.kind {
            Kind::File => Ok(inode),
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }
}

/// Locks the destination's and the source's file data in inode order (copies the
/// other way round must not deadlock).
fn lock_both<'a>(
    dst: &'a Arc<Mutex<FileData>>,
    src: Option<&'a Arc<Mutex<FileData>>>,
    dst_first: bool,
) -> (MutexGuard<'a, FileData>, Option<MutexGuard<'a, FileData>>) {
    match src {
        None => (dst.lock().unwrap(), None),
        Some(s) if dst_first => {
            let d = dst.lock().unwrap();
            (d, Some(s.lock().unwrap()))
        }
        Some(s) => {
            let s = s.lock().unwrap();
            (dst.lock().unwrap(), Some(s))
        }
    }
}
