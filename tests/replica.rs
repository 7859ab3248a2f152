//! Read-only mounts beside a writer follow it like read replicas.

mod common;
use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

fn reader(writer: &Fixture) -> Fixture {
    let mut r = Fixture::new();
    r.spec = writer.spec.clone();
    r.extra = vec!["--read-only".into()];
    r.mount();
    r
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        wait_until(Duration::from_secs(4), &mut cond),
        "{what} not visible on the replica within 4 s"
    );
}

#[test]
fn replica_follows_the_writer() {
    let w = Fixture::new();
    let mut wf = w;
    wf.extra = vec!["--commit-interval".into(), "1".into()];
    wf.mount();
    std::fs::write(wf.path("old"), b"v1").unwrap();
    bash(&format!("sync {}/old", wf.mnt_str()));
    let r = reader(&wf);
    assert_eq!(std::fs::read(r.path("old")).unwrap(), b"v1");
    // Reads on the replica change nothing (no atime writes, EROFS for writes).
    let err = std::fs::write(r.path("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // Keep a file open on the replica while the writer changes it.
    let mut held = std::fs::File::open(r.path("old")).unwrap();
    let mut buf = String::new();
    held.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "v1");
    // An fsynced new file, an overwrite, a rename, a delete.
    bash(&format!(
        "cd {0} && printf fresh > new && sync new && printf v2-longer > old && sync old && \
         mkdir d && printf inner > d/f && mv d moved && sync . && printf gone > tmp && sync tmp",
        wf.mnt_str()
    ));
    eventually("a new fsynced file", || {
        std::fs::read(r.path("new")).is_ok_and(|d| d == b"fresh")
    });
    eventually("an overwrite", || {
        std::fs::read(r.path("old")).is_ok_and(|d| d == b"v2-longer")
    });
    eventually("an overwrite through an open handle", || {
        let mut s = String::new();
        held.seek(SeekFrom::Start(0)).unwrap();
        held.read_to_string(&mut s).is_ok() && s == "v2-longer"
    });
    eventually("a renamed directory", || {
        std::fs::read(r.path("moved/f")).is_ok_and(|d| d == b"inner")
    });
    assert!(!r.path("d").exists());
    bash(&format!("rm {}/tmp && sync {}", wf.mnt_str(), wf.mnt_str()));
    eventually("a delete", || !r.path("tmp").exists());
    // Without fsync: visible within the commit interval plus the refresh.
    std::fs::write(wf.path("lazy"), b"later").unwrap();
    eventually("an unsynced write", || {
        std::fs::read(r.path("lazy")).is_ok_and(|d| d == b"later")
    });
    drop(held);
    r.umount();
}

#[test]
fn replica_reloads_after_the_writer_compacts() {
    let mut w = Fixture::new();
    w.extra = vec!["--snapshot-every".into(), "3".into()];
    w.mount();
    std::fs::write(w.path("a"), b"1").unwrap();
    bash(&format!("sync {}/a", w.mnt_str()));
    let r = reader(&w);
    let newest = || {
        std::fs::read_dir(w.store.join("meta"))
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .into_string()
                    .unwrap()
                    .strip_prefix("snapshot-")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap()
    };
    // Snapshots are written by a thread of their own while commits go on: sync files
    // until two have landed.
    let mut n = 0;
    while newest() < 2 && n < 200 {
        std::fs::write(w.path(&format!("f{n}")), format!("{n}")).unwrap();
        bash(&format!("sync {}/f{n}", w.mnt_str()));
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        newest() >= 2,
        "the writer compacted (snapshot generation {})",
        newest()
    );
    eventually("files written across compactions", || {
        (0..n).all(|i| {
            std::fs::read(r.path(&format!("f{i}"))).is_ok_and(|d| d == format!("{i}").as_bytes())
        })
    });
    r.umount();
}

#[test]
fn a_replica_keeps_pages_across_opens_until_the_writer_changes_the_file() {
    let mut w = Fixture::new();
    w.extra = vec!["--commit-interval".into(), "1".into()];
    w.mount();
    std::fs::write(w.path("f"), b"version 1").unwrap();
    bash(&format!("sync {}/f", w.mnt_str()));
    let mut r = Fixture::new();
    r.spec = w.spec.clone();
    r.extra = vec!["--read-only".into()];
    r.env = vec![("RUST_LOG".to_string(), "info,fuser=debug".to_string())];
    r.mount();
    for _ in 0..3 {
        assert_eq!(std::fs::read(r.path("f")).unwrap(), b"version 1");
    }
    assert!(!r.path(".mark").exists());
    // Same length: only the refresh's invalidation can tell the kernel's pages are old.
    std::fs::write(w.path("f"), b"version 2").unwrap();
    bash(&format!("sync {}/f", w.mnt_str()));
    eventually("an overwrite of the same length", || {
        std::fs::read(r.path("f")).is_ok_and(|d| d == b"version 2")
    });
    r.umount();
    w.umount();
    let log = r.log_text();
    let requests = |text: &str, op: &str| text.matches(&format!(" {op} ")).count();
    // Zero-message opens: no OPEN after the first, and the three reads were one READ
    // (the pages stayed across opens).
    assert!(requests(&log, "OPEN") <= 1);
    assert_eq!(requests(&log, "RELEASE"), 0);
    let first_reads = &log[..log.find(".mark").expect("marker")];
    assert_eq!(requests(first_reads, "READ"), 1);
}

#[test]
fn a_file_saved_by_rename_over_the_old_one_reaches_a_replica_whole() {
    let mut w = Fixture::new();
    // No periodic commit during the test: only the fsync below commits.
    w.extra = vec!["--commit-interval".into(), "600".into()];
    w.mount();
    std::fs::write(w.path("f"), b"old version").unwrap();
    bash(&format!("sync {}/f", w.mnt_str()));
    let r = reader(&w);
    assert_eq!(std::fs::read(r.path("f")).unwrap(), b"old version");
    // Saved as editors save, without fsync: a new file renamed over the old one.
    // Another file's fsync commits the rename; a commit records a file only as far
    // as its data reached the store, so this one recorded the new file empty.
    let new = vec![b'n'; 5000];
    std::fs::write(w.path("f.tmp"), &new).unwrap();
    std::fs::rename(w.path("f.tmp"), w.path("f")).unwrap();
    std::fs::write(w.path("other"), b"x").unwrap();
    bash(&format!("sync {}/other", w.mnt_str()));
    eventually("the other file", || r.path("other").exists());
    let seen = std::fs::read(r.path("f")).unwrap();
    assert!(seen == new, "the replica read {} bytes", seen.len());
    r.umount();
    w.umount();
}
