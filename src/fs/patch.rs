//! Small changes to stored blocks, kept as byte patches in the index
//! (`Extent::Patched`). An fsync after a few KiB changed in a big file then journals
//! those bytes instead of hashing and uploading a whole new block (SQLite's WAL, a
//! log appended and synced, a database page rewritten). Patched slots are folded
//! into plain blocks in the background once the file has been left alone a while,
//! or at once when all patches together pass a budget, so the index stays small.

use super::data::DirtyBlock;
use super::{FsResult, Volume};
use crate::index::{Extent, Ino, Patch};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most patch bytes one slot keeps; past it the slot is uploaded whole.
pub(super) const SLOT_MAX: u64 = 64 << 10;
/// Most patch bytes all files keep together (as counted by `PatchedFiles`).
const BUDGET: u64 = 16 << 20;
/// Written ranges closer than this are kept as one patch.
const GAP: u32 = 256;
/// Most patches one slot keeps (each costs a few bytes of index beyond its data).
const SLOT_PATCHES: usize = 1024;
/// A file's patches are folded once it has had none added for this long.
const IDLE: Duration = Duration::from_secs(30);

/// What a dirty slot was loaded from, and the byte ranges written into it since:
/// enough to store the change as patches over that base.
#[derive(Clone)]
pub(super) struct Patchable {
    /// The slot's extent when the dirty buffer was made from it (None: a hole).
    pub(super) base: Option<Extent>,
    /// Written ranges, sorted, disjoint, `(start, end)` within the slot.
    written: Vec<(u32, u32)>,
    /// Bytes `written` covers.
    covered: u64,
}

impl Patchable {
    /// None when `base` can't carry patches (inline data is rewritten whole).
    pub(super) fn over(base: Option<Extent>) -> Option<Patchable> {
        match base {
            Some(Extent::Inline(_)) => None,
            base => Some(Patchable {
                base,
                written: Vec::new(),
                covered: 0,
            }),
        }
    }

    /// Notes a write of `lo..hi`; false once the writes are too big or too many
    /// for patches. Joins the ranges it overlaps or comes near (a sequential
    /// writer's next write joins the last one).
    pub(super) fn note(&mut self, lo: usize, hi: usize) -> bool {
        let (mut lo, mut hi) = (lo as u32, hi as u32);
        // The ranges this one joins: from the first ending at or after lo - GAP, to
        // the last starting at or before hi + GAP.
        let first = self
            .written
            .partition_point(|r| r.1.saturating_add(GAP) < lo);
        let end = self
            .written
            .partition_point(|r| r.0 <= hi.saturating_add(GAP));
        for r in &self.written[first..end.max(first)] {
            self.covered -= u64::from(r.1 - r.0);
            lo = lo.min(r.0);
            hi = hi.max(r.1);
        }
        self.written.splice(first..end.max(first), [(lo, hi)]);
        self.covered += u64::from(hi - lo);
        self.covered <= SLOT_MAX && self.written.len() <= SLOT_PATCHES
    }

    /// The base with the written bytes of `data` (the slot's whole new content)
    /// laid over it, or None when a plain block is the better choice.
    pub(super) fn patch(&self, data: &[u8]) -> Option<Extent> {
        let (base, base_len, old) = match &self.base {
            None => (None, 0, &[][..]),
            Some(Extent::Block { id, len }) => (Some(*id), *len, &[][..]),
            Some(Extent::Patched {
                base,
                base_len,
                patches,
                ..
            }) => (*base, *base_len, patches.as_slice()),
            Some(Extent::Inline(_)) => return None,
        };
        let len = u32::try_from(data.len()).ok()?;
        let ranges: Vec<(u32, u32)> = old
            .iter()
            .map(|p| (p.at, p.at + p.bytes.len() as u32))
            .chain(self.written.iter().copied())
            .map(|(lo, hi)| (lo.min(len), hi.min(len)))
            .filter(|(lo, hi)| lo < hi)
            .collect();
        let ranges = merged(ranges);
        let bytes = covered(&ranges);
        // Half the slot or more: a new block costs little more and reads faster.
        if bytes > SLOT_MAX || bytes * 2 > u64::from(len) || ranges.len() > SLOT_PATCHES {
            return None;
        }
        let patches = ranges
            .into_iter()
            .map(|(lo, hi)| Patch {
                at: lo,
                bytes: data[lo as usize..hi as usize].to_vec(),
            })
            .collect();
        Some(Extent::Patched {
            base,
            base_len: base_len.min(len),
            len,
            patches,
        })
    }
}

/// Sorted, with overlapping and nearby ranges joined.
fn merged(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(GAP) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn covered(ranges: &[(u32, u32)]) -> u64 {
    ranges.iter().map(|(lo, hi)| u64::from(hi - lo)).sum()
}

/// Files with patched slots: when each last got one, and roughly how many patch
/// bytes (an upper bound: slots that lost their patches otherwise still count
/// until the file is folded).
#[derive(Default)]
pub(super) struct PatchedFiles {
    files: HashMap<Ino, (Instant, u64)>,
    total: u64,
}

impl PatchedFiles {
    #[cfg(test)]
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// Whether `more` patch bytes still fit the budget.
    pub(super) fn room_for(&self, more: u64) -> bool {
        self.total + more <= BUDGET
    }

    /// A slot of `ino` went from `old` to `new` patch bytes.
    pub(super) fn note(&mut self, ino: Ino, old: u64, new: u64) {
        if old == 0 && new == 0 {
            return;
        }
        let entry = self.files.entry(ino).or_insert((Instant::now(), 0));
        if new > 0 {
            entry.0 = Instant::now();
        }
        let bytes = (entry.1 + new).saturating_sub(old);
        self.total = (self.total + bytes).saturating_sub(entry.1);
        entry.1 = bytes;
        if bytes == 0 {
            self.files.remove(&ino);
        }
    }

    /// Files to fold now, taken off the list: the idle ones, or all of them once
    /// the patches pass half the budget (or `everything`).
    pub(super) fn take_due(&mut self, everything: bool) -> Vec<Ino> {
        let all = everything || self.total > BUDGET / 2;
        let due: Vec<Ino> = self
            .files
            .iter()
            .filter(|(_, (at, _))| all || at.elapsed() >= IDLE)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in &due {
            if let Some((_, bytes)) = self.files.remove(ino) {
                self.total = self.total.saturating_sub(bytes);
            }
        }
        due
    }
}

impl Volume {
    /// Finds patched slots the index was loaded with (a writer's mount), so they
    /// are folded like any others.
    pub(super) fn note_loaded_patches(&self) {
        let found: Vec<(Ino, u64)> = {
            let state = self.state();
            state
                .index
                .inodes()
                .filter_map(|i| {
                    let mut patched = i
                        .extents
                        .values()
                        .filter(|e| matches!(e, Extent::Patched { .. }))
                        .peekable();
                    patched.peek()?;
                    // At least 1: a slot cut down to no patches is folded too.
                    let bytes: u64 = patched.map(Extent::patch_bytes).sum();
                    Some((i.ino, bytes.max(1)))
                })
                .collect()
        };
        let mut patched = self.patched.lock().unwrap();
        for (ino, bytes) in found {
            patched.note(ino, 0, bytes);
        }
    }

    /// Folds the patched slots of files due for it (see `PatchedFiles::take_due`)
    /// into plain blocks. A failure leaves the patches, which hold the data anyway.
    pub(super) fn fold_patches(&self, everything: bool) {
        if self.config.read_only {
            return;
        }
        let due = self.patched.lock().unwrap().take_due(everything);
        for ino in due {
            if let Err(e) = self.fold_file(ino) {
                log::warn!("folding the patches of inode {ino} into blocks: {e}");
                // Tried again later.
                let left = self.patch_bytes_of(ino);
                self.patched.lock().unwrap().note(ino, 0, left);
            }
            self.drop_clean_file_data(ino);
        }
    }

    fn patch_bytes_of(&self, ino: Ino) -> u64 {
        let state = self.state();
        state
            .index
            .get(ino)
            .map_or(0, |i| i.extents.values().map(Extent::patch_bytes).sum())
    }

    /// Each patched slot becomes a dirty slot with its whole content, written back
    /// as a plain block; a slot already dirty is just made to upload whole. Flushes
    /// even with nothing to fold: the file's data state is dropped after this, and
    /// a flush is what ends a pending size (`Index::mark_data_flushed`).
    fn fold_file(&self, ino: Ino) -> FsResult<()> {
        // The bases fetched all at once, before the file's writers are held up.
        let bases: Vec<crate::block::BlockId> = {
            let state = self.state();
            state.index.get(ino).map_or(Vec::new(), |inode| {
                inode
                    .extents
                    .values()
                    .filter(|e| matches!(e, Extent::Patched { .. }))
                    .filter_map(Extent::block_id)
                    .collect()
            })
        };
        self.fetch_all(bases.into_iter())?;
        let fd = self.file_data_or_new(ino);
        {
            let mut file = fd.lock().unwrap();
            let slots: Vec<(u64, Extent)> = {
                let state = self.state();
                match state.index.get(ino) {
                    Some(inode) => inode
                        .extents
                        .iter()
                        .filter(|(_, e)| matches!(e, Extent::Patched { .. }))
                        .map(|(s, e)| (*s, e.clone()))
                        .collect(),
                    None => Vec::new(),
                }
            };
            for (slot, extent) in slots {
                if let Some(block) = file.dirty.get_mut(&slot) {
                    block.patchable = None;
                    continue;
                }
                let data = self.slot_content(&extent, 0)?;
                self.account_dirty(data.len() as i64);
                let version = self.next_version();
                file.dirty.insert(
                    slot,
                    DirtyBlock {
                        data: Arc::new(data),
                        version,
                        patchable: None,
                    },
                );
            }
        }
        self.flush_file(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(e: &Extent, base: &[u8]) -> Vec<u8> {
        let mut out = vec![0; e.len() as usize];
        e.read_into(Some(base), 0, out.len(), &mut out);
        out
    }

    #[test]
    fn a_patch_reproduces_the_new_content() {
        let base = vec![7u8; 4096];
        let id = crate::block::BlockId::of(&base);
        let mut p = Patchable::over(Some(Extent::Block { id, len: 4000 })).unwrap();
        let mut data = base[..4000].to_vec();
        data.resize(5000, 0);
        data[100..110].fill(1);
        data[4500..4600].fill(2);
        assert!(p.note(100, 110));
        assert!(p.note(4500, 4600));
        let e = p.patch(&data[..]).unwrap();
        assert_eq!(content(&e, &base), data);
        // Cut inside the second patch, grown again: zeros, not the old bytes.
        let mut cut = e.clone();
        cut.clip(4550);
        assert_eq!(content(&cut, &base), data[..4550]);
        let mut again = Patchable::over(Some(cut.clone())).unwrap();
        let mut grown = data[..4550].to_vec();
        grown.resize(4700, 0);
        grown[4650..4700].fill(3);
        assert!(again.note(4650, 4700));
        assert_eq!(content(&again.patch(&grown).unwrap(), &base), grown);
    }

    #[test]
    fn big_changes_are_not_patches() {
        let mut p = Patchable::over(None).unwrap();
        assert!(p.note(0, 1000));
        assert!(p.patch(&vec![1; 1500]).is_none(), "more than half the slot");
        assert!(p.patch(&vec![1; 4000]).is_some());
        assert!(!p.note(0, SLOT_MAX as usize + 1));
        assert!(Patchable::over(Some(Extent::Inline(vec![1]))).is_none());
    }

    #[test]
    fn noted_writes_join_like_merged_ranges() {
        let mut p = Patchable::over(None).unwrap();
        let mut all = Vec::new();
        let mut x = 12345u32;
        for _ in 0..300 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let lo = (x >> 8) % 200_000;
            let len = (x >> 3) % 300 + 1;
            assert!(p.note(lo as usize, (lo + len) as usize));
            all.push((lo, lo + len));
            assert_eq!(p.written, merged(all.clone()));
            assert_eq!(p.covered, covered(&p.written));
        }
        let mut many = Patchable::over(None).unwrap();
        let ok: Vec<bool> = (0..SLOT_PATCHES + 1)
            .map(|i| many.note(i * 1000, i * 1000 + 1))
            .collect();
        assert!(ok[..SLOT_PATCHES].iter().all(|&b| b) && !ok[SLOT_PATCHES]);
    }

    #[test]
    fn nearby_writes_join() {
        assert_eq!(
            merged(vec![(500, 600), (0, 10), (20, 30), (5, 12)]),
            vec![(0, 30), (500, 600)]
        );
    }

    #[test]
    fn the_budget_counts_per_file() {
        let mut p = PatchedFiles::default();
        p.note(1, 0, 100);
        p.note(1, 100, 300);
        p.note(2, 0, 50);
        assert_eq!(p.total, 350);
        assert!(p.room_for(BUDGET - 350));
        assert!(!p.room_for(BUDGET - 349));
        assert!(p.take_due(false).is_empty());
        let mut all = p.take_due(true);
        all.sort_unstable();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(p.total, 0);
    }
}
