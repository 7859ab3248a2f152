//! Shared harness for tests that mount real FUSE filesystems in temp dirs.
//! Every command runs under `timeout`, and teardown always unmounts, so a hung mount
//! cannot hang the suite.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_objfs");

/// Runs a command with a time limit; returns its output.
pub fn run_with_timeout(secs: u64, program: &str, args: &[&str]) -> Output {
    run_with_env(secs, program, args, &[])
}

/// Like `run_with_timeout`, with extra environment variables.
pub fn run_with_env(secs: u64, program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a command that must succeed.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = run_with_timeout(300, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an unmount again while it fails with "busy". Tests run in parallel threads of
/// one process: a child another thread forks inherits every open descriptor until it
/// execs, so a file this thread has just closed can keep its mount busy for a moment.
pub fn retry_while_busy(mut unmount: impl FnMut() -> Output) -> Output {
    let mut out = unmount();
    for _ in 0..20 {
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = unmount();
    }
    out
}

/// A shell snippet that must succeed.
pub fn bash(script: &str) -> String {
    sh("bash", &["-euo", "pipefail", "-c", script])
}

pub fn objfs(args: &[&str]) -> Output {
    run_with_timeout(120, BIN, args)
}

pub fn objfs_ok(args: &[&str]) -> String {
    let out = objfs(args);
    assert!(
        out.status.success(),
        "objfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn is_mountpoint(dir: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pid of the daemon serving `dir`, found by its command line.
pub fn daemon_pids(dir: &Path) -> Vec<u32> {
    processes_serving(dir)
        .into_iter()
        .filter(|(_, comm)| comm == "objfs")
        .map(|(pid, _)| pid)
        .collect()
}

/// Live processes whose command line is a mount of `dir`, with their names.
pub fn processes_serving(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'));
        if !zombie && args.iter().any(|a| a == "mount") && args.contains(&needle) {
            found.push((pid, comm.trim().to_string()));
        }
    }
    found
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A store and a mountpoint in a temp dir; unmounted on drop whatever happened.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    /// The local store directory (for local-store fixtures).
    pub store: PathBuf,
    /// The STORE argument given to objfs.
    pub spec: String,
    /// Environment for objfs commands (S3 credentials and endpoint).
    pub env: Vec<(String, String)>,
    pub mnt: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
}

impl Fixture {
    pub fn new() -> Fixture {
        assert_eq!(unsafe { libc::geteuid() }, 0, "mount tests run as root");
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let log = tmp.path().join("objfs.log");
        Fixture {
            tmp,
            spec: store.to_string_lossy().into_owned(),
            store,
            env: Vec::new(),
            mnt,
            log,
            extra: Vec::new(),
        }
    }

    /// A fixture for another kind of store (e.g. s3://...), with its environment.
    pub fn with_store(spec: &str, env: &[(&str, String)]) -> Fixture {
        let mut f = Fixture::new();
        f.spec = spec.to_string();
        f.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        f
    }

    /// Runs objfs with this fixture's environment.
    pub fn objfs(&self, args: &[&str]) -> Output {
        run_with_env(120, BIN, args, &self.env)
    }

    pub fn objfs_ok(&self, args: &[&str]) -> String {
        let out = self.objfs(args);
        assert!(
            out.status.success(),
            "objfs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fixture already mounted read-write.
    pub fn mounted() -> Fixture {
        let f = Fixture::new();
        f.mount();
        f
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn mount_args(&self) -> Vec<String> {
        let mut args = vec![
            "mount".to_string(),
            self.spec.clone(),
            self.mnt.to_string_lossy().into_owned(),
            "--log-file".to_string(),
            self.log.to_string_lossy().into_owned(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }

    pub fn try_mount(&self) -> Output {
        let args = self.mount_args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.objfs(&refs)
    }

    /// A second mount of the same store at `dir`, with `extra` options.
    pub fn try_mount_at(&self, dir: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "mount",
            self.spec.as_str(),
            dir.to_str().unwrap(),
            "--log-file",
            self.log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.objfs(&args)
    }

    pub fn mount(&self) {
        let out = self.try_mount();
        assert!(
            out.status.success(),
            "mount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        assert!(is_mountpoint(&self.mnt), "mount returned but is not live");
    }

    pub fn umount(&self) {
        let out = retry_while_busy(|| objfs(&["umount", self.mnt.to_str().unwrap()]));
        assert!(
            out.status.success(),
            "umount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        assert!(!is_mountpoint(&self.mnt));
    }

    pub fn remount(&self) {
        self.umount();
        self.mount();
    }

    /// A crash: SIGKILLs the one daemon serving the mount and waits until it is gone,
    /// leaving a dead mount behind.
    pub fn kill_daemon(&self) {
        let pids = daemon_pids(&self.mnt);
        assert_eq!(pids.len(), 1, "daemons serving {}", self.mnt.display());
        unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(10), || daemon_pids(&self.mnt)
                .is_empty()),
            "the killed daemon did not go away"
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn store_str(&self) -> &str {
        &self.spec
    }

    pub fn mnt_str(&self) -> &str {
        self.mnt.to_str().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if is_mountpoint(&self.mnt) {
            let out = objfs(&["umount", self.mnt.to_str().unwrap(), "--timeout", "60"]);
            if !out.status.success() || is_mountpoint(&self.mnt) {
                let _ = run_with_timeout(30, "umount", &["-l", self.mnt.to_str().unwrap()]);
            }
        }
        for pid in daemon_pids(&self.mnt) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = run_with_timeout(30, "umount", &["-l", self.mnt.to_str().unwrap()]);
    }
}

/// Builds a tree of assorted files (sizes around block edges, empty files, symlinks,
/// hard links, nested dirs, odd names, modes, old mtimes) under `root`.
pub fn make_sample_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("name with spaces/ünïcödé")).unwrap();
    let sizes = [
        0usize,
        1,
        100,
        4095,
        4096,
        4097,
        65536,
        1 << 20,
        (1 << 20) + 1,
        3 * (1 << 20) + 12345,
    ];
    for (i, size) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..*size).map(|j| ((j * 31 + i * 7) % 253) as u8).collect();
        std::fs::write(root.join(format!("a/file{i}.bin")), &data).unwrap();
    }
    std::fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    std::fs::write(
        root.join("name with spaces/ünïcödé/x y.txt"),
        b"odd names\n",
    )
    .unwrap();
    std::fs::write(root.join("exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("exec.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("private"), b"secret").unwrap();
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link-to-deep")).unwrap();
    std::os::unix::fs::symlink("does-not-exist", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("a/file2.bin"), root.join("hardlink.bin")).unwrap();
    bash(&format!(
        "touch -h -d '2001-02-03 04:05:06.123456789' '{}'/a/file1.bin '{}'/link-to-deep",
        root.display(),
        root.display()
    ));
}
