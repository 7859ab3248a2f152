//! Real programs on the mount: git, SQLite in WAL mode (shared writable mmap),
//! tar of a source tree, and an editor-style save.

mod common;
use common::*;

#[test]
fn git_init_add_commit_status_and_fsck() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    bash(&format!(
        "cd {m} && git init -q repo && cp -a {src}/src repo/ && cd repo && \
         git -c user.name=t -c user.email=t@t add -A && \
         git -c user.name=t -c user.email=t@t commit -qm first && \
         echo change >> src/lib.rs && git -c user.name=t -c user.email=t@t commit -qam second && \
         git mv src/util.rs src/helpers.rs && git -c user.name=t -c user.email=t@t commit -qm rename && \
         git gc -q && test -z \"$(git status --porcelain)\"",
        src = env!("CARGO_MANIFEST_DIR")
    ));
    f.remount();
    bash(&format!(
        "cd {m}/repo && git fsck --strict 2>&1 && test -z \"$(git status --porcelain)\" && \
         test \"$(git log --oneline | wc -l)\" = 3 && git checkout -q HEAD~2 && test -f src/util.rs"
    ));
}

#[test]
fn sqlite_wal_survives_concurrent_readers_and_remount() {
    let f = Fixture::mounted();
    let db = f.path("test.db");
    let db = db.to_str().unwrap();
    bash(&format!(
        "sqlite3 -cmd '.timeout 10000' {db} 'PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);' > /dev/null"
    ));
    // A writer doing many small transactions while a reader polls through the -shm mmap.
    let writer = std::thread::spawn({
        let db = db.to_string();
        move || {
            bash(&format!(
                "for i in $(seq 1 40); do sqlite3 -cmd '.timeout 10000' {db} \"BEGIN; INSERT INTO t(v) SELECT hex(randomblob(300)) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<25) SELECT x FROM c); COMMIT;\"; done"
            ))
        }
    });
    for _ in 0..20 {
        bash(&format!(
            "sqlite3 -cmd '.timeout 10000' {db} 'SELECT count(*) FROM t;' > /dev/null"
        ));
    }
    writer.join().unwrap();
    assert_eq!(
        bash(&format!(
            "sqlite3 -cmd '.timeout 10000' {db} 'SELECT count(*) FROM t;'"
        ))
        .trim(),
        "1000"
    );
    assert_eq!(
        bash(&format!(
            "sqlite3 -cmd '.timeout 10000' {db} 'PRAGMA integrity_check;'"
        ))
        .trim(),
        "ok"
    );
    f.remount();
    assert_eq!(
        bash(&format!(
            "sqlite3 -cmd '.timeout 10000' {db} 'PRAGMA integrity_check; SELECT count(*) FROM t;'"
        ))
        .trim(),
        "ok\n1000"
    );
}

#[test]
fn sqlite_overwriting_its_wal_and_database_in_place_survives_remount() {
    let f = Fixture::mounted();
    let db = f.path("wrap.db");
    let db = db.to_str().unwrap();
    // 900 commits: the WAL passes its 1000-page checkpoint (at ~700) and is overwritten from
    // its start, and checkpoints rewrite database pages in place: small writes inside
    // blocks already full, each transaction ending in an fsync.
    let py = format!(
        "import sqlite3\n\
         c = sqlite3.connect('{db}'); c.execute('pragma journal_mode=wal')\n\
         c.execute('create table t(x integer primary key, y text)')\n\
         for i in range(900):\n\
         \x20   with c:\n\
         \x20       c.execute('insert into t values(?, ?)', (i, 'y' * 200))\n\
         \x20       c.execute('update t set y = ? where x = ?', ('z' * 150, i // 2))\n\
         print(c.execute('pragma integrity_check').fetchone()[0], c.execute('select count(*) from t').fetchone()[0])"
    );
    assert_eq!(sh("python3", &["-c", &py]).trim(), "ok 900");
    f.remount();
    assert_eq!(
        bash(&format!(
            "sqlite3 -cmd '.timeout 10000' {db} 'PRAGMA integrity_check; SELECT count(*), sum(length(y)) FROM t;'"
        ))
        .trim(),
        format!("ok\n900|{}", 450 * 150 + 450 * 200)
    );
}

#[test]
fn editor_style_save_and_tar_of_a_source_tree() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    // Write tmp, fsync, rename over, fsync the directory: the classic safe save.
    let script = format!(
        r#"
import os
d = "{m}"
for i in range(50):
    data = ("version %d\n" % i).encode() * (i * 100 + 1)
    tmp = os.path.join(d, ".notes.txt.swp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, os.path.join(d, "notes.txt"))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
"#
    );
    sh("python3", &["-c", &script]);
    f.remount();
    let data = std::fs::read(f.path("notes.txt")).unwrap();
    assert_eq!(data, b"version 49\n".repeat(4901));
    assert!(!f.path(".notes.txt.swp").exists());
    // tar x of a source tree into the mount, then back out again.
    let tarball = f.tmp.path().join("src.tar");
    bash(&format!(
        "tar --format=posix -C {root} -cf {t} src tests Cargo.toml && mkdir {m}/x && tar -C {m}/x -xf {t} && \
         diff -r {root}/src {m}/x/src && diff -r {root}/tests {m}/x/tests && \
         tar --format=posix -C {m}/x -cf - . | tar -tf - | sort > {tmp}/listing && test -s {tmp}/listing",
        root = env!("CARGO_MANIFEST_DIR"),
        t = tarball.display(),
        tmp = f.tmp.path().display()
    ));
}
