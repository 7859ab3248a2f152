//! floorfs: the cost of FUSE itself on this machine, for `scripts/bench.sh`.
//!
//! An in-memory filesystem that does no storage work at all but talks to the kernel
//! exactly as objfs does (same threads, TTL, capabilities, zero-message opens). Whatever
//! it takes for a workload is the floor any FUSE filesystem pays here, so the bench can
//! tell objfs's own overhead from the protocol's. Not a product: no persistence, no
//! limits, no removal. Usage: `floorfs MOUNTPOINT` (runs until unmounted).

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(30);
/// File data lives in chunks so a growing file never reallocates and copies.
const CHUNK: usize = 1 << 20;

struct Node {
    attr: FileAttr,
    chunks: Vec<Vec<u8>>,
    children: BTreeMap<OsString, u64>,
}

impl Node {
    fn read(&self, offset: usize, size: usize) -> Vec<u8> {
        let end = (offset + size).min(self.attr.size as usize);
        let mut out = Vec::with_capacity(end.saturating_sub(offset));
        let mut pos = offset;
        while pos < end {
            let (i, at) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - at).min(end - pos);
            // Bytes a chunk holds, then zeros (a hole or an extended size).
            let held = self
                .chunks
                .get(i)
                .map_or(&[][..], |c| &c[at.min(c.len())..]);
            let copied = held.len().min(n);
            out.extend_from_slice(&held[..copied]);
            out.resize(out.len() + n - copied, 0);
            pos += n;
        }
        out
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        let mut pos = offset;
        let mut src = data;
        while !src.is_empty() {
            let (i, at) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - at).min(src.len());
            if self.chunks.len() <= i {
                self.chunks.resize_with(i + 1, || Vec::with_capacity(CHUNK));
            }
            let c = &mut self.chunks[i];
            if c.len() == at {
                c.extend_from_slice(&src[..n]);
            } else {
                if c.len() < at + n {
                    c.resize(at + n, 0);
                }
                c[at..at + n].copy_from_slice(&src[..n]);
            }
            pos += n;
            src = &src[n..];
        }
        self.attr.size = self.attr.size.max(pos as u64);
    }
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

struct FloorFs {
    state: Mutex<State>,
}

fn new_attr(ino: u64, kind: FileType, perm: u16, req: &Request) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: req.uid(),
        gid: req.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn to_time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl FloorFs {
    fn add(&self, parent: u64, name: &OsStr, kind: FileType, mode: u32, req: &Request) -> FileAttr {
        let mut s = self.state.lock().unwrap();
        let ino = s.next_ino;
        s.next_ino += 1;
        let attr = new_attr(ino, kind, (mode & 0o7777) as u16, req);
        let node = Node {
            attr,
            chunks: Vec::new(),
            children: BTreeMap::new(),
        };
        s.nodes.insert(ino, node);
        if let Some(p) = s.nodes.get_mut(&parent) {
            p.children.insert(name.to_owned(), ino);
            p.attr.mtime = SystemTime::now();
        }
        attr
    }
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS
                | fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state.lock().unwrap();
        let found = s.nodes.get(&parent.0).and_then(|p| p.children.get(name));
        match found.and_then(|ino| s.nodes.get(ino)) {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state.lock().unwrap().nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
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
        let mut s = self.state.lock().unwrap();
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        n.attr.uid = uid.unwrap_or(n.attr.uid);
        n.attr.gid = gid.unwrap_or(n.attr.gid);
        if let Some(size) = size {
            let size = size as usize;
            let kept = size.div_ceil(CHUNK);
            n.chunks.truncate(kept);
            if n.chunks.len() == kept
                && let Some(last) = n.chunks.last_mut()
            {
                last.truncate(size - (kept - 1) * CHUNK);
            }
            n.attr.size = size as u64;
        }
        n.attr.atime = atime.map_or(n.attr.atime, to_time);
        n.attr.mtime = mtime.map_or(n.attr.mtime, to_time);
        n.attr.ctime = SystemTime::now();
        reply.attr(&TTL, &n.attr);
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
        let attr = self.add(parent.0, name, FileType::Directory, mode & !umask, req);
        reply.entry(&TTL, &attr, Generation(0));
    }

    /// As objfs does: ENOSYS once, and the kernel creates files with MKNOD and opens
    /// them without a request.
    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let attr = self.add(
            parent.0,
            name,
            FileType::RegularFile,
            mode & 0o7777 & !umask,
            req,
        );
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // As objfs does: the kernel opens and closes files by itself from now on.
        reply.error(Errno::ENOSYS);
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
        let s = self.state.lock().unwrap();
        match s.nodes.get(&ino.0) {
            Some(n) => reply.data(&n.read(offset as usize, size as usize)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state.lock().unwrap();
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        n.write(offset as usize, data);
        n.attr.blocks = n.attr.size.div_ceil(512);
        n.attr.mtime = SystemTime::now();
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.state.lock().unwrap();
        let Some(dir) = s.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (name, child)) in dir.children.iter().enumerate().skip(offset as usize) {
            let kind = s.nodes[child].attr.kind;
            if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let s = self.state.lock().unwrap();
        let Some(dir) = s.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (name, child)) in dir.children.iter().enumerate().skip(offset as usize) {
            let attr = &s.nodes[child].attr;
            if reply.add(
                INodeNo(*child),
                (i + 1) as u64,
                name,
                &TTL,
                attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, name: &OsStr, _size: u32, reply: ReplyXattr) {
        // As objfs without --acl: system.* (POSIX ACLs) and SELinux labels are
        // unsupported, which `ls -l` remembers for the whole mount.
        let name = name.as_bytes();
        if name.starts_with(b"system.") || name == b"security.selinux" {
            reply.error(Errno::EOPNOTSUPP);
        } else {
            reply.error(Errno::ENODATA);
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }
}

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: floorfs MOUNTPOINT");
        std::process::exit(2);
    };
    let req_root = FileAttr {
        ino: INodeNo(1),
        size: 0,
        blocks: 0,
        atime: SystemTime::now(),
        mtime: SystemTime::now(),
        ctime: SystemTime::now(),
        crtime: SystemTime::now(),
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    };
    let root = Node {
        attr: req_root,
        chunks: Vec::new(),
        children: BTreeMap::new(),
    };
    let fs = FloorFs {
        state: Mutex::new(State {
            nodes: HashMap::from([(1, root)]),
            next_ino: 2,
        }),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("floorfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(4);
    config.clone_fd = true;
    if let Err(e) = fuser::mount(fs, &mountpoint, &config) {
        eprintln!("floorfs: {e}");
        std::process::exit(1);
    }
}
