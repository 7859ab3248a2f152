//! Hostile input: each case gets a one-line error, and nothing already stored is lost
//! or overwritten.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Every file in the store with its content.
fn store_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// All objects present before are still there, unchanged (lease objects may change).
fn assert_nothing_lost(before: &BTreeMap<String, Vec<u8>>, root: &Path) {
    let after = store_files(root);
    for (k, v) in before {
        if k.starts_with("meta/lease-") {
            continue;
        }
        assert_eq!(after.get(k), Some(v), "{k} was lost or overwritten");
    }
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn populated() -> Fixture {
    let f = Fixture::mounted();
    bash(&format!(
        "cd {} && mkdir d && head -c 3000000 /dev/urandom > d/big && printf small > d/small && sync d/big d/small",
        f.mnt_str()
    ));
    f
}

fn meta_keys(f: &Fixture, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(f.store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn newer_format_version_is_refused() {
    let f = populated();
    f.umount();
    let sb = f.store.join("meta/superblock");
    let mut bytes = std::fs::read(&sb).unwrap();
    bytes[8] = 200;
    std::fs::write(&sb, &bytes).unwrap();
    let before = store_files(&f.store);
    let err = one_line_error(&f.try_mount());
    assert!(err.contains("format version 200"), "{err}");
    assert_nothing_lost(&before, &f.store);
    let err = one_line_error(&objfs(&["mkfs", f.store_str()]));
    assert!(err.contains("already holds"), "{err}");
}

#[test]
fn damaged_snapshot_is_refused_and_kept() {
    for damage in ["truncate", "garbage", "delete"] {
        let f = populated();
        f.umount();
        let snap = meta_keys(&f, "snapshot-").pop().unwrap();
        match damage {
            "truncate" => {
                let b = std::fs::read(&snap).unwrap();
                std::fs::write(&snap, &b[..b.len() / 2]).unwrap();
            }
            "garbage" => std::fs::write(&snap, b"not a snapshot at all").unwrap(),
            _ => std::fs::remove_file(&snap).unwrap(),
        }
        let before = store_files(&f.store);
        let err = one_line_error(&f.try_mount());
        assert!(err.contains("no readable snapshot"), "{damage}: {err}");
        assert_nothing_lost(&before, &f.store);
        let out = objfs(&["fsck", f.store_str()]);
        assert!(!out.status.success());
    }
}

#[test]
fn torn_journal_segment_stops_replay_with_a_warning() {
    let f = Fixture::mounted();
    bash(&format!(
        "cd {0} && printf one > a && sync a && printf two > b && sync b",
        f.mnt_str()
    ));
    // Kill the daemon so the journal is not compacted into a snapshot at unmount.
    f.kill_daemon();
    let last = meta_keys(&f, "journal-").pop().unwrap();
    let b = std::fs::read(&last).unwrap();
    std::fs::write(&last, &b[..b.len() - 3]).unwrap();
    let fsck = objfs(&["fsck", f.store_str()]);
    assert!(!fsck.status.success());
    assert!(String::from_utf8_lossy(&fsck.stdout).contains("torn or corrupt"));
    let before = store_files(&f.store);
    f.mount();
    assert_eq!(std::fs::read(f.path("a")).unwrap(), b"one");
    assert!(!f.path("b").exists(), "b lived only in the torn segment");
    assert!(f.log_text().contains("torn or corrupt journal segment"));
    // The damaged segment is kept as evidence; new work goes to a fresh generation.
    assert_nothing_lost(&before, &f.store);
    std::fs::write(f.path("c"), b"three").unwrap();
    f.remount();
    assert_eq!(std::fs::read(f.path("c")).unwrap(), b"three");
}

#[test]
fn corrupt_or_missing_blocks_are_eio_and_fsck_names_the_files() {
    let f = populated();
    f.umount();
    let mut blocks: Vec<_> = walk_blocks(&f.store.join("blocks"));
    blocks.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let biggest = blocks.pop().unwrap();
    let mut b = std::fs::read(&biggest).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&biggest, &b).unwrap();
    let fsck = objfs(&["fsck", f.store_str(), "--verify-data"]);
    let text = String::from_utf8_lossy(&fsck.stdout);
    assert!(!fsck.status.success());
    assert!(text.contains("damaged files: /d/big"), "{text}");
    std::fs::remove_file(blocks.pop().unwrap()).unwrap();
    let fsck = objfs(&["fsck", f.store_str()]);
    assert!(String::from_utf8_lossy(&fsck.stdout).contains("is missing; damaged files: /d/big"));
    f.mount();
    let out = run_with_timeout(60, "cat", &[f.path("d/big").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));
    // The rest of the filesystem is fine.
    assert_eq!(std::fs::read(f.path("d/small")).unwrap(), b"small");
}

fn walk_blocks(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk_blocks(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A small tmpfs for a store, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn new(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run_with_timeout(30, "umount", &["-l", self.0.to_str().unwrap()]);
    }
}

#[test]
fn a_full_store_disk_gives_enospc_without_corruption() {
    let mut f = Fixture::new();
    let disk = f.tmp.path().join("disk");
    let _guard = SmallDisk::new(&disk, "8M");
    f.store = disk.join("store");
    f.spec = f.store.to_string_lossy().into_owned();
    f.mount();
    bash(&format!(
        "printf keep > {0}/keep && sync {0}/keep",
        f.mnt_str()
    ));
    let out = run_with_timeout(
        60,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}/huge", f.mnt_str()),
            "bs=1M",
            "count=20",
            "conv=fsync",
        ],
    );
    assert!(!out.status.success(), "20 MiB cannot fit in 8 MiB");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left on device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(f.path("huge")).unwrap();
    std::fs::write(f.path("after"), b"fits").unwrap();
    f.remount();
    assert_eq!(std::fs::read(f.path("keep")).unwrap(), b"keep");
    assert_eq!(std::fs::read(f.path("after")).unwrap(), b"fits");
    f.umount();
    assert!(objfs_ok(&["fsck", f.store_str()]).contains("clean"));
}

#[test]
fn an_unwritable_store_mounts_read_only_only() {
    let mut f = Fixture::new();
    let disk = f.tmp.path().join("disk");
    let _guard = SmallDisk::new(&disk, "16M");
    f.store = disk.join("store");
    f.spec = f.store.to_string_lossy().into_owned();
    f.mount();
    std::fs::write(f.path("x"), b"data").unwrap();
    f.umount();
    sh("mount", &["-o", "remount,ro", disk.to_str().unwrap()]);
    let err = one_line_error(&f.try_mount());
    assert!(
        err.contains("ead-only file system") || err.contains("denied"),
        "{err}"
    );
    f.extra = vec!["--read-only".into()];
    f.mount();
    assert_eq!(std::fs::read(f.path("x")).unwrap(), b"data");
}
