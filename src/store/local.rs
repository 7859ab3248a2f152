use super::{ObjectStore, StoreError, StoreResult, StoreSpace};
use crate::alloc;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const TMP_PREFIX: &str = ".tmp-";
/// A sync of at most this many objects fsyncs each of them and their directories;
/// a bigger one uses one syncfs(2). syncfs also writes out every other dirty page on
/// that filesystem: with 2 GB of another program's data dirty there, a 2 MiB fsync
/// took 1.35 s (a native fsync 2 ms), and a database's fsyncs mostly sync one block.
const SYNC_EACH_MAX: usize = 8;

/// Objects as files under a root directory. Every put is durable when it returns
/// (temp file, fsync, rename, fsync directory) and never leaves a partial object visible.
pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
    nonce: u64,
    /// Objects put unsynced (`put_parts_unsynced`) that no sync has covered yet. The
    /// first few keep the descriptor they were written through: while it is open the
    /// kernel keeps the file's writeback error for it (an inode evicted meanwhile
    /// would take the error along).
    unsynced: Mutex<HashMap<PathBuf, Vec<File>>>,
    /// The root, open since the store was: a syncfs on it reports every writeback
    /// error on that filesystem since then, even one another program's syncfs has
    /// already been told of (a freshly opened descriptor would not be).
    root_dir: File,
    /// A sync failed: after a writeback error the kernel may have dropped the data
    /// and marked it clean, so a later fsync of the same files would succeed without
    /// it ("fsyncgate"). Every later sync fails instead.
    sync_failed: Mutex<Option<String>>,
    /// One sync at a time: a caller whose puts are in the batch another sync is
    /// still making durable waits for it to end.
    sync_lock: Mutex<()>,
    /// Block reads use O_DIRECT until the filesystem refuses it.
    direct_reads: AtomicBool,
    /// Block writes likewise.
    direct_writes: AtomicBool,
}

impl LocalStore {
    pub fn open(root: &Path, create: bool) -> StoreResult<LocalStore> {
        let key = root.display().to_string();
        if create {
            fs::create_dir_all(root).map_err(|e| StoreError::from_io(&key, e))?;
        }
        let meta = fs::metadata(root).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(key.clone()),
            _ => StoreError::from_io(&key, e),
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Io(format!("{key} is not a directory")));
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
            nonce: u64::from(std::process::id()) << 32 ^ crate::util::random_u64(),
            unsynced: Mutex::new(HashMap::new()),
            root_dir: File::open(root).map_err(|e| StoreError::from_io(&key, e))?,
            sync_failed: Mutex::new(None),
            sync_lock: Mutex::new(()),
            direct_reads: AtomicBool::new(true),
            direct_writes: AtomicBool::new(true),
        })
    }

    /// `sync`, with `whole_fs` syncing the store's whole filesystem (given its root)
    /// and `fsync` one file or directory.
    fn sync_with(
        &self,
        whole_fs: impl Fn(&File) -> std::io::Result<()>,
        fsync: impl Fn(&File) -> std::io::Result<()>,
    ) -> StoreResult<()> {
        let _one = self.sync_lock.lock().unwrap();
        if let Some(e) = &*self.sync_failed.lock().unwrap() {
            return Err(StoreError::Io(format!(
                "an earlier sync of the store failed ({e}): blocks written before it may not be on disk; remount"
            )));
        }
        let batch = std::mem::take(&mut *self.unsynced.lock().unwrap());
        if batch.is_empty() {
            return Ok(());
        }
        let synced = match batch.len() {
            // syncfs reports a writeback error of any file on that filesystem, maybe
            // another program's: ours are then asked one by one (a descriptor opened
            // now still sees an error of its file that nobody has seen). Failing to
            // open one of them then is as bad: the error may have been ours.
            n if n > SYNC_EACH_MAX => whole_fs(&self.root_dir).or_else(|e| {
                log::warn!("syncfs of the store: {e}; syncing its new objects one by one");
                sync_each(&self.root, &batch, &fsync).map_err(Failed::into_sync)
            }),
            _ => sync_each(&self.root, &batch, &fsync),
        };
        match synced {
            Ok(()) => Ok(()),
            // Nothing was synced that a retry could mistake for durable (EMFILE, ...).
            Err(Failed::Open(e)) => {
                let mut unsynced = self.unsynced.lock().unwrap();
                for (path, files) in batch {
                    let held = unsynced.entry(path.clone()).or_default();
                    for f in files {
                        keep_held(&path, held, f);
                    }
                }
                Err(StoreError::from_io("sync", e))
            }
            Err(Failed::Sync(e)) => {
                *self.sync_failed.lock().unwrap() = Some(e.to_string());
                Err(StoreError::from_io("sync", e))
            }
        }
    }

    /// Lists an object for the next sync, keeping its descriptor while few objects
    /// are listed. Two puts of one object may race (the same block in two files):
    /// both descriptors are kept, and a sync uses the one whose file the path names.
    fn note_unsynced(&self, path: PathBuf, file: Option<File>) {
        let mut unsynced = self.unsynced.lock().unwrap();
        let room = unsynced.len() < SYNC_EACH_MAX || unsynced.contains_key(&path);
        let held = unsynced.entry(path.clone()).or_default();
        if let Some(f) = file
            && room
        {
            keep_held(&path, held, f);
        }
    }

    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        let valid = !key.is_empty()
            && !key.starts_with('/')
            && key.split('/').all(|part| {
                !part.is_empty() && part != "." && part != ".." && !part.starts_with(TMP_PREFIX)
            });
        if !valid {
            return Err(StoreError::Io(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn write_temp(
        &self,
        dir: &Path,
        key: &str,
        parts: &[&[u8]],
        durable: bool,
    ) -> StoreResult<(PathBuf, File)> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{:x}-{n}", self.nonce));
        let result = (|| {
            let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let mut written = 0;
            if self.direct_writes.load(Ordering::Relaxed)
                && let Some(first) = parts.first()
            {
                match write_direct(&f, first)? {
                    Written::Direct(n) => written = n,
                    Written::Buffered => {}
                    Written::Unsupported(e) => {
                        self.direct_writes.store(false, Ordering::Relaxed);
                        log::info!("{}: no O_DIRECT writes ({e})", self.root.display());
                    }
                }
            }
            let mut offset = written;
            for part in parts {
                let skip = written.min(part.len());
                written -= skip;
                f.write_all_at(&part[skip..], offset as u64)?;
                offset += part.len() - skip;
            }
            if durable {
                f.sync_all()?;
            }
            Ok::<File, std::io::Error>(f)
        })();
        match result {
            Ok(f) => Ok((tmp, f)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(StoreError::from_io(key, e))
            }
        }
    }

    fn ensure_parent(&self, path: &Path, key: &str) -> StoreResult<PathBuf> {
        let dir = path
            .parent()
            .expect("object path has a parent")
            .to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| StoreError::from_io(key, e))?;
            // The new directory's own entry must be durable too.
            if let Some(grand) = dir.parent() {
                sync_dir(grand).map_err(|e| StoreError::from_io(key, e))?;
            }
        }
        Ok(dir)
    }

    /// Keys under `dir` starting with `prefix` into `out`, with their sizes when
    /// `sizes` (a stat each), else 0.
    fn collect(
        &self,
        dir: &Path,
        rel: &str,
        prefix: &str,
        sizes: bool,
        out: &mut Vec<(String, u64)>,
    ) -> StoreResult<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::from_io(rel, e)),
        };
        // What a name here must start with (or, for a directory, be the start of):
        // the part of the prefix past this directory. Checked before any allocation,
        // since a commit's fork check lists one name among all of meta/.
        let base_len = if rel.is_empty() { 0 } else { rel.len() + 1 };
        let rest = prefix.get(base_len..).unwrap_or("");
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::from_io(rel, e))?;
            let name = entry.file_name();
            let Ok(name) = std::str::from_utf8(name.as_bytes()) else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) || !(name.starts_with(rest) || rest.starts_with(name)) {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    self.collect(&entry.path(), &key, prefix, sizes, out)?;
                }
            } else if key.starts_with(prefix) {
                let len = match sizes {
                    true => match entry.metadata() {
                        Ok(m) => m.len(),
                        // Deleted since the directory was read.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::from_io(&key, e)),
                    },
                    false => 0,
                };
                out.push((key, len));
            }
        }
        Ok(())
    }

    fn walk(&self, prefix: &str, sizes: bool) -> StoreResult<Vec<(String, u64)>> {
        // Start the walk at the deepest directory the prefix fully names.
        let (dir_rel, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_rel)
        };
        let mut out = Vec::new();
        self.collect(&start, dir_rel, prefix, sizes, &mut out)?;
        out.sort();
        Ok(out)
    }
}

/// What the file at `path` holds against the concatenation of `parts`.
enum Existing {
    Absent,
    Same,
    Other,
}

fn existing(path: &Path, parts: &[&[u8]]) -> Existing {
    let existing = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Existing::Absent,
        Err(_) => return Existing::Other,
    };
    let mut rest = existing.as_slice();
    for part in parts {
        match rest.split_at_checked(part.len()) {
            Some((head, tail)) if head == *part => rest = tail,
            _ => return Existing::Other,
        }
    }
    match rest.is_empty() {
        true => Existing::Same,
        false => Existing::Other,
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn syncfs(root: &File) -> std::io::Result<()> {
    // SAFETY: root is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(root)) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why a sync failed: opening a file (nothing was synced; a retry is sound) or
/// syncing one (the kernel may have dropped the data: no retry can be trusted).
enum Failed {
    Open(std::io::Error),
    Sync(std::io::Error),
}

impl Failed {
    /// Counted as a failed sync: after a failed syncfs, nothing may be retried.
    fn into_sync(self) -> Failed {
        match self {
            Failed::Open(e) | Failed::Sync(e) => Failed::Sync(e),
        }
    }
}

/// fsyncs each file (through the descriptor it was written with, where kept), then
/// each directory from the one holding it up to the store's root (the rename into
/// place, and any directory created on the way: another thread may have created it
/// and not yet synced its parent). A file deleted since its put has nothing left to
/// make durable.
fn sync_each(
    root: &Path,
    batch: &HashMap<PathBuf, Vec<File>>,
    fsync: impl Fn(&File) -> std::io::Result<()>,
) -> Result<(), Failed> {
    for (path, held) in batch {
        let reopened;
        // A held descriptor counts only while the path still names its file (not
        // after a delete and a put again, or a racing put's rename over it).
        let file = match held.iter().find(|f| names(path, f)) {
            Some(f) => f,
            None => match File::open(path) {
                Ok(f) => {
                    reopened = f;
                    &reopened
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Failed::Open(e)),
            },
        };
        fsync(file).map_err(Failed::Sync)?;
    }
    for dir in dirs_up_to(root, batch.keys()) {
        let d = match File::open(dir) {
            Ok(d) => d,
            // Removed with all it held: nothing there to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Failed::Open(e)),
        };
        fsync(&d).map_err(Failed::Sync)?;
    }
    Ok(())
}

/// Adds `f` to the descriptors held for `path`, at most two, dropping those whose
/// file is no longer there (deleted, or renamed over: nothing left to sync).
fn keep_held(path: &Path, held: &mut Vec<File>, f: File) {
    const HELD_PER_OBJECT: usize = 2;
    held.retain(|h| names(path, h) || same_file(h, &f));
    if held.len() < HELD_PER_OBJECT && !held.iter().any(|h| same_file(h, &f)) {
        held.push(f);
    }
}

/// Whether `path` names the file `f` is open on.
fn names(path: &Path, f: &File) -> bool {
    matches!((f.metadata(), fs::metadata(path)), (Ok(a), Ok(b)) if same_inode(&a, &b))
}

fn same_file(a: &File, b: &File) -> bool {
    matches!((a.metadata(), b.metadata()), (Ok(a), Ok(b)) if same_inode(&a, &b))
}

fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// The directories holding `paths` and all above them up to `root`, deepest first.
fn dirs_up_to<'a>(root: &Path, paths: impl Iterator<Item = &'a PathBuf>) -> Vec<&'a Path> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in paths {
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(root)) {
            if !dirs.insert(d) {
                break;
            }
            dir = d.parent();
        }
    }
    // Longer paths sort after their ancestors: reversed, children come first.
    dirs.into_iter().rev().collect()
}

enum Direct {
    Read,
    /// Read this one through the page cache: it is small, the buffer is not
    /// page-aligned (not our allocator's), or a read came back short before the end.
    Buffered,
    /// The filesystem under the store does not take O_DIRECT reads.
    Unsupported(std::io::Error),
}

fn set_direct(f: &File, on: bool) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    // SAFETY: fcntl on a descriptor we own; only the status flags change.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = match on {
        true => flags | libc::O_DIRECT,
        false => flags & !libc::O_DIRECT,
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

enum Written {
    /// The first this many bytes are on the disk; the rest goes through the page cache.
    Direct(usize),
    /// Nothing written: the data is small or its buffer not page-aligned.
    Buffered,
    /// The filesystem under the store does not take O_DIRECT writes.
    Unsupported(std::io::Error),
}

/// Writes the whole pages at the start of a new, empty file `f` from `data` with
/// O_DIRECT, and leaves `f` in buffered mode for the rest (the tail of a page and the
/// trailer). A block's bytes then go straight from the block buffer to the disk: no
/// copy into the store's page cache, no writeback of it at the next sync, and no
/// cached copy that the block cache and the mount's page cache hold already.
/// Durability is unchanged: the file's size and name are made durable by the same
/// sync as before.
fn write_direct(f: &File, data: &[u8]) -> std::io::Result<Written> {
    let whole = data.len() / alloc::PAGE * alloc::PAGE;
    if whole < alloc::LARGE || !alloc::is_page_aligned(data.as_ptr()) {
        return Ok(Written::Buffered);
    }
    match set_direct(f, true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Written::Unsupported(e)),
        other => other?,
    }
    let written = write_whole_direct(f, &data[..whole]);
    set_direct(f, false)?;
    written
}

fn write_whole_direct(f: &File, data: &[u8]) -> std::io::Result<Written> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    let mut done = 0usize;
    while done < data.len() {
        // SAFETY: the range [done, len) lies within data.
        let n = unsafe {
            libc::pwrite(
                fd,
                data.as_ptr().add(done).cast(),
                data.len() - done,
                done as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if done == 0 => return Ok(Written::Unsupported(e)),
                _ => return Err(e),
            }
        }
        done += n as usize;
        // A short write that leaves the offset unaligned: the rest goes buffered.
        if n == 0 || !done.is_multiple_of(alloc::PAGE) {
            break;
        }
    }
    Ok(Written::Direct(done))
}

/// Reads a whole object of `len` bytes with O_DIRECT into `buf`, straight from the
/// disk: no copy out of the page cache, and no second cached copy of data that the
/// block cache and the mount's own page cache hold already. Offsets and lengths stay
/// multiples of a page, which covers any logical block size up to 4 KiB. Unless it
/// returns `Read`, `f` is back in buffered mode at offset 0 and `buf` is empty.
fn read_direct(f: &File, len: usize, buf: &mut Vec<u8>) -> std::io::Result<Direct> {
    buf.clear();
    let want = alloc::page_round(len);
    if want < alloc::LARGE {
        return Ok(Direct::Buffered);
    }
    buf.reserve_exact(want);
    if !alloc::is_page_aligned(buf.as_ptr()) {
        return Ok(Direct::Buffered);
    }
    match set_direct(f, true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Direct::Unsupported(e)),
        other => other?,
    }
    let direct = read_whole_direct(f, len, want, buf);
    if !matches!(direct, Ok(Direct::Read)) {
        buf.clear();
        set_direct(f, false)?;
    }
    direct
}

fn read_whole_direct(
    f: &File,
    len: usize,
    want: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Direct> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    let mut filled = 0usize;
    while filled < len {
        // SAFETY: the range [filled, want) lies within buf's capacity, and the kernel
        // writes at most want - filled bytes there.
        let n = unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().add(filled).cast(),
                want - filled,
                filled as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if filled == 0 => return Ok(Direct::Unsupported(e)),
                _ => return Err(e),
            }
        }
        let n = n as usize;
        filled += n;
        // Reads stay page-aligned only while each one is whole: a short one before
        // the end (a filesystem that splits reads) finishes through the page cache.
        if n == 0 || (filled < len && !filled.is_multiple_of(alloc::PAGE)) {
            return Ok(Direct::Buffered);
        }
    }
    // SAFETY: the kernel initialized the first `filled` bytes, at least `len`.
    unsafe { buf.set_len(len) };
    Ok(Direct::Read)
}

impl ObjectStore for LocalStore {
    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        let path = self.path_of(key)?;
        fs::read(&path).map_err(|e| StoreError::from_io(key, e))
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let read = |buf: &mut Vec<u8>| -> std::io::Result<()> {
            let mut f = File::open(&path)?;
            let len = f.metadata()?.len() as usize;
            buf.clear();
            if self.direct_reads.load(Ordering::Relaxed) {
                match read_direct(&f, len, buf)? {
                    Direct::Read => return Ok(()),
                    Direct::Buffered => {}
                    Direct::Unsupported(e) => {
                        self.direct_reads.store(false, Ordering::Relaxed);
                        log::info!("{}: no O_DIRECT reads ({e})", self.root.display());
                    }
                }
            }
            // A reused buffer is usually big enough already; read_to_end checks for
            // EOF without growing a buffer that fits exactly.
            buf.reserve_exact(len);
            f.read_to_end(buf)?;
            Ok(())
        };
        read(buf).map_err(|e| StoreError::from_io(key, e))
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let dir = self.ensure_parent(&path, key)?;
        let (tmp, _) = self.write_temp(&dir, key, &[data], true)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::from_io(key, e));
        }
        sync_dir(&dir).map_err(|e| StoreError::from_io(key, e))
    }

    fn put_parts_unsynced(&self, key: &str, parts: &[&[u8]]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        // An intact object already holding these bytes is left alone. Any other
        // existing object is replaced durably: an unsynced copy could tear in a
        // crash, and the one it replaces may be a committed block stored another way
        // (compressed, or by another zstd version), not a torn one.
        let replacing = match existing(&path, parts) {
            // Intact, but perhaps not yet durable (an unsynced put whose process died).
            Existing::Same => {
                let file = File::open(&path).ok();
                self.note_unsynced(path, file);
                return Ok(());
            }
            Existing::Other => true,
            Existing::Absent => false,
        };
        let dir = self.ensure_parent(&path, key)?;
        let (tmp, file) = self.write_temp(&dir, key, parts, replacing)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::from_io(key, e));
        }
        if replacing {
            sync_dir(&dir).map_err(|e| StoreError::from_io(key, e))?;
        } else {
            self.note_unsynced(path, Some(file));
        }
        Ok(())
    }

    /// Makes every earlier unsynced put durable: a few objects by an fsync each
    /// (and one per directory up to the root), many at once by one syncfs(2) instead
    /// of two fsyncs per block (see `SYNC_EACH_MAX`).
    fn sync(&self) -> StoreResult<()> {
        self.sync_with(syncfs, File::sync_all)
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let dir = self.ensure_parent(&path, key)?;
        let (tmp, _) = self.write_temp(&dir, key, &[data], true)?;
        // link(2) fails with EEXIST atomically: conditional create without a lock.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&dir).map_err(|e| StoreError::from_io(key, e)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StoreError::AlreadyExists(key.into()))
            }
            Err(e) => Err(StoreError::from_io(key, e)),
        }
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::from_io(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let listed = self.walk(prefix, false)?;
        Ok(listed.into_iter().map(|(key, _)| key).collect())
    }

    fn list_sizes(&self, prefix: &str) -> StoreResult<Vec<(String, u64)>> {
        self.walk(prefix, true)
    }

    fn space(&self) -> StoreResult<StoreSpace> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| StoreError::Io("store path has a NUL byte".into()))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and st a properly sized out-parameter.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(StoreError::from_io(
                "statvfs",
                std::io::Error::last_os_error(),
            ));
        }
        let frsize = st.f_frsize as u64;
        Ok(StoreSpace {
            total_bytes: st.f_blocks as u64 * frsize,
            free_bytes: st.f_bavail as u64 * frsize,
            unbounded: false,
        })
    }

    fn conditional_create_is_atomic(&self) -> bool {
        // link(2) fails with EEXIST.
        true
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s"), true).unwrap();
        super::super::contract::check(&store);
    }

    #[test]
    fn big_objects_are_read_with_o_direct_whatever_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let mut buf = Vec::new();
        for len in [
            alloc::LARGE + 4,
            alloc::LARGE + alloc::PAGE,
            1 << 20,
            3 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            store.put("blocks/x", &data).unwrap();
            let f = File::open(dir.path().join("blocks/x")).unwrap();
            match read_direct(&f, len, &mut buf).unwrap() {
                Direct::Read => assert!(buf == data, "{len} bytes read back differ"),
                // tmpfs before Linux 6.6: the buffered path below still has to work.
                Direct::Unsupported(e) => eprintln!("no O_DIRECT under the temp dir: {e}"),
                Direct::Buffered => panic!("{len} bytes into an aligned buffer went buffered"),
            }
            buf.clear();
            store.get_into("blocks/x", &mut buf).unwrap();
            assert!(buf == data);
        }
        // Small objects go through the page cache.
        store.put("small", b"tiny").unwrap();
        let mut small = Vec::new();
        let f = File::open(dir.path().join("small")).unwrap();
        assert!(matches!(
            read_direct(&f, 4, &mut small).unwrap(),
            Direct::Buffered
        ));
        store.get_into("small", &mut small).unwrap();
        assert_eq!(small, b"tiny");
    }

    /// How many of the first `pages` pages of the file at `path` are in the page cache.
    fn resident_pages(path: &Path, pages: usize) -> usize {
        let f = File::open(path).unwrap();
        let len = pages * alloc::PAGE;
        // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore
        // writes one byte per page into a vector of exactly that many.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; pages];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.iter().filter(|b| *b & 1 == 1).count()
        }
    }

    #[test]
    fn big_blocks_are_written_with_o_direct_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let trailer = [0xAB, 0xCD, 0x01];
        for len in [
            alloc::LARGE,
            alloc::LARGE + 5,
            alloc::LARGE + alloc::PAGE - 1,
            (1 << 20) + 77,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
            assert!(alloc::is_page_aligned(data.as_ptr()));
            let key = format!("blocks/{len}");
            store.put_parts_unsynced(&key, &[&data, &trailer]).unwrap();
            let path = dir.path().join(&key);
            if store.direct_writes.load(Ordering::Relaxed) {
                // The block's whole pages went past the page cache.
                assert_eq!(resident_pages(&path, len / alloc::PAGE), 0, "{len}");
            } else {
                eprintln!("no O_DIRECT writes under the temp dir");
            }
            let back = fs::read(&path).unwrap();
            assert_eq!(back.len(), len + trailer.len());
            assert!(back[..len] == data[..] && back[len..] == trailer, "{len}");
        }
        // A buffer that is not page-aligned is written through the page cache.
        let data: Vec<u8> = (0..alloc::LARGE * 2).map(|i| (i % 251) as u8).collect();
        let unaligned = &data[1..];
        store
            .put_parts_unsynced("blocks/u", &[unaligned, &trailer])
            .unwrap();
        let back = fs::read(dir.path().join("blocks/u")).unwrap();
        assert!(back[..unaligned.len()] == *unaligned && back[unaligned.len()..] == trailer);
        assert!(store.sync().is_ok());
    }

    #[test]
    fn rejects_keys_that_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        for key in ["../x", "/abs", "a//b", "a/./b", "", ".tmp-x"] {
            assert!(store.put(key, b"x").is_err(), "{key}");
        }
    }

    #[test]
    fn unsynced_puts_keep_intact_objects_and_replace_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store
            .put_parts_unsynced("blocks/ab/x", &[b"abc", b"def"])
            .unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(
            &fs::metadata(dir.path().join("blocks/ab/x")).unwrap(),
        );
        store
            .put_parts_unsynced("blocks/ab/x", &[b"abcdef"])
            .unwrap();
        let again = std::os::unix::fs::MetadataExt::ino(
            &fs::metadata(dir.path().join("blocks/ab/x")).unwrap(),
        );
        assert_eq!(inode, again, "an intact object is left alone");
        // Any other object there (torn, or the same block stored another way) is
        // replaced durably at once: not left to a later sync.
        fs::write(dir.path().join("blocks/ab/x"), b"ab").unwrap();
        store
            .put_parts_unsynced("blocks/ab/x", &[b"abc", b"def"])
            .unwrap();
        assert_eq!(store.get("blocks/ab/x").unwrap(), b"abcdef");
        // The first put, which the second found intact (perhaps not durable yet),
        // listed once; the replacement was durable at once.
        assert_eq!(store.unsynced.lock().unwrap().len(), 1);
        store.sync().unwrap();
        assert!(store.unsynced.lock().unwrap().is_empty());
    }

    #[test]
    fn syncs_of_few_and_of_many_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        for n in [1, SYNC_EACH_MAX, SYNC_EACH_MAX + 1] {
            put_objects(&store, &format!("{n}-"), n);
            // One of them deleted before the sync (nothing left to make durable).
            fs::remove_file(dir.path().join(format!("blocks/00/{n}-0"))).unwrap();
            store.sync().unwrap();
            assert!(store.unsynced.lock().unwrap().is_empty());
        }
    }

    /// `n` objects, spread over three directories.
    fn put_objects(store: &LocalStore, tag: &str, n: usize) {
        for i in 0..n {
            let key = format!("blocks/{:02x}/{tag}{i}", i % 3);
            store.put_parts_unsynced(&key, &[b"data"]).unwrap();
        }
    }

    /// A file that cannot be opened (out of descriptors, say) leaves the batch for
    /// the next sync: nothing was synced that a retry could mistake for durable.
    #[test]
    fn a_sync_that_could_not_open_a_file_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store.put_parts_unsynced("blocks/09/x", &[b"data"]).unwrap();
        let moved = dir.path().join("moved");
        fs::rename(dir.path().join("blocks/09"), &moved).unwrap();
        fs::write(dir.path().join("blocks/09"), b"not a directory").unwrap();
        assert!(store.sync().is_err());
        assert_eq!(store.unsynced.lock().unwrap().len(), 1);
        fs::remove_file(dir.path().join("blocks/09")).unwrap();
        fs::rename(&moved, dir.path().join("blocks/09")).unwrap();
        store.sync().unwrap();
        assert!(store.unsynced.lock().unwrap().is_empty());
    }

    /// A failed fsync fails every later sync: after a writeback error the kernel
    /// may have dropped the data and marked it clean, so a retry would succeed
    /// without it.
    #[test]
    fn a_failed_fsync_stops_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store.put_parts_unsynced("blocks/09/x", &[b"data"]).unwrap();
        let eio = |_: &File| Err(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(store.sync_with(syncfs, eio).is_err());
        store.put_parts_unsynced("blocks/0a/y", &[b"data"]).unwrap();
        let again = store.sync().unwrap_err().to_string();
        assert!(
            again.contains("an earlier sync of the store failed"),
            "{again}"
        );
    }

    /// syncfs reports another program's writeback error on the same filesystem too:
    /// the store's own objects are then synced one by one, and only a failure among
    /// them stops the store (then even one to open them: the error may be theirs).
    #[test]
    fn a_syncfs_error_that_is_not_ours_does_not_stop_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let foreign = |_: &File| Err(std::io::Error::other("another file's writeback error"));
        put_objects(&store, "a", SYNC_EACH_MAX + 1);
        store.sync_with(foreign, File::sync_all).unwrap();
        assert!(store.unsynced.lock().unwrap().is_empty());
        // Past the first few, objects are reopened to be synced: one that cannot be
        // opened now stops the store.
        put_objects(&store, "b", SYNC_EACH_MAX);
        store
            .put_parts_unsynced("blocks/0c/late", &[b"data"])
            .unwrap();
        fs::remove_dir_all(dir.path().join("blocks/0c")).unwrap();
        fs::write(dir.path().join("blocks/0c"), b"not a directory").unwrap();
        assert!(store.sync_with(foreign, File::sync_all).is_err());
        assert!(store.sync().is_err());
    }

    /// Syncs through `sync_with`, recording the inode of every file fsynced.
    fn sync_recording(store: &LocalStore) -> (StoreResult<()>, Vec<u64>) {
        use std::os::unix::fs::MetadataExt;
        let seen = Mutex::new(Vec::new());
        let fsync = |f: &File| {
            seen.lock().unwrap().push(f.metadata()?.ino());
            f.sync_all()
        };
        let synced = store.sync_with(syncfs, fsync);
        (synced, seen.into_inner().unwrap())
    }

    fn inode(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(path).unwrap())
    }

    /// Found by review: a held descriptor of a file no longer at the path (deleted,
    /// then put again: blocks are named by content) was fsynced instead of it.
    #[test]
    fn a_put_again_after_a_delete_syncs_the_file_now_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store.put_parts_unsynced("blocks/ab/x", &[b"old"]).unwrap();
        store.delete("blocks/ab/x").unwrap();
        store.put_parts_unsynced("blocks/ab/x", &[b"new"]).unwrap();
        let now = inode(&dir.path().join("blocks/ab/x"));
        let (synced, fsynced) = sync_recording(&store);
        synced.unwrap();
        assert!(fsynced.contains(&now), "{now} not in {fsynced:?}");
    }

    /// The same with two puts of one object racing: whichever rename came last.
    #[test]
    fn racing_puts_of_one_object_sync_the_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let path = store.path_of("blocks/ab/x").unwrap();
        let d = store.ensure_parent(&path, "k").unwrap();
        let (t1, f1) = store.write_temp(&d, "k", &[b"data"], false).unwrap();
        let (t2, f2) = store.write_temp(&d, "k", &[b"data"], false).unwrap();
        fs::rename(&t2, &path).unwrap();
        fs::rename(&t1, &path).unwrap();
        store.note_unsynced(path.clone(), Some(f1));
        store.note_unsynced(path.clone(), Some(f2));
        // The descriptor of the file at the path is among those held (review).
        let held = store.unsynced.lock().unwrap()[&path]
            .iter()
            .any(|f| names(&path, f));
        assert!(held);
        let now = inode(&path);
        let (synced, fsynced) = sync_recording(&store);
        synced.unwrap();
        assert!(fsynced.contains(&now), "{now} not in {fsynced:?}");
    }

    /// A put of bytes already there keeps the descriptor the file was written
    /// through (it hears of that file's writeback errors; a fresh one may not).
    #[test]
    fn a_put_of_the_same_bytes_keeps_the_write_descriptor() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let path = dir.path().join("blocks/ab/x");
        let held = |store: &LocalStore| -> Vec<i32> {
            let unsynced = store.unsynced.lock().unwrap();
            unsynced[&path].iter().map(|f| f.as_raw_fd()).collect()
        };
        store.put_parts_unsynced("blocks/ab/x", &[b"data"]).unwrap();
        let written = held(&store);
        store.put_parts_unsynced("blocks/ab/x", &[b"data"]).unwrap();
        assert_eq!(held(&store), written);
    }

    /// Found by review: two stale descriptors (deleted files) kept the one of the
    /// file at the path out.
    #[test]
    fn the_file_at_the_path_keeps_its_descriptor_after_deletes_and_puts() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let path = dir.path().join("blocks/ab/x");
        for bytes in [&b"one"[..], b"two"] {
            store.put_parts_unsynced("blocks/ab/x", &[bytes]).unwrap();
            store.delete("blocks/ab/x").unwrap();
        }
        store
            .put_parts_unsynced("blocks/ab/x", &[b"three"])
            .unwrap();
        let unsynced = store.unsynced.lock().unwrap();
        assert!(unsynced[&path].iter().any(|f| names(&path, f)));
        assert!(unsynced[&path].len() <= 2);
    }

    /// Found by review: each sync that failed to open a file put its descriptors
    /// back on top of those noted meanwhile, without bound.
    #[test]
    fn a_failed_open_does_not_grow_the_held_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let key = "blocks/ab/cd/x";
        let path = store.path_of(key).unwrap();
        let ab = dir.path().join("blocks/ab");
        let moved = dir.path().join("blocks/ab-moved");
        store.put_parts_unsynced(key, &[b"a"]).unwrap();
        for round in 0..3u8 {
            let first = std::cell::Cell::new(true);
            let fsync = |f: &File| {
                if first.replace(false) {
                    // Two puts of the object while the sync runs, then its
                    // directory cannot be opened (ENOTDIR).
                    for n in [2 * round, 2 * round + 1] {
                        store.delete(key).unwrap();
                        store.put_parts_unsynced(key, &[&[b'c', n]]).unwrap();
                    }
                    fs::rename(&ab, &moved).unwrap();
                    fs::write(&ab, b"").unwrap();
                }
                f.sync_all()
            };
            assert!(store.sync_with(syncfs, fsync).is_err(), "round {round}");
            fs::remove_file(&ab).unwrap();
            fs::rename(&moved, &ab).unwrap();
            assert!(store.unsynced.lock().unwrap()[&path].len() <= 2);
        }
        store.sync().unwrap();
    }

    /// A directory removed with everything it held has nothing to make durable.
    #[test]
    fn a_removed_empty_directory_does_not_fail_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store.put_parts_unsynced("blocks/ab/x", &[b"data"]).unwrap();
        fs::remove_file(dir.path().join("blocks/ab/x")).unwrap();
        fs::remove_dir(dir.path().join("blocks/ab")).unwrap();
        store.sync().unwrap();
        store.sync().unwrap();
    }

    /// The first block of a fresh store creates `blocks/` and `blocks/xx`: their
    /// entries become durable with it (found by review: only `blocks/` was synced).
    #[test]
    fn a_sync_of_few_objects_covers_their_directories_up_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = LocalStore::open(&root, true).unwrap();
        store
            .put_parts_unsynced("blocks/ab/abcdef", &[b"data"])
            .unwrap();
        store
            .put_parts_unsynced("blocks/cd/abcdef", &[b"data"])
            .unwrap();
        let paths: Vec<PathBuf> = store.unsynced.lock().unwrap().keys().cloned().collect();
        let (ab, cd, blocks) = (
            root.join("blocks/ab"),
            root.join("blocks/cd"),
            root.join("blocks"),
        );
        assert_eq!(
            dirs_up_to(&root, paths.iter()),
            vec![&*cd, &*ab, &*blocks, &*root]
        );
        store.sync().unwrap();
    }

    #[test]
    fn leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store.put("x/y", b"1").unwrap();
        let _ = store.put_if_absent("x/y", b"2");
        let names: Vec<_> = fs::read_dir(dir.path().join("x"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("y")]);
    }
}
