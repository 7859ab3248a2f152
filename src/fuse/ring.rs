//! FUSE over io_uring (kernel 6.14+, fuse module parameter `enable_uring`; opt-in with
//! `--io-uring`): the kernel hands each request to a queue of the CPU it was made on,
//! and the daemon answers and asks for the next one in one `io_uring_enter` instead of
//! a write and a read. On this project's 2-vCPU machines it measured no faster than
//! `/dev/fuse` (docs/performance.md); it is there for machines where `/dev/fuse`'s
//! wake-ups are what limits a workload. fuser 0.18 has no such transport, so this module parses the
//! requests and encodes the replies itself; everything else (INIT, forgets,
//! interrupts, notifications, requests made before the queues are up) stays on
//! fuser's `/dev/fuse` loop.
//!
//! Each queue thread owns one io_uring and one request slot: a header buffer and a
//! payload buffer the kernel copies requests into and replies out of.

use super::{
    FuseAdapter, Sized, StatfsOut, creator, errno_code, rename_flags, sized, to_kind_mode,
};
use crate::fs::{Attr, Ctx, FsError, SetAttr, SetTime};
use crate::index::Timestamp;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Opcodes (include/uapi/linux/fuse.h), and their names for the debug log.
macro_rules! opcodes {
    ($($name:ident = $code:literal),* $(,)?) => {
        $(const $name: u32 = $code;)*

        fn opcode_name(opcode: u32) -> Option<&'static str> {
            match opcode {
                $($code => Some(stringify!($name)),)*
                _ => None,
            }
        }
    };
}

opcodes! {
    LOOKUP = 1,
    GETATTR = 3,
    SETATTR = 4,
    READLINK = 5,
    SYMLINK = 6,
    MKNOD = 8,
    MKDIR = 9,
    UNLINK = 10,
    RMDIR = 11,
    RENAME = 12,
    LINK = 13,
    OPEN = 14,
    READ = 15,
    WRITE = 16,
    STATFS = 17,
    RELEASE = 18,
    FSYNC = 20,
    SETXATTR = 21,
    GETXATTR = 22,
    LISTXATTR = 23,
    REMOVEXATTR = 24,
    FLUSH = 25,
    OPENDIR = 27,
    READDIR = 28,
    RELEASEDIR = 29,
    FSYNCDIR = 30,
    ACCESS = 34,
    CREATE = 35,
    DESTROY = 38,
    IOCTL = 39,
    FALLOCATE = 43,
    READDIRPLUS = 44,
    RENAME2 = 45,
    LSEEK = 46,
    COPY_FILE_RANGE = 47,
}

// setattr's `valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Reply payloads are at most one request's worth of pages (1 MiB); the kernel
/// refuses a buffer smaller than that.
const PAYLOAD_SIZE: usize = (1 << 20) + 4096;
/// More queues than this (possible CPUs) would pin too much memory in buffers.
const MAX_QUEUES: usize = 64;

/// `struct fuse_uring_req_header`: request/reply header, per-op header, and the
/// slot's bookkeeping (`struct fuse_uring_ent_in_out`). Page-aligned, as the kernel
/// may pin it.
#[repr(C, align(4096))]
struct SlotHeader {
    in_out: [u8; 128],
    op_in: [u8; 128],
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// The bytes of `SlotHeader` the kernel reads and writes.
const SLOT_HEADER_LEN: usize = 128 + 128 + 32;

/// The running queue threads; they end by themselves when the filesystem is
/// unmounted (the kernel fails their pending commands).
pub struct RingTransport {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The mount's `/dev/fuse` descriptor, given once the mount exists.
    dev: Arc<OnceLock<OwnedFd>>,
}

/// Who may use the mount when it was not mounted with allow_other: the same rule
/// as fuser's `/dev/fuse` loop.
#[derive(Clone, Copy)]
pub enum Access {
    Anyone,
    OwnerOnly(u32),
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

impl RingTransport {
    /// Called before the mount (fuser reads INIT while mounting). Builds every
    /// queue thread's io_uring and starts the threads (about `threads` in all, at
    /// least two per CPU queue, so one slow request does not hold up the rest made on
    /// its CPU), which wait for INIT and the descriptor (`attach`); only if all of
    /// that worked does INIT ask the kernel for io_uring. Once the kernel agrees, it
    /// holds every request until each queue has a slot, so a queue that could not be
    /// set up must not be left to chance.
    pub fn prepare(
        adapter: &FuseAdapter,
        wanted: bool,
        threads: usize,
        access: Access,
    ) -> RingTransport {
        let mut transport = RingTransport {
            threads: Vec::new(),
            dev: Arc::new(OnceLock::new()),
        };
        if !wanted {
            log::info!("FUSE transport: /dev/fuse");
            return transport;
        }
        let queues = possible_cpus();
        if queues == 0 || queues > MAX_QUEUES {
            log::info!("FUSE transport: /dev/fuse (io_uring: {queues} possible CPUs)");
            return transport;
        }
        let per_queue = threads.div_ceil(queues).max(2);
        let rings: Result<Vec<Ring>, _> = (0..queues * per_queue)
            .map(|_| IoUring::builder().build(2))
            .collect();
        let rings = match rings {
            Ok(r) => r,
            Err(e) => {
                log::info!("FUSE transport: /dev/fuse (io_uring: {e})");
                return transport;
            }
        };
        let adapter = Arc::new(adapter.clone());
        for (n, ring) in rings.into_iter().enumerate() {
            let (dev, adapter) = (transport.dev.clone(), adapter.clone());
            let qid = (n / per_queue) as u16;
            let report = (n == 0).then_some((queues, per_queue));
            let thread = std::thread::Builder::new()
                .name(format!("objfs-ring{qid}.{}", n % per_queue))
                .spawn(move || serve_queue(ring, &dev, &adapter, qid, access, report));
            match thread {
                Ok(t) => transport.threads.push(t),
                Err(e) => {
                    // INIT will not ask: the threads started see that and end.
                    log::info!("FUSE transport: /dev/fuse (io_uring thread: {e})");
                    return transport;
                }
            }
        }
        adapter.ring_prepared.store(true, Ordering::Release);
        transport
    }

    /// Gives the queue threads the mount's `/dev/fuse` descriptor.
    pub fn attach(&self, dev: OwnedFd) {
        let _ = self.dev.set(dev);
    }

    /// Waits for the queue threads, after the session ended.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Waits for INIT (which fuser handles while mounting) and, if the kernel agreed
/// to io_uring, for the mount's descriptor.
fn wait_for_init<'a>(adapter: &FuseAdapter, dev: &'a OnceLock<OwnedFd>) -> Option<&'a OwnedFd> {
    loop {
        match (adapter.ring_state(), dev.get()) {
            (Some(false), _) => return None,
            (Some(true), Some(dev)) => return Some(dev),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The kernel keeps one queue per possible CPU (`num_possible_cpus`) and uses none
/// until all have a slot.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            usize::try_from(n).unwrap_or(0)
        })
}

/// "0-3,8" -> 5.
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse::<usize>().ok()?, hi.trim().parse().ok()?),
            None => {
                let cpu = part.trim().parse::<usize>().ok()?;
                (cpu, cpu)
            }
        };
        count += hi.checked_sub(lo)? + 1;
    }
    Some(count)
}

struct Slot {
    header: Box<SlotHeader>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

impl Slot {
    fn new() -> Slot {
        let mut header = Box::new(SlotHeader {
            in_out: [0; 128],
            op_in: [0; 128],
            flags: 0,
            commit_id: 0,
            payload_sz: 0,
            padding: 0,
            reserved: 0,
        });
        let mut payload = vec![0u8; PAYLOAD_SIZE];
        let iov = Box::new([
            libc::iovec {
                iov_base: (&mut *header as *mut SlotHeader).cast(),
                iov_len: SLOT_HEADER_LEN,
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: PAYLOAD_SIZE,
            },
        ]);
        Slot {
            header,
            payload,
            iov,
        }
    }
}

/// `struct fuse_uring_cmd_req` in the SQE's command area.
fn command(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

fn register_entry(fd: i32, qid: u16, slot: &Slot) -> squeue::Entry128 {
    let entry = opcode::UringCmd80::new(types::Fd(fd), CMD_REGISTER)
        .cmd(command(qid, 0))
        .addr(Some(slot.iov.as_ptr() as u64))
        .build();
    with_len(entry, 2)
}

fn commit_entry(fd: i32, qid: u16, commit_id: u64) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(fd), CMD_COMMIT_AND_FETCH)
        .cmd(command(qid, commit_id))
        .build()
}

/// `UringCmd80` has no setter for the SQE's `len` (byte 24), where REGISTER wants
/// the number of iovecs.
fn with_len(entry: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is a repr(C) 128-byte SQE; byte 24 holds the u32 `len`.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
    raw[24..28].copy_from_slice(&len.to_le_bytes());
    // SAFETY: same layout back; any bytes form a valid SQE value.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn serve_queue(
    mut ring: Ring,
    dev: &OnceLock<OwnedFd>,
    adapter: &FuseAdapter,
    qid: u16,
    access: Access,
    report: Option<(usize, usize)>,
) {
    // Not pinned to the queue's CPU: pinned, the threads verifying a stream's blocks
    // shared one CPU with the reader (cold reads 15-20% slower), and round trips
    // were no faster (docs/performance.md).
    let dev = wait_for_init(adapter, dev);
    if let Some((queues, per_queue)) = report {
        if dev.is_some() {
            log::info!("FUSE transport: io_uring, {queues} queues x {per_queue} threads");
        } else {
            log::info!("FUSE transport: /dev/fuse (the kernel offers no io_uring queues)");
        }
    }
    let Some(dev) = dev else {
        return;
    };
    let fd = dev.as_raw_fd();
    let mut slot = Slot::new();
    let mut scratch = Vec::new();
    let mut registered = false;
    if registration_fails_for_a_test(qid) {
        log::error!("FUSE io_uring queue {qid}: registration failed (test fault)");
        give_up_on_the_ring(fd);
        std::mem::forget(slot);
        return;
    }
    let mut next = register_entry(fd, qid, &slot);
    loop {
        let res = match submit_and_wait(&mut ring, &next) {
            Ok(res) => res,
            Err(e) => {
                log::error!("FUSE io_uring queue {qid}: {e}");
                if !registered {
                    give_up_on_the_ring(fd);
                }
                // The kernel may still hold the slot's buffers: never free them.
                std::mem::forget(slot);
                return;
            }
        };
        match res {
            0 => registered = true,
            e if e == -libc::EINTR || e == -libc::EAGAIN => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // Unmounted or aborted.
            e if e == -libc::ENOTCONN || e == -libc::ECONNABORTED || e == -libc::ENODEV => {
                return;
            }
            e if !registered => {
                // The kernel refused the slot, and with it io_uring for this mount:
                // requests stay on /dev/fuse.
                return log::warn!(
                    "FUSE io_uring queue {qid}: {}; requests stay on /dev/fuse",
                    std::io::Error::from_raw_os_error(-e)
                );
            }
            e => {
                // A commit the kernel refused: the slot is offered again, so the
                // queue keeps its threads.
                log::warn!(
                    "FUSE io_uring queue {qid}: {}",
                    std::io::Error::from_raw_os_error(-e)
                );
                next = register_entry(fd, qid, &slot);
                continue;
            }
        }
        answer(adapter, &mut slot, &mut scratch, access);
        next = commit_entry(fd, qid, slot.header.commit_id);
    }
}

/// Submits one command and waits for its completion's result.
fn submit_and_wait(ring: &mut Ring, entry: &squeue::Entry128) -> std::io::Result<i32> {
    // SAFETY: the buffers the command names belong to the caller's slot, which is
    // never freed while the kernel may hold them (see `serve_queue`).
    unsafe { ring.submission().push(entry) }
        .map_err(|_| std::io::Error::other("submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result());
        }
    }
}

/// Debug builds only (the tests' binary): OBJFS_TEST_RING_REGISTER_FAILS makes queue
/// 0 fail as a queue that cannot register its slot does, so the fallback is tested.
fn registration_fails_for_a_test(qid: u16) -> bool {
    cfg!(debug_assertions)
        && qid == 0
        && std::env::var_os("OBJFS_TEST_RING_REGISTER_FAILS").is_some()
}

/// A queue that cannot get its slot registered would leave the kernel holding every
/// request: a REGISTER it must refuse (no such queue) turns io_uring off for the
/// mount, and requests go to /dev/fuse.
fn give_up_on_the_ring(fd: i32) {
    let refused = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(2)
        .map_err(|e| e.to_string())
        .and_then(|mut ring| {
            let slot = Slot::new();
            let entry = register_entry(fd, u16::MAX, &slot);
            let res = submit_and_wait(&mut ring, &entry).map_err(|e| e.to_string());
            std::mem::forget(slot);
            res.map(|_| ())
        });
    match refused {
        Ok(()) => log::warn!("FUSE io_uring: turned off for this mount; requests use /dev/fuse"),
        Err(e) => log::error!("FUSE io_uring: could not turn it off ({e}); requests may wait"),
    }
}

/// Parses the request in `slot`, serves it and leaves the reply in its place.
fn answer(adapter: &FuseAdapter, slot: &mut Slot, scratch: &mut Vec<u8>, access: Access) {
    let h = &slot.header.in_out;
    let req = Request {
        opcode: u32_at(h, 4),
        unique: u64_at(h, 8),
        nodeid: u64_at(h, 16),
        caller: Ctx {
            uid: u32_at(h, 24),
            gid: u32_at(h, 28),
            pid: u32_at(h, 32),
            umask: 0,
        },
    };
    let payload_len = (slot.header.payload_sz as usize).min(PAYLOAD_SIZE);
    log::debug!(
        "FUSE({}) ino {:#018x} {}",
        req.unique,
        req.nodeid,
        describe(req.opcode, &slot.payload[..payload_len])
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_slot(adapter, &req, slot, payload_len, scratch, access)
    }))
    .unwrap_or_else(|_| {
        // As fuser's loop answers a handler that panicked: the caller gets EIO
        // instead of waiting forever.
        log::error!("FUSE request {} panicked", req.unique);
        Err(FsError::Io("request handler panicked".into()))
    });
    let (error, len) = match result {
        Ok(len) => (0, len),
        Err(e) => (-errno_code(&e), 0),
    };
    let hdr = &mut slot.header;
    hdr.payload_sz = len as u32;
    hdr.in_out[..16].fill(0);
    hdr.in_out[0..4].copy_from_slice(&((16 + len) as u32).to_le_bytes());
    hdr.in_out[4..8].copy_from_slice(&error.to_le_bytes());
    hdr.in_out[8..16].copy_from_slice(&req.unique.to_le_bytes());
}

/// The request's name in the debug log, as fuser's loop writes it (with the
/// attribute name of xattr requests).
fn describe(opcode: u32, input: &[u8]) -> String {
    let op_name = opcode_name(opcode).map_or_else(|| format!("opcode {opcode}"), str::to_string);
    match opcode {
        GETXATTR | SETXATTR | REMOVEXATTR => match name(input) {
            Ok(n) => format!("{op_name} name {:?}", String::from_utf8_lossy(n)),
            Err(_) => op_name,
        },
        _ => op_name,
    }
}

/// Serves the request in `slot`; returns the reply's length in its payload buffer.
fn serve_slot(
    adapter: &FuseAdapter,
    req: &Request,
    slot: &mut Slot,
    payload_len: usize,
    scratch: &mut Vec<u8>,
    access: Access,
) -> Result<usize, FsError> {
    let op = slot.header.op_in;
    if !allowed(req, access) {
        Err(FsError::Access)
    } else if req.opcode == WRITE {
        // The one request with a large input and a small reply: its data is used
        // where the kernel put it, and the reply written after.
        write(adapter, req, &op, &slot.payload[..payload_len]).map(|n| {
            let mut out = Reply::new(&mut slot.payload);
            out.written(n);
            out.len
        })
    } else {
        // Names and xattr values (at most 64 KiB): copied out, since the reply
        // goes where they are.
        scratch.clear();
        scratch.extend_from_slice(&slot.payload[..payload_len]);
        let mut out = Reply::new(&mut slot.payload);
        serve(adapter, req, &op, scratch, &mut out).map(|()| out.len)
    }
}

struct Request {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    caller: Ctx,
}

fn allowed(req: &Request, access: Access) -> bool {
    match access {
        Access::Anyone => true,
        // What the kernel may send on behalf of no particular user.
        Access::OwnerOnly(uid) => {
            req.caller.uid == uid
                || matches!(
                    req.opcode,
                    DESTROY
                        | READ
                        | READDIR
                        | READDIRPLUS
                        | WRITE
                        | FSYNC
                        | FSYNCDIR
                        | RELEASE
                        | RELEASEDIR
                )
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The NUL-terminated names at the start of a payload; a missing NUL is EINVAL.
fn names<const N: usize>(payload: &[u8]) -> Result<([&[u8]; N], &[u8]), FsError> {
    let mut out = [&payload[..0]; N];
    let mut rest = payload;
    for name in out.iter_mut() {
        let end = rest.iter().position(|&c| c == 0).ok_or(FsError::Invalid)?;
        *name = &rest[..end];
        rest = &rest[end + 1..];
    }
    Ok((out, rest))
}

fn name(payload: &[u8]) -> Result<&[u8], FsError> {
    Ok(names::<1>(payload)?.0[0])
}

/// The reply being written into the slot's payload buffer.
struct Reply<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Reply<'_> {
    fn new(buf: &mut [u8]) -> Reply<'_> {
        Reply { buf, len: 0 }
    }

    fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn zeros(&mut self, n: usize) {
        self.buf[self.len..self.len + n].fill(0);
        self.len += n;
    }

    /// `struct fuse_attr`.
    fn attr(&mut self, a: &Attr, blksize: u32) {
        self.u64(a.ino);
        self.u64(a.size);
        self.u64(a.blocks);
        for t in [a.atime, a.mtime, a.ctime] {
            self.u64(t.sec as u64);
        }
        for t in [a.atime, a.mtime, a.ctime] {
            self.u32(t.nsec);
        }
        self.u32(to_kind_mode(a.kind) | u32::from(a.perm));
        self.u32(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u32(a.rdev);
        self.u32(blksize);
        self.u32(0);
    }

    /// `struct fuse_entry_out`.
    fn entry(&mut self, a: &Attr, ttl: Duration, blksize: u32) {
        self.u64(a.ino);
        self.u64(0);
        self.u64(ttl.as_secs());
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(ttl.subsec_nanos());
        self.attr(a, blksize);
    }

    /// `struct fuse_attr_out`.
    fn attr_out(&mut self, a: &Attr, ttl: Duration, blksize: u32) {
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(0);
        self.attr(a, blksize);
    }

    /// `struct fuse_open_out`.
    fn open(&mut self, fh: u64, flags: u32) {
        self.u64(fh);
        self.u32(flags);
        self.u32(0);
    }

    /// `struct fuse_write_out`.
    fn written(&mut self, n: u32) {
        self.u32(n);
        self.u32(0);
    }

    /// `struct fuse_dirent` (name padded to 8 bytes); false when it does not fit
    /// in `limit`.
    fn dirent(&mut self, limit: usize, ino: u64, next: u64, kind_mode: u32, name: &[u8]) -> bool {
        let len = dirent_len(name);
        if self.len + len > limit {
            return false;
        }
        self.u64(ino);
        self.u64(next);
        self.u32(name.len() as u32);
        self.u32(kind_mode >> 12);
        self.bytes(name);
        self.zeros(len - 24 - name.len());
        true
    }

    fn statfs(&mut self, s: &StatfsOut) {
        for v in [s.blocks, s.bfree, s.bfree, s.files, s.ffree] {
            self.u64(v);
        }
        for v in [s.bsize, s.namelen, s.frsize] {
            self.u32(v);
        }
        self.zeros(4 + 6 * 4);
    }
}

fn timestamp(sec: u64, nsec: u32) -> Timestamp {
    Timestamp {
        sec: sec as i64,
        nsec,
    }
}

fn set_time(valid: u32, set_bit: u32, now_bit: u32, at: Timestamp) -> Option<SetTime> {
    if valid & now_bit != 0 {
        Some(SetTime::Now)
    } else if valid & set_bit != 0 {
        Some(SetTime::At(at))
    } else {
        None
    }
}

/// `struct fuse_setattr_in` -> SetAttr.
fn set_attr(op: &[u8], caller: Ctx) -> SetAttr {
    let valid = u32_at(op, 0);
    let given = |bit: u32, v: u32| (valid & bit != 0).then_some(v);
    SetAttr {
        mode: given(FATTR_MODE, u32_at(op, 68)),
        uid: given(FATTR_UID, u32_at(op, 76)),
        gid: given(FATTR_GID, u32_at(op, 80)),
        size: (valid & FATTR_SIZE != 0).then(|| u64_at(op, 16)),
        atime: set_time(
            valid,
            FATTR_ATIME,
            FATTR_ATIME_NOW,
            timestamp(u64_at(op, 32), u32_at(op, 56)),
        ),
        mtime: set_time(
            valid,
            FATTR_MTIME,
            FATTR_MTIME_NOW,
            timestamp(u64_at(op, 40), u32_at(op, 60)),
        ),
        caller: Some(caller),
    }
}

/// One request: `op` is its fixed-size header, `input` what follows (names, data).
fn serve(
    fs: &FuseAdapter,
    req: &Request,
    op: &[u8; 128],
    input: &[u8],
    out: &mut Reply,
) -> Result<(), FsError> {
    let vol = &fs.volume;
    let ino = req.nodeid;
    let (ttl, blksize) = (fs.ttl, vol.superblock().block_size);
    match req.opcode {
        LOOKUP => out.entry(&fs.held(vol.lookup(ino, name(input)?))?, ttl, blksize),
        GETATTR => out.attr_out(&vol.getattr(ino)?, ttl, blksize),
        SETATTR => out.attr_out(&vol.setattr(ino, set_attr(op, req.caller))?, ttl, blksize),
        READLINK => out.bytes(&vol.readlink(ino)?),
        SYMLINK => {
            let ([link, target], _) = names::<2>(input)?;
            let a = fs.held(vol.symlink(req.caller, ino, link, target))?;
            out.entry(&a, ttl, blksize);
        }
        MKNOD => {
            let who = creator(req.caller, u32_at(op, 8));
            let a = fs.held(vol.mknod(who, ino, name(input)?, u32_at(op, 0), u32_at(op, 4)))?;
            out.entry(&a, ttl, blksize);
        }
        MKDIR => {
            let who = creator(req.caller, u32_at(op, 4));
            out.entry(
                &fs.held(vol.mkdir(who, ino, name(input)?, u32_at(op, 0)))?,
                ttl,
                blksize,
            );
        }
        UNLINK => vol.unlink(ino, name(input)?)?,
        RMDIR => vol.rmdir(ino, name(input)?)?,
        RENAME | RENAME2 => {
            let flags = if req.opcode == RENAME2 {
                u32_at(op, 8)
            } else {
                0
            };
            let ([from, to], _) = names::<2>(input)?;
            vol.rename(ino, from, u64_at(op, 0), to, rename_flags(flags)?)?;
        }
        LINK => {
            let a = fs.held(vol.link(u64_at(op, 0), ino, name(input)?))?;
            out.entry(&a, ttl, blksize);
        }
        OPEN => {
            let (fh, flags) = fs.open_file(ino, u32_at(op, 0) as i32)?;
            out.open(fh, flags.bits());
        }
        READ => {
            let size = (u32_at(op, 16) as usize).min(out.room());
            let data = vol.read_shared(ino, u64_at(op, 8), size as u32)?;
            out.bytes(data.as_slice());
        }
        STATFS => out.statfs(&fs.statfs_out()?),
        RELEASE | RELEASEDIR => vol.release(u64_at(op, 0))?,
        FSYNC => fs.fsync_file(ino, u64_at(op, 0))?,
        FSYNCDIR => vol.commit()?,
        SETXATTR => {
            let size = u32_at(op, 0) as usize;
            let ([key], value) = names::<1>(input)?;
            let value = value.get(..size).ok_or(FsError::Invalid)?;
            fs.set_xattr(&req.caller, ino, key, value, u32_at(op, 4) as i32)?;
        }
        GETXATTR => xattr(out, sized(u32_at(op, 0), vol.getxattr(ino, name(input)?))?),
        LISTXATTR => xattr(out, sized(u32_at(op, 0), vol.listxattr(ino))?),
        REMOVEXATTR => vol.removexattr(ino, name(input)?)?,
        FLUSH => fs.flush_file(ino, u64_at(op, 0))?,
        OPENDIR => out.open(vol.opendir(ino)?, 0),
        READDIR => {
            let limit = (u32_at(op, 16) as usize).min(out.buf.len());
            for (next, e) in fs.dir_entries(ino, u64_at(op, 0), u64_at(op, 8))? {
                if !out.dirent(limit, e.ino, next, to_kind_mode(e.kind), &e.name) {
                    break;
                }
            }
        }
        READDIRPLUS => {
            let limit = (u32_at(op, 16) as usize).min(out.buf.len());
            for (next, e, a) in fs.dir_entries_plus(ino, u64_at(op, 0), u64_at(op, 8))? {
                if out.len + ENTRY_OUT_LEN + dirent_len(&e.name) > limit {
                    break;
                }
                out.entry(&a, ttl, blksize);
                out.dirent(limit, e.ino, next, to_kind_mode(e.kind), &e.name);
                fs.held_listed(&e);
            }
        }
        ACCESS => fs.access_check(ino)?,
        CREATE => {
            let who = creator(req.caller, u32_at(op, 8));
            let (a, fh) = fs.create_file(who, ino, name(input)?, u32_at(op, 4))?;
            out.entry(&a, ttl, blksize);
            out.open(fh, fs.open_flags.bits());
        }
        IOCTL => return Err(FsError::NoIoctl),
        FALLOCATE => {
            let (offset, length) = (u64_at(op, 8), u64_at(op, 16));
            fs.fallocate_file(&req.caller, ino, offset, length, u32_at(op, 24) as i32)?;
        }
        LSEEK => {
            let at = fs.seek_file(ino, u64_at(op, 8) as i64, u32_at(op, 16) as i32)?;
            out.u64(at as u64);
        }
        COPY_FILE_RANGE => {
            let n = fs.copy_file(
                &req.caller,
                ino,
                u64_at(op, 8),
                u64_at(op, 16),
                u64_at(op, 32),
                u64_at(op, 40),
                u64_at(op, 48),
            )?;
            out.written(n);
        }
        DESTROY => {}
        // Locks, bmap, poll, syncfs, tmpfile, statx...: what fuser's loop answers
        // for the methods objfs leaves out.
        _ => return Err(FsError::LeftToKernel),
    }
    Ok(())
}

fn write(fs: &FuseAdapter, req: &Request, op: &[u8; 128], data: &[u8]) -> Result<u32, FsError> {
    let size = (u32_at(op, 16) as usize).min(data.len());
    let kill = u32_at(op, 20) & FUSE_WRITE_KILL_SUIDGID != 0;
    let drop_setid_for = kill.then_some(req.caller);
    fs.write_file(req.nodeid, u64_at(op, 8), &data[..size], drop_setid_for)
}

const ENTRY_OUT_LEN: usize = 40 + 88;

/// `struct fuse_dirent` with its name, padded to 8 bytes.
fn dirent_len(name: &[u8]) -> usize {
    (24 + name.len()).next_multiple_of(8)
}

fn xattr(out: &mut Reply, s: Sized) {
    match s {
        Sized::Size(n) => {
            out.u32(n);
            out.u32(0);
        }
        Sized::Data(v) => out.bytes(&v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8"), Some(5));
        assert_eq!(count_cpu_list("0,2-3"), Some(3));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn register_names_the_slot_and_its_two_iovecs() {
        let slot = Slot::new();
        let entry = register_entry(7, 1, &slot);
        // SAFETY: Entry128 is the 128-byte SQE.
        let raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
        assert_eq!(raw[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(i32::from_le_bytes(raw[4..8].try_into().unwrap()), 7);
        assert_eq!(u32_at(&raw, 8), CMD_REGISTER); // cmd_op
        assert_eq!(u64_at(&raw, 16), slot.iov.as_ptr() as u64); // addr
        assert_eq!(u32_at(&raw, 24), 2); // len: header and payload
        assert_eq!(u64_at(&raw, 48 + 8), 0); // commit_id
        assert_eq!(u16::from_le_bytes([raw[48 + 16], raw[48 + 17]]), 1); // qid
        let commit: [u8; 128] = unsafe { std::mem::transmute(commit_entry(7, 1, 99)) };
        assert_eq!(u32_at(&commit, 8), CMD_COMMIT_AND_FETCH);
        assert_eq!(u64_at(&commit, 48 + 8), 99);
    }

    #[test]
    fn names_need_their_nul() {
        let (n, rest) = names::<2>(b"a\0bc\0xyz").unwrap();
        assert_eq!(n, [&b"a"[..], &b"bc"[..]]);
        assert_eq!(rest, b"xyz");
        assert!(names::<1>(b"abc").is_err());
    }

    #[test]
    fn dirents_pad_to_eight_and_stop_at_the_limit() {
        let mut buf = vec![0u8; 64];
        let mut out = Reply::new(&mut buf);
        assert!(out.dirent(64, 5, 1, libc::S_IFREG, b"abc"));
        assert_eq!(out.len, 32);
        assert!(!out.dirent(64, 6, 2, libc::S_IFREG, b"0123456789"));
        assert_eq!(out.len, 32);
        assert_eq!(u32_at(out.buf, 20), libc::DT_REG as u32);
    }
}
