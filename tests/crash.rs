//! Crash safety: SIGKILL the daemon at random moments while a writer fsyncs files and
//! saves a document the editor way (write tmp, fsync, rename over, fsync dir); after
//! remounting, every fsynced file must be intact and the document a whole version.

mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

const WRITER: &str = r#"
import os, sys, hashlib, random
mnt, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
logf = open(log, "a")
def note(line):
    logf.write(line + "\n"); logf.flush()
def write_all(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
i = 0
while True:
    i += 1
    data = rng.randbytes(rng.choice([0, 100, 5000, 300000, 1500000]))
    name = "f%d_%d" % (seed, i)
    write_all(os.path.join(mnt, name), data)
    note("file %s %s" % (name, hashlib.sha256(data).hexdigest()))
    doc = rng.randbytes(rng.randint(1, 200000))
    note("try %d %s" % (i, hashlib.sha256(doc).hexdigest()))
    write_all(os.path.join(mnt, "doc.tmp"), doc)
    os.rename(os.path.join(mnt, "doc.tmp"), os.path.join(mnt, "doc%d" % seed))
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    note("doc %d %s" % (i, hashlib.sha256(doc).hexdigest()))
    if i % 7 == 0:
        os.unlink(os.path.join(mnt, name))
        note("gone %s" % name)
"#;

fn sha256_file(path: &std::path::Path) -> Option<String> {
    let out = run_with_timeout(60, "sha256sum", &[path.to_str().unwrap()]);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    })
}

fn check_round(f: &Fixture, round: u64, log: &str) -> usize {
    let mut files: HashMap<String, String> = HashMap::new();
    let mut tries: Vec<(u64, String)> = Vec::new();
    let mut last_doc: Option<u64> = None;
    for line in log.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["file", name, sha] => {
                files.insert(name.to_string(), sha.to_string());
            }
            ["gone", name] => {
                files.remove(*name);
            }
            ["try", i, sha] => tries.push((i.parse().unwrap(), sha.to_string())),
            ["doc", i, _] => last_doc = Some(i.parse().unwrap()),
            _ => {}
        }
    }
    for (name, sha) in &files {
        let got = sha256_file(&f.path(name));
        assert_eq!(
            got.as_deref(),
            Some(sha.as_str()),
            "fsynced file {name} lost or damaged"
        );
    }
    let doc_name = format!("doc{round}");
    let doc = sha256_file(&f.path(&doc_name));
    let allowed: Vec<&String> = tries
        .iter()
        .filter(|(i, _)| last_doc.is_none_or(|d| *i >= d))
        .map(|(_, s)| s)
        .collect();
    match (&doc, last_doc) {
        (None, None) => {}
        (Some(d), _) => assert!(
            allowed.contains(&d),
            "doc is not a whole saved version: sha {d}, size {:?}, last saved {last_doc:?}, allowed {allowed:?}\nlog tail:\n{}",
            std::fs::metadata(f.path(&doc_name)).map(|m| m.len()),
            log.lines().rev().take(8).collect::<Vec<_>>().join("\n")
        ),
        (None, Some(i)) => panic!("doc saved (version {i}) but missing"),
    }
    files.len()
}

#[test]
fn sigkill_at_random_moments_loses_nothing_fsynced() {
    let rounds: u64 = std::env::var("OBJFS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut f = Fixture::new();
    let script = f.tmp.path().join("writer.py");
    std::fs::write(&script, WRITER).unwrap();
    let mut checked = 0;
    for round in 1..=rounds {
        // Rounds in turn: mount defaults; through the kernel's writeback cache; a
        // snapshot every other commit, taken while the writer goes on.
        f.extra = match round % 3 {
            0 => Vec::new(),
            1 => vec!["--writeback-cache".into()],
            _ => ["--snapshot-every", "2", "--commit-interval", "1"]
                .map(String::from)
                .to_vec(),
        };
        f.mount();
        let log = f.tmp.path().join(format!("round{round}.log"));
        let mut writer = std::process::Command::new("python3")
            .arg(&script)
            .arg(&f.mnt)
            .arg(&log)
            .arg(round.to_string())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill somewhere between 0.1 and 1.5 s in, varying by round.
        std::thread::sleep(Duration::from_millis(100 + (round * 337) % 1400));
        f.kill_daemon();
        let _ = writer.kill();
        let _ = writer.wait();
        // The next mount clears the dead mount and takes over the dead daemon's lease.
        f.mount();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        checked += check_round(&f, round, &text);
        f.umount();
        let out = objfs_ok(&["fsck", f.store_str()]);
        assert!(out.contains("clean"), "{out}");
    }
    eprintln!("{checked} fsynced files verified over {rounds} crashes");
    assert!(checked > 0, "the writer never got a file fsynced");
}

#[test]
fn second_writer_is_refused_with_the_holder_named() {
    let f = Fixture::mounted();
    let other = f.tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let out = f.try_mount_at(&other, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mounted read-write by writer"), "{err}");
    assert!(err.contains("expires in"), "{err}");
    assert!(!is_mountpoint(&other));
    // A read-only mount beside the writer is fine.
    let out = f.try_mount_at(&other, &["--read-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    objfs_ok(&["umount", other.to_str().unwrap()]);
    // After a clean unmount the next writer gets in at once.
    f.umount();
    f.mount();
}

#[test]
fn gc_frees_what_a_dead_writer_left_and_refuses_beside_a_live_one() {
    let f = Fixture::mounted();
    std::fs::write(f.path("keep"), vec![1u8; 2 << 20]).unwrap();
    let out = objfs(&["gc", f.store_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mounted read-write by"));
    f.umount();
    // Blocks uploaded but never committed, as a killed writer leaves them.
    let orphan = f
        .store
        .join("blocks/ab/ab00000000000000000000000000000000000000000000000000000000000000");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"OBK\0junk").unwrap();
    let out = objfs_ok(&["gc", f.store_str(), "--dry-run"]);
    assert!(out.contains("would free 1 "), "{out}");
    assert!(orphan.exists());
    let out = objfs_ok(&["gc", f.store_str()]);
    assert!(
        out.contains("freed 1 unreferenced blocks; 1 blocks in use"),
        "{out}"
    );
    assert!(!orphan.exists());
    f.mount();
    assert_eq!(std::fs::read(f.path("keep")).unwrap(), vec![1u8; 2 << 20]);
}

/// gc right after a crash: it recovers the store as a mount would (sealing the dead
/// writer's journal) instead of refusing, then collects; the fsynced file survives
/// and the next mount gets in at once.
#[test]
fn gc_after_a_crash_recovers_the_store_then_collects() {
    let f = Fixture::mounted();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut file = std::fs::File::create(f.path("kept")).unwrap();
    std::io::Write::write_all(&mut file, &data).unwrap();
    file.sync_all().unwrap();
    drop(file);
    f.kill_daemon();
    bash(&format!("umount -l '{}'", f.mnt_str()));
    let orphan = f
        .store
        .join("blocks/cd/cd00000000000000000000000000000000000000000000000000000000000000");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"OBK\0junk").unwrap();
    let dry = objfs(&["gc", f.store_str(), "--dry-run"]);
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(
        !dry.status.success() && err.contains("without --dry-run"),
        "{err}"
    );
    assert!(orphan.exists());
    let out = objfs(&["gc", f.store_str()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("recovering it first"), "{stderr}");
    assert!(stdout.contains("freed 1 unreferenced blocks"), "{stdout}");
    assert!(!orphan.exists());
    let out = objfs_ok(&["fsck", f.store_str()]);
    assert!(out.contains("clean"), "{out}");
    f.mount();
    assert_eq!(std::fs::read(f.path("kept")).unwrap(), data);
}

#[test]
fn fsck_repair_refuses_beside_a_live_writer_and_runs_offline() {
    let f = Fixture::mounted();
    std::fs::create_dir(f.path("d")).unwrap();
    std::fs::write(f.path("d/x"), b"x").unwrap();
    let out = objfs(&["fsck", f.store_str(), "--repair"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to repair"));
    f.umount();
    let out = objfs_ok(&["fsck", f.store_str(), "--repair"]);
    assert!(
        out.contains("nothing to repair") && out.contains("clean"),
        "{out}"
    );
    f.mount();
    assert_eq!(std::fs::read(f.path("d/x")).unwrap(), b"x");
}

#[test]
fn a_forked_journal_is_refused_then_fsck_repair_keeps_one_writer_and_mounts() {
    let f = Fixture::mounted();
    bash(&format!(
        "printf acknowledged | dd of='{}/kept' conv=fsync status=none",
        f.mnt_str()
    ));
    // A dead writer leaves its journal segments unsnapshotted.
    f.kill_daemon();
    bash(&format!("umount -l '{}'", f.mnt_str()));
    // What a second writer on a store without conditional create leaves: another
    // segment with the same sequence number.
    let meta = f.tmp.path().join("store/meta");
    let last = bash(&format!(
        "ls '{}' | grep '^journal-' | sort | tail -1",
        meta.display()
    ));
    let last = last.trim();
    assert!(!last.is_empty(), "no journal segment to fork");
    let (head, _writer) = last.rsplit_once('-').unwrap();
    std::fs::copy(meta.join(last), meta.join(format!("{head}-ffffffff"))).unwrap();

    let out = f.try_mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("journal fork"),
        "{err}"
    );
    assert!(err.contains("fsck --repair"), "{err}");
    let out = objfs(&["fsck", f.store_str()]);
    assert!(!out.status.success());

    let out = objfs_ok(&["fsck", f.store_str(), "--repair"]);
    assert!(
        out.contains("journal fork") && out.contains("clean"),
        "{out}"
    );
    // The newest lease holder's chain is kept; the other is set aside, not deleted.
    assert!(!meta.join(format!("{head}-ffffffff")).exists());
    assert!(
        meta.join("forked")
            .join(format!("{head}-ffffffff"))
            .exists()
    );
    f.mount();
    assert_eq!(std::fs::read(f.path("kept")).unwrap(), b"acknowledged");
}

/// A database's way: pages rewritten in place and a log appended, fsync after each
/// change. Each fsync stores the changed bytes as patches in the journal (not a new
/// 1 MiB block), and after a SIGKILL the next mount has every fsynced change.
const PATCHER: &str = r#"
import os, sys, hashlib, random
path = sys.argv[1]
rng = random.Random(5)
data = bytearray(rng.randbytes(3 * 1048576 + 1000))
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, data)
os.fsync(fd)
print("blocks", flush=True)
sys.stdin.readline()
for i in range(60):
    at = rng.randrange(0, 3 * 1048576)
    page = rng.randbytes(300)
    os.pwrite(fd, page, at)
    data[at:at + 300] = page
    rec = rng.randbytes(150)
    os.pwrite(fd, rec, len(data))
    data += rec
    os.fsync(fd)
print(hashlib.sha256(data).hexdigest(), flush=True)
sys.stdin.readline()
"#;

fn stored_blocks(store: &std::path::Path) -> usize {
    let mut n = 0;
    for dir in std::fs::read_dir(store.join("blocks")).unwrap() {
        n += std::fs::read_dir(dir.unwrap().path()).unwrap().count();
    }
    n
}

#[test]
fn small_fsynced_changes_are_journaled_as_patches_and_survive_sigkill() {
    use std::io::{BufRead, BufReader, Write};
    let f = Fixture::mounted();
    let script = f.tmp.path().join("patcher.py");
    std::fs::write(&script, PATCHER).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .arg(f.path("db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("patcher output").unwrap();
    assert_eq!(next(), "blocks");
    let before = stored_blocks(&f.store);
    writeln!(stdin).unwrap();
    let expected = next();
    let uploaded = stored_blocks(&f.store) - before;
    // Whole blocks would be 60 or more (each fsync changed one or two).
    assert!(
        uploaded <= 10,
        "{uploaded} blocks uploaded for 60 small fsynced changes"
    );
    f.kill_daemon();
    drop(stdin);
    let _ = child.wait();
    f.mount();
    assert_eq!(
        sha256_file(&f.path("db")).as_deref(),
        Some(expected.as_str())
    );
    f.umount();
    let out = objfs_ok(&["fsck", f.store_str()]);
    assert!(out.contains("clean"), "{out}");
}
