//! The FUSE adapter: translates kernel requests into `Volume` calls and errors into
//! errno. No filesystem logic lives here. Requests reach it two ways: through fuser's
//! `/dev/fuse` loop (the `Filesystem` impl below) and, where the kernel offers it,
//! through io_uring queues (`ring`); both share the helpers on `FuseAdapter`.

mod ring;

pub use ring::{Access, RingTransport};

use crate::fs::{
    Attr, Ctx, DirEntry, FsError, RenameFlags as CoreRenameFlags, Seek, SetAttr, SetTime, Volume,
    XattrSet,
};
use crate::index::{Kind, Timestamp};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Directory entries fetched per readdir request (more than one reply buffer holds).
const READDIR_BATCH: usize = 512;

#[derive(Clone)]
pub struct FuseAdapter {
    volume: Arc<Volume>,
    ttl: Duration,
    /// Page cache kept across opens: only where no one else changes the files.
    open_flags: FopenFlags,
    /// Set once the session is up: lets a request handler tell the kernel to
    /// forget attributes it would otherwise keep for the whole TTL.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Whether the io_uring queue threads all started (`--io-uring`), so INIT may
    /// ask the kernel for io_uring; and whether it agreed.
    ring_prepared: Arc<AtomicBool>,
    ring_state: Arc<AtomicU8>,
    /// Zero-message opens: agreed at INIT (`Volume::set_opens_unseen`).
    opens_unseen: Arc<AtomicBool>,
    launderer: Launderer,
    settings: AdapterSettings,
}

/// What the mount asked of the adapter.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterSettings {
    /// Threads reading /dev/fuse.
    pub request_threads: usize,
    /// `--open-requests`: no zero-message opens.
    pub open_requests: bool,
}

/// How long SEEK_DATA/SEEK_HOLE waits for the kernel to write its dirty pages back
/// before it answers "all data" instead.
const LAUNDER_WAIT: Duration = Duration::from_secs(2);

/// Has the kernel write back its dirty pages of a file (a reverse invalidation
/// launders them: WRITE requests that land before it returns). With zero-message
/// opens objfs cannot tell which files a process has mapped for writing, so SEEK_DATA
/// and SEEK_HOLE ask this first instead of calling such data a hole. Its own thread:
/// the WRITEs need a free request thread, which the waiting handler would otherwise
/// be; a handler waits at most LAUNDER_WAIT.
#[derive(Clone, Default)]
struct Launderer {
    jobs: Arc<Mutex<Option<mpsc::Sender<LaunderJob>>>>,
}

struct LaunderJob {
    ino: u64,
    range: (u64, u64),
    done: mpsc::SyncSender<bool>,
}

impl Launderer {
    /// Whether the kernel holds nothing dirty of `ino` in `[start, end)` any more.
    /// (Its clean pages there go too: the hole's, zeros, unless a mapping wrote.)
    fn launder(
        &self,
        notifier: &Arc<OnceLock<fuser::Notifier>>,
        ino: u64,
        range: (u64, u64),
    ) -> bool {
        let (done, finished) = mpsc::sync_channel(1);
        let job = LaunderJob { ino, range, done };
        let sent = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if jobs.is_none() {
                *jobs = Self::spawn(notifier.clone());
            }
            jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
        };
        sent && finished.recv_timeout(LAUNDER_WAIT).unwrap_or(false)
    }

    fn spawn(notifier: Arc<OnceLock<fuser::Notifier>>) -> Option<mpsc::Sender<LaunderJob>> {
        let (tx, rx) = mpsc::channel::<LaunderJob>();
        let spawned = std::thread::Builder::new()
            .name("objfs-launder".into())
            .spawn(move || {
                for job in rx {
                    let Some(n) = notifier.get() else {
                        let _ = job.done.send(false);
                        continue;
                    };
                    let (start, end) = job.range;
                    let offset = i64::try_from(start).unwrap_or(i64::MAX);
                    // 0: to the end of the file.
                    let len = i64::try_from(end - start).unwrap_or(0);
                    // ENOENT: the kernel has no pages of it at all.
                    let ok = match n.inval_inode(INodeNo(job.ino), offset, len) {
                        Ok(()) => true,
                        Err(e) => e.raw_os_error() == Some(libc::ENOENT),
                    };
                    let _ = job.done.send(ok);
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                log::warn!("SEEK_DATA/SEEK_HOLE: no thread to have the kernel write back ({e})");
                None
            }
        }
    }
}

const RING_PENDING: u8 = 0;
const RING_AGREED: u8 = 1;
const RING_REFUSED: u8 = 2;

/// What statfs reports, in the kernel's units.
pub(crate) struct StatfsOut {
    blocks: u64,
    bfree: u64,
    files: u64,
    ffree: u64,
    bsize: u32,
    namelen: u32,
    frsize: u32,
}

/// getxattr/listxattr: size 0 asks for the length.
pub(crate) enum Sized {
    Size(u32),
    Data(Vec<u8>),
}

impl FuseAdapter {
    pub fn new(
        volume: Arc<Volume>,
        notifier: Arc<OnceLock<fuser::Notifier>>,
        settings: AdapterSettings,
    ) -> FuseAdapter {
        let open_flags = if volume.config().read_only {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        // A writer is the only one changing its files, so the kernel may keep
        // attributes and names longer; a replica must look again soon.
        let ttl = if volume.config().read_only {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        FuseAdapter {
            volume,
            ttl,
            open_flags,
            notifier,
            ring_prepared: Arc::new(AtomicBool::new(false)),
            ring_state: Arc::new(AtomicU8::new(RING_PENDING)),
            opens_unseen: Arc::new(AtomicBool::new(false)),
            launderer: Launderer::default(),
            settings,
        }
    }

    /// Whether the kernel agreed at INIT to serve requests over io_uring; None
    /// until INIT.
    fn ring_state(&self) -> Option<bool> {
        match self.ring_state.load(Ordering::Acquire) {
            RING_PENDING => None,
            state => Some(state == RING_AGREED),
        }
    }

    fn opens_unseen(&self) -> bool {
        self.opens_unseen.load(Ordering::Relaxed)
    }

    /// Whether the kernel's lookups keep unlinked files: with zero-message opens on a
    /// writer (a replica's files go as the writer's do; see `init`).
    fn holds(&self) -> bool {
        self.volume.opens_unseen()
    }

    /// An entry reply the kernel will count as a lookup: with zero-message opens the
    /// inode must stay until the kernel forgets it.
    fn held(&self, result: Result<Attr, FsError>) -> Result<Attr, FsError> {
        let a = result?;
        if self.holds() {
            self.volume.hold(a.ino)?;
        }
        Ok(a)
    }

    /// A readdirplus entry the kernel took ("." and ".." it does not count).
    fn held_listed(&self, e: &DirEntry) {
        if self.holds() && e.name != b"." && e.name != b".." {
            // Removed meanwhile: the kernel's later requests for it find nothing.
            let _ = self.volume.hold(e.ino);
        }
    }

    /// ENOSYS once, and the kernel opens and closes files by itself from then on.
    fn open_file(&self, ino: u64, flags: i32) -> Result<(u64, FopenFlags), FsError> {
        if self.opens_unseen() {
            return Err(FsError::LeftToKernel);
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // A reader has no write-back error to hear about at close: spare the
        // round trip.
        let open_flags = if write {
            self.open_flags
        } else {
            self.open_flags | FopenFlags::FOPEN_NOFLUSH
        };
        let fh = self.volume.open(ino, truncate, write)?;
        // A sparse-looking file now counts whole (its data may stay in the
        // kernel a while): the kernel must not serve its old st_blocks.
        if write && self.volume.blocks_change_when_written(ino) {
            self.forget_cached_attrs(INodeNo(ino));
        }
        Ok((fh, open_flags))
    }

    /// With zero-message opens, ENOSYS once: the kernel then creates files with
    /// MKNOD and opens them by itself (a CREATE's handle would cost a RELEASE).
    fn create_file(
        &self,
        caller: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<(Attr, u64), FsError> {
        if self.opens_unseen() {
            return Err(FsError::LeftToKernel);
        }
        self.volume.create(caller, parent, name, mode)
    }

    /// close(2). With zero-message opens there are no handles: ENOSYS, and the kernel
    /// stops sending FLUSH (write-back errors are reported by fsync).
    fn flush_file(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        if self.opens_unseen() {
            return Err(FsError::LeftToKernel);
        }
        self.volume.flush(ino, Some(fh))
    }

    fn fsync_file(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        let fh = (!self.opens_unseen()).then_some(fh);
        self.volume.fsync_handle(ino, fh)
    }

    /// `drop_setid_for`: the writer, when the kernel asks us to drop set-ID bits.
    fn write_file(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        drop_setid_for: Option<Ctx>,
    ) -> Result<u32, FsError> {
        let (n, mode_changed) =
            self.volume
                .write_dropping_setid(ino, offset, data, drop_setid_for)?;
        if mode_changed {
            self.forget_cached_attrs(INodeNo(ino));
        }
        Ok(n)
    }

    fn fallocate_file(
        &self,
        caller: &Ctx,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        self.volume.fallocate(ino, offset, length, mode)?;
        // Like a write: the kernel leaves dropping set-ID bits to us.
        if self.volume.drop_setid_for(ino, caller) == Ok(true) {
            self.forget_cached_attrs(INodeNo(ino));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_file(
        &self,
        caller: &Ctx,
        ino_in: u64,
        offset_in: u64,
        ino_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u32, FsError> {
        if flags != 0 {
            return Err(FsError::Invalid);
        }
        let n = self
            .volume
            .copy_range(ino_in, offset_in, ino_out, offset_out, len)?;
        // Like a write: the kernel leaves dropping set-ID bits to us.
        if n > 0 && self.volume.drop_setid_for(ino_out, caller) == Ok(true) {
            self.forget_cached_attrs(INodeNo(ino_out));
        }
        // At most SHARE_MAX bytes per call: fits.
        Ok(n as u32)
    }

    fn seek_file(&self, ino: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        if self.volume.config().writeback_cache {
            // The kernel asks without writing its dirty pages back first, so data
            // only it holds would look like a hole: let it answer itself (all data).
            return Err(FsError::LeftToKernel);
        }
        let what = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            // The kernel answers the other kinds itself.
            _ => return Err(FsError::Invalid),
        };
        let offset = u64::try_from(offset).map_err(|_| FsError::NoSuchOffset)?;
        let answer = self.volume.seek(ino, offset, what);
        // (Nothing on a replica is written through a mapping.)
        if !self.holds() {
            return Ok(answer? as i64);
        }
        // A hole may be where a process's mapping has dirty pages: before calling a
        // range a hole, have the kernel write back its pages there and look again.
        let size = self.volume.getattr(ino)?.size;
        let Some(hole) = self.claimed_hole(ino, offset, what, &answer, size) else {
            return Ok(answer? as i64);
        };
        if self.can_launder() && self.launderer.launder(&self.notifier, ino, hole) {
            let again = self.volume.seek(ino, offset, what);
            match self.claimed_hole(ino, offset, what, &again, size) {
                Some((start, end)) if start < hole.0 || end > hole.1 => {}
                _ => return Ok(again? as i64),
            }
        }
        // Could not: all of it is data, which is never wrong.
        Ok(match what {
            Seek::Data => offset,
            Seek::Hole => size,
        } as i64)
    }

    /// The hole `answer` reports, as `[start, end)`; None if it reports data.
    fn claimed_hole(
        &self,
        ino: u64,
        offset: u64,
        what: Seek,
        answer: &Result<u64, FsError>,
        size: u64,
    ) -> Option<(u64, u64)> {
        match (what, answer) {
            (Seek::Data, Ok(at)) if *at > offset => Some((offset, *at)),
            (Seek::Data, Err(FsError::NoSuchOffset)) if offset < size => Some((offset, size)),
            (Seek::Hole, Ok(at)) if *at < size => {
                let end = self.volume.seek(ino, *at, Seek::Data).unwrap_or(size);
                Some((*at, end))
            }
            _ => None,
        }
    }

    /// The WRITEs a launder causes need a request thread other than the one
    /// waiting for it: with one thread on /dev/fuse, every seek would wait it out.
    fn can_launder(&self) -> bool {
        self.settings.request_threads > 1 || self.ring_state() == Some(true)
    }

    fn dir_entries(&self, ino: u64, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        self.volume.readdir(ino, fh, offset, READDIR_BATCH)
    }

    /// Entries with the attributes of what their names hold now (`entries_now`): a
    /// name gone since the listing is skipped, a replaced one shows its new inode. An
    /// empty reply ends the listing for the kernel, so a batch whose names are all
    /// gone is followed by the next one.
    fn dir_entries_plus(
        &self,
        ino: u64,
        fh: u64,
        mut offset: u64,
    ) -> Result<Vec<(u64, DirEntry, Attr)>, FsError> {
        loop {
            let entries = self.dir_entries(ino, fh, offset)?;
            let Some(&(last, _)) = entries.last() else {
                return Ok(Vec::new());
            };
            let attrs = self.volume.entries_now(ino, entries.iter().map(|(_, e)| e));
            let live: Vec<_> = entries
                .into_iter()
                .zip(attrs)
                .filter_map(|((next, mut e), a)| {
                    let a = a?;
                    (e.ino, e.kind) = (a.ino, a.kind);
                    Some((next, e, a))
                })
                .collect();
            if !live.is_empty() {
                return Ok(live);
            }
            offset = last;
        }
    }

    fn statfs_out(&self) -> Result<StatfsOut, FsError> {
        const FRSIZE: u64 = 4096;
        let s = self.volume.statfs()?;
        let files = s.files.max(1 << 32);
        Ok(StatfsOut {
            blocks: s.total_bytes / FRSIZE,
            bfree: s.free_bytes / FRSIZE,
            files,
            ffree: files - s.files,
            bsize: s.block_size,
            namelen: crate::fs::NAME_MAX as u32,
            frsize: FRSIZE as u32,
        })
    }

    fn set_xattr(
        &self,
        caller: &Ctx,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), FsError> {
        let mode = match flags {
            0 => XattrSet::Any,
            libc::XATTR_CREATE => XattrSet::Create,
            libc::XATTR_REPLACE => XattrSet::Replace,
            _ => return Err(FsError::Invalid),
        };
        self.volume.setxattr(caller, ino, name, value, mode)
    }

    fn access_check(&self, ino: u64) -> Result<(), FsError> {
        self.volume.getattr(ino).map(|_| ())
    }

    /// The kernel refreshes size and times after a write, not the mode (nor
    /// st_blocks at an open for writing).
    fn forget_cached_attrs(&self, ino: INodeNo) {
        if let Some(notifier) = self.notifier.get() {
            let _ = notifier.inval_inode(ino, -1, 0);
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: to_system_time(a.atime),
            mtime: to_system_time(a.mtime),
            ctime: to_system_time(a.ctime),
            crtime: to_system_time(a.crtime),
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: self.volume.superblock().block_size,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, result: Result<Attr, FsError>) {
        match self.held(result) {
            Ok(a) => reply.entry(&self.ttl, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// The single place where a core error becomes an errno.
fn errno_code(e: &FsError) -> i32 {
    if let FsError::Io(msg) = e {
        log::warn!("I/O error returned to caller: {msg}");
    }
    e.errno()
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(errno_code(e))
}

/// rename(2) flags: the ones objfs supports, EINVAL for the rest.
fn rename_flags(bits: u32) -> Result<CoreRenameFlags, FsError> {
    let flags = RenameFlags::from_bits_retain(bits);
    if flags.contains(RenameFlags::RENAME_WHITEOUT)
        || flags.contains(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_NOREPLACE)
    {
        return Err(FsError::Invalid);
    }
    Ok(CoreRenameFlags {
        noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
        exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
    })
}

/// getxattr/listxattr: size 0 asks for the length; a too-small buffer is ERANGE.
fn sized(size: u32, result: Result<Vec<u8>, FsError>) -> Result<Sized, FsError> {
    let v = result?;
    if size == 0 {
        Ok(Sized::Size(v.len() as u32))
    } else if v.len() > size as usize {
        Err(FsError::Range)
    } else {
        Ok(Sized::Data(v))
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask: 0,
    }
}

/// The caller of a create, mkdir or mknod, with the umask the kernel passes along.
fn creator(caller: Ctx, umask: u32) -> Ctx {
    Ctx { umask, ..caller }
}

/// The file-type bits of `st_mode`.
fn to_kind_mode(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDev => libc::S_IFCHR,
        Kind::BlockDev => libc::S_IFBLK,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn from_system_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timestamp { sec, nsec }
        }
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(from_kernel_time(st)),
    }
}

/// Times the kernel sends: fuser 0.18 turns (sec < 0, nsec) into EPOCH - (|sec| + nsec)
/// instead of EPOCH - |sec| + nsec (its own TODO in time.rs); this undoes exactly that.
fn from_kernel_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => from_system_time(t),
        Err(e) => {
            let d = e.duration();
            Timestamp {
                sec: -(d.as_secs() as i64),
                nsec: d.subsec_nanos(),
            }
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // Nanosecond timestamps; the kernel's default granularity for FUSE is a second.
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_CACHE_SYMLINKS
                | fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS
                // We drop set-ID bits on write ourselves, so the kernel need not ask
                // for security.capability before every write.
                | fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        );
        // The kernel enforces and caches ACLs, and leaves the umask to us (a default
        // ACL replaces it).
        let acl_flags = fuser::InitFlags::FUSE_POSIX_ACL | fuser::InitFlags::FUSE_DONT_MASK;
        if self.volume.config().writeback_cache && !self.volume.config().read_only {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        }
        if self.volume.config().posix_acls && config.add_capabilities(acl_flags).is_ok() {
            self.volume.enable_posix_acls();
        }
        // Zero-message opens: OPEN answered ENOSYS makes the kernel open and close
        // files without asking (two round trips fewer per file), keeping their pages
        // across opens. Not with the writeback cache, where a file open for writing
        // counts whole. A replica may: its refreshes drop the pages of every inode
        // the writer changed (`invalidate`).
        let cfg = self.volume.config();
        if !cfg.writeback_cache
            && !self.settings.open_requests
            && config
                .capabilities()
                .contains(fuser::InitFlags::FUSE_NO_OPEN_SUPPORT)
        {
            self.opens_unseen.store(true, Ordering::Relaxed);
            if !cfg.read_only {
                self.volume.set_opens_unseen();
            }
        }
        // Offered only where the fuse module's enable_uring parameter is on.
        let ring = self.ring_prepared.load(Ordering::Acquire)
            && config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        let state = if ring { RING_AGREED } else { RING_REFUSED };
        self.ring_state.store(state, Ordering::Release);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.volume.lookup(parent.0, name.as_bytes()));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.volume.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.volume.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            caller: Some(ctx(req)),
        };
        match self.volume.setattr(ino.0, set) {
            Ok(a) => reply.attr(&self.ttl, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.volume.mknod(
            creator(ctx(req), umask),
            parent.0,
            name.as_bytes(),
            mode,
            rdev,
        );
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .volume
            .mkdir(creator(ctx(req), umask), parent.0, name.as_bytes(), mode);
        self.entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.unlink(parent.0, name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.rmdir(parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.volume.symlink(
            ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = rename_flags(flags.bits()).and_then(|core| {
            self.volume.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                core,
            )
        });
        empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.volume.link(ino.0, newparent.0, newname.as_bytes()),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino.0, flags.0) {
            Ok((fh, open_flags)) => reply.opened(FileHandle(fh), open_flags),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume.read_shared(ino.0, offset, size) {
            Ok(data) => reply.data(data.as_slice()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let drop_setid_for = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| ctx(req));
        match self.write_file(ino.0, offset, data, drop_setid_for) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.flush_file(ino.0, fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.release(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fsync_file(ino.0, fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_entries(ino.0, fh.0, offset) {
            Ok(entries) => {
                for (next, e) in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        next,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_entries_plus(ino.0, fh.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        for (next, e, a) in entries {
            if reply.add(
                INodeNo(e.ino),
                next,
                OsStr::from_bytes(&e.name),
                &self.ttl,
                &self.attr(&a),
                Generation(0),
            ) {
                break;
            }
            self.held_listed(&e);
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.release(fh.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.commit());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_out() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self.set_xattr(&ctx(req), ino.0, name.as_bytes(), value, flags);
        empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(
            reply,
            sized(size, self.volume.getxattr(ino.0, name.as_bytes())),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, sized(size, self.volume.listxattr(ino.0)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.removexattr(ino.0, name.as_bytes()));
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.fallocate_file(&ctx(req), ino.0, offset, length, mode),
        );
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let result = self.copy_file(
            &ctx(req),
            ino_in.0,
            offset_in,
            ino_out.0,
            offset_out,
            len,
            flags.bits(),
        );
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.seek_file(ino.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// No ioctls: ENOTTY, what a file that is not a terminal answers isatty's TCGETS
    /// (Python asks at every open), without fuser's warning in the log each time.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(errno(&FsError::NoIoctl));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        empty(reply, self.access_check(ino.0));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_file(creator(ctx(req), umask), parent.0, name.as_bytes(), mode) {
            Ok((a, fh)) => reply.created(
                &self.ttl,
                &self.attr(&a),
                Generation(0),
                FileHandle(fh),
                self.open_flags,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, result: Result<Sized, FsError>) {
    match result {
        Ok(Sized::Size(n)) => reply.size(n),
        Ok(Sized::Data(v)) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Read-only mounts: applies the writer's commits every `period` and tells the kernel
/// to drop what it cached of the changed inodes and names.
pub fn spawn_follower(volume: Arc<Volume>, notifier: fuser::Notifier, period: Duration) {
    std::thread::Builder::new()
        .name("objfs-follow".into())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                match volume.refresh() {
                    Ok(changed) if !changed.is_empty() => invalidate(&notifier, &changed),
                    Ok(_) => {}
                    Err(e) => log::warn!("following the writer: {e}"),
                }
            }
        })
        .expect("spawn follower thread");
}

fn invalidate(notifier: &fuser::Notifier, changed: &crate::fs::Changed) {
    // Errors here mean the kernel had nothing cached for that inode or name.
    for (dir, name) in &changed.entries {
        let _ = notifier.inval_entry(INodeNo(*dir), OsStr::from_bytes(name));
    }
    for ino in changed.inodes.iter().chain(&changed.all) {
        let _ = notifier.inval_inode(INodeNo(*ino), 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_times_before_1970_keep_their_fraction() {
        // What fuser hands us for 1929-06-01 00:00:00.25 (sec -1280448000, nsec 250000000).
        let from_fuser = UNIX_EPOCH - Duration::new(1_280_448_000, 250_000_000);
        assert_eq!(
            from_kernel_time(from_fuser),
            Timestamp {
                sec: -1_280_448_000,
                nsec: 250_000_000
            }
        );
        let later = UNIX_EPOCH + Duration::new(5, 7);
        assert_eq!(from_kernel_time(later), Timestamp { sec: 5, nsec: 7 });
    }

    #[test]
    fn time_round_trips() {
        for t in [
            Timestamp { sec: 0, nsec: 0 },
            Timestamp {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timestamp {
                sec: -5,
                nsec: 250_000_000,
            },
        ] {
            assert_eq!(from_system_time(to_system_time(t)), t);
        }
    }
}
