//! The command line's contract: mount/umount life cycle, errors, signals, dead mounts.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn first_mount_creates_the_filesystem_and_returns_once_live() {
    let f = Fixture::new();
    let out = f.try_mount();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `$(objfs mount ...)` returned, so the daemon let go of our stdout/stderr.
    assert!(String::from_utf8_lossy(&out.stdout).contains("created a new objfs filesystem"));
    assert!(is_mountpoint(&f.mnt));
    assert_eq!(daemon_pids(&f.mnt).len(), 1, "exactly one daemon per mount");
    std::fs::write(f.path("hello"), b"world").unwrap();
    f.remount();
    assert_eq!(std::fs::read(f.path("hello")).unwrap(), b"world");
    // A second mount of a store that exists says nothing about creating one.
    f.umount();
    let out = f.try_mount();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("created"));
    // Nothing of objfs's own shows inside the tree.
    let names: Vec<_> = std::fs::read_dir(&f.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("hello")]);
    // Two clean mounts and unmounts: nothing in the log reads like a problem.
    f.umount();
    let log = f.log_text();
    assert!(log.contains("everything is in the store"), "{log}");
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

#[test]
fn umount_errors_are_clear() {
    let f = Fixture::new();
    let out = objfs(&["umount", f.mnt_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not mounted"));
    f.mount();
    // Busy: a process holds a file open; the mount stays.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(&f.mnt)
        .spawn()
        .unwrap();
    let out = objfs(&["umount", f.mnt_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mountpoint(&f.mnt));
    child.kill().unwrap();
    child.wait().unwrap();
    f.umount();
}

fn expect_err(args: &[&str], needle: &str) {
    let out = objfs(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn mount_errors_are_one_line_and_change_nothing() {
    let f = Fixture::new();
    let store = f.store_str();
    // Read-only mount of nothing never creates anything.
    expect_err(
        &["mount", store, f.mnt_str(), "--read-only"],
        "does not exist",
    );
    assert!(!f.store.exists());
    let file = f.tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    expect_err(&["mount", store, file.to_str().unwrap()], "not a directory");
    expect_err(&["mount", store, "/nonexistent/mnt"], "does not exist");
    expect_err(
        &["mount", store, f.mnt_str(), "-o", "bogus"],
        "unknown mount option",
    );
    expect_err(
        &["mount", store, f.mnt_str(), "--cache-size", "lots"],
        "invalid size",
    );
    expect_err(
        &["mount", store, f.mnt_str(), "--cache-size", "9999999T"],
        "out of range",
    );
    // A directory holding other things is not taken over.
    let foreign = f.tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("photo.jpg"), b"jpeg").unwrap();
    expect_err(
        &["mount", foreign.to_str().unwrap(), f.mnt_str()],
        "does not hold an objfs filesystem",
    );
    expect_err(&["mkfs", foreign.to_str().unwrap()], "not empty");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    // mkfs then mkfs again.
    objfs_ok(&["mkfs", store, "--block-size", "64K"]);
    expect_err(&["mkfs", store], "already holds");
    expect_err(
        &[
            "mkfs",
            f.tmp.path().join("x").to_str().unwrap(),
            "--block-size",
            "1000",
        ],
        "power of two",
    );
    f.mount();
    expect_err(&["mount", store, f.mnt_str()], "already mounted");
    let out = objfs_ok(&["stat", store]);
    assert!(out.contains("block size:     64.0 KiB"), "{out}");
}

#[test]
fn sigterm_flushes_and_the_store_remounts() {
    let f = Fixture::mounted();
    bash(&format!(
        "cp -a {}/src {}/",
        env!("CARGO_MANIFEST_DIR"),
        f.mnt_str()
    ));
    bash(&format!(
        "dd if=/dev/urandom of={}/rand bs=64k count=40 status=none",
        f.mnt_str()
    ));
    let sum = bash(&format!("md5sum < {}/rand", f.mnt_str()));
    let pids = daemon_pids(&f.mnt);
    assert_eq!(pids.len(), 1);
    unsafe { libc::kill(pids[0] as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(30), || daemon_pids(&f.mnt).is_empty()));
    assert!(!is_mountpoint(&f.mnt));
    f.mount();
    assert_eq!(bash(&format!("md5sum < {}/rand", f.mnt_str())), sum);
    bash(&format!(
        "diff -r {}/src {}/src",
        env!("CARGO_MANIFEST_DIR"),
        f.mnt_str()
    ));
}

#[test]
fn plain_umount_also_flushes() {
    let f = Fixture::mounted();
    std::fs::write(f.path("a"), vec![3u8; 3 << 20]).unwrap();
    let out = retry_while_busy(|| run_with_timeout(60, "umount", &[f.mnt_str()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Right away: a daemon still flushing is waited for, not reported as a second writer.
    f.mount();
    assert_eq!(std::fs::read(f.path("a")).unwrap(), vec![3u8; 3 << 20]);
}

#[test]
fn killed_daemon_leaves_a_dead_mount_that_is_cleaned_up() {
    let f = Fixture::mounted();
    bash(&format!(
        "printf durable > {0}/kept && sync {0}/kept && python3 -c \"import os; fd=os.open('{0}/kept', os.O_RDONLY); os.fsync(fd)\"",
        f.mnt_str()
    ));
    f.kill_daemon();
    // The mount is dead ("Transport endpoint is not connected"); statfs always asks
    // the daemon, while stat may be answered from the attribute cache.
    let out = run_with_timeout(30, "stat", &["-f", f.mnt_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not connected") || err.contains("connection abort"),
        "{err}"
    );
    let out = objfs_ok(&["umount", f.mnt_str()]);
    assert!(out.contains("dead mount"), "{out}");
    assert!(!is_mountpoint(&f.mnt));
    f.mount();
    assert_eq!(std::fs::read(f.path("kept")).unwrap(), b"durable");
    // And a mount over a dead mount just works.
    f.kill_daemon();
    f.mount();
    assert_eq!(std::fs::read(f.path("kept")).unwrap(), b"durable");
}

#[test]
fn dash_o_options_and_read_only_mounts() {
    let f = Fixture::mounted();
    std::fs::write(f.path("f"), b"data").unwrap();
    f.umount();
    let out = objfs(&[
        "mount",
        f.store_str(),
        f.mnt_str(),
        "--log-file",
        f.log.to_str().unwrap(),
        "-o",
        "ro,cache_size=32M,commit_interval=2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(f.path("f")).unwrap(), b"data");
    let err = std::fs::write(f.path("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    f.umount();
}

#[test]
fn help_names_the_log_file() {
    let out = objfs_ok(&["mount", "--help"]);
    assert!(out.contains("--log-file"));
    assert!(out.contains(".local/state/objfs"));
    for cmd in ["mkfs", "umount", "stat", "fsck"] {
        objfs_ok(&[cmd, "--help"]);
    }
}

#[test]
fn umount_waits_for_the_final_flush_even_under_another_binary_name() {
    let f = Fixture::new();
    let renamed = f.tmp.path().join("objfs-1.0-renamed");
    // Copied by a child process: a copy written by this one could still be open for
    // writing in a child another test thread forks meanwhile, and exec would fail
    // with "Text file busy".
    bash(&format!("cp '{BIN}' '{}'", renamed.display()));
    let bin = renamed.to_str().unwrap();
    let (store, mnt, log) = (f.store_str(), f.mnt_str(), f.log.to_str().unwrap());
    // Nothing is committed in the background: everything waits for the unmount.
    let out = run_with_timeout(
        60,
        bin,
        &[
            "mount",
            store,
            mnt,
            "--log-file",
            log,
            "--commit-interval",
            "3600",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bash(&format!(
        "cd '{mnt}' && for d in $(seq 20); do mkdir d$d; for i in $(seq 100); do head -c 6000 /dev/urandom > d$d/f$i; done; done"
    ));
    let out = run_with_timeout(120, bin, &["umount", mnt]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = processes_serving(&f.mnt);
    assert!(
        left.is_empty(),
        "umount returned before the daemon exited: {left:?}"
    );
    assert!(objfs_ok(&["fsck", store]).contains("clean"));
    f.mount();
    let n = bash(&format!("find '{mnt}' -type f | wc -l"));
    assert_eq!(n.trim(), "2000");
}

fn stored_block_bytes(store: &std::path::Path) -> (u64, Vec<std::path::PathBuf>) {
    let mut total = 0;
    let mut files = Vec::new();
    for dir in std::fs::read_dir(store.join("blocks")).unwrap() {
        for e in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let e = e.unwrap();
            total += e.metadata().unwrap().len();
            files.push(e.path());
        }
    }
    (total, files)
}

#[test]
fn mkfs_compression_zstd_stores_compressible_blocks_smaller_and_reads_them_back() {
    let f = Fixture::new();
    expect_err(
        &["mkfs", f.store_str(), "--compression", "lz5"],
        "unknown codec",
    );
    assert!(!f.store.exists(), "a refused mkfs created the store");
    objfs_ok(&["mkfs", f.store_str(), "--compression", "zstd"]);
    f.mount();
    // 6.9 MB of text, and 3 MiB of random bytes (stored plain: zstd cannot shrink them).
    bash(&format!(
        "seq 1 1000000 > {m}/text && head -c 3M /dev/urandom > {m}/random && cp {m}/random {t}/random",
        m = f.mnt_str(),
        t = f.tmp.path().display()
    ));
    f.umount();
    let (stored, blocks) = stored_block_bytes(&f.store);
    let logical = 6_888_896 + (3 << 20);
    assert!(
        stored < 3_500_000 + (3 << 20) / 10 * 11,
        "{stored} bytes stored for {logical}"
    );
    let out = objfs_ok(&["stat", f.store_str()]);
    assert!(out.contains("compression:    zstd"), "{out}");
    // stat sums the objects' sizes as stored, after compression.
    assert!(
        out.contains(&format!("in the store:   {stored} (")),
        "{stored}: {out}"
    );
    assert!(
        out.contains(&format!(
            "in {} block objects, compressed to ",
            blocks.len()
        )),
        "{out}"
    );
    assert!(compressed_percent(&out) < 75.0, "{out}");
    let out = objfs_ok(&["fsck", f.store_str(), "--verify-data"]);
    assert!(out.contains("clean"), "{out}");
    f.mount();
    bash("sync; echo 3 > /proc/sys/vm/drop_caches");
    bash(&format!(
        "seq 1 1000000 | cmp - {m}/text && cmp {t}/random {m}/random",
        m = f.mnt_str(),
        t = f.tmp.path().display()
    ));
    f.umount();
    // A damaged compressed block is an I/O error, never wrong bytes.
    let smallest = blocks
        .iter()
        .min_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(smallest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(smallest, &bytes).unwrap();
    f.mount();
    bash("sync; echo 3 > /proc/sys/vm/drop_caches");
    let out = run_with_timeout(60, "cat", &[f.path("text").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The percentage in `objfs stat`'s "compressed to N% of their plain size".
fn compressed_percent(stat: &str) -> f64 {
    let rest = stat
        .split("compressed to ")
        .nth(1)
        .expect("a compression figure");
    rest.split('%').next().unwrap().parse().unwrap()
}
