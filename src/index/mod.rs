//! The index: every inode, directory entry, block list and xattr, in memory, with the
//! set of changes not yet committed to the journal. It knows nothing of POSIX rules
//! (that is the fs core) and does no I/O (that is `journal`).

pub mod codec;
pub mod journal;
pub mod superblock;

use crate::block::BlockId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let (sec, nsec) = crate::util::unix_now();
        Timestamp { sec, nsec }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// What holds the bytes of one block-sized slot of a file. `len` bytes are valid;
/// anything after them up to the file size reads as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    Block {
        id: BlockId,
        len: u32,
    },
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A stored block (or zeros: `base` None) with small byte ranges written over
    /// it, kept in the index: an fsync of a small change to a big file journals the
    /// changed bytes instead of uploading a whole new block. The slot holds `len`
    /// bytes: the first `base_len` bytes of `base`, zeros after them, then
    /// `patches` (sorted by offset, disjoint) laid over that. The
    /// volume folds it into a plain block later (`Volume::fold_patches`).
    Patched {
        base: Option<BlockId>,
        base_len: u32,
        len: u32,
        patches: Vec<Patch>,
    },
}

/// Bytes laid over a patched slot at `at`. (Bytes as one run, not a sequence of
/// numbers: bincode then copies them instead of encoding each byte on its own. The
/// encoding is the same.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub at: u32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Block { len, .. } | Extent::Patched { len, .. } => u64::from(*len),
            Extent::Inline(d) => d.len() as u64,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stored block this extent reads from, if any.
    pub fn block_id(&self) -> Option<BlockId> {
        match self {
            Extent::Block { id, .. } => Some(*id),
            Extent::Patched { base, .. } => *base,
            Extent::Inline(_) => None,
        }
    }
    /// Bytes of patches a `Patched` extent keeps in the index.
    pub fn patch_bytes(&self) -> u64 {
        match self {
            Extent::Patched { patches, .. } => patches.iter().map(|p| p.bytes.len() as u64).sum(),
            _ => 0,
        }
    }
    /// Keeps only the first `keep` bytes.
    pub fn clip(&mut self, keep: u64) {
        let keep32 = keep.min(u64::from(u32::MAX)) as u32;
        match self {
            Extent::Block { len, .. } => *len = (*len).min(keep32),
            Extent::Inline(d) => d.truncate(keep as usize),
            Extent::Patched {
                base,
                base_len,
                len,
                patches,
            } => {
                *len = (*len).min(keep32);
                *base_len = (*base_len).min(keep32);
                patches.retain(|p| p.at < keep32);
                for p in patches.iter_mut() {
                    p.bytes.truncate((keep32 - p.at) as usize);
                }
                // Cut down to its base: a plain block (zeros past `len` read the
                // same as zeros past `base_len` up to the file's size).
                if patches.is_empty()
                    && let Some(id) = *base
                {
                    *self = Extent::Block { id, len: *base_len };
                }
            }
        }
    }

    /// Bytes `lo..hi` of the slot (`hi` at most `len()`) into `out`, which must be
    /// zeroed and `hi - lo` long; `block` is the plain base block, when there is one.
    /// For `Block` and `Inline` extents too.
    pub fn read_into(&self, block: Option<&[u8]>, lo: usize, hi: usize, out: &mut [u8]) {
        let copy = |src: &[u8], at: usize, out: &mut [u8]| {
            let (from, to) = (lo.max(at), hi.min(at + src.len()));
            if from < to {
                out[from - lo..to - lo].copy_from_slice(&src[from - at..to - at]);
            }
        };
        let valid = |b: &'_ [u8], n: u32| -> usize { (n as usize).min(b.len()) };
        match self {
            Extent::Inline(d) => copy(d, 0, out),
            Extent::Block { len, .. } => {
                if let Some(b) = block {
                    copy(&b[..valid(b, *len)], 0, out);
                }
            }
            Extent::Patched {
                base_len, patches, ..
            } => {
                if let Some(b) = block {
                    copy(&b[..valid(b, *base_len)], 0, out);
                }
                for p in patches {
                    copy(&p.bytes, p.at as usize, out);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
    /// Directories: the parent, for "..".
    pub parent: Ino,
    /// Files: block slot number -> extent; a missing slot is a hole.
    pub extents: BTreeMap<u64, Extent>,
    /// Symlinks: the target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    pub fn new(ino: Ino, kind: Kind, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = Timestamp::now();
        Inode {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            parent: 0,
            extents: BTreeMap::new(),
            target: Vec::new(),
            xattrs: BTreeMap::new(),
        }
    }

    /// Drops extents past `size` and clips the one it ends in, so nothing stale
    /// reappears if the file grows again. Returns whether anything changed, and the
    /// blocks dropped.
    fn clip_extents(&mut self, block_size: u64) -> (bool, Vec<BlockId>) {
        let gone = self.extents.split_off(&self.size.div_ceil(block_size));
        let mut changed = !gone.is_empty();
        let dropped = gone.into_values().filter_map(|e| e.block_id()).collect();
        let tail = self.size % block_size;
        if tail != 0
            && let Some(e) = self.extents.get_mut(&(self.size / block_size))
            && e.len() > tail
        {
            e.clip(tail);
            changed = true;
        }
        (changed, dropped)
    }

    /// Everything but the extent map.
    fn without_extents(&self) -> Inode {
        Inode {
            ino: self.ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            rdev: self.rdev,
            parent: self.parent,
            extents: BTreeMap::new(),
            target: self.target.clone(),
            xattrs: self.xattrs.clone(),
        }
    }
}

/// One index change, as journaled. Replaying records is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    PutInode(Inode),
    DelInode(Ino),
    PutEntry {
        dir: Ino,
        name: Vec<u8>,
        ino: Ino,
    },
    DelEntry {
        dir: Ino,
        name: Vec<u8>,
    },
    /// An inode already in the store whose attributes and some slots changed:
    /// `inode.extents` holds just the changed slots that have content, `holes` the
    /// ones that became holes. A commit of a small change to a big file stays small
    /// (a whole extent map is ~48 bytes per block: 5 MB for a 100 GiB file).
    PatchInode {
        inode: Inode,
        holes: Vec<u64>,
    },
}

/// The full index as stored in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub generation: u64,
    pub next_ino: u64,
    pub inodes: Vec<Inode>,
    pub dirs: Vec<(Ino, DirTable)>,
}

/// One directory's entries as stored: (name, inode), sorted by name.
pub type DirTable = Vec<(Vec<u8>, Ino)>;

/// The index at one moment, sharing its inodes and directories with it.
pub struct SnapshotView {
    generation: u64,
    next_ino: u64,
    inodes: Vec<Arc<Inode>>,
    dirs: Vec<(Ino, Arc<Entries>)>,
    durable_size: HashMap<Ino, u64>,
}

impl SnapshotView {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The snapshot as a plain `SnapshotBody`: what the view's `Serialize` must
    /// encode exactly (tests hold it to that).
    #[cfg(test)]
    pub fn body(self) -> SnapshotBody {
        let mut inodes: Vec<Inode> = self
            .inodes
            .iter()
            .map(|i| persistable(i, &self.durable_size))
            .collect();
        inodes.sort_by_key(|i| i.ino);
        let mut dirs: Vec<(Ino, DirTable)> = self
            .dirs
            .iter()
            .map(|(d, e)| (*d, e.iter().map(|(n, i)| (n.clone(), *i)).collect()))
            .collect();
        dirs.sort_by_key(|(d, _)| *d);
        SnapshotBody {
            generation: self.generation,
            next_ino: self.next_ino,
            inodes,
            dirs,
        }
    }
}

/// Encodes exactly as the `SnapshotBody` it stands for, without cloning the index:
/// only inodes whose size must be clamped are copied.
impl Serialize for SnapshotView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut inodes: Vec<&Inode> = self.inodes.iter().map(|i| &**i).collect();
        inodes.sort_unstable_by_key(|i| i.ino);
        let inodes = Clamped {
            inodes: &inodes,
            durable_size: &self.durable_size,
        };
        let mut dirs: Vec<(Ino, EntriesAsTable<'_>)> = self
            .dirs
            .iter()
            .map(|(d, e)| (*d, EntriesAsTable(e)))
            .collect();
        dirs.sort_by_key(|(d, _)| *d);
        let mut body = s.serialize_struct("SnapshotBody", 4)?;
        body.serialize_field("generation", &self.generation)?;
        body.serialize_field("next_ino", &self.next_ino)?;
        body.serialize_field("inodes", &inodes)?;
        body.serialize_field("dirs", &dirs)?;
        body.end()
    }
}

/// Inodes encoded as `persistable` would make them, copying only those it changes.
struct Clamped<'a> {
    inodes: &'a [&'a Inode],
    durable_size: &'a HashMap<Ino, u64>,
}

impl Serialize for Clamped<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use std::borrow::Cow;
        s.collect_seq(
            self.inodes
                .iter()
                .map(|&i| match self.durable_size.get(&i.ino) {
                    Some(&durable) if durable < i.size => {
                        Cow::Owned(persistable(i, self.durable_size))
                    }
                    _ => Cow::Borrowed(i),
                }),
        )
    }
}

/// A directory's entries encoded as a `DirTable`.
struct EntriesAsTable<'a>(&'a Entries);

impl Serialize for EntriesAsTable<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

/// The inode as it may be persisted now: a file with unflushed data is journaled
/// with its last durable size, so a crash never exposes a tail of zeros.
fn persistable(inode: &Inode, durable_size: &HashMap<Ino, u64>) -> Inode {
    clamp_size(inode.clone(), durable_size)
}

fn clamp_size(mut inode: Inode, durable_size: &HashMap<Ino, u64>) -> Inode {
    if let Some(&durable) = durable_size.get(&inode.ino) {
        inode.size = inode.size.min(durable);
    }
    inode
}

/// The record of an inode already in the store: its attributes as `persistable`
/// gives them, and of its extent map only `slots`.
fn patch(inode: &Inode, slots: &BTreeSet<u64>, durable_size: &HashMap<Ino, u64>) -> Record {
    let mut extents = BTreeMap::new();
    let mut holes = Vec::new();
    for &slot in slots {
        match inode.extents.get(&slot) {
            Some(e) => {
                extents.insert(slot, e.clone());
            }
            None => holes.push(slot),
        }
    }
    let mut attrs = clamp_size(inode.without_extents(), durable_size);
    attrs.extents = extents;
    Record::PatchInode {
        inode: attrs,
        holes,
    }
}

/// Per-block bookkeeping that decides when a block may be deleted from the store.
#[derive(Default)]
pub struct Ledger {
    refs: HashMap<BlockId, u32>,
    uploading: HashMap<BlockId, u32>,
    deleting: HashSet<BlockId>,
}

impl Ledger {
    pub fn refs(&self, id: &BlockId) -> u32 {
        self.refs.get(id).copied().unwrap_or(0)
    }
    fn add(&mut self, id: BlockId) {
        *self.refs.entry(id).or_default() += 1;
    }
    /// True when the last reference went away.
    fn remove(&mut self, id: BlockId) -> bool {
        crate::util::release_count(&mut self.refs, &id)
    }
    pub fn block_count(&self) -> usize {
        self.refs.len()
    }
    pub fn referenced(&self) -> impl Iterator<Item = (&BlockId, &u32)> {
        self.refs.iter()
    }
}

pub enum UploadStart {
    /// Already referenced, hence already in the store: no upload needed.
    Present,
    Needed,
    /// A delete of this block is in progress; try again shortly.
    Busy,
}

/// One directory's entries, by name.
pub type Entries = BTreeMap<Vec<u8>, Ino>;

/// Inodes and directories are shared copy-on-write (`Arc::make_mut`), so a snapshot
/// can take the whole index under the state lock in the time of a pointer copy each,
/// and encode it after the lock is gone (cloning 100k inodes under the lock held every
/// operation up for ~60 ms).
#[derive(Default)]
pub struct Index {
    inodes: HashMap<Ino, Arc<Inode>>,
    dirs: HashMap<Ino, Arc<Entries>>,
    next_ino: u64,
    block_size: u64,
    dirty_inodes: HashSet<Ino>,
    dirty_entries: HashSet<(Ino, Vec<u8>)>,
    /// Files with unflushed data -> the size that is safe to journal for them.
    durable_size: HashMap<Ino, u64>,
    /// Inodes whose next record must carry the whole extent map: new ones and
    /// resized ones. Every other dirty inode is journaled as a patch of the slots in
    /// `changed_slots`.
    whole_inodes: HashSet<Ino>,
    changed_slots: HashMap<Ino, BTreeSet<u64>>,
    ledger: Ledger,
    /// Blocks whose last reference went away since the last commit.
    unreferenced: Vec<BlockId>,
}

/// Changes taken for one commit; handed back with `restore` if the commit fails.
#[derive(Debug, Default)]
pub struct Changes {
    pub records: Vec<Record>,
    pub next_ino: u64,
    inodes: HashSet<Ino>,
    entries: HashSet<(Ino, Vec<u8>)>,
    whole_inodes: HashSet<Ino>,
    changed_slots: HashMap<Ino, BTreeSet<u64>>,
    pub unreferenced: Vec<BlockId>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Index {
    /// A fresh filesystem: just the root directory.
    pub fn new_filesystem(block_size: u32, uid: u32, gid: u32) -> Index {
        let mut index = Index {
            next_ino: ROOT_INO + 1,
            block_size: u64::from(block_size),
            ..Default::default()
        };
        let mut root = Inode::new(ROOT_INO, Kind::Dir, 0o755, uid, gid);
        root.nlink = 2;
        root.parent = ROOT_INO;
        index.inodes.insert(ROOT_INO, Arc::new(root));
        index.dirs.insert(ROOT_INO, Arc::default());
        index
    }

    pub fn from_snapshot(body: SnapshotBody, block_size: u32) -> Index {
        let mut index = Index {
            next_ino: body.next_ino,
            block_size: u64::from(block_size),
            ..Default::default()
        };
        for inode in body.inodes {
            index.inodes.insert(inode.ino, Arc::new(inode));
        }
        for (dir, entries) in body.dirs {
            index
                .dirs
                .insert(dir, Arc::new(entries.into_iter().collect()));
        }
        index
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Applies a journaled record during recovery (no change tracking).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::PutInode(inode) => {
                if inode.kind == Kind::Dir {
                    self.dirs.entry(inode.ino).or_default();
                }
                self.next_ino = self.next_ino.max(inode.ino + 1);
                self.inodes.insert(inode.ino, Arc::new(inode));
            }
            Record::DelInode(ino) => {
                self.inodes.remove(&ino);
                self.dirs.remove(&ino);
            }
            Record::PutEntry { dir, name, ino } => {
                Arc::make_mut(self.dirs.entry(dir).or_default()).insert(name, ino);
            }
            Record::DelEntry { dir, name } => {
                if let Some(d) = self.dirs.get_mut(&dir) {
                    Arc::make_mut(d).remove(&name);
                }
            }
            Record::PatchInode { mut inode, holes } => {
                match self.inodes.remove(&inode.ino) {
                    Some(old) => {
                        let mut extents = Arc::unwrap_or_clone(old).extents;
                        for slot in holes {
                            extents.remove(&slot);
                        }
                        extents.append(&mut inode.extents);
                        inode.extents = extents;
                    }
                    None => log::warn!(
                        "journal patches inode {} that it never wrote whole",
                        inode.ino
                    ),
                }
                self.apply(Record::PutInode(inode));
            }
        }
    }

    pub fn set_next_ino(&mut self, next: u64) {
        self.next_ino = self.next_ino.max(next);
    }

    /// After loading: normalize files, reclaim inodes no directory links to (files
    /// unlinked while open when the last writer died), and count block references.
    /// Returns the reclaimed inode numbers.
    pub fn finish_load(&mut self) -> Vec<Ino> {
        let bs = self.block_size;
        let mut clipped = Vec::new();
        // Freshly loaded inodes are shared with nothing: make_mut copies none.
        for inode in self.inodes.values_mut() {
            let (changed, _) = Arc::make_mut(inode).clip_extents(bs);
            if changed {
                clipped.push(inode.ino);
            }
        }
        // Cut here, not in the journal: a writer's first record of each must carry
        // the whole map, or its later patches would sit on the uncut map at the next
        // load (and bring back what was cut).
        self.dirty_inodes.extend(clipped.iter().copied());
        self.whole_inodes.extend(clipped);
        let mut linked: HashSet<Ino> = HashSet::from([ROOT_INO]);
        for entries in self.dirs.values() {
            linked.extend(entries.values().copied());
        }
        let orphans: Vec<Ino> = self
            .inodes
            .keys()
            .copied()
            .filter(|i| !linked.contains(i))
            .collect();
        let mut orphan_blocks = Vec::new();
        for ino in &orphans {
            if let Some(inode) = self.inodes.remove(ino) {
                orphan_blocks.extend(inode.extents.values().filter_map(Extent::block_id));
            }
            self.dirs.remove(ino);
            self.dirty_inodes.insert(*ino);
        }
        self.ledger.refs.clear();
        for inode in self.inodes.values() {
            for e in inode.extents.values() {
                if let Some(id) = e.block_id() {
                    self.ledger.add(id);
                }
            }
        }
        // The reclaimed files' blocks are freed like any others after the next commit.
        orphan_blocks.sort_unstable();
        orphan_blocks.dedup();
        let freed = orphan_blocks
            .into_iter()
            .filter(|id| self.ledger.refs(id) == 0);
        self.unreferenced.extend(freed);
        orphans
    }

    pub fn get(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(&ino).map(|i| &**i)
    }

    /// Mutable access; the inode is journaled at the next commit.
    pub fn get_mut(&mut self, ino: Ino) -> Option<&mut Inode> {
        let inode = Arc::make_mut(self.inodes.get_mut(&ino)?);
        self.dirty_inodes.insert(ino);
        Some(inode)
    }

    pub fn alloc_ino(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub fn insert_inode(&mut self, inode: Inode) {
        let ino = inode.ino;
        if inode.kind == Kind::Dir {
            self.dirs.entry(ino).or_default();
        }
        for e in inode.extents.values() {
            if let Some(id) = e.block_id() {
                self.ledger.add(id);
            }
        }
        self.inodes.insert(ino, Arc::new(inode));
        self.dirty_inodes.insert(ino);
        self.whole_inodes.insert(ino);
    }

    pub fn remove_inode(&mut self, ino: Ino) -> Option<Inode> {
        let inode = Arc::unwrap_or_clone(self.inodes.remove(&ino)?);
        self.dirs.remove(&ino);
        self.durable_size.remove(&ino);
        for e in inode.extents.values() {
            self.release_extent(e);
        }
        self.dirty_inodes.insert(ino);
        Some(inode)
    }

    fn release_extent(&mut self, e: &Extent) {
        if let Some(id) = e.block_id()
            && self.ledger.remove(id)
        {
            self.unreferenced.push(id);
        }
    }

    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        self.dirs.get(&dir)?.get(name).copied()
    }

    pub fn entries(&self, dir: Ino) -> Option<&Entries> {
        self.dirs.get(&dir).map(|d| &**d)
    }

    pub fn insert_entry(&mut self, dir: Ino, name: &[u8], ino: Ino) {
        Arc::make_mut(self.dirs.entry(dir).or_default()).insert(name.to_vec(), ino);
        self.dirty_entries.insert((dir, name.to_vec()));
    }

    pub fn remove_entry(&mut self, dir: Ino, name: &[u8]) -> Option<Ino> {
        let ino = Arc::make_mut(self.dirs.get_mut(&dir)?).remove(name)?;
        self.dirty_entries.insert((dir, name.to_vec()));
        Some(ino)
    }

    /// Points a file's block slot at new content.
    pub fn set_extent(&mut self, ino: Ino, slot: u64, extent: Extent) {
        if let Some(id) = extent.block_id() {
            self.ledger.add(id);
        }
        let Some(inode) = self.inodes.get_mut(&ino).map(Arc::make_mut) else {
            // The file is gone; the new reference is dropped at once.
            self.release_extent(&extent);
            return;
        };
        self.dirty_inodes.insert(ino);
        if let Some(old) = inode.extents.insert(slot, extent) {
            self.release_extent(&old);
        }
        self.note_slot(ino, slot);
    }

    fn note_slot(&mut self, ino: Ino, slot: u64) {
        if !self.whole_inodes.contains(&ino) {
            self.changed_slots.entry(ino).or_default().insert(slot);
        }
    }

    /// Makes a block slot a hole.
    pub fn remove_extent(&mut self, ino: Ino, slot: u64) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        // Only an inode that changes is copied away from a snapshot view.
        if !inode.extents.contains_key(&slot) {
            return;
        }
        if let Some(old) = Arc::make_mut(inode).extents.remove(&slot) {
            self.dirty_inodes.insert(ino);
            self.release_extent(&old);
            self.note_slot(ino, slot);
        }
    }

    /// Sets a file's size, dropping content past it.
    pub fn set_size(&mut self, ino: Ino, size: u64) {
        let bs = self.block_size;
        let Some(inode) = self.inodes.get_mut(&ino).map(Arc::make_mut) else {
            return;
        };
        let old = inode.size;
        // Clip at the smaller of the two sizes so bytes cut earlier never reappear.
        inode.size = old.min(size);
        let (_, dropped) = inode.clip_extents(bs);
        inode.size = size;
        self.dirty_inodes.insert(ino);
        // Clipping may drop or shorten many slots: journal the whole map once.
        self.whole_inodes.insert(ino);
        self.changed_slots.remove(&ino);
        if let Some(d) = self.durable_size.get_mut(&ino) {
            *d = (*d).min(size);
        }
        for id in dropped {
            if self.ledger.remove(id) {
                self.unreferenced.push(id);
            }
        }
    }

    /// The file has data not yet in the store: until `mark_data_flushed`, commits
    /// journal it with its size from before the unflushed writes.
    pub fn mark_data_pending(&mut self, ino: Ino) {
        if let Some(inode) = self.inodes.get(&ino) {
            self.durable_size.entry(ino).or_insert(inode.size);
        }
    }

    /// The bytes st_blocks counts for a file: its slots with content (a hole takes
    /// none; the last slot only up to the size), or its whole size while it has data
    /// not yet in any slot, so a file being written never looks sparser than it is.
    pub fn allocated(&self, inode: &Inode) -> u64 {
        if inode.kind != Kind::File || self.durable_size.contains_key(&inode.ino) {
            return inode.size;
        }
        (inode.extents.len() as u64 * self.block_size).min(inode.size)
    }

    pub fn mark_data_flushed(&mut self, ino: Ino) {
        if self.durable_size.remove(&ino).is_some() {
            self.dirty_inodes.insert(ino);
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Registers an upload about to happen, so no concurrent delete removes the block.
    pub fn begin_upload(&mut self, id: BlockId) -> UploadStart {
        if self.ledger.deleting.contains(&id) {
            return UploadStart::Busy;
        }
        *self.ledger.uploading.entry(id).or_default() += 1;
        if self.ledger.refs(&id) > 0 {
            UploadStart::Present
        } else {
            UploadStart::Needed
        }
    }

    pub fn end_upload(&mut self, id: BlockId) {
        if let Some(n) = self.ledger.uploading.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.ledger.uploading.remove(&id);
                if self.ledger.refs(&id) == 0 {
                    // Uploaded but never referenced (the data changed meanwhile).
                    self.unreferenced.push(id);
                }
            }
        }
    }

    /// Claims a block for deletion if nothing references or is uploading it.
    pub fn begin_delete(&mut self, id: BlockId) -> bool {
        let free = self.ledger.refs(&id) == 0 && !self.ledger.uploading.contains_key(&id);
        if free {
            self.ledger.deleting.insert(id);
        }
        free
    }

    pub fn end_delete(&mut self, id: BlockId) {
        self.ledger.deleting.remove(&id);
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty_inodes.is_empty() || !self.dirty_entries.is_empty()
    }

    /// Takes every change since the last commit as journal records.
    pub fn take_changes(&mut self) -> Changes {
        let inodes = std::mem::take(&mut self.dirty_inodes);
        let entries = std::mem::take(&mut self.dirty_entries);
        let mut records = Vec::with_capacity(inodes.len() + entries.len());
        let mut ordered: Vec<Ino> = inodes.iter().copied().collect();
        ordered.sort_unstable();
        let mut whole_inodes = HashSet::new();
        let mut changed_slots = HashMap::new();
        for ino in ordered {
            let whole = self.whole_inodes.remove(&ino);
            let slots = self.changed_slots.remove(&ino).unwrap_or_default();
            let Some(inode) = self.inodes.get(&ino) else {
                records.push(Record::DelInode(ino));
                continue;
            };
            let size = inode.size;
            if whole {
                records.push(Record::PutInode(persistable(inode, &self.durable_size)));
                whole_inodes.insert(ino);
            } else {
                records.push(patch(inode, &slots, &self.durable_size));
                changed_slots.insert(ino, slots);
            }
            if let Some(&durable) = self.durable_size.get(&ino) {
                // Journal it again once its data is in the store.
                self.dirty_inodes.insert(ino);
                if durable < size {
                    // Journaled shorter than it is: whoever loads this cuts the slots
                    // past `durable`, so the next record must carry the whole map.
                    self.whole_inodes.insert(ino);
                }
            }
        }
        let mut ordered: Vec<&(Ino, Vec<u8>)> = entries.iter().collect();
        ordered.sort_unstable();
        for (dir, name) in ordered {
            match self.lookup(*dir, name) {
                Some(ino) => records.push(Record::PutEntry {
                    dir: *dir,
                    name: name.clone(),
                    ino,
                }),
                None => records.push(Record::DelEntry {
                    dir: *dir,
                    name: name.clone(),
                }),
            }
        }
        Changes {
            records,
            next_ino: self.next_ino,
            inodes,
            entries,
            whole_inodes,
            changed_slots,
            unreferenced: std::mem::take(&mut self.unreferenced),
        }
    }

    /// Puts back changes whose commit failed, so the next commit carries them.
    pub fn restore(&mut self, changes: Changes) {
        self.dirty_inodes.extend(changes.inodes);
        self.dirty_entries.extend(changes.entries);
        self.whole_inodes.extend(changes.whole_inodes);
        for (ino, slots) in changes.changed_slots {
            if !self.whole_inodes.contains(&ino) {
                self.changed_slots.entry(ino).or_default().extend(slots);
            }
        }
        self.unreferenced.extend(changes.unreferenced);
    }

    /// The whole index as it is now, cheaply (shared inodes and directories, see
    /// `Index`); it encodes as a `SnapshotBody` without the index.
    pub fn snapshot_view(&self, generation: u64) -> SnapshotView {
        SnapshotView {
            generation,
            next_ino: self.next_ino,
            inodes: self.inodes.values().cloned().collect(),
            dirs: self.dirs.iter().map(|(d, e)| (*d, e.clone())).collect(),
            durable_size: self.durable_size.clone(),
        }
    }

    #[cfg(test)]
    pub fn snapshot_body(&self, generation: u64) -> SnapshotBody {
        self.snapshot_view(generation).body()
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn inodes(&self) -> impl Iterator<Item = &Inode> {
        self.inodes.values().map(|i| &**i)
    }

    pub fn next_ino(&self) -> u64 {
        self.next_ino
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(index: &mut Index, name: &[u8]) -> Ino {
        let ino = index.alloc_ino();
        index.insert_inode(Inode::new(ino, Kind::File, 0o644, 0, 0));
        index.insert_entry(ROOT_INO, name, ino);
        ino
    }

    #[test]
    fn inline_bytes_encode_as_before_and_patches_as_number_and_bytes() {
        // Extent as stores of format 2 hold it.
        #[derive(Serialize)]
        enum Before {
            #[allow(dead_code)]
            Block {
                id: BlockId,
                len: u32,
            },
            Inline(Vec<u8>),
        }
        let data = b"inline data".to_vec();
        assert_eq!(
            bincode::serialize(&Extent::Inline(data.clone())).unwrap(),
            bincode::serialize(&Before::Inline(data.clone())).unwrap()
        );
        let back: Extent =
            bincode::deserialize(&bincode::serialize(&Before::Inline(data.clone())).unwrap())
                .unwrap();
        assert_eq!(back, Extent::Inline(data.clone()));
        let p = Patch {
            at: 7,
            bytes: data.clone(),
        };
        assert_eq!(
            bincode::serialize(&p).unwrap(),
            bincode::serialize(&(7u32, data)).unwrap()
        );
    }

    #[test]
    fn changes_replay_to_the_same_index() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let base = index.snapshot_body(0);
        let a = file(&mut index, b"a");
        let b = file(&mut index, b"b");
        index.get_mut(a).unwrap().size = 10;
        index.set_extent(a, 0, Extent::Inline(b"0123456789".to_vec()));
        index.remove_entry(ROOT_INO, b"b");
        index.remove_inode(b);
        let changes = index.take_changes();
        assert!(!index.has_changes());

        let mut replayed = Index::from_snapshot(base, 4096);
        for r in changes.records {
            replayed.apply(r);
        }
        replayed.set_next_ino(changes.next_ino);
        replayed.finish_load();
        assert_eq!(replayed.get(a), index.get(a));
        assert_eq!(replayed.get(b), None);
        assert_eq!(replayed.lookup(ROOT_INO, b"b"), None);
        assert_eq!(replayed.next_ino(), index.next_ino());
    }

    fn block(n: u64) -> Extent {
        Extent::Block {
            id: BlockId::of(&n.to_le_bytes()),
            len: 4096,
        }
    }

    #[test]
    fn a_small_change_to_a_big_file_is_journaled_as_a_small_patch() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let f = file(&mut index, b"big");
        index.get_mut(f).unwrap().size = 10_000 * 4096;
        for slot in 0..10_000 {
            index.set_extent(f, slot, block(slot));
        }
        let first = index.take_changes();
        assert!(matches!(&first.records[0], Record::PutInode(i) if i.extents.len() == 10_000));
        let base = index.snapshot_body(0);
        index.set_extent(f, 17, block(1_000_017));
        index.remove_extent(f, 18);
        index.get_mut(f).unwrap().mtime.sec += 1;
        let changes = index.take_changes();
        let bytes = bincode::serialize(&changes.records).unwrap();
        assert!(bytes.len() < 300, "{} bytes", bytes.len());
        let mut replayed = Index::from_snapshot(base, 4096);
        for r in changes.records {
            replayed.apply(r);
        }
        assert_eq!(replayed.get(f), index.get(f));
    }

    /// A writer streaming file `f`: two blocks installed, the third still in memory,
    /// so the journal (after the `base` snapshot) has `f` at its clamped size 0.
    fn stream_with_its_last_block_unflushed() -> (Index, SnapshotBody, Ino, Vec<Record>) {
        let mut w = Index::new_filesystem(4096, 0, 0);
        let base = w.snapshot_body(0);
        let f = file(&mut w, b"f");
        let mut journal = w.take_changes().records;
        w.mark_data_pending(f);
        w.get_mut(f).unwrap().size = 3 * 4096;
        w.set_extent(f, 0, block(0));
        w.set_extent(f, 1, block(1));
        journal.extend(w.take_changes().records);
        (w, base, f, journal)
    }

    /// Loads `base` and `journal` as a mount (or a follower) would.
    fn load(base: &SnapshotBody, journal: &[Record]) -> Index {
        let mut ix = Index::from_snapshot(clone_body(base), 4096);
        for r in journal {
            ix.apply(r.clone());
        }
        ix.finish_load();
        ix
    }

    /// A follower that loaded while a file's journaled size was clamped (a stream's
    /// last block still in memory) gets every slot once the writer catches up.
    #[test]
    fn a_follower_loaded_at_a_clamped_size_gets_every_slot_later() {
        let (mut w, base, f, journal) = stream_with_its_last_block_unflushed();
        let mut ro = load(&base, &journal);
        assert!(
            ro.get(f).unwrap().extents.is_empty(),
            "cut at the clamped size"
        );
        w.set_extent(f, 2, block(2));
        w.mark_data_flushed(f);
        for r in w.take_changes().records {
            ro.apply(r);
        }
        assert_eq!(ro.get(f), w.get(f));
    }

    /// Crash, load (which cuts at the journaled size), a sparse write, crash again:
    /// what the first load cut stays cut.
    #[test]
    fn what_a_load_cut_stays_cut_after_the_next_crash() {
        let (_, base, f, mut journal) = stream_with_its_last_block_unflushed();
        let mut w2 = load(&base, &journal);
        assert!(w2.get(f).unwrap().extents.is_empty());
        w2.mark_data_pending(f);
        w2.get_mut(f).unwrap().size = 6 * 4096;
        w2.set_extent(f, 5, block(5));
        w2.mark_data_flushed(f);
        journal.extend(w2.take_changes().records);
        assert_eq!(load(&base, &journal).get(f), w2.get(f));
    }

    fn clone_body(b: &SnapshotBody) -> SnapshotBody {
        SnapshotBody {
            generation: b.generation,
            next_ino: b.next_ino,
            inodes: b.inodes.clone(),
            dirs: b.dirs.clone(),
        }
    }

    /// Random changes (unflushed data among them), committed at random points (some
    /// commits fail and are restored), replay from the first snapshot to exactly the
    /// live index; so do followers that loaded part way (cutting at clamped sizes)
    /// and went on applying the journal.
    #[test]
    fn patches_and_whole_records_replay_to_the_same_index() {
        use rand::{Rng, SeedableRng};
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut index = Index::new_filesystem(4096, 0, 0);
            let base = index.snapshot_body(0);
            let mut journal: Vec<Record> = Vec::new();
            let mut files: Vec<Ino> = Vec::new();
            let mut failed: Option<Changes> = None;
            let mut followers: Vec<(Index, usize)> = Vec::new();
            for step in 0..300 {
                let pick = files.get(rng.gen_range(0..files.len().max(1))).copied();
                match (rng.gen_range(0..10), pick) {
                    (0, _) | (_, None) => {
                        files.push(file(&mut index, format!("f{step}").as_bytes()))
                    }
                    (1..=3, Some(f)) => {
                        let slot = rng.gen_range(0..40);
                        let inode = index.get_mut(f).unwrap();
                        inode.size = inode.size.max((slot + 1) * 4096);
                        index.set_extent(f, slot, block(rng.gen_range(0..1000)));
                    }
                    (4, Some(f)) => index.remove_extent(f, rng.gen_range(0..40)),
                    (5, Some(f)) => index.set_size(f, rng.gen_range(0..40 * 4096)),
                    (6, Some(f)) => index.get_mut(f).unwrap().perm = rng.gen_range(0..0o777),
                    (8, Some(f)) if rng.gen_bool(0.5) => index.mark_data_pending(f),
                    (8, Some(f)) => index.mark_data_flushed(f),
                    (7, Some(f)) if rng.gen_bool(0.3) => {
                        let name = index
                            .entries(ROOT_INO)
                            .unwrap()
                            .iter()
                            .find(|&(_, &i)| i == f)
                            .map(|(n, _)| n.clone())
                            .unwrap();
                        index.remove_entry(ROOT_INO, &name);
                        index.remove_inode(f);
                        files.retain(|&x| x != f);
                    }
                    _ => {
                        // A commit that failed comes back while later changes have
                        // been made, as when the store was down for a while.
                        if let Some(failed) = failed.take() {
                            index.restore(failed);
                        }
                        let changes = index.take_changes();
                        if rng.gen_bool(0.2) {
                            failed = Some(changes);
                        } else {
                            journal.extend(changes.records);
                        }
                        if rng.gen_bool(0.2) {
                            // A follower (or a writer after a crash) loads here.
                            followers.push((load(&base, &journal), journal.len()));
                        }
                    }
                }
            }
            if let Some(failed) = failed.take() {
                index.restore(failed);
            }
            for &f in &files {
                index.mark_data_flushed(f);
            }
            journal.extend(index.take_changes().records);
            for (mut ro, seen) in followers {
                for r in &journal[seen..] {
                    ro.apply(r.clone());
                }
                for &f in &files {
                    assert_eq!(ro.get(f), index.get(f), "seed {seed}, follower, inode {f}");
                }
            }
            let mut replayed = Index::from_snapshot(base, 4096);
            for r in journal {
                replayed.apply(r);
            }
            for &f in &files {
                assert_eq!(replayed.get(f), index.get(f), "seed {seed}, inode {f}");
            }
            assert_eq!(replayed.inode_count(), index.inode_count(), "seed {seed}");
        }
    }

    /// Files a and b at the root, directory d holding b again as b2.
    fn two_files_and_a_dir() -> (Index, Ino, Ino, Ino) {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let a = file(&mut index, b"a");
        let b = file(&mut index, b"b");
        let dir = index.alloc_ino();
        index.insert_inode(Inode::new(dir, Kind::Dir, 0o755, 0, 0));
        index.insert_entry(ROOT_INO, b"d", dir);
        index.insert_entry(dir, b"b2", b);
        (index, a, b, dir)
    }

    #[test]
    fn a_snapshot_view_keeps_the_index_as_it_was_while_the_index_changes() {
        let (mut index, a, b, dir) = two_files_and_a_dir();
        index.get_mut(a).unwrap().size = 10;
        index.set_extent(a, 0, Extent::Inline(b"0123456789".to_vec()));
        let encoded = |body: &SnapshotBody| codec::encode(&codec::SNAPSHOT, body);
        let before = encoded(&index.snapshot_body(1));
        let view = index.snapshot_view(1);

        index.get_mut(a).unwrap().perm = 0o600;
        index.set_extent(a, 0, Extent::Inline(b"changed".to_vec()));
        index.set_size(a, 3);
        index.remove_extent(a, 0);
        index.insert_entry(dir, b"new", a);
        index.remove_entry(ROOT_INO, b"b");
        index.remove_entry(dir, b"b2");
        index.remove_inode(b);
        let c = file(&mut index, b"c");
        assert_ne!(encoded(&index.snapshot_body(1)), before);

        assert_eq!(encoded(&view.body()), before);
        // And the index itself has every change.
        assert_eq!(index.get(a).unwrap().perm, 0o600);
        assert!(index.get(a).unwrap().extents.is_empty());
        assert_eq!(index.lookup(dir, b"new"), Some(a));
        assert_eq!(index.get(b), None);
        assert_eq!(index.lookup(ROOT_INO, b"c"), Some(c));
    }

    #[test]
    fn a_snapshot_view_encodes_exactly_as_its_body() {
        let (mut index, a, b, _) = two_files_and_a_dir();
        index.get_mut(a).unwrap().size = 5000;
        index.set_extent(a, 0, Extent::Inline(vec![1; 4096]));
        index.set_extent(
            a,
            1,
            Extent::Block {
                id: BlockId::of(b"z"),
                len: 904,
            },
        );
        index
            .get_mut(b)
            .unwrap()
            .xattrs
            .insert(b"user.x".to_vec(), b"1".to_vec());
        // b has unflushed data: it is stored with its durable size.
        index.get_mut(b).unwrap().size = 100;
        index.mark_data_pending(b);
        index.get_mut(b).unwrap().size = 9000;
        let view = index.snapshot_view(7);
        let from_view = codec::encode(&codec::SNAPSHOT, &view);
        let body = view.body();
        assert_eq!(body.inodes.iter().find(|i| i.ino == b).unwrap().size, 100);
        assert_eq!(from_view, codec::encode(&codec::SNAPSHOT, &body));
    }

    #[test]
    fn refcounts_follow_extents() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let a = file(&mut index, b"a");
        let b = file(&mut index, b"b");
        let id = BlockId::of(b"x");
        index.get_mut(a).unwrap().size = 4096;
        index.get_mut(b).unwrap().size = 4096;
        index.set_extent(a, 0, Extent::Block { id, len: 4096 });
        index.set_extent(b, 0, Extent::Block { id, len: 4096 });
        assert_eq!(index.ledger().refs(&id), 2);
        index.set_size(a, 0);
        assert_eq!(index.ledger().refs(&id), 1);
        assert!(!index.begin_delete(id));
        index.remove_inode(b);
        assert_eq!(index.ledger().refs(&id), 0);
        assert_eq!(index.take_changes().unreferenced, vec![id]);
        assert!(index.begin_delete(id));
        assert!(matches!(index.begin_upload(id), UploadStart::Busy));
    }

    #[test]
    fn truncate_then_grow_reads_no_stale_bytes() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let a = file(&mut index, b"a");
        index.get_mut(a).unwrap().size = 8000;
        index.set_extent(a, 0, Extent::Inline(vec![7; 4096]));
        index.set_extent(a, 1, Extent::Inline(vec![7; 3904]));
        index.set_size(a, 100);
        index.set_size(a, 8000);
        let inode = index.get(a).unwrap();
        assert_eq!(inode.extents.len(), 1);
        assert_eq!(inode.extents[&0].len(), 100);
    }

    #[test]
    fn unflushed_files_journal_their_durable_size() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let a = file(&mut index, b"a");
        index.get_mut(a).unwrap().size = 5;
        index.take_changes();
        index.mark_data_pending(a);
        index.get_mut(a).unwrap().size = 500;
        let changes = index.take_changes();
        let Record::PatchInode { inode: i, .. } = &changes.records[0] else {
            panic!("{:?}", changes.records[0])
        };
        assert_eq!(i.size, 5);
        assert!(index.has_changes(), "journaled again after the flush");
        index.mark_data_flushed(a);
        // Whole: a load of the clamped record cut the slots past its size.
        let changes = index.take_changes();
        let Record::PutInode(i) = &changes.records[0] else {
            panic!("{:?}", changes.records[0])
        };
        assert_eq!(i.size, 500);
        index.get_mut(a).unwrap().mtime.sec += 1;
        let changes = index.take_changes();
        assert!(matches!(&changes.records[0], Record::PatchInode { .. }));
        // A resized file is journaled whole, clamped the same way.
        index.mark_data_pending(a);
        index.set_size(a, 9000);
        let changes = index.take_changes();
        let Record::PutInode(i) = &changes.records[0] else {
            panic!("{:?}", changes.records[0])
        };
        assert_eq!(i.size, 500);
    }

    #[test]
    fn orphans_are_reclaimed_on_load() {
        let mut index = Index::new_filesystem(4096, 0, 0);
        let a = file(&mut index, b"a");
        index.remove_entry(ROOT_INO, b"a");
        let body = index.snapshot_body(1);
        let mut loaded = Index::from_snapshot(body, 4096);
        assert_eq!(loaded.finish_load(), vec![a]);
        assert!(loaded.get(a).is_none());
    }
}
