//! Differential testing: one seeded random sequence of filesystem operations is applied
//! both to a real objfs mount and to a native directory in the fixture's temp dir, and
//! after every step the two trees must look the same (names, types, sizes, contents,
//! permission bits, link counts, symlink targets, user.* xattrs, and mtimes the test set
//! explicitly). An operation must fail on both sides with the same errno or succeed on
//! both. On a divergence the test prints the seed, the whole sequence and a shrunk one,
//! then panics.
//!
//! Knobs (environment):
//! - OBJFS_DIFF_SEEDS: seeds in total, split over the two tests (default 6)
//! - OBJFS_DIFF_OPS: operations per seed (default 300)
//! - OBJFS_DIFF_SEED_BASE: first seed (default fixed, so runs are reproducible)
//! - OBJFS_DIFF_SEED: run exactly this one seed (reproduces a printed failure)
//! - OBJFS_DIFF_FULL_EVERY: steps between full content comparisons (default 20; between
//!   them only files whose stat signature changed on either side are re-read)
//! - OBJFS_DIFF_SHRINK_ATTEMPTS / OBJFS_DIFF_SHRINK_SECS: shrink budget (60 / 180)
//! - OBJFS_DIFF_NO_PRE_EPOCH=1: keep utimens times at or after 1970, to look past the
//!   known pre-1970 timestamp divergence while hunting for other bugs (off by default)
//!
//! Each seed also picks an objfs setup (`seed % 4`, see `variant_args`).

mod common;
use common::*;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const XATTR_NAMES: [&str; 3] = ["user.x", "user.y", "user.z"];
/// Largest file the generator aims for (offset + length of a write, truncate size).
const MAX_EXTENT: u64 = 7 * MIB;

// ---------------------------------------------------------------------------------------
// Operations

/// Bytes described by a seed and a length, so sequences replay and print compactly.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Data {
    seed: u64,
    len: usize,
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Data {{ seed: {}, len: {} }}", self.seed, self.len)
    }
}

impl Data {
    /// Zeros, a repeating pattern or random bytes, depending on the seed. Seeds are
    /// drawn from a small pool often enough that identical blocks recur (dedup).
    fn bytes(&self) -> Vec<u8> {
        match self.seed % 6 {
            0 => vec![0; self.len],
            1 => (0..self.len)
                .map(|i| (i % 251) as u8 ^ (self.seed as u8))
                .collect(),
            _ => {
                let mut v = vec![0; self.len];
                StdRng::seed_from_u64(self.seed).fill_bytes(&mut v);
                v
            }
        }
    }
}

/// Permission bits, printed in octal.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mode(u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mode({:#o})", self.0)
    }
}

#[derive(Debug, Clone, Copy)]
enum ATime {
    Omit,
    Now,
    At(i64, i64),
}

#[derive(Debug, Clone, Copy)]
enum XFlags {
    Any,
    Create,
    Replace,
}

#[derive(Debug, Clone)]
enum Op {
    /// O_CREAT|O_TRUNC (std::fs::write), or O_CREAT|O_EXCL when `excl`.
    Create {
        path: String,
        data: Data,
        excl: bool,
    },
    /// open (O_CREAT if `create`), seek, write_all.
    WriteAt {
        path: String,
        offset: u64,
        data: Data,
        create: bool,
    },
    /// O_APPEND|O_CREAT, write_all.
    Append {
        path: String,
        data: Data,
    },
    /// open for writing, ftruncate.
    Truncate {
        path: String,
        size: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: Mode,
    },
    Rmdir {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Chmod {
        path: String,
        mode: Mode,
    },
    /// utimensat with an explicit mtime; AT_SYMLINK_NOFOLLOW when `nofollow`.
    Utimens {
        path: String,
        atime: ATime,
        mtime: (i64, i64),
        nofollow: bool,
    },
    /// lsetxattr.
    SetXattr {
        path: String,
        name: &'static str,
        value: Data,
        flags: XFlags,
    },
    /// lremovexattr.
    RemoveXattr {
        path: String,
        name: &'static str,
    },
    /// Open read-write, unlink, write at `offset` and read everything back through the
    /// handle (with fstat's nlink and size), then close.
    UnlinkOpen {
        path: String,
        offset: u64,
        data: Data,
    },
    /// Open read-only and read up to `len` bytes at `offset`.
    Read {
        path: String,
        offset: u64,
        len: u64,
    },
    /// copy_file_range from one file (opened read-only) into another (opened
    /// write-only, created if missing), looping until `len` bytes or the source's end.
    CopyRange {
        from: String,
        to: String,
        src_off: u64,
        dst_off: u64,
        len: u64,
    },
    /// Unmount and mount objfs again (the native side does nothing).
    Remount,
}

impl Op {
    fn payload(&self) -> Vec<u8> {
        match self {
            Op::Create { data, .. }
            | Op::WriteAt { data, .. }
            | Op::Append { data, .. }
            | Op::UnlinkOpen { data, .. }
            | Op::SetXattr { value: data, .. } => data.bytes(),
            _ => Vec::new(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::WriteAt { .. } => "write",
            Op::Append { .. } => "append",
            Op::Truncate { .. } => "truncate",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Symlink { .. } => "symlink",
            Op::Chmod { .. } => "chmod",
            Op::Utimens { .. } => "utimens",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::UnlinkOpen { .. } => "unlink-open",
            Op::Read { .. } => "read",
            Op::CopyRange { .. } => "copy-range",
            Op::Remount => "remount",
        }
    }

    /// The paths an op names (for mtime bookkeeping).
    fn paths(&self) -> Vec<&str> {
        match self {
            Op::Rename { from, to } | Op::Link { from, to } | Op::CopyRange { from, to, .. } => {
                vec![from, to]
            }
            Op::Create { path, .. }
            | Op::WriteAt { path, .. }
            | Op::Append { path, .. }
            | Op::Truncate { path, .. }
            | Op::Unlink { path }
            | Op::Mkdir { path, .. }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Chmod { path, .. }
            | Op::Utimens { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::UnlinkOpen { path, .. }
            | Op::Read { path, .. } => vec![path],
            Op::Remount => vec![],
        }
    }
}

/// What an op returned: bytes it observed (reads), or the errno it failed with.
type Outcome = Result<Vec<u8>, i32>;

fn errno_of(e: io::Error) -> i32 {
    // -1 marks a failure that carried no errno (e.g. a short write).
    e.raw_os_error().unwrap_or(-1)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// Drops clean cached pages so a read on the mount really goes to objfs.
fn drop_page_cache(f: &fs::File) {
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn ts(t: (i64, i64)) -> libc::timespec {
    libc::timespec {
        tv_sec: t.0 as libc::time_t,
        tv_nsec: t.1 as libc::c_long,
    }
}

/// Applies `op` under `root`. `mount` says the root is the objfs side.
fn apply(root: &Path, op: &Op, payload: &[u8], mount: bool) -> Outcome {
    let p = |rel: &str| root.join(rel);
    let io = |r: io::Result<()>| r.map(|()| Vec::new()).map_err(errno_of);
    match op {
        Op::Create { path, excl, .. } => io((|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(!*excl)
                .create_new(*excl)
                .truncate(!*excl)
                .open(p(path))?;
            f.write_all(payload)
        })()),
        Op::WriteAt {
            path,
            offset,
            create,
            ..
        } => io((|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(*create)
                .open(p(path))?;
            f.seek(SeekFrom::Start(*offset))?;
            f.write_all(payload)
        })()),
        Op::Append { path, .. } => io((|| {
            let mut f = OpenOptions::new().append(true).create(true).open(p(path))?;
            f.write_all(payload)
        })()),
        Op::Truncate { path, size } => io((|| {
            let f = OpenOptions::new().write(true).open(p(path))?;
            f.set_len(*size)
        })()),
        Op::Rename { from, to } => io(fs::rename(p(from), p(to))),
        Op::Link { from, to } => io(fs::hard_link(p(from), p(to))),
        Op::Unlink { path } => io(fs::remove_file(p(path))),
        Op::Mkdir { path, mode } => io(fs::DirBuilder::new().mode(mode.0).create(p(path))),
        Op::Rmdir { path } => io(fs::remove_dir(p(path))),
        Op::Symlink { target, path } => io(std::os::unix::fs::symlink(target, p(path))),
        Op::Chmod { path, mode } => io(fs::set_permissions(
            p(path),
            fs::Permissions::from_mode(mode.0),
        )),
        Op::Utimens {
            path,
            atime,
            mtime,
            nofollow,
        } => {
            let a = match atime {
                ATime::Omit => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                ATime::Now => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                ATime::At(s, n) => ts((*s, *n)),
            };
            let times = [a, ts(*mtime)];
            let flags = if *nofollow {
                libc::AT_SYMLINK_NOFOLLOW
            } else {
                0
            };
            let c = cpath(&p(path));
            if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) } == 0 {
                Ok(Vec::new())
            } else {
                Err(last_errno())
            }
        }
        Op::SetXattr {
            path, name, flags, ..
        } => {
            let c = cpath(&p(path));
            let n = CString::new(*name).unwrap();
            let fl = match flags {
                XFlags::Any => 0,
                XFlags::Create => libc::XATTR_CREATE,
                XFlags::Replace => libc::XATTR_REPLACE,
            };
            let r = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    payload.as_ptr().cast(),
                    payload.len(),
                    fl,
                )
            };
            if r == 0 {
                Ok(Vec::new())
            } else {
                Err(last_errno())
            }
        }
        Op::RemoveXattr { path, name } => {
            let c = cpath(&p(path));
            let n = CString::new(*name).unwrap();
            if unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) } == 0 {
                Ok(Vec::new())
            } else {
                Err(last_errno())
            }
        }
        Op::UnlinkOpen { path, offset, .. } => (|| -> io::Result<Vec<u8>> {
            let mut f = OpenOptions::new().read(true).write(true).open(p(path))?;
            fs::remove_file(p(path))?;
            f.seek(SeekFrom::Start(*offset))?;
            f.write_all(payload)?;
            let md = f.metadata()?;
            let mut out = format!("nlink={} size={}\n", md.nlink(), md.len()).into_bytes();
            if mount {
                drop_page_cache(&f);
            }
            f.seek(SeekFrom::Start(0))?;
            f.read_to_end(&mut out)?;
            Ok(out)
        })()
        .map_err(errno_of),
        Op::Read { path, offset, len } => (|| -> io::Result<Vec<u8>> {
            let mut f = OpenOptions::new().read(true).open(p(path))?;
            if mount {
                drop_page_cache(&f);
            }
            f.seek(SeekFrom::Start(*offset))?;
            let mut out = Vec::new();
            f.take(*len).read_to_end(&mut out)?;
            Ok(out)
        })()
        .map_err(errno_of),
        Op::CopyRange {
            from,
            to,
            src_off,
            dst_off,
            len,
        } => (|| -> io::Result<Vec<u8>> {
            let src = OpenOptions::new().read(true).open(p(from))?;
            let dst = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(to))?;
            let (mut so, mut d_o) = (*src_off as i64, *dst_off as i64);
            let mut done = 0u64;
            while done < *len {
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        &mut so,
                        dst.as_raw_fd(),
                        &mut d_o,
                        (*len - done) as usize,
                        0,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                if n == 0 {
                    break;
                }
                done += n as u64;
            }
            Ok(format!("copied {done}").into_bytes())
        })()
        .map_err(errno_of),
        Op::Remount => Ok(Vec::new()),
    }
}

// ---------------------------------------------------------------------------------------
// Tree snapshots

#[derive(Clone, PartialEq, Eq)]
struct Meta {
    kind: char,
    perm: u32,
    /// Files and directories.
    nlink: u64,
    /// Files and symlinks (directory sizes are not compared).
    size: u64,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} perm {:#o} nlink {} size {}",
            self.kind, self.perm, self.nlink, self.size
        )?;
        if let Some(t) = &self.target {
            write!(f, " -> {:?}", String::from_utf8_lossy(t))?;
        }
        let xattrs: Vec<String> = self
            .xattrs
            .iter()
            .map(|(k, v)| {
                let head: String = v.iter().take(8).map(|b| format!("{b:02x}")).collect();
                format!("{}={} bytes {head}..", String::from_utf8_lossy(k), v.len())
            })
            .collect();
        write!(f, " xattrs [{}]", xattrs.join(", "))
    }
}

/// A stat signature: if it is unchanged on both sides the cached contents stand.
type Sig = (u64, u64, i64, i64, i64, i64);

#[derive(Debug, Clone)]
struct Node {
    meta: Meta,
    mtime: (i64, i64),
    ino: u64,
    sig: Sig,
    content: Option<Arc<Vec<u8>>>,
}

type Tree = BTreeMap<String, Node>;

fn user_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = cpath(path);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 70000];
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m < 0 {
            return Err(io::Error::other(format!(
                "lgetxattr {} {}: {}",
                path.display(),
                String::from_utf8_lossy(name),
                io::Error::last_os_error()
            )));
        }
        val.truncate(m as usize);
        out.insert(name.to_vec(), val);
    }
    Ok(out)
}

/// Metadata of everything below `root` (contents are filled in later).
fn walk(root: &Path) -> Result<Tree, String> {
    let mut tree = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let abs = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let rd = fs::read_dir(&abs).map_err(|e| format!("read_dir {}: {e}", abs.display()))?;
        for entry in rd {
            let entry = entry.map_err(|e| format!("read_dir entry in {}: {e}", abs.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let path = root.join(&rel);
            let md = fs::symlink_metadata(&path)
                .map_err(|e| format!("lstat {}: {e}", path.display()))?;
            let ft = md.file_type();
            let kind = if ft.is_file() {
                'f'
            } else if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else {
                '?'
            };
            let target = if kind == 'l' {
                Some(
                    fs::read_link(&path)
                        .map_err(|e| format!("readlink {}: {e}", path.display()))?
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else {
                None
            };
            let xattrs =
                user_xattrs(&path).map_err(|e| format!("xattrs of {}: {e}", path.display()))?;
            let meta = Meta {
                kind,
                perm: md.mode() & 0o7777,
                nlink: if kind == 'l' { 0 } else { md.nlink() },
                size: if kind == 'd' { 0 } else { md.size() },
                target,
                xattrs,
            };
            let sig = (
                md.ino(),
                md.size(),
                md.mtime(),
                md.mtime_nsec(),
                md.ctime(),
                md.ctime_nsec(),
            );
            if kind == 'd' {
                stack.push(rel.clone());
            }
            tree.insert(
                rel,
                Node {
                    meta,
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ino: md.ino(),
                    sig,
                    content: None,
                },
            );
        }
    }
    Ok(tree)
}

fn read_file(path: &Path, mount: bool) -> Result<Vec<u8>, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    if mount {
        drop_page_cache(&f);
    }
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(v)
}

fn describe_bytes_diff(a: &[u8], b: &[u8]) -> String {
    let first = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let show = |v: &[u8]| {
        let end = (first + 16).min(v.len());
        format!("{:02x?}", &v[first.min(v.len())..end])
    };
    format!(
        "native {} bytes, mount {} bytes, first difference at byte {first} (block {} + {}): native {} mount {}",
        a.len(),
        b.len(),
        first as u64 / MIB,
        first as u64 % MIB,
        show(a),
        show(b)
    )
}

// ---------------------------------------------------------------------------------------
// A session: one fixture, one native directory, one sequence

struct Failure {
    step: usize,
    msg: String,
}

/// Kills the daemon (so blocked calls return) if a run takes far too long.
struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(mnt: PathBuf, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: run exceeded {limit:?}; killing the objfs daemon of {}",
                    mnt.display()
                );
                for pid in daemon_pids(&mnt) {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let _ = run_with_timeout(30, "umount", &["-l", mnt.to_str().unwrap()]);
            }
        });
        Watchdog {
            tx: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Session {
    // Field order: the watchdog goes before the fixture unmounts.
    _watchdog: Watchdog,
    f: Fixture,
    native: PathBuf,
    /// Native inode numbers whose mtime (and, for directories, entries) nothing has
    /// touched since the test set it explicitly: only their mtimes are compared.
    explicit: HashSet<u64>,
    /// Last comparison's trees (contents of files reused while signatures hold).
    last_native: Tree,
    last_mount: Tree,
    full_every: usize,
    steps: usize,
    remounts: usize,
    /// Per op kind: (succeeded, failed with an errno).
    stats: BTreeMap<&'static str, (usize, usize)>,
}

/// How objfs is set up for a seed (`seed % 4`): defaults; tiny dirty limit and cache
/// (every write flushes, partial overwrites read stored blocks back) with frequent
/// commits and a snapshot every other one (taken while operations go on); frequent
/// commits with serial uploads; 64 KiB blocks.
/// Mount options, and mkfs options (none: the first mount creates the filesystem).
fn variant_args(variant: u64) -> (&'static [&'static str], &'static [&'static str]) {
    match variant % 4 {
        0 => (&[], &[]),
        1 => (
            &[
                "--dirty-limit",
                "4M",
                "--cache-size",
                "1M",
                "--commit-interval",
                "1",
                "--snapshot-every",
                "2",
            ],
            // Blocks fetched again and again, stored compressed.
            &["--compression", "zstd"],
        ),
        2 => (
            &[
                "--commit-interval",
                "1",
                "--upload-threads",
                "1",
                "--writeback-cache",
            ],
            &[],
        ),
        // Through io_uring queues where the kernel offers them (scripts/test.sh
        // turns the fuse module's switch on).
        _ => (&["--io-uring"], &["--block-size", "64K"]),
    }
}

fn describe_variant(variant: u64) -> String {
    let (args, mkfs) = variant_args(variant);
    let mut d = if args.is_empty() {
        "mount defaults".to_string()
    } else {
        format!("mount {}", args.join(" "))
    };
    if !mkfs.is_empty() {
        d += &format!(", mkfs {}", mkfs.join(" "));
    }
    d
}

impl Session {
    fn new(limit: Duration, variant: u64) -> Session {
        let mut f = Fixture::new();
        let (args, mkfs) = variant_args(variant);
        if !mkfs.is_empty() {
            let mut cmd = vec!["mkfs", f.store_str()];
            cmd.extend_from_slice(mkfs);
            objfs_ok(&cmd);
        }
        f.extra = args.iter().map(|a| a.to_string()).collect();
        f.mount();
        let native = f.tmp.path().join("native");
        fs::create_dir(&native).unwrap();
        Session {
            _watchdog: Watchdog::start(f.mnt.clone(), limit),
            f,
            native,
            explicit: HashSet::new(),
            last_native: Tree::new(),
            last_mount: Tree::new(),
            full_every: env_usize("OBJFS_DIFF_FULL_EVERY", 20).max(1),
            steps: 0,
            remounts: 0,
            stats: BTreeMap::new(),
        }
    }

    /// Native inode numbers an op on `rel` may change: the entry, what it resolves to,
    /// and their parent directories.
    fn inos_near(&self, rel: &str) -> Vec<u64> {
        let path = self.native.join(rel);
        let mut out = Vec::new();
        let mut add = |p: &Path| {
            if let Ok(m) = fs::symlink_metadata(p) {
                out.push(m.ino());
            }
            if let Ok(m) = fs::metadata(p) {
                out.push(m.ino());
            }
        };
        add(&path);
        if let Some(parent) = path.parent() {
            add(parent);
        }
        if let Ok(canon) = fs::canonicalize(&path) {
            add(&canon);
            if let Some(parent) = canon.parent() {
                add(parent);
            }
        }
        if let Some(parent) = path.parent().and_then(|p| fs::canonicalize(p).ok()) {
            add(&parent);
        }
        out
    }

    fn remount(&mut self) -> Result<(), String> {
        let out = objfs(&["umount", self.f.mnt_str()]);
        if !out.status.success() {
            return Err(format!(
                "umount failed: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.f.log_text()
            ));
        }
        let out = self.f.try_mount();
        if !out.status.success() || !is_mountpoint(&self.f.mnt) {
            return Err(format!(
                "mount failed: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.f.log_text()
            ));
        }
        self.remounts += 1;
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        self.steps += 1;
        let mut touched: Vec<u64> = op.paths().iter().flat_map(|p| self.inos_near(p)).collect();
        let full = if let Op::Remount = op {
            self.remount()?;
            true
        } else {
            let payload = op.payload();
            let native = apply(&self.native, op, &payload, false);
            let mount = apply(&self.f.mnt, op, &payload, true);
            if native != mount {
                let show = |o: &Outcome| match o {
                    Ok(v) if v.len() <= 64 => format!("Ok({:?})", String::from_utf8_lossy(v)),
                    Ok(v) => format!("Ok({} bytes)", v.len()),
                    Err(e) => format!("Err({e}: {})", io::Error::from_raw_os_error(*e)),
                };
                let mut msg = format!(
                    "outcomes differ: native {} vs mount {}",
                    show(&native),
                    show(&mount)
                );
                if let (Ok(a), Ok(b)) = (&native, &mount) {
                    msg += &format!("\n  {}", describe_bytes_diff(a, b));
                }
                return Err(msg);
            }
            let e = self.stats.entry(op.kind()).or_default();
            if native.is_ok() {
                e.0 += 1
            } else {
                e.1 += 1
            }
            self.steps.is_multiple_of(self.full_every)
        };
        touched.extend(op.paths().iter().flat_map(|p| self.inos_near(p)));
        for ino in touched {
            self.explicit.remove(&ino);
        }
        if let Op::Utimens { path, nofollow, .. } = op {
            let p = self.native.join(path);
            let md = if *nofollow {
                fs::symlink_metadata(&p)
            } else {
                fs::metadata(&p)
            };
            if let Ok(md) = md {
                self.explicit.insert(md.ino());
            }
        }
        self.compare(full)
    }

    /// Walks both trees and reports every difference.
    fn compare(&mut self, full: bool) -> Result<(), String> {
        let mut native = walk(&self.native).map_err(|e| format!("native walk: {e}"))?;
        let mut mount = walk(&self.f.mnt).map_err(|e| format!("mount walk: {e}"))?;
        let mut diffs = Vec::new();
        for name in native.keys().filter(|k| !mount.contains_key(*k)) {
            diffs.push(format!(
                "{name}: only in native ({:?})",
                native[name].meta.kind
            ));
        }
        for name in mount.keys().filter(|k| !native.contains_key(*k)) {
            diffs.push(format!(
                "{name}: only in mount ({:?})",
                mount[name].meta.kind
            ));
        }
        for (name, n) in native.iter_mut() {
            let Some(m) = mount.get_mut(name) else {
                continue;
            };
            if n.meta != m.meta {
                diffs.push(format!(
                    "{name}: metadata differs\n    native {:?}\n    mount  {:?}",
                    n.meta, m.meta
                ));
            }
            if self.explicit.contains(&n.ino) && n.mtime != m.mtime {
                diffs.push(format!(
                    "{name}: explicitly set mtime differs: native {:?} mount {:?}",
                    n.mtime, m.mtime
                ));
            }
            if n.meta.kind != 'f' || m.meta.kind != 'f' {
                continue;
            }
            let cached = |last: &Tree, sig: &Sig| {
                last.get(name)
                    .filter(|o| o.sig == *sig)
                    .and_then(|o| o.content.clone())
            };
            let (cn, cm) = (
                cached(&self.last_native, &n.sig),
                cached(&self.last_mount, &m.sig),
            );
            let (cn, cm) = match (cn, cm) {
                (Some(a), Some(b)) if !full => (a, b),
                _ => {
                    let a = read_file(&self.native.join(name), false)?;
                    let b = read_file(&self.f.mnt.join(name), true)
                        .map_err(|e| format!("mount: {e}"))?;
                    (Arc::new(a), Arc::new(b))
                }
            };
            if cn != cm {
                diffs.push(format!(
                    "{name}: contents differ: {}",
                    describe_bytes_diff(&cn, &cm)
                ));
            }
            n.content = Some(cn);
            m.content = Some(cm);
        }
        self.last_native = native;
        self.last_mount = mount;
        if diffs.is_empty() {
            Ok(())
        } else {
            diffs.truncate(20);
            Err(format!(
                "trees differ{}:\n  {}",
                if full { " (full compare)" } else { "" },
                diffs.join("\n  ")
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generation

struct Gen<'a> {
    rng: &'a mut StdRng,
    tree: &'a Tree,
}

impl Gen<'_> {
    fn name(&mut self) -> &'static str {
        NAMES[self.rng.gen_range(0..NAMES.len())]
    }

    fn any_path(&mut self) -> String {
        let depth = self.rng.gen_range(1..=3);
        (0..depth)
            .map(|_| self.name())
            .collect::<Vec<_>>()
            .join("/")
    }

    fn existing(&mut self, kinds: &str) -> Option<String> {
        let all: Vec<&String> = self
            .tree
            .iter()
            .filter(|(_, n)| kinds.contains(n.meta.kind))
            .map(|(k, _)| k)
            .collect();
        if all.is_empty() {
            None
        } else {
            Some(all[self.rng.gen_range(0..all.len())].clone())
        }
    }

    /// A (usually new) name in an existing shallow directory or the root.
    fn in_dir(&mut self) -> String {
        let dirs: Vec<&String> = self
            .tree
            .iter()
            .filter(|(k, n)| n.meta.kind == 'd' && k.matches('/').count() < 2)
            .map(|(k, _)| k)
            .collect();
        let name = self.name();
        let pick = self.rng.gen_range(0..=dirs.len());
        if pick == dirs.len() {
            name.to_string()
        } else {
            format!("{}/{name}", dirs[pick])
        }
    }

    /// Mostly an existing entry of one of `kinds`, else a fresh or random path.
    fn target(&mut self, kinds: &str, p_existing: f64) -> String {
        if self.rng.gen_bool(p_existing)
            && let Some(p) = self.existing(kinds)
        {
            return p;
        }
        if self.rng.gen_bool(0.75) {
            self.in_dir()
        } else {
            self.any_path()
        }
    }

    /// A regular file (sometimes a symlink) for data ops.
    fn file(&mut self, p_existing: f64) -> String {
        let kinds = if self.rng.gen_bool(0.15) { "l" } else { "f" };
        self.target(kinds, p_existing)
    }

    /// Mostly an entry that has user xattrs.
    fn with_xattrs(&mut self) -> String {
        let all: Vec<&String> = self
            .tree
            .iter()
            .filter(|(_, n)| !n.meta.xattrs.is_empty())
            .map(|(k, _)| k)
            .collect();
        if !all.is_empty() && self.rng.gen_bool(0.75) {
            return all[self.rng.gen_range(0..all.len())].clone();
        }
        self.target("fd", 0.9)
    }

    fn size_of(&self, path: &str) -> u64 {
        self.tree.get(path).map_or(0, |n| n.meta.size)
    }

    fn data(&mut self, max: u64) -> Data {
        let r = self.rng.gen_range(0..100);
        let len = if r < 45 {
            self.rng.gen_range(0..=4200)
        } else if r < 70 {
            self.rng.gen_range(4097..=200_000)
        } else if r < 90 {
            // Around one block.
            (MIB as i64 + self.rng.gen_range(-5000..=5000)) as u64
        } else {
            self.rng.gen_range(MIB..=3 * MIB)
        };
        let seed = if self.rng.gen_bool(0.3) {
            self.rng.gen_range(0..12)
        } else {
            self.rng.r#gen()
        };
        Data {
            seed,
            len: len.min(max) as usize,
        }
    }

    /// Offsets inside the file, near block edges, or past EOF.
    fn offset(&mut self, size: u64) -> u64 {
        let r = self.rng.gen_range(0..100);
        let off = if r < 30 {
            self.rng.gen_range(0..=size)
        } else if r < 55 {
            let k = self.rng.gen_range(1..=3);
            (k * MIB as i64 + self.rng.gen_range(-3000..=3000)) as u64
        } else if r < 75 {
            size + self.rng.gen_range(1..=2 * MIB)
        } else {
            self.rng.gen_range(0..10_000)
        };
        off.min(MAX_EXTENT - 1)
    }

    fn time(&mut self) -> (i64, i64) {
        let sec = match self.rng.gen_range(0..10) {
            0 if !no_pre_epoch() => self.rng.gen_range(-2_000_000_000..0),
            1 => 0,
            _ => self.rng.gen_range(1..4_000_000_000),
        };
        (sec, self.rng.gen_range(0..1_000_000_000))
    }

    fn op(&mut self) -> Op {
        const WEIGHTS: [(u32, u32); 18] = [
            (0, 12), // create
            (1, 14), // write at
            (2, 6),  // append
            (3, 7),  // truncate
            (4, 10), // rename
            (5, 5),  // link
            (6, 6),  // unlink
            (7, 9),  // mkdir
            (8, 4),  // rmdir
            (9, 5),  // symlink
            (10, 4), // chmod
            (11, 5), // utimens
            (12, 5), // setxattr
            (13, 3), // removexattr
            (14, 3), // unlink while open
            (15, 5), // read
            (16, 1), // remount
            (17, 5), // copy range
        ];
        let total: u32 = WEIGHTS.iter().map(|w| w.1).sum();
        let mut r = self.rng.gen_range(0..total);
        let mut which = 0;
        for (k, w) in WEIGHTS {
            if r < w {
                which = k;
                break;
            }
            r -= w;
        }
        match which {
            0 => {
                let path = self.target("f", 0.4);
                Op::Create {
                    path,
                    data: self.data(MAX_EXTENT),
                    excl: self.rng.gen_bool(0.15),
                }
            }
            1 => {
                let path = self.file(0.75);
                let offset = self.offset(self.size_of(&path));
                Op::WriteAt {
                    path,
                    offset,
                    data: self.data(MAX_EXTENT - offset),
                    create: self.rng.gen_bool(0.5),
                }
            }
            2 => {
                let path = self.file(0.75);
                let room = MAX_EXTENT.saturating_sub(self.size_of(&path));
                Op::Append {
                    path,
                    data: self.data(room),
                }
            }
            3 => {
                let path = self.file(0.8);
                let size = self.size_of(&path);
                let size = match self.rng.gen_range(0..6) {
                    0 => 0,
                    1 => self.rng.gen_range(0..=size),
                    2 => size + self.rng.gen_range(1..=3 * MIB),
                    3 => {
                        (self.rng.gen_range(1..=3) * MIB as i64 + self.rng.gen_range(-2..=2)) as u64
                    }
                    4 => self.rng.gen_range(0..5000),
                    _ => size,
                };
                Op::Truncate {
                    path,
                    size: size.min(MAX_EXTENT),
                }
            }
            4 => {
                let from = self.target("fdl", 0.85);
                let to = if self.rng.gen_bool(0.4) {
                    self.target("fdl", 1.0)
                } else {
                    self.target("", 0.0)
                };
                Op::Rename { from, to }
            }
            5 => {
                let from = self.target("fl", 0.85);
                let to = self.target("fdl", 0.15);
                Op::Link { from, to }
            }
            6 => Op::Unlink {
                path: self.target("fl", 0.85),
            },
            7 => {
                let modes = [0o755, 0o700, 0o777, 0o1777, 0o555, 0o750];
                let mode = modes[self.rng.gen_range(0..modes.len())];
                Op::Mkdir {
                    path: self.target("d", 0.1),
                    mode: Mode(mode),
                }
            }
            8 => Op::Rmdir {
                path: self.target("d", 0.85),
            },
            9 => {
                let mut target = if self.rng.gen_bool(0.1) {
                    ".".to_string()
                } else {
                    self.any_path()
                };
                if self.rng.gen_bool(0.1) {
                    target = format!("./{target}");
                }
                Op::Symlink {
                    target,
                    path: self.target("fdl", 0.15),
                }
            }
            10 => {
                let path = self.target("fdl", 0.9);
                Op::Chmod {
                    path,
                    mode: Mode(self.rng.gen_range(0..=0o7777u32) & 0o1777),
                }
            }
            11 => {
                let path = self.target("fdl", 0.9);
                let atime = match self.rng.gen_range(0..4) {
                    0 => ATime::Omit,
                    1 => ATime::Now,
                    _ => {
                        let t = self.time();
                        ATime::At(t.0, t.1)
                    }
                };
                Op::Utimens {
                    path,
                    atime,
                    mtime: self.time(),
                    nofollow: self.rng.gen_bool(0.3),
                }
            }
            12 => {
                let kinds = if self.rng.gen_bool(0.1) { "l" } else { "fd" };
                let path = self.target(kinds, 0.9);
                let name = XATTR_NAMES[self.rng.gen_range(0..XATTR_NAMES.len())];
                let flags = [XFlags::Any, XFlags::Any, XFlags::Create, XFlags::Replace]
                    [self.rng.gen_range(0..4)];
                let len = if self.rng.gen_bool(0.2) {
                    0
                } else {
                    self.rng.gen_range(1..=600)
                };
                Op::SetXattr {
                    path,
                    name,
                    value: Data {
                        seed: self.rng.r#gen(),
                        len,
                    },
                    flags,
                }
            }
            13 => {
                let path = self.with_xattrs();
                let present: Vec<&'static str> = XATTR_NAMES
                    .into_iter()
                    .filter(|x| {
                        self.tree
                            .get(&path)
                            .is_some_and(|n| n.meta.xattrs.contains_key(x.as_bytes()))
                    })
                    .collect();
                let name = if !present.is_empty() && self.rng.gen_bool(0.8) {
                    present[self.rng.gen_range(0..present.len())]
                } else {
                    XATTR_NAMES[self.rng.gen_range(0..XATTR_NAMES.len())]
                };
                Op::RemoveXattr { path, name }
            }
            14 => {
                let path = self.file(0.85);
                let offset = self.offset(self.size_of(&path)).min(2 * MIB);
                let mut data = self.data(MIB + 8192);
                data.len = data.len.min(300_000);
                Op::UnlinkOpen { path, offset, data }
            }
            15 => {
                let path = self.file(0.85);
                let size = self.size_of(&path);
                let offset = if self.rng.gen_bool(0.5) {
                    0
                } else {
                    self.offset(size)
                };
                let len = if self.rng.gen_bool(0.3) {
                    u64::MAX >> 1
                } else {
                    self.rng.gen_range(0..=2 * MIB)
                };
                Op::Read { path, offset, len }
            }
            17 => {
                let from = self.file(0.9);
                let to = self.file(0.8);
                let src_off = self.offset(self.size_of(&from));
                // Half the time equally aligned, so whole blocks can be shared.
                let dst_off = if self.rng.gen_bool(0.5) {
                    let k = self.rng.gen_range(0..=4) * MIB;
                    (src_off % MIB + k).min(MAX_EXTENT - 1)
                } else {
                    self.offset(self.size_of(&to))
                };
                let len = match self.rng.gen_range(0..4) {
                    0 => u64::MAX >> 1,
                    1 => self.rng.gen_range(MIB..=3 * MIB),
                    _ => self.data(MAX_EXTENT).len as u64,
                };
                Op::CopyRange {
                    from,
                    to,
                    src_off,
                    dst_off,
                    len: len.min(MAX_EXTENT - dst_off),
                }
            }
            16 => Op::Remount,
            _ => unreachable!("weights name ops 0..=17"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running, replaying, shrinking

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// OBJFS_DIFF_NO_PRE_EPOCH=1 keeps utimens times at or after 1970 (to look past a
/// known pre-1970 timestamp bug while hunting for others).
fn no_pre_epoch() -> bool {
    std::env::var("OBJFS_DIFF_NO_PRE_EPOCH").is_ok_and(|v| v == "1")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| {
        let v = v.trim();
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// Generates and applies `n` ops from `seed`; returns them and the first failure.
fn run_seed(seed: u64, n: usize) -> (Vec<Op>, Option<Failure>, String) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Session::new(Duration::from_secs(300 + n as u64), seed);
    let mut ops = Vec::with_capacity(n);
    let mut failure = None;
    if let Err(msg) = s.compare(true) {
        failure = Some(Failure {
            step: 0,
            msg: format!("before any op: {msg}"),
        });
    }
    while failure.is_none() && ops.len() < n {
        let op = Gen {
            rng: &mut rng,
            tree: &s.last_native,
        }
        .op();
        ops.push(op.clone());
        if let Err(msg) = s.step(&op) {
            failure = Some(Failure {
                step: ops.len() - 1,
                msg,
            });
        }
    }
    if failure.is_none() {
        // A last remount and full comparison: everything must have persisted.
        ops.push(Op::Remount);
        if let Err(msg) = s.step(&Op::Remount) {
            failure = Some(Failure {
                step: ops.len() - 1,
                msg,
            });
        }
    }
    let stats: Vec<String> = s
        .stats
        .iter()
        .map(|(k, (ok, err))| format!("{k} {ok}/{err}"))
        .collect();
    let summary = format!(
        "{} remounts, {} files ({:.1} MiB) / {} entries at the end; ok/errno per op: {}",
        s.remounts,
        s.last_native
            .values()
            .filter(|n| n.meta.kind == 'f')
            .count(),
        s.last_native
            .values()
            .filter(|n| n.meta.kind == 'f')
            .map(|n| n.meta.size)
            .sum::<u64>() as f64
            / MIB as f64,
        s.last_native.len(),
        stats.join(", ")
    );
    (ops, failure, summary)
}

/// Applies a fixed sequence on a fresh fixture and native directory.
fn replay(ops: &[Op], variant: u64, limit: Duration) -> Option<Failure> {
    let mut s = Session::new(limit, variant);
    for (i, op) in ops.iter().enumerate() {
        if let Err(msg) = s.step(op) {
            return Some(Failure { step: i, msg });
        }
    }
    None
}

/// Delta debugging, bounded in attempts and time: drop chunks of ops (halves, quarters,
/// ... single ops) while the sequence still fails; cut everything after the failing step.
fn shrink(mut ops: Vec<Op>, mut failure: Failure, variant: u64) -> (Vec<Op>, Failure, usize) {
    let start = Instant::now();
    let budget = Duration::from_secs(env_usize("OBJFS_DIFF_SHRINK_SECS", 180) as u64);
    let max_attempts = env_usize("OBJFS_DIFF_SHRINK_ATTEMPTS", 60);
    let mut attempts = 0;
    ops.truncate(failure.step + 1);
    let mut chunk = (ops.len() / 2).max(1);
    'outer: loop {
        let mut i = 0;
        let mut progressed = false;
        while i < ops.len() {
            if attempts >= max_attempts || start.elapsed() > budget {
                break 'outer;
            }
            let end = (i + chunk).min(ops.len());
            let mut candidate: Vec<Op> = ops[..i].to_vec();
            candidate.extend_from_slice(&ops[end..]);
            attempts += 1;
            match replay(&candidate, variant, Duration::from_secs(120)) {
                Some(f) => {
                    candidate.truncate(f.step + 1);
                    eprintln!(
                        "  shrink attempt {attempts}: still fails with {} ops (removed {i}..{end})",
                        candidate.len()
                    );
                    ops = candidate;
                    failure = f;
                    progressed = true;
                }
                None => i = end,
            }
        }
        if chunk == 1 && !progressed {
            break;
        }
        if chunk > 1 {
            chunk = (chunk / 2).max(1);
        }
    }
    (ops, failure, attempts)
}

fn print_ops(ops: &[Op]) -> String {
    ops.iter()
        .enumerate()
        .map(|(i, op)| format!("  {i:4}: {op:?}\n"))
        .collect()
}

fn run_seeds(seeds: &[u64], n: usize) {
    for &seed in seeds {
        let start = Instant::now();
        let (ops, failure, summary) = run_seed(seed, n);
        let Some(failure) = failure else {
            eprintln!(
                "differential seed {seed:#x} [{}]: {} ops agree, {:.1}s ({summary})",
                describe_variant(seed),
                ops.len(),
                start.elapsed().as_secs_f64()
            );
            continue;
        };
        eprintln!(
            "\n==== DIVERGENCE: seed {seed:#x} (OBJFS_DIFF_SEED={seed:#x} OBJFS_DIFF_OPS={n}; objfs setup {}) at step {} ====\n{}\n\
             full sequence ({} ops):\n{}",
            describe_variant(seed),
            failure.step,
            failure.msg,
            ops.len(),
            print_ops(&ops)
        );
        let (small, small_failure, attempts) = shrink(ops, failure, seed);
        eprintln!(
            "==== shrunk sequence ({} ops, {attempts} shrink attempts), seed {seed:#x} ====\n{}\
             fails at step {}: {}\n",
            small.len(),
            print_ops(&small),
            small_failure.step,
            small_failure.msg
        );
        panic!(
            "objfs diverged from a native directory: seed {seed:#x} ({}), step {}: {}\nshrunk to {} ops:\n{}",
            describe_variant(seed),
            small_failure.step,
            small_failure.msg,
            small.len(),
            print_ops(&small)
        );
    }
}

/// This test's share of the seeds (`part` of 2).
fn seeds_for(part: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("OBJFS_DIFF_SEED") {
        return if part == 0 { vec![seed] } else { vec![] };
    }
    let base = env_u64("OBJFS_DIFF_SEED_BASE").unwrap_or(0x0bf5_d1ff_0000);
    let total = env_usize("OBJFS_DIFF_SEEDS", 6) as u64;
    // First half and second half, so each test gets a mix of setups (seed % 4).
    let half = total.div_ceil(2);
    let range = if part == 0 { 0..half } else { half..total };
    range.map(|i| base + i).collect()
}

#[test]
fn differential_against_native_dir_part_a() {
    run_seeds(&seeds_for(0), env_usize("OBJFS_DIFF_OPS", 300));
}

#[test]
fn differential_against_native_dir_part_b() {
    run_seeds(&seeds_for(1), env_usize("OBJFS_DIFF_OPS", 300));
}
