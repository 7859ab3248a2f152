//! The fs core: POSIX semantics on top of the index and the block cache, as a plain
//! Rust API (`Volume`) that tests drive without FUSE. The FUSE adapter only translates.

pub mod acl;
mod copy;
mod data;
mod error;
mod patch;
mod persist;
mod prefetch;
pub use prefetch::{LOCAL_PREFETCH_WORKERS, REMOTE_PREFETCH_WORKERS};
mod repair;
mod upload;

pub use copy::Seek;
pub use data::ReadData;
pub use error::{FsError, FsResult};
pub use persist::{Background, Changed, pending_frees};

use crate::block::BlockId;
use crate::cache::BlockCache;
use crate::index::journal::{self, Journal, LoadReport};
use crate::index::superblock::Superblock;
use crate::index::{Index, Ino, Inode, Kind, ROOT_INO, Timestamp};
use crate::lease::Lease;
use crate::store::ObjectStore;
use data::FileData;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const NAME_MAX: usize = 255;
pub const SYMLINK_MAX: usize = 4095;
/// Hard links per file, as ext4.
pub const LINK_MAX: u32 = 65000;
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_VALUE_MAX: usize = 65536;
/// What listxattr(2) can return at most (Linux XATTR_LIST_MAX).
pub const XATTR_LIST_MAX: usize = 65536;
/// The SELinux label's attribute name (see `Volume::check_xattr_name`).
const SELINUX_LABEL: &[u8] = b"security.selinux";
/// Largest file offset objfs accepts (8 EiB would overflow block arithmetic).
pub const MAX_FILE_SIZE: u64 = 1 << 60;

/// Who is asking: the caller's credentials.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    /// The calling process, for its supplementary groups; 0 when unknown.
    pub pid: u32,
    /// The caller's umask, for the mode of a node it creates.
    pub umask: u32,
}

impl Ctx {
    pub fn root() -> Ctx {
        Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
            umask: 0,
        }
    }

    /// Root stands in for CAP_FSETID and CAP_FOWNER, which a FUSE request does not carry.
    pub fn privileged(&self) -> bool {
        self.uid == 0
    }

    /// In group `gid` as primary group, or as a supplementary one (read from /proc:
    /// a FUSE request carries only the primary group).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid
            || (self.pid != 0 && crate::util::supplementary_groups(self.pid).contains(&gid))
    }
}

/// What `stat` shows of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
}

impl Attr {
    /// `allocated`: the bytes `blocks` counts (`Index::allocated`).
    fn of(inode: &Inode, allocated: u64) -> Attr {
        let size = match inode.kind {
            Kind::Symlink => inode.target.len() as u64,
            Kind::Dir => 4096,
            _ => inode.size,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            size,
            blocks: match inode.kind {
                Kind::File => allocated.div_ceil(512),
                _ => size.div_ceil(512),
            },
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.crtime,
            rdev: inode.rdev,
        }
    }
}

/// A time to set with utimensat.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Who asks; None for objfs itself (treated as privileged).
    pub caller: Option<Ctx>,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum XattrSet {
    Any,
    Create,
    Replace,
}

#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    pub block_size: u32,
}

/// Tunables of a mounted volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub read_only: bool,
    pub cache_size: u64,
    /// Dirty bytes held in memory before writers flush synchronously.
    pub dirty_limit: u64,
    /// Budget for cache, dirty data and upload buffers together.
    pub memory_limit: Option<u64>,
    /// Disk cache tier: a directory (the filesystem's uuid is appended) and a size.
    pub disk_cache: Option<(std::path::PathBuf, u64)>,
    pub commit_interval: Duration,
    /// Freed blocks stay in the store this long after the commit that freed them.
    pub free_grace: Duration,
    pub upload_threads: usize,
    /// Journal segments (or bytes) after which a snapshot compacts the journal.
    pub snapshot_segments: u64,
    pub snapshot_bytes: u64,
    /// How long a writer lease lasts without renewal (renewed every third of it).
    pub lease_ttl: Duration,
    /// Recorded in the lease so others can tell where the writer is mounted.
    pub mountpoint: String,
    /// `fsck --repair`: keep one chain of a forked journal instead of refusing it.
    pub resolve_forks: bool,
    /// Background fetchers for sequential readers.
    pub prefetch_workers: usize,
    /// Offer POSIX ACLs to the kernel (`--acl`).
    pub posix_acls: bool,
    /// Let the kernel gather writes in its page cache (`--writeback-cache`).
    pub writeback_cache: bool,
}

/// Room for what the budget does not itemize: FUSE buffers, read replies, the index,
/// the cache's pool of reusable buffers (16 MiB).
const MEMORY_OVERHEAD: u64 = 32 << 20;

impl VolumeConfig {
    /// Shrinks the cache, dirty limit and upload parallelism to fit `memory_limit`.
    /// Uploads hold a second copy of their block while encoding it.
    pub fn fit_memory(&mut self, block_size: u64) -> FsResult<()> {
        let Some(limit) = self.memory_limit else {
            return Ok(());
        };
        let usable = limit.saturating_sub(MEMORY_OVERHEAD);
        self.upload_threads = self
            .upload_threads
            .min((usable / 8 / block_size).max(1) as usize);
        self.dirty_limit = self.dirty_limit.min((usable / 4).max(2 * block_size));
        let uploads = self.upload_threads as u64 * block_size;
        let cache = usable.saturating_sub(self.dirty_limit + uploads);
        if cache < 2 * block_size {
            return Err(FsError::Config(format!(
                "--memory-limit {} is too small for {} blocks (need at least {})",
                crate::util::format_bytes(limit),
                crate::util::format_bytes(block_size),
                crate::util::format_bytes(MEMORY_OVERHEAD + 6 * block_size)
            )));
        }
        self.cache_size = self.cache_size.min(cache);
        Ok(())
    }
}

impl Default for VolumeConfig {
    fn default() -> VolumeConfig {
        VolumeConfig {
            read_only: false,
            cache_size: 256 << 20,
            dirty_limit: 128 << 20,
            memory_limit: None,
            disk_cache: None,
            commit_interval: Duration::from_secs(5),
            free_grace: Duration::from_secs(30),
            upload_threads: 8,
            snapshot_segments: 256,
            snapshot_bytes: 64 << 20,
            lease_ttl: Duration::from_secs(30),
            mountpoint: String::new(),
            resolve_forks: false,
            prefetch_workers: prefetch::LOCAL_PREFETCH_WORKERS,
            posix_acls: false,
            writeback_cache: false,
        }
    }
}

/// Everything the metadata lock guards: the index and which inodes are open.
struct State {
    index: Index,
    open: HashMap<Ino, u32>,
    /// Of those, handles open for writing: the kernel may hold data of these files
    /// that has not reached us (writeback cache, dirty shared mappings).
    writers: HashMap<Ino, u32>,
    /// Lookups the kernel holds (`hold`), with zero-message opens: then an unlinked
    /// file stays while the kernel still knows it, since a process may have it open.
    held: HashMap<Ino, u64>,
}

enum Handle {
    /// `seen`: the newest write-back error this descriptor has reported (or that
    /// happened before it was opened).
    File { ino: Ino, seen: u64, write: bool },
    /// `entries`: listed at the last read from offset 0 (the first read, or a
    /// rewind), so a listing shows what the directory holds when it is read, not
    /// when it was opened; None before the first read.
    Dir { entries: Option<Vec<DirEntry>> },
}

pub struct Volume {
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    readahead: prefetch::Readahead,
    prefetcher: prefetch::Prefetcher,
    uploader: upload::Uploader,
    superblock: Superblock,
    block_size: u64,
    config: VolumeConfig,
    state: Mutex<State>,
    /// Serializes commits and snapshots; lock order: journal -> file data -> state.
    journal: Mutex<Journal>,
    /// Snapshots run on their own thread while commits go on (`persist`).
    snapshots: persist::SnapshotTrigger,
    /// `meta/pending-frees` may exist (found at load, or not known to be absent).
    pending_frees_listed: AtomicBool,
    /// A segment is in the store whose lease check failed with a store error: no
    /// commit is acknowledged until a check succeeds (`persist::confirm_lease`).
    lease_unconfirmed: AtomicBool,
    files: Mutex<HashMap<Ino, Arc<Mutex<FileData>>>>,
    /// Data of destroyed files, discarded once the state lock is released.
    graveyard: Mutex<Vec<Arc<Mutex<FileData>>>>,
    dirty_bytes: AtomicU64,
    versions: AtomicU64,
    /// Files with slots stored as patches (`Extent::Patched`), for folding.
    patched: Mutex<patch::PatchedFiles>,
    /// `used_bytes`' last sum, and when it was taken.
    used_bytes: Mutex<Option<(Instant, u64)>>,
    /// Sequence of write-back errors (per-descriptor reporting).
    error_seq: AtomicU64,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    free_queue: Mutex<VecDeque<(Instant, BlockId)>>,
    load_report: LoadReport,
    /// What loading had to fix first (a forked journal), for `repair` to report.
    load_fixes: Vec<String>,
    /// The writer lease (None when read-only).
    lease: Mutex<Option<Lease>>,
    /// Set when this writer lost its lease or saw a second writer: no more writes.
    fenced: AtomicBool,
    /// POSIX ACLs are stored and kept in step with modes (the kernel enforces them).
    posix_acls: AtomicBool,
    /// The kernel opens files without telling us (`opens_unseen`).
    opens_unseen: AtomicBool,
}

/// What a new node is made of.
struct NewNode<'a> {
    kind: Kind,
    mode: u32,
    rdev: u32,
    target: &'a [u8],
}

impl NewNode<'static> {
    fn plain(kind: Kind, mode: u32) -> NewNode<'static> {
        NewNode {
            kind,
            mode,
            rdev: 0,
            target: b"",
        }
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    Ok(())
}

impl Volume {
    /// Loads the filesystem in `store` (recovering from its journal).
    pub fn load(store: Arc<dyn ObjectStore>, mut config: VolumeConfig) -> FsResult<Volume> {
        let writer = crate::util::random_hex(4);
        let sb = journal::read_superblock(&*store).map_err(|e| FsError::Io(e.to_string()))?;
        config.fit_memory(u64::from(sb.block_size))?;
        // Freed blocks are deleted only while the lease outlasts a DELETE
        // (`delete_freed_blocks`); renewed every third of its term, a lease of three
        // deadlines always leaves two.
        let shortest = store.delete_deadline() * 3;
        if !config.read_only && config.lease_ttl < shortest {
            log::warn!(
                "writer lease raised from {} s to {} s: a DELETE on this store may take effect up to {} s after it is sent",
                config.lease_ttl.as_secs(),
                shortest.as_secs(),
                store.delete_deadline().as_secs()
            );
            config.lease_ttl = shortest;
        }
        // The lease comes first: the index must not be read while another writer changes it.
        let mut lease = if config.read_only {
            None
        } else {
            Some(Lease::acquire(
                store.clone(),
                &writer,
                config.lease_ttl,
                &config.mountpoint,
            )?)
        };
        let leased = lease.is_some();
        let load = || {
            let fixes = Self::resolve_forks(&store, &config, leased)?;
            let mut loaded = journal::load(store.clone(), &writer)?;
            if leased {
                loaded.superblock = journal::upgrade_format(&*store, &loaded.superblock)?;
            }
            Ok::<_, journal::IndexError>((fixes, loaded))
        };
        let (loaded, lost) = match lease.as_mut() {
            Some(l) => l.renewed_during(load),
            None => (load(), None),
        };
        if let Some(who) = lost {
            return Err(FsError::Lease(crate::lease::LeaseError::Lost(who).into()));
        }
        let (load_fixes, mut loaded) = match loaded {
            Ok(l) => l,
            Err(e) => {
                // A lease taken over from a writer that never released the store
                // stays unreleased, so the next writer seals the journal as this one
                // would have (`Journal::seal_after_takeover`).
                if let Some(mut l) = lease
                    && !l.took_over()
                {
                    let _ = l.release();
                }
                return Err(FsError::Io(e.to_string()));
            }
        };
        if lease.as_ref().is_some_and(Lease::took_over) {
            loaded.journal.seal_after_takeover();
        }
        let block_size = u64::from(loaded.superblock.block_size);
        let volume = Volume {
            cache: Arc::new(
                Self::block_cache(&store, &config, &sb.uuid)
                    .with_format(sb.compression(), sb.block_size),
            ),
            readahead: prefetch::Readahead::default(),
            prefetcher: prefetch::Prefetcher::new(config.prefetch_workers),
            uploader: upload::Uploader::default(),
            store,
            superblock: loaded.superblock,
            block_size,
            config,
            state: Mutex::new(State {
                index: loaded.index,
                open: HashMap::new(),
                writers: HashMap::new(),
                held: HashMap::new(),
            }),
            journal: Mutex::new(loaded.journal),
            files: Mutex::new(HashMap::new()),
            graveyard: Mutex::new(Vec::new()),
            dirty_bytes: AtomicU64::new(0),
            versions: AtomicU64::new(1),
            patched: Mutex::default(),
            used_bytes: Mutex::default(),
            error_seq: AtomicU64::new(0),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            free_queue: Mutex::new(VecDeque::new()),
            snapshots: persist::SnapshotTrigger::default(),
            pending_frees_listed: AtomicBool::new(false),
            lease_unconfirmed: AtomicBool::new(false),
            load_report: loaded.report,
            load_fixes,
            lease: Mutex::new(lease),
            fenced: AtomicBool::new(false),
            posix_acls: AtomicBool::new(false),
            opens_unseen: AtomicBool::new(false),
        };
        if !volume.config.read_only {
            // Renewals may have failed through a long load: the seal written next
            // needs a valid lease (taken again, or the volume stops, as in the lease
            // thread).
            let lapsed = volume
                .lease
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|l| !l.valid_now());
            if lapsed {
                volume.renew_lease();
            }
            // A snapshot of a large index can outlast the lease too.
            crate::util::with_ticks(
                volume.config.lease_ttl / 3,
                || volume.renew_lease(),
                || volume.after_recovery(),
            )?;
        }
        Ok(volume)
    }

    /// Only when asked (fsck --repair) and under the writer lease.
    fn resolve_forks(
        store: &Arc<dyn ObjectStore>,
        config: &VolumeConfig,
        leased: bool,
    ) -> Result<Vec<String>, journal::IndexError> {
        if !config.resolve_forks || !leased {
            return Ok(Vec::new());
        }
        // An unreadable lease history only loses the tie-break.
        let preferred = crate::lease::writers_newest_first(&**store).unwrap_or_default();
        Ok(journal::resolve_forks(&**store, &preferred)?
            .into_iter()
            .map(|r| {
                format!(
                    "journal fork at generation {} sequence {}: kept writer {}'s chain, moved {} segment(s) to {}",
                    r.generation,
                    r.seq,
                    r.kept,
                    r.moved.len(),
                    journal::FORKED_PREFIX
                )
            })
            .collect())
    }

    fn block_cache(store: &Arc<dyn ObjectStore>, config: &VolumeConfig, uuid: &str) -> BlockCache {
        let cache = BlockCache::new(store.clone(), config.cache_size);
        match &config.disk_cache {
            Some((dir, size)) if *size > 0 => {
                match crate::cache::DiskCache::open(&dir.join(uuid), *size) {
                    Ok(disk) => cache.with_disk(disk),
                    Err(e) => {
                        log::warn!(
                            "disk cache {} unusable, running without it: {e}",
                            dir.display()
                        );
                        cache
                    }
                }
            }
            _ => cache,
        }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Write access to the index, for tests that need to damage it.
    #[cfg(test)]
    pub(crate) fn with_index_mut<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        f(&mut self.state().index)
    }

    /// Read access to the index, for offline tools.
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.state().index)
    }

    /// Fetches a block from the store and checks its hash.
    pub fn verify_block(&self, id: BlockId) -> FsResult<()> {
        let stored = self.store.get(&id.key())?;
        let max = self.block_size as usize;
        crate::block::decode_with(id, stored, max, &crate::block::NewBuffers)
            .map_err(|e| FsError::Io(e.to_string()))?;
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> FsResult<()> {
        if self.config.read_only || self.fenced.load(Ordering::Relaxed) {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Stops all further writes (EROFS) after losing the store to another writer.
    pub fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            log::error!(
                "no longer writing to the store: {why}; the mount is read-only from now on"
            );
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    fn attr(&self, state: &State, ino: Ino) -> FsResult<Attr> {
        let inode = Self::inode(state, ino)?;
        // A file open for writing may have data only the kernel holds (dirty shared
        // mappings; with the writeback cache, writes, and even the size): it counts
        // whole, and with the writeback cache never as no blocks at all, or `tar
        // --sparse` takes it for one hole and archives zeros. (Without it the size is
        // ours, and an empty file keeps 0 blocks, as anywhere.)
        let allocated = match state.writers.contains_key(&ino) {
            true if self.config.writeback_cache => inode.size.max(1),
            true => inode.size,
            // Any file may be open for writing without our knowing (dirty shared
            // mappings): never no blocks at all, for the same reason.
            false if self.opens_unseen() && inode.size > 0 => state.index.allocated(inode).max(1),
            false => state.index.allocated(inode),
        };
        Ok(Attr::of(inode, allocated))
    }

    fn inode(state: &State, ino: Ino) -> FsResult<&Inode> {
        state.index.get(ino).ok_or(FsError::NotFound)
    }

    fn inode_mut(state: &mut State, ino: Ino) -> FsResult<&mut Inode> {
        state.index.get_mut(ino).ok_or(FsError::NotFound)
    }

    fn dir(state: &State, ino: Ino) -> FsResult<&Inode> {
        let inode = Self::inode(state, ino)?;
        if inode.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(inode)
    }

    fn touch_dir(state: &mut State, dir: Ino) {
        if let Some(d) = state.index.get_mut(dir) {
            let now = Timestamp::now();
            d.mtime = now;
            d.ctime = now;
        }
    }

    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let state = self.state();
        self.attr(&state, ino)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let state = self.state();
        let dir = Self::dir(&state, parent)?;
        let ino = match name {
            b"." => parent,
            b".." => dir.parent,
            _ => state.index.lookup(parent, name).ok_or(FsError::NotFound)?,
        };
        self.attr(&state, ino)
    }

    /// Creates any kind of node; the common part of create, mkdir, mknod and symlink.
    fn make_node(&self, ctx: Ctx, parent: Ino, name: &[u8], node: NewNode) -> FsResult<Attr> {
        let NewNode {
            kind,
            mode,
            rdev,
            target,
        } = node;
        self.writable()?;
        check_name(name)?;
        let mut state = self.state();
        let dir = Self::dir(&state, parent)?;
        if dir.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if state.index.lookup(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let mut xattrs = std::collections::BTreeMap::new();
        let mut perm = (mode & 0o7777) as u16;
        match self.inherited_acl(dir, kind) {
            Some(mut acl) => {
                let bits = acl.create_masq(mode);
                perm = (mode & 0o7000 | bits) as u16;
                if !acl.is_minimal() {
                    xattrs.insert(acl::ACCESS.to_vec(), acl.encode());
                }
                if kind == Kind::Dir {
                    xattrs.insert(acl::DEFAULT.to_vec(), dir.xattrs[acl::DEFAULT].clone());
                }
            }
            // Without a default ACL to inherit, the umask applies.
            None if kind != Kind::Symlink => perm &= !(ctx.umask & 0o777) as u16,
            None => {}
        }
        // A setgid directory hands its group (and, to subdirectories, the bit) down.
        let gid = if dir.perm & 0o2000 != 0 {
            if kind == Kind::Dir {
                perm |= 0o2000;
            }
            dir.gid
        } else {
            ctx.gid
        };
        let ino = state.index.alloc_ino();
        let mut inode = Inode::new(ino, kind, perm, ctx.uid, gid);
        inode.rdev = rdev;
        inode.target = target.to_vec();
        inode.xattrs = xattrs;
        if kind == Kind::Dir {
            inode.nlink = 2;
            inode.parent = parent;
        }
        let attr = Attr::of(&inode, inode.size);
        state.index.insert_inode(inode);
        state.index.insert_entry(parent, name, ino);
        Self::touch_dir(&mut state, parent);
        if kind == Kind::Dir {
            Self::inode_mut(&mut state, parent)?.nlink += 1;
        }
        Ok(attr)
    }

    /// The default ACL a node made in `dir` inherits, if ACLs are on and it has one.
    fn inherited_acl(&self, dir: &Inode, kind: Kind) -> Option<acl::Acl> {
        if kind == Kind::Symlink || !self.posix_acls.load(Ordering::Relaxed) {
            return None;
        }
        dir.xattrs
            .get(acl::DEFAULT)
            .and_then(|b| acl::Acl::parse(b))
    }

    /// Turns on POSIX ACLs: once the kernel enforces them (FUSE_POSIX_ACL), they are
    /// stored, inherited and kept in step with the mode.
    pub fn enable_posix_acls(&self) {
        self.posix_acls.store(true, Ordering::Relaxed);
    }

    /// The kernel opens and closes files without a request from now on (zero-message
    /// opens): it holds unlinked files alive by its lookups (`hold`, `forget`).
    pub fn set_opens_unseen(&self) {
        self.opens_unseen.store(true, Ordering::Relaxed);
    }

    pub fn opens_unseen(&self) -> bool {
        self.opens_unseen.load(Ordering::Relaxed)
    }

    /// The kernel is about to learn of `ino` from an entry reply, and will `forget`
    /// it; NotFound if it is gone (then the reply must not name it). Only regular
    /// files are counted: nothing else is read or written after its last unlink.
    pub fn hold(&self, ino: Ino) -> FsResult<()> {
        let mut state = self.state();
        if Self::inode(&state, ino)?.kind == Kind::File {
            *state.held.entry(ino).or_default() += 1;
        }
        Ok(())
    }

    /// The kernel dropped `n` of its lookups of `ino`; with the last, an unlinked
    /// file that is not open goes.
    pub fn forget(&self, ino: Ino, n: u64) {
        let mut state = self.state();
        let Some(count) = state.held.get_mut(&ino) else {
            return;
        };
        *count = count.saturating_sub(n);
        if *count > 0 {
            return;
        }
        state.held.remove(&ino);
        if !state.open.contains_key(&ino) {
            self.readahead.forget(ino);
        }
        self.destroy_if_unused(&mut state, ino);
        drop(state);
        self.bury();
    }

    /// Every lookup the kernel held is gone (unmounted): unlinked files go now.
    pub(super) fn forget_all(&self) {
        let mut state = self.state();
        let held: Vec<Ino> = state.held.drain().map(|(ino, _)| ino).collect();
        for ino in held {
            self.destroy_if_unused(&mut state, ino);
        }
        drop(state);
        self.bury();
    }

    pub fn mkdir(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> FsResult<Attr> {
        self.make_node(ctx, parent, name, NewNode::plain(Kind::Dir, mode))
    }

    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFDIR => Kind::Dir,
            _ => return Err(FsError::Invalid),
        };
        self.make_node(
            ctx,
            parent,
            name,
            NewNode {
                rdev,
                ..NewNode::plain(kind, mode)
            },
        )
    }

    pub fn symlink(&self, ctx: Ctx, parent: Ino, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        self.make_node(
            ctx,
            parent,
            name,
            NewNode {
                target,
                ..NewNode::plain(Kind::Symlink, 0o777)
            },
        )
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let state = self.state();
        let inode = Self::inode(&state, ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(inode.target.clone())
    }

    /// Creates a regular file and opens it.
    pub fn create(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> FsResult<(Attr, u64)> {
        let attr = self.make_node(ctx, parent, name, NewNode::plain(Kind::File, mode))?;
        let fh = self.open(attr.ino, false, true)?;
        // As the kernel will cache it: open for writing (see `attr`).
        let attr = self.getattr(attr.ino).unwrap_or(attr);
        Ok((attr, fh))
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.writable()?;
        check_name(name)?;
        let mut state = self.state();
        Self::dir(&state, parent)?;
        let inode = Self::inode(&state, ino)?;
        if inode.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if inode.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if inode.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        if state.index.lookup(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        state.index.insert_entry(parent, name, ino);
        Self::touch_dir(&mut state, parent);
        let inode = Self::inode_mut(&mut state, ino)?;
        inode.nlink += 1;
        inode.ctime = Timestamp::now();
        self.attr(&state, ino)
    }

    /// Drops one link; the inode goes when no link and no open handle is left.
    fn drop_link(&self, state: &mut State, ino: Ino) {
        let Some(inode) = state.index.get_mut(ino) else {
            return;
        };
        inode.nlink = inode
            .nlink
            .saturating_sub(if inode.kind == Kind::Dir { 2 } else { 1 });
        inode.ctime = Timestamp::now();
        self.destroy_if_unused(state, ino);
    }

    /// As ext4's `auto_da_alloc`: a file renamed over another (saved as editors save:
    /// written under a temporary name, then renamed over the old one, often without
    /// fsync) is written back before the rename, so that the commit that records the
    /// rename has its data. A commit records a file only as far as its data reached
    /// the store, so otherwise a crash, or a replica, could show an empty file where
    /// the old one was. An exchange writes back both.
    fn write_back_before_replacing(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        if flags.noreplace {
            return Ok(());
        }
        let (from, to) = {
            let state = self.state();
            let file = |dir, name| {
                let ino = state.index.lookup(dir, name)?;
                (state.index.get(ino)?.kind == Kind::File).then_some(ino)
            };
            let replaced = state.index.lookup(new_parent, new_name);
            // Onto another link of the same file: a rename that changes nothing.
            match replaced {
                Some(to) if Some(to) != state.index.lookup(parent, name) => {
                    (file(parent, name), file(new_parent, new_name))
                }
                _ => (None, None),
            }
        };
        if let Some(ino) = from {
            self.flush_file(ino)?;
        }
        match to {
            Some(ino) if flags.exchange => self.flush_file(ino),
            _ => Ok(()),
        }
    }

    /// An inode with no link goes once nothing has it open and the kernel holds no
    /// lookup of it.
    fn destroy_if_unused(&self, state: &mut State, ino: Ino) {
        let unlinked = state.index.get(ino).is_some_and(|i| i.nlink == 0);
        if unlinked && !state.open.contains_key(&ino) && !state.held.contains_key(&ino) {
            self.destroy_inode(state, ino);
        }
    }

    fn destroy_inode(&self, state: &mut State, ino: Ino) {
        state.index.remove_inode(ino);
        if let Some(fd) = self.files.lock().unwrap().remove(&ino) {
            // Its data lock ranks above the state lock we hold: discard it later.
            self.graveyard.lock().unwrap().push(fd);
        }
    }

    /// Drops the unflushed data of destroyed files; call without the state lock.
    fn bury(&self) {
        let dead: Vec<_> = std::mem::take(&mut *self.graveyard.lock().unwrap());
        for fd in dead {
            let dropped = fd.lock().unwrap().discard();
            self.dirty_bytes.fetch_sub(dropped, Ordering::Relaxed);
        }
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        let mut state = self.state();
        Self::dir(&state, parent)?;
        let ino = state.index.lookup(parent, name).ok_or(FsError::NotFound)?;
        if Self::inode(&state, ino)?.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        state.index.remove_entry(parent, name);
        Self::touch_dir(&mut state, parent);
        self.drop_link(&mut state, ino);
        drop(state);
        self.bury();
        Ok(())
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let mut state = self.state();
        Self::dir(&state, parent)?;
        let ino = state.index.lookup(parent, name).ok_or(FsError::NotFound)?;
        Self::dir(&state, ino)?;
        if state.index.entries(ino).is_some_and(|e| !e.is_empty()) {
            return Err(FsError::NotEmpty);
        }
        state.index.remove_entry(parent, name);
        Self::touch_dir(&mut state, parent);
        Self::inode_mut(&mut state, parent)?.nlink -= 1;
        self.drop_link(&mut state, ino);
        drop(state);
        self.bury();
        Ok(())
    }

    /// True if `dir` is `ancestor` or lies below it.
    fn is_within(state: &State, mut dir: Ino, ancestor: Ino) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match state.index.get(dir) {
                Some(d) if d.parent != dir => dir = d.parent,
                _ => return false,
            }
        }
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        self.writable()?;
        check_name(new_name)?;
        self.write_back_before_replacing(parent, name, new_parent, new_name, flags)?;
        if name == b"." || name == b".." {
            return Err(FsError::Invalid);
        }
        let mut state = self.state();
        Self::dir(&state, parent)?;
        Self::dir(&state, new_parent)?;
        let src = state.index.lookup(parent, name).ok_or(FsError::NotFound)?;
        let dst = state.index.lookup(new_parent, new_name);
        let src_is_dir = Self::inode(&state, src)?.kind == Kind::Dir;
        if src_is_dir && Self::is_within(&state, new_parent, src) {
            return Err(FsError::Invalid);
        }
        if flags.exchange {
            let dst = dst.ok_or(FsError::NotFound)?;
            let dst_is_dir = Self::inode(&state, dst)?.kind == Kind::Dir;
            if dst_is_dir && Self::is_within(&state, parent, dst) {
                return Err(FsError::Invalid);
            }
            state.index.insert_entry(parent, name, dst);
            state.index.insert_entry(new_parent, new_name, src);
            self.moved(&mut state, src, src_is_dir, parent, new_parent)?;
            self.moved(&mut state, dst, dst_is_dir, new_parent, parent)?;
            return Ok(());
        }
        if let Some(dst) = dst {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if dst == src {
                return Ok(());
            }
            let dst_is_dir = Self::inode(&state, dst)?.kind == Kind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if state.index.entries(dst).is_some_and(|e| !e.is_empty()) => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
            state.index.remove_entry(new_parent, new_name);
            if dst_is_dir {
                Self::inode_mut(&mut state, new_parent)?.nlink -= 1;
            }
            self.drop_link(&mut state, dst);
        }
        state.index.remove_entry(parent, name);
        state.index.insert_entry(new_parent, new_name, src);
        let result = self.moved(&mut state, src, src_is_dir, parent, new_parent);
        drop(state);
        self.bury();
        result
    }

    /// Bookkeeping after `ino` moved from directory `from` to `to`.
    fn moved(&self, state: &mut State, ino: Ino, is_dir: bool, from: Ino, to: Ino) -> FsResult<()> {
        Self::inode_mut(state, ino)?.ctime = Timestamp::now();
        if is_dir && from != to {
            Self::inode_mut(state, ino)?.parent = to;
            Self::inode_mut(state, from)?.nlink -= 1;
            Self::inode_mut(state, to)?.nlink += 1;
        }
        Self::touch_dir(state, from);
        Self::touch_dir(state, to);
        Ok(())
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> FsResult<Attr> {
        self.writable()?;
        if let Some(size) = set.size {
            self.truncate(ino, size)?;
        }
        let mut state = self.state();
        let inode = Self::inode_mut(&mut state, ino)?;
        let now = Timestamp::now();
        if let Some(mode) = set.mode {
            inode.perm = (mode & 0o7777) as u16;
            acl_chmod(inode, mode);
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves dropping set-ID bits on chown
        // and truncate to us (an explicit mode wins: chmod never drops them).
        let caller = set.caller.unwrap_or_else(Ctx::root);
        let chown = set.uid.is_some() || set.gid.is_some();
        let unprivileged_truncate = set.size.is_some() && !caller.privileged();
        if set.mode.is_none() && inode.kind != Kind::Dir && (chown || unprivileged_truncate) {
            data::drop_setid(inode, &caller);
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(ts) => ts,
        };
        if let Some(t) = set.atime {
            inode.atime = resolve(t);
        }
        if let Some(t) = set.mtime {
            inode.mtime = resolve(t);
        }
        inode.ctime = now;
        self.attr(&state, ino)
    }

    /// `write`: opened for writing (O_WRONLY or O_RDWR).
    pub fn open(&self, ino: Ino, truncate: bool, write: bool) -> FsResult<u64> {
        {
            let mut state = self.state();
            let kind = Self::inode(&state, ino)?.kind;
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            *state.open.entry(ino).or_default() += 1;
            if write {
                *state.writers.entry(ino).or_default() += 1;
            }
        }
        if truncate
            && let Err(e) = self.setattr(
                ino,
                SetAttr {
                    size: Some(0),
                    ..Default::default()
                },
            )
        {
            self.close_inode(ino, write);
            return Err(e);
        }
        let seen = self.error_seq.load(Ordering::Relaxed);
        Ok(self.add_handle(Handle::File { ino, seen, write }))
    }

    /// Whether `st_blocks` changes when the file is opened for writing (see `attr`):
    /// then the kernel's cached attributes must go.
    pub fn blocks_change_when_written(&self, ino: Ino) -> bool {
        let state = self.state();
        state.index.get(ino).is_some_and(|inode| {
            inode.kind == Kind::File && state.index.allocated(inode) < inode.size.max(1)
        })
    }

    fn handle_error_seen(&self, fh: u64) -> u64 {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::File { seen, .. }) => *seen,
            _ => 0,
        }
    }

    fn set_handle_error_seen(&self, fh: u64, seq: u64) {
        if let Some(Handle::File { seen, .. }) = self.handles.lock().unwrap().get_mut(&fh) {
            *seen = seq;
        }
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, handle);
        fh
    }

    fn close_inode(&self, ino: Ino, write: bool) {
        let mut state = self.state();
        if write {
            crate::util::release_count(&mut state.writers, &ino);
        }
        let last = crate::util::release_count(&mut state.open, &ino);
        if last {
            self.readahead.forget(ino);
            self.destroy_if_unused(&mut state, ino);
        }
        drop(state);
        self.bury();
    }

    /// Last close of a handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.handles.lock().unwrap().remove(&fh);
        match handle {
            Some(Handle::File { ino, write, .. }) => {
                self.close_inode(ino, write);
                Ok(())
            }
            Some(Handle::Dir { .. }) => Ok(()),
            None => Err(FsError::BadHandle),
        }
    }

    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        Self::dir(&self.state(), ino)?;
        Ok(self.add_handle(Handle::Dir { entries: None }))
    }

    /// The directory's entries, in name order. The state lock is taken for 4,096
    /// entries at a time (copying them), each chunk resuming after the last name of
    /// the one before, so listing a huge directory never holds every other operation
    /// up for long (100,000 entries held it for 22 ms in one go) and never makes a
    /// writer copy the directory. An entry added or removed meanwhile may or may not
    /// show, as POSIX allows; one present throughout shows exactly once.
    fn list_dir(&self, ino: Ino) -> FsResult<Vec<DirEntry>> {
        use std::ops::Bound::{Excluded, Unbounded};
        const CHUNK: usize = 4096;
        let parent = Self::dir(&self.state(), ino)?.parent;
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                kind: Kind::Dir,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                kind: Kind::Dir,
            },
        ];
        let mut after: Option<Vec<u8>> = None;
        loop {
            let state = self.state();
            let Some(dir) = state.index.entries(ino) else {
                break;
            };
            let from = match &after {
                Some(name) => Excluded(name.as_slice()),
                None => Unbounded,
            };
            let mut names = dir.range::<[u8], _>((from, Unbounded));
            let chunk: Vec<(&Vec<u8>, &Ino)> = names.by_ref().take(CHUNK).collect();
            let more = names.next().is_some();
            after = chunk.last().map(|(name, _)| (*name).clone());
            entries.extend(chunk.into_iter().filter_map(|(name, &child)| {
                Some(DirEntry {
                    name: name.clone(),
                    ino: child,
                    kind: state.index.get(child)?.kind,
                })
            }));
            if !more {
                break;
            }
        }
        Ok(entries)
    }

    /// Up to `max` entries from position `offset` of the listing taken at opendir
    /// (taken again when a reader rewinds to 0), so offsets stay stable while the
    /// directory changes. Each entry comes with the offset of the one after it.
    pub fn readdir(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<(u64, DirEntry)>> {
        let listed = matches!(
            self.handles.lock().unwrap().get(&fh),
            Some(Handle::Dir { entries: Some(_) })
        );
        if offset == 0 || !listed {
            let fresh = self.list_dir(ino)?;
            match self.handles.lock().unwrap().get_mut(&fh) {
                Some(Handle::Dir { entries }) => *entries = Some(fresh),
                _ => return Err(FsError::BadHandle),
            }
        }
        let handles = self.handles.lock().unwrap();
        let Some(Handle::Dir {
            entries: Some(entries),
        }) = handles.get(&fh)
        else {
            return Err(FsError::BadHandle);
        };
        Ok(entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .take(max)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// Readdirplus: the attributes of what each listed name holds now, under one
    /// lock. The kernel makes a cached name of every entry, so a name renamed or
    /// removed since the listing was read must not come back naming the file it
    /// held (an open with O_TRUNC of the old name would truncate the renamed file):
    /// None for it; a name replaced since gets its new inode's attributes.
    pub fn entries_now<'a>(
        &self,
        dir: Ino,
        entries: impl Iterator<Item = &'a DirEntry>,
    ) -> Vec<Option<Attr>> {
        let state = self.state();
        let now = |e: &DirEntry| {
            let ino = match e.name.as_slice() {
                // The kernel makes no names of these.
                b"." | b".." => e.ino,
                name => state.index.lookup(dir, name)?,
            };
            self.attr(&state, ino).ok()
        };
        entries.map(now).collect()
    }

    /// The size of all files together, summed at most once a second: the sum walks
    /// every inode under the state lock (tens of ms for a million files), and some
    /// programs call statfs before every write.
    fn used_bytes(&self) -> u64 {
        let mut cached = self.used_bytes.lock().unwrap();
        if let Some((at, used)) = *cached
            && at.elapsed() < Duration::from_secs(1)
        {
            return used;
        }
        let used = self.state().index.inodes().map(|i| i.size).sum();
        *cached = Some((Instant::now(), used));
        used
    }

    pub fn statfs(&self) -> FsResult<FsStats> {
        let space = self.store.space()?;
        let files = self.state().index.inode_count() as u64;
        let free_bytes = if space.unbounded {
            space.total_bytes.saturating_sub(self.used_bytes())
        } else {
            space.free_bytes
        };
        Ok(FsStats {
            total_bytes: space.total_bytes,
            free_bytes,
            files,
            block_size: self.superblock.block_size,
        })
    }

    pub fn setxattr(
        &self,
        caller: &Ctx,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrSet,
    ) -> FsResult<()> {
        self.writable()?;
        self.check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return Err(FsError::TooBig);
        }
        let mut state = self.state();
        let inode = Self::inode_mut(&mut state, ino)?;
        let exists = inode.xattrs.contains_key(name);
        match mode {
            XattrSet::Create if exists => return Err(FsError::Exists),
            XattrSet::Replace if !exists => return Err(FsError::NoAttr),
            _ => {}
        }
        // A name list longer than listxattr can return would make every tool that
        // copies xattrs (cp -a, rsync -X, getfattr -d) fail on the file.
        let listed: usize = inode.xattrs.keys().map(|k| k.len() + 1).sum();
        if !exists && listed + name.len() + 1 > XATTR_LIST_MAX {
            return Err(FsError::NoSpace);
        }
        if acl::is_acl_name(name) {
            set_acl(inode, caller, name, value)?;
        } else {
            inode.xattrs.insert(name.to_vec(), value.to_vec());
        }
        inode.ctime = Timestamp::now();
        Ok(())
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        self.check_xattr_name(name)?;
        let state = self.state();
        let inode = Self::inode(&state, ino)?;
        inode.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Names, each NUL-terminated, as listxattr returns them.
    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let state = self.state();
        let inode = Self::inode(&state, ino)?;
        let mut out = Vec::new();
        let acls = self.posix_acls.load(Ordering::Relaxed);
        for name in inode.xattrs.keys() {
            // ACLs kept from a mount with --acl are not there for this one.
            if (!acls && acl::is_acl_name(name)) || name == SELINUX_LABEL {
                continue;
            }
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        self.check_xattr_name(name)?;
        let mut state = self.state();
        let inode = Self::inode_mut(&mut state, ino)?;
        let removed = inode.xattrs.remove(name).is_some();
        // No stored ACL is the minimal one, which is there to remove (as on ext4).
        if !removed && !acl::is_acl_name(name) {
            return Err(FsError::NoAttr);
        }
        inode.ctime = Timestamp::now();
        Ok(())
    }

    /// Which names may be stored. `security.selinux` may not: objfs keeps no SELinux
    /// labels. Where SELinux runs, the kernel answers for that name itself (FUSE mounts
    /// are labelled by policy), so it reaches us only where SELinux is off, from tools
    /// like `ls -l` asking every file for its label. "Not supported" is what a
    /// filesystem without labels answers, and `ls` then stops asking for the rest of
    /// the mount, where "no such attribute" would cost one round trip per file.
    fn check_xattr_name(&self, name: &[u8]) -> FsResult<()> {
        if name.is_empty() {
            return Err(FsError::Invalid);
        }
        if name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        if acl::is_acl_name(name) {
            // Stored only while the kernel enforces them: ACLs kept but not applied
            // would grant or deny other than they say.
            return match self.posix_acls.load(Ordering::Relaxed) {
                true => Ok(()),
                false => Err(FsError::NotSupported),
            };
        }
        if name == SELINUX_LABEL {
            return Err(FsError::NotSupported);
        }
        // Other system.* names are the kernel's own (or another filesystem's).
        const NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
        if !NAMESPACES
            .iter()
            .any(|ns| name.starts_with(ns) && name.len() > ns.len())
        {
            return Err(FsError::NotSupported);
        }
        Ok(())
    }

    /// Counts for `objfs stat`.
    pub fn usage(&self) -> Usage {
        let state = self.state();
        let mut u = Usage::default();
        for inode in state.index.inodes() {
            match inode.kind {
                Kind::Dir => u.dirs += 1,
                Kind::File => {
                    u.files += 1;
                    u.logical_bytes += inode.size;
                    u.inline_bytes += inode
                        .extents
                        .values()
                        .filter_map(|e| match e {
                            crate::index::Extent::Inline(d) => Some(d.len() as u64),
                            _ => None,
                        })
                        .sum::<u64>();
                }
                _ => u.other += 1,
            }
        }
        u.blocks = state.index.ledger().block_count() as u64;
        u
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub files: u64,
    pub dirs: u64,
    pub other: u64,
    pub logical_bytes: u64,
    pub inline_bytes: u64,
    pub blocks: u64,
}

/// Stores an ACL and keeps the mode in step, as ext4 does: an access ACL sets the
/// mode's permission bits (and drops set-group-ID if the caller could not have set it
/// with chmod), and one that the mode already says in full is not stored at all.
fn set_acl(inode: &mut Inode, caller: &Ctx, name: &[u8], value: &[u8]) -> FsResult<()> {
    let parsed = acl::Acl::parse(value).ok_or(FsError::Invalid)?;
    if inode.kind == Kind::Symlink {
        return Err(FsError::NotSupported);
    }
    if name == acl::DEFAULT {
        if inode.kind != Kind::Dir {
            return Err(FsError::Access);
        }
        inode.xattrs.insert(name.to_vec(), parsed.encode());
        return Ok(());
    }
    let mut perm = u32::from(inode.perm) & 0o7000 | parsed.mode_bits();
    if !(caller.privileged() || caller.in_group(inode.gid)) {
        perm &= !0o2000;
    }
    inode.perm = perm as u16;
    if parsed.is_minimal() {
        inode.xattrs.remove(name);
    } else {
        inode.xattrs.insert(name.to_vec(), parsed.encode());
    }
    Ok(())
}

/// A chmod moves the access ACL's owner, group-class and other entries with it.
fn acl_chmod(inode: &mut Inode, mode: u32) {
    let Some(mut a) = inode
        .xattrs
        .get(acl::ACCESS)
        .and_then(|b| acl::Acl::parse(b))
    else {
        return;
    };
    a.chmod(mode);
    inode.xattrs.insert(acl::ACCESS.to_vec(), a.encode());
}

#[cfg(test)]
mod tests;
