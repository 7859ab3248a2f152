//! `objfs mount` and `objfs umount`: the daemon's life cycle. The parent validates,
//! forks a daemon, and returns only once the daemon reports the mount live.

use crate::cli::{MountArgs, MountSettings};
use crate::fs::{Volume, VolumeConfig};
use crate::fuse::FuseAdapter;
use crate::index::journal::{self, IndexError};
use crate::store::{ObjectStore, StoreError, StoreLocation};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

type CliResult<T> = Result<T, String>;

pub fn mount(args: &MountArgs) -> CliResult<()> {
    let mut settings = args.settings()?;
    if let Some(dir) = &settings.cache_dir {
        settings.cache_dir = Some(absolute(dir)?);
    }
    let location = match StoreLocation::parse_with(&args.store, &settings.store)? {
        StoreLocation::Local(p) => StoreLocation::Local(absolute(&p)?),
        other => other,
    };
    let mountpoint = prepare_mountpoint(&args.mountpoint)?;
    let log_file = match &settings.log_file {
        Some(p) => absolute(p)?,
        None => default_log_file(&mountpoint),
    };
    let target = Target {
        location,
        spec: args.store.clone(),
        mountpoint,
    };
    if args.foreground {
        init_logging();
        return serve(&target, &settings, &mut Reporter(None));
    }
    let log = open_log(&log_file)?;
    let (read_end, write_end) = pipe()?;
    let log2 = log.try_clone().map_err(|e| format!("log file: {e}"))?;
    // Nothing that starts threads (store clients, runtimes) may run before this fork.
    match daemonize::Daemonize::new()
        .working_directory("/")
        .umask(0o022)
        .stdout(log)
        .stderr(log2)
        .execute()
    {
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(write_end);
            wait_for_daemon(read_end, &log_file)
        }
        daemonize::Outcome::Parent(Err(e)) => Err(format!("could not start the daemon: {e}")),
        daemonize::Outcome::Child(Ok(_)) => {
            drop(read_end);
            init_logging();
            let mut reporter = Reporter(Some(File::from(write_end)));
            let code = match serve(&target, &settings, &mut reporter) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
        daemonize::Outcome::Child(Err(e)) => {
            let mut w = File::from(write_end);
            let _ = writeln!(w, "ERR could not daemonize: {e}");
            std::process::exit(1);
        }
    }
}

/// What to mount where.
struct Target {
    location: StoreLocation,
    spec: String,
    mountpoint: PathBuf,
}

/// Tells the user what happens during start-up: through the readiness pipe to the
/// waiting parent, or straight to stdout in the foreground.
struct Reporter(Option<File>);

impl Reporter {
    fn say(&mut self, msg: &str) {
        match &mut self.0 {
            Some(pipe) => {
                let _ = writeln!(pipe, "MSG {msg}");
            }
            None => println!("{msg}"),
        }
    }

    /// The mount is live (or failed): the parent may exit now.
    fn finish(&mut self, result: Result<(), &str>) {
        match (self.0.take(), result) {
            (Some(mut pipe), Ok(())) => {
                let _ = writeln!(pipe, "OK");
            }
            (Some(mut pipe), Err(msg)) => {
                let _ = writeln!(pipe, "ERR {msg}");
            }
            (None, Ok(())) => {}
            // In the foreground the caller prints the error.
            (None, Err(_)) => {}
        }
    }
}

fn wait_for_daemon(read_end: OwnedFd, log_file: &Path) -> CliResult<()> {
    let mut msg = String::new();
    let _ = File::from(read_end).read_to_string(&mut msg);
    for line in msg.lines() {
        if let Some(text) = line.strip_prefix("MSG ") {
            println!("{text}");
        } else if line == "OK" {
            return Ok(());
        } else if let Some(reason) = line.strip_prefix("ERR ") {
            return Err(reason.to_string());
        }
    }
    Err(format!(
        "the daemon exited during start-up; see {}",
        log_file.display()
    ))
}

fn absolute(p: &Path) -> CliResult<PathBuf> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// A STORE ready to mount: created on a first read-write mount of a blank location.
pub fn open_or_create(
    location: &StoreLocation,
    spec: &str,
    read_only: bool,
    say: &mut dyn FnMut(&str),
) -> CliResult<Arc<dyn ObjectStore>> {
    if !read_only && location.is_blank() {
        let store = location.open(true).map_err(|e| format!("{spec}: {e}"))?;
        let sb = journal::mkfs(&*store, crate::index::superblock::DEFAULT_BLOCK_SIZE)
            .map_err(|e| format!("{spec}: {e}"))?;
        say(&format!(
            "created a new objfs filesystem in {spec} (uuid {})",
            sb.uuid
        ));
        return Ok(store);
    }
    let store = location.open(false).map_err(|e| match e {
        StoreError::NotFound(_) => format!("{spec}: store does not exist"),
        e => format!("{spec}: {e}"),
    })?;
    let hint = if matches!(location, StoreLocation::S3(_)) {
        format!(" (create one with: objfs mkfs {spec})")
    } else {
        String::new()
    };
    journal::read_superblock(&*store).map_err(|e| match e {
        IndexError::NotObjfs(_) if read_only => {
            format!("{spec} does not hold an objfs filesystem (a read-only mount never creates one){hint}")
        }
        IndexError::NotObjfs(_) if !hint.is_empty() => {
            format!("{spec} does not hold an objfs filesystem{hint}")
        }
        IndexError::NotObjfs(_) => format!(
            "{spec} is not empty and does not hold an objfs filesystem; refusing to use it"
        ),
        e => format!("{spec}: {e}"),
    })?;
    Ok(store)
}

fn prepare_mountpoint(path: &Path) -> CliResult<PathBuf> {
    let abs = absolute(path)?;
    if mount_state(&abs) == MountState::Dead {
        // A dead mount left by a killed daemon: clear it and reuse the directory.
        log::info!("clearing dead mount at {}", abs.display());
        detach(&abs)?;
    }
    match std::fs::metadata(&abs) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("mountpoint {} does not exist", abs.display()));
        }
        Err(e) => return Err(format!("mountpoint {}: {e}", abs.display())),
        Ok(m) if !m.is_dir() => {
            return Err(format!("mountpoint {} is not a directory", abs.display()));
        }
        Ok(_) => {}
    }
    let canonical = abs
        .canonicalize()
        .map_err(|e| format!("mountpoint {}: {e}", abs.display()))?;
    if mount_state(&canonical) != MountState::NotMounted {
        return Err(format!("{} is already mounted", canonical.display()));
    }
    Ok(canonical)
}

#[derive(Debug, PartialEq, Eq)]
enum MountState {
    NotMounted,
    Live,
    /// Still in the mount table, but its daemon is gone.
    Dead,
}

fn mount_state(path: &Path) -> MountState {
    if !is_mounted(path) {
        return MountState::NotMounted;
    }
    let Ok(c) = c_path(path) else {
        return MountState::Live;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // statfs always reaches the daemon (stat may be answered from the attribute cache).
    // SAFETY: c is a valid path and st a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    let err = std::io::Error::last_os_error().raw_os_error();
    if rc != 0 && matches!(err, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)) {
        MountState::Dead
    } else {
        MountState::Live
    }
}

fn open_log(path: &Path) -> CliResult<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("log directory {}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("log file {}: {e}", path.display()))
}

/// fuser warns "Unmount failed" at every clean unmount (the kernel has already
/// unmounted when its session ends): kept out of the default log, where it reads
/// like a failure. RUST_LOG replaces the whole filter.
const DEFAULT_LOG_FILTER: &str = "info,fuser::mnt=error";

fn init_logging() {
    let env = env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        log::error!("internal error: {info}");
    }));
}

fn pipe() -> CliResult<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe(2) just returned these two fresh descriptors; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs the mount until it is unmounted or the daemon is told to stop.
fn serve(target: &Target, settings: &MountSettings, reporter: &mut Reporter) -> CliResult<()> {
    tune_malloc();
    match start(target, settings, reporter) {
        Ok((volume, session, ring, background)) => {
            reporter.finish(Ok(()));
            run_until_unmounted(volume, session, ring, background, &target.mountpoint)
        }
        Err(msg) => {
            reporter.finish(Err(&msg));
            Err(msg)
        }
    }
}

type Started = (
    Arc<Volume>,
    fuser::BackgroundSession,
    crate::fuse::RingTransport,
    Option<crate::fs::Background>,
);

/// Keeps the daemon's RSS close to what it uses. Buffers of 256 KiB and more are
/// mappings of their own (`alloc::PageAlignedLarge`), unmapped exactly when freed; a
/// fixed mmap threshold keeps glibc from adapting it upwards for the sizes below that,
/// and fewer arenas keep small objects together. (glibc's defaults let writing 4 GiB
/// with `--memory-limit 256M` peak at 270-330 MiB RSS; the cache's buffer pool makes up
/// for the page faults that exact unmapping costs.) Must run before any thread starts.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; no thread is running yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Opens (or creates) the store, loads the index, takes the lease and mounts.
fn start(target: &Target, settings: &MountSettings, reporter: &mut Reporter) -> CliResult<Started> {
    let mountpoint = target.mountpoint.as_path();
    let store = open_or_create(
        &target.location,
        &target.spec,
        settings.read_only,
        &mut |m| reporter.say(m),
    )?;
    let config = VolumeConfig {
        read_only: settings.read_only,
        cache_size: settings.cache_size,
        dirty_limit: settings.dirty_limit,
        memory_limit: settings.memory_limit,
        disk_cache: disk_cache(&target.location, settings),
        commit_interval: Duration::from_secs(settings.commit_interval_secs),
        upload_threads: settings.upload_threads,
        lease_ttl: Duration::from_secs(settings.lease_ttl_secs),
        mountpoint: mountpoint.display().to_string(),
        snapshot_segments: settings.snapshot_every,
        posix_acls: settings.posix_acls,
        writeback_cache: settings.writeback_cache,
        prefetch_workers: if target.location.is_remote() {
            crate::fs::REMOTE_PREFETCH_WORKERS
        } else {
            crate::fs::LOCAL_PREFETCH_WORKERS
        },
        ..VolumeConfig::default()
    };
    let describe = store.describe();
    let volume = load_waiting_for_predecessor(store, config)
        .map(Arc::new)
        .map_err(|e| format!("{describe}: {e}"))?;
    for w in &volume.load_report().warnings {
        log::warn!("recovery: {w}");
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![
        fuser::MountOption::FSName(format!("objfs:{describe}")),
        fuser::MountOption::Subtype("objfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if settings.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    fuse_config.acl = if settings.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    fuse_config.n_threads = Some(settings.threads);
    fuse_config.clone_fd = true;
    let notifier = Arc::new(std::sync::OnceLock::new());
    let adapter_settings = crate::fuse::AdapterSettings {
        request_threads: settings.threads,
        open_requests: settings.open_requests,
    };
    let adapter = FuseAdapter::new(volume.clone(), notifier.clone(), adapter_settings);
    let access = if settings.allow_other {
        crate::fuse::Access::Anyone
    } else {
        // SAFETY: geteuid has no preconditions.
        crate::fuse::Access::OwnerOnly(unsafe { libc::geteuid() })
    };
    // Before the mount: fuser handles INIT while mounting, and whether INIT asks for
    // io_uring depends on the queue threads being ready.
    let ring =
        crate::fuse::RingTransport::prepare(&adapter, settings.io_uring, settings.threads, access);
    let mounting = |e: std::io::Error| format!("mounting {}: {e}", mountpoint.display());
    let session = fuser::Session::new(adapter, mountpoint, &fuse_config).map_err(mounting)?;
    let dev = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .map_err(mounting)?;
    ring.attach(dev);
    let session = session.spawn().map_err(mounting)?;
    let _ = notifier.set(session.notifier());
    raise_readahead(mountpoint);
    let background = (!settings.read_only).then(|| volume.start_background());
    if settings.read_only {
        crate::fuse::spawn_follower(
            volume.clone(),
            session.notifier(),
            Duration::from_secs(settings.refresh_secs),
        );
    }
    write_pid_file(&pid_file_for(mountpoint));
    log::info!(
        "mounted {describe} at {} ({})",
        mountpoint.display(),
        if settings.read_only {
            "read-only"
        } else {
            "read-write"
        }
    );
    Ok((volume, session, ring, background))
}

/// The kernel reads FUSE files ahead by only 128 KiB unless the mount's bdi says
/// more; 4 MiB lets sequential reads arrive as 1 MiB requests.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "4096") {
        log::debug!("could not raise readahead ({knob}): {e}");
    }
}

fn run_until_unmounted(
    volume: Arc<Volume>,
    session: fuser::BackgroundSession,
    ring: crate::fuse::RingTransport,
    background: Option<crate::fs::Background>,
    mountpoint: &Path,
) -> CliResult<()> {
    spawn_signal_handler(volume.clone(), mountpoint.to_path_buf());
    if let Err(e) = session.join() {
        log::warn!("FUSE session ended with: {e}");
    }
    ring.join();
    if let Some(bg) = background {
        bg.stop();
    }
    let result = volume.shutdown();
    let _ = std::fs::remove_file(pid_file_for(mountpoint));
    match result {
        Ok(()) => {
            log::info!(
                "unmounted {}; everything is in the store",
                mountpoint.display()
            );
            Ok(())
        }
        Err(e) => Err(format!(
            "final flush failed, changes since the last commit may be lost: {e}"
        )),
    }
}

/// The disk tier: on by default only where the store is remote.
fn disk_cache(location: &StoreLocation, settings: &MountSettings) -> Option<(PathBuf, u64)> {
    let default = if location.is_unbounded() { 4 << 30 } else { 0 };
    let size = settings.disk_cache_size.unwrap_or(default);
    if size == 0 {
        return None;
    }
    let dir = settings.cache_dir.clone().unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("objfs-{}", unsafe { libc::geteuid() }))
            })
            .join("objfs")
    });
    Some((dir, size))
}

/// A daemon on this machine whose mount is already gone is still flushing (after a
/// plain `umount DIR`): wait for it, a bounded time, instead of failing.
fn load_waiting_for_predecessor(
    store: Arc<dyn ObjectStore>,
    config: VolumeConfig,
) -> Result<Volume, crate::fs::FsError> {
    let deadline = Instant::now() + PREDECESSOR_WAIT;
    loop {
        match Volume::load(store.clone(), config.clone()) {
            Err(crate::fs::FsError::Lease(e)) => {
                let finishing = match &*e {
                    crate::lease::LeaseError::Held(h) => {
                        h.is_local()
                            && !h.mountpoint.is_empty()
                            && !is_mounted(Path::new(&h.mountpoint))
                    }
                    _ => false,
                };
                if !finishing || Instant::now() >= deadline {
                    return Err(crate::fs::FsError::Lease(e));
                }
                log::info!("waiting for the previous daemon to finish: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

const PREDECESSOR_WAIT: Duration = Duration::from_secs(120);

fn spawn_signal_handler(volume: Arc<Volume>, mountpoint: PathBuf) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            log::info!("signal {sig}: flushing and unmounting");
            if let Err(e) = volume.sync_all() {
                log::error!("flush on signal failed: {e}");
            }
            if let Err(e) = unmount(&mountpoint, false) {
                log::warn!("{e}; detaching instead");
                let _ = detach(&mountpoint);
            }
        }
    });
}

fn c_path(path: &Path) -> CliResult<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())
}

fn unmount(path: &Path, lazy: bool) -> CliResult<()> {
    let c = c_path(path)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => Err(format!(
            "{} is busy (a process is using it); not unmounted",
            path.display()
        )),
        Some(libc::EPERM) => fusermount_unmount(path, lazy),
        Some(libc::EINVAL) => Err(format!("{} is not mounted", path.display())),
        _ => Err(format!("unmounting {}: {err}", path.display())),
    }
}

/// Non-root users unmount through the setuid helper.
fn fusermount_unmount(path: &Path, lazy: bool) -> CliResult<()> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" }).arg(path);
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(format!("fusermount3 could not unmount {}", path.display())),
        Err(_) => Err(format!(
            "permission denied unmounting {} (and fusermount3 is not installed)",
            path.display()
        )),
    }
}

fn detach(path: &Path) -> CliResult<()> {
    unmount(path, true)
}

/// Mount points from /proc/self/mountinfo (octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mount_field(field))))
        .collect()
}

fn unescape_mount_field(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

fn runtime_dir() -> PathBuf {
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/objfs")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("objfs")
    } else {
        std::env::temp_dir().join(format!("objfs-{}", unsafe { libc::geteuid() }))
    }
}

fn mount_tag(mountpoint: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(mountpoint.as_os_str().as_bytes());
    let name: String = mountpoint
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .take(32)
                .collect()
        })
        .unwrap_or_default();
    format!("{name}-{}", &hex::encode(digest)[..12])
}

fn pid_file_for(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(format!("{}.pid", mount_tag(mountpoint)))
}

fn default_log_file(mountpoint: &Path) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("objfs-{}", unsafe { libc::geteuid() }))
        });
    base.join("objfs")
        .join(format!("{}.log", mount_tag(mountpoint)))
}

fn write_pid_file(path: &Path) {
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, format!("{}\n", std::process::id())));
    if let Err(e) = result {
        log::warn!(
            "pid file {}: {e} (objfs umount will not wait for this daemon)",
            path.display()
        );
    }
}

/// True while `pid` is a live (not zombie) objfs process.
fn daemon_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    // A reused pid runs another program; the daemon runs this one, whatever the
    // binary is called.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ours = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    !matches!(state, Some('Z') | Some('X') | None) && comm.trim() == ours.trim()
}

pub fn umount(mountpoint: &Path, timeout: Duration) -> CliResult<()> {
    let abs = absolute(mountpoint)?;
    if mount_state(&abs) == MountState::Dead {
        detach(&abs)?;
        let _ = std::fs::remove_file(pid_file_for(&abs));
        println!(
            "cleaned up dead mount at {} (its daemon was gone)",
            abs.display()
        );
        return Ok(());
    }
    if !abs.exists() {
        return Err(format!("{} does not exist", abs.display()));
    }
    let canonical = abs
        .canonicalize()
        .map_err(|e| format!("{}: {e}", abs.display()))?;
    if !is_mounted(&canonical) {
        return Err(format!("{} is not mounted", canonical.display()));
    }
    let pid_file = pid_file_for(&canonical);
    let pid: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    unmount(&canonical, false)?;
    let Some(pid) = pid else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    while daemon_alive(pid) {
        if Instant::now() >= deadline {
            return Err(format!(
                "unmounted, but the daemon (pid {pid}) is still flushing after {}s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount_field("/a\\040b"), b"/a b");
        assert_eq!(unescape_mount_field("/plain"), b"/plain");
    }
}
