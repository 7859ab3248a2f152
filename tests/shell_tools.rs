//! Real shell tools on a real mount: cp -a, diff -r, tar, mv, rm -r, ln, dd, truncate.

mod common;
use common::*;
use std::path::Path;

/// A log filter that names every request, whichever way it reached objfs.
const REQUEST_LOG: &str = "info,fuser=debug,objfs::fuse::ring=debug";

fn tree_listing(root: &str) -> String {
    // Type, mode, size, mtime (ns), link target and link count of everything, sorted.
    bash(&format!(
        "cd '{root}' && find . -mindepth 1 -printf '%y %m %s %T@ %l %n %p\\n' | grep -v '^d' | sort -k7; \
         cd '{root}' && find . -mindepth 1 -type d -printf '%y %m %p\\n' | sort -k3"
    ))
}

#[test]
fn cp_a_and_tar_round_trip_a_real_tree() {
    let f = Fixture::mounted();
    let src = f.tmp.path().join("src");
    make_sample_tree(&src);
    let src = src.to_str().unwrap();
    let m = f.mnt_str();
    bash(&format!("cp -a '{src}' '{m}/copy'"));
    bash(&format!("diff -r --no-dereference '{src}' '{m}/copy'"));
    assert_eq!(tree_listing(src), tree_listing(&format!("{m}/copy")));
    f.remount();
    bash(&format!("diff -r --no-dereference '{src}' '{m}/copy'"));
    assert_eq!(tree_listing(src), tree_listing(&format!("{m}/copy")));
    // Back out with cp -a and with tar.
    let out = f.tmp.path().join("out");
    bash(&format!("cp -a '{m}/copy' '{}'", out.display()));
    assert_eq!(tree_listing(src), tree_listing(out.to_str().unwrap()));
    let untar = f.tmp.path().join("untar");
    bash(&format!(
        "mkdir '{0}' && tar --format=posix -C '{m}/copy' -cf - . | tar -C '{0}' -xpf - && diff -r --no-dereference '{src}' '{0}'",
        untar.display()
    ));
    assert_eq!(tree_listing(src), tree_listing(untar.to_str().unwrap()));
    // And tar extraction into the mount.
    bash(&format!(
        "mkdir '{m}/fromtar' && tar --format=posix -C '{src}' -cf - . | tar -C '{m}/fromtar' -xpf - && diff -r --no-dereference '{src}' '{m}/fromtar'"
    ));
    assert_eq!(tree_listing(src), tree_listing(&format!("{m}/fromtar")));
    bash(&format!("rm -r '{m}/copy' '{m}/fromtar'"));
    assert_eq!(std::fs::read_dir(&f.mnt).unwrap().count(), 0);
    f.remount();
    assert_eq!(std::fs::read_dir(&f.mnt).unwrap().count(), 0);
}

#[test]
fn mv_ln_and_rename_of_non_empty_directories() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    bash(&format!(
        "mkdir -p {m}/a/b/c && echo one > {m}/a/b/c/f && echo two > {m}/a/g && \
         mv {m}/a {m}/renamed && test -f {m}/renamed/b/c/f && test ! -e {m}/a && \
         mkdir {m}/other && mv {m}/renamed/b {m}/other/ && test \"$(cat {m}/other/b/c/f)\" = one && \
         ln {m}/renamed/g {m}/hard && ln -s renamed/g {m}/soft && test \"$(cat {m}/soft)\" = two && \
         test \"$(stat -c %h {m}/hard)\" = 2 && echo new > {m}/new && mv -f {m}/new {m}/hard && \
         test \"$(cat {m}/hard)\" = new && test \"$(stat -c %h {m}/renamed/g)\" = 1 && \
         mkdir {m}/empty && mv -T {m}/other {m}/empty && test -f {m}/empty/b/c/f"
    ));
    f.remount();
    bash(&format!(
        "test \"$(cat {m}/empty/b/c/f)\" = one && test \"$(cat {m}/hard)\" = new && \
         test \"$(readlink {m}/soft)\" = renamed/g && test \"$(cat {m}/soft)\" = two && \
         test \"$(stat -c %h {m}/empty)\" = 3 && test \"$(stat -c %h {m})\" = 4"
    ));
    // rmdir of a non-empty directory fails, of an empty one works.
    let out = run_with_timeout(30, "rmdir", &[&format!("{m}/empty")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn dd_truncate_sparse_and_append() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    let native = f.tmp.path().join("native");
    std::fs::create_dir(&native).unwrap();
    let n = native.to_str().unwrap();
    // The same commands on the mount and on a native directory must give the same bytes.
    let script = |d: &str| {
        format!(
            "set -e; cd {d}; \
             dd if=/dev/zero of=z bs=1M count=3 status=none; \
             printf 'abc' | dd of=z bs=1 seek=1048574 conv=notrunc status=none; \
             dd if=/dev/urandom of=/dev/null bs=1 count=0 status=none; \
             head -c 2500000 /dev/zero | tr '\\0' 'x' > x; \
             printf tail >> x; printf more >> x; \
             truncate -s 10M sparse; printf end >> sparse; \
             truncate -s 7 x2; cp x x2; truncate -s 1048577 x2; truncate -s 5000000 x2; \
             dd if=x of=part bs=4096 skip=3 count=5 status=none; \
             printf hello > small; truncate -s 2 small; truncate -s 4 small"
        )
    };
    bash(&script(m));
    bash(&script(n));
    for name in ["z", "x", "sparse", "x2", "part", "small"] {
        let a = std::fs::read(f.path(name)).unwrap();
        let b = std::fs::read(native.join(name)).unwrap();
        assert!(a == b, "{name} differs");
    }
    f.remount();
    for name in ["z", "x", "sparse", "x2", "part", "small"] {
        let a = std::fs::read(f.path(name)).unwrap();
        let b = std::fs::read(native.join(name)).unwrap();
        assert!(a == b, "{name} differs after remount");
    }
}

#[test]
fn many_processes_at_once() {
    let f = Fixture::mounted();
    let m = f.mnt_str().to_string();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                bash(&format!(
                    "mkdir -p {m}/w{i} && for j in $(seq 1 40); do \
                       head -c $((j * 3000 + {i})) /dev/urandom > {m}/w{i}/f$j; \
                       cp {m}/w{i}/f$j {m}/w{i}/g$j; cmp {m}/w{i}/f$j {m}/w{i}/g$j; \
                       cat {m}/w{i}/g$j > /dev/null; ls -l {m} > /dev/null; done"
                ));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let sums = bash(&format!("cd {m} && md5sum */* | sort"));
    f.remount();
    assert_eq!(bash(&format!("cd {m} && md5sum */* | sort")), sums);
}

#[test]
fn stat_reports_dedup_and_statfs_reports_space() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    bash(&format!(
        "head -c 3145728 /dev/urandom > {m}/a && cp {m}/a {m}/b && cp {m}/a {m}/c && mkdir {m}/d"
    ));
    // A block freed just before the unmount: listed for the next writer to delete.
    bash(&format!(
        "head -c 1048576 /dev/urandom | dd of={m}/e bs=1M conv=fsync status=none && rm {m}/e"
    ));
    let df = bash(&format!("df -B1 --output=size,avail {m} | tail -1"));
    let nums: Vec<u64> = df.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(nums[0] > 0 && nums[1] > 0 && nums[1] <= nums[0], "{df}");
    f.umount();
    let out = objfs_ok(&["stat", f.store_str()]);
    assert!(out.contains("files:          3"), "{out}");
    assert!(out.contains("directories:    2"), "{out}");
    assert!(out.contains("blocks:         3"), "{out}");
    assert!(out.contains("dedup ratio:    3.00"), "{out}");
    // Three 1 MiB blocks and their 4-byte trailers, as the store lists them.
    assert!(
        out.contains("in the store:   3145740 (3.0 MiB) in 3 block objects\n"),
        "{out}"
    );
    assert!(
        out.contains("freed:          1 block objects, 1.0 MiB (freed shortly before"),
        "{out}"
    );
    assert!(!out.contains("unreferenced"), "{out}");
    let out = objfs_ok(&["fsck", f.store_str()]);
    assert!(out.contains("clean"), "{out}");
    // An object no file references (what a writer killed mid-upload leaves).
    let junk = f.store.join("blocks/ab").join("ab".repeat(32));
    std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
    std::fs::write(&junk, b"not referenced").unwrap();
    let out = objfs_ok(&["stat", f.store_str()]);
    assert!(
        out.contains("unreferenced:   1 block objects, 14 B"),
        "{out}"
    );
}

#[test]
fn a_directory_of_100k_entries_lists_stably_while_it_changes() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    bash(&format!(
        "mkdir {m}/big && cd {m}/big && seq -f 'f%06g' 1 100000 | xargs touch"
    ));
    assert_eq!(bash(&format!("ls -f {m}/big | wc -l")).trim(), "100002");
    // List while files are added and removed: every name present throughout shows
    // up exactly once, nothing is skipped or repeated.
    let script = format!(
        r#"
import os, threading
d = "{m}/big"
stop = False
def churn():
    i = 0
    while not stop and i < 5000:
        open(os.path.join(d, "new%d" % i), "w").close()
        os.unlink(os.path.join(d, "f%06d" % (100000 - i)))
        i += 1
t = threading.Thread(target=churn)
t.start()
seen = [e.name for e in os.scandir(d)]
stop = True
t.join()
stable = [n for n in seen if n.startswith("f") and int(n[1:]) <= 90000]
assert len(stable) == len(set(stable)) == 90000, (len(stable), len(set(stable)))
print(len(seen))
"#
    );
    sh("python3", &["-c", &script]);
    f.remount();
    let n: usize = bash(&format!("ls -f {m}/big | wc -l"))
        .trim()
        .parse()
        .unwrap();
    assert!(n > 90000, "{n}");
}

#[test]
fn writes_truncates_and_chowns_drop_set_id_bits_as_on_a_native_disk() {
    let f = Fixture::mounted();
    let native = f.tmp.path().join("native");
    std::fs::create_dir(&native).unwrap();
    // The other users must be able to reach both directories.
    bash(&format!("chmod 755 '{}'", f.tmp.path().display()));
    // `stat -c %a` asks the kernel for the mode alone, which a write does not make it
    // fetch again: a stale cached mode would show here.
    // Writes by nobody: a: setuid+setgid with group-execute; b: setgid without it,
    // writer not in the group; d: the same, writer's primary group is the file's;
    // h: the same, the file's group is only a supplementary group of the writer.
    // c: written by root (CAP_FSETID keeps the bits). e: chowned by root.
    // f: truncated by nobody; i: truncated by root. g: fallocate by nobody.
    let script = |dir: &str| {
        format!(
            "cd '{dir}' && touch a b c d e f g h i && chmod 6777 a c f g i && chmod 6767 b d h && \
             chmod 4755 e && chgrp nogroup d h && chown nobody e && \
             NG=$(getent group nogroup | cut -d: -f3) && \
             setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo x >> a; echo y >> b; truncate -s 0 f; fallocate -l 8192 g' && \
             setpriv --reuid=65534 --regid=$NG --clear-groups sh -c 'echo z >> d' && \
             setpriv --reuid=65534 --regid=1 --groups=$NG sh -c 'echo v >> h' && \
             echo w >> c && truncate -s 1 i && \
             stat -c '%n %a' a b c d e f g h i && stat -c '%n %s %U' a b c d e f g h i"
        )
    };
    let on_native = bash(&script(native.to_str().unwrap()));
    let on_objfs = bash(&script(f.mnt_str()));
    assert_eq!(on_objfs, on_native);
    for expected in [
        "a 777\n", "e 755\n", "f 777\n", "g 777\n", "h 2767\n", "i 6777\n",
    ] {
        assert!(on_native.contains(expected), "{expected:?} in {on_native}");
    }
    // And what the store kept, not only what the kernel cached.
    f.remount();
    let kept = bash(&format!(
        "cd '{}' && stat -c '%n %a' a b c d e f g h i && stat -c '%n %s %U' a b c d e f g h i",
        f.mnt_str()
    ));
    assert_eq!(kept, on_native);
}

#[test]
fn posix_acls_are_enforced_inherited_and_kept_in_step_with_modes_as_on_a_native_disk() {
    let mut f = Fixture::new();
    f.extra = vec!["--acl".into()];
    f.mount();
    let native = f.tmp.path().join("native");
    std::fs::create_dir(&native).unwrap();
    bash(&format!(
        "chmod 755 '{}' '{}'",
        f.tmp.path().display(),
        f.mnt_str()
    ));
    // Users 1234 and 1235 exist only as numbers: 1234 is named in the ACLs, 1235 not.
    let script = |dir: &str| {
        format!(
            "cd '{dir}' && umask 022 && mkdir shared && \
             setfacl -m u:1234:rwx,g:50:r-x shared && \
             setfacl -d -m u:1234:rwx,g:50:rwx,o::--- shared && \
             touch shared/file && mkdir shared/sub && mkdir -m 700 shared/private && \
             mknod shared/fifo p && ln -s file shared/link && \
             (umask 077; touch shared/masked; touch plain077) && \
             getfacl -cp shared/file shared/sub shared/private shared/fifo shared/masked && \
             getfacl -cpd shared/sub && stat -c '%n %A' shared/* plain077 && \
             chmod 640 shared/file && getfacl -cp shared/file && \
             setfacl -m m::rwx shared/file && stat -c '%n %A' shared/file && \
             setfacl -b shared/file && getfacl -cp shared/file && stat -c '%n %A' shared/file && \
             touch plain && setfacl -m u::rw,g::r,o::r plain && \
             (getfattr -m - -d plain | grep -c posix_acl || true) && \
             setfacl -k shared && touch shared/after && stat -c '%n %A' shared/after && \
             echo hi > shared/enf && chmod 600 shared/enf && setfacl -m u:1234:rw shared/enf && \
             (setpriv --reuid 1234 --regid 1234 --clear-groups sh -c 'echo ok >> shared/enf' \
                && echo 1234 may write) && \
             (setpriv --reuid 1235 --regid 1235 --clear-groups cat shared/enf 2>/dev/null \
                || echo 1235 may not read) && cat shared/enf && \
             touch sg && chown 1234:7 sg && chmod 2770 sg && \
             setpriv --reuid 1234 --regid 1234 --clear-groups setfacl -m u:99:r sg && \
             stat -c '%n %A' sg && \
             (setfacl -d -m u:1:r plain 2>&1 || true) | sed 's/^setfacl: //'"
        )
    };
    let on_native = bash(&script(native.to_str().unwrap()));
    let on_objfs = bash(&script(f.mnt_str()));
    assert_eq!(on_objfs, on_native);
    for expected in [
        "user:1234:rwx\t#effective:rw-\n",
        "default:group:staff:rwx\n",
        "shared/private drwx------\n",
        "1234 may write\n",
        "1235 may not read\n",
        "sg -rwxrwx---\n",
        "Only directories can have default ACLs",
    ] {
        assert!(on_native.contains(expected), "{expected:?} in {on_native}");
    }
    // cp -a carries ACLs in, and the store keeps them across a remount.
    bash(&format!(
        "cp -a '{}/shared' '{}/copied'",
        native.display(),
        f.mnt_str()
    ));
    let acls = |dir: &Path, tree: &str| {
        bash(&format!(
            "cd '{}/{tree}' && find . -mindepth 1 -not -type l | sort | \
             while read -r p; do getfacl -p \"$p\"; done",
            dir.display()
        ))
    };
    let mnt = f.mnt.clone();
    let copied = acls(&mnt, "copied");
    assert_eq!(copied, acls(&native, "shared"));
    assert!(copied.contains("# file: ./sub\n"), "{copied}");
    let shared = acls(&mnt, "shared");
    f.remount();
    assert_eq!(acls(&mnt, "copied"), copied);
    assert_eq!(acls(&mnt, "shared"), shared);
    // Without --acl (the default): no ACLs in or out.
    f.umount();
    let out = f.try_mount_at(&mnt, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = bash(&format!(
        "cd '{}' && (setfacl -m u:5:r copied/file 2>&1 || true) && getfacl -cp copied/sub",
        f.mnt_str()
    ));
    assert!(refused.contains("Operation not supported"), "{refused}");
    assert!(!refused.contains("user:1234"), "{refused}");
}

#[test]
fn selinux_labels_are_unsupported_so_ls_l_asks_once_per_mount() {
    if Path::new("/sys/fs/selinux/enforce").exists() {
        // There the kernel answers for security.selinux itself, never asking us.
        eprintln!("skipped: SELinux is on");
        return;
    }
    let mut f = Fixture::new();
    f.env = vec![("RUST_LOG".to_string(), REQUEST_LOG.to_string())];
    f.mount();
    let m = f.mnt_str();
    let out = bash(&format!(
        "cd {m} && seq 1 50 | xargs touch && \
         setfattr -n security.objfs-test -v 1 1 && getfattr --only-values -n security.objfs-test 1 && echo; \
         (getfattr -n security.selinux 1 2>&1 || true); (setfattr -n security.selinux -v x 1 2>&1 || true)"
    ));
    assert_eq!(
        out.matches("Operation not supported").count(),
        2,
        "getfattr and setfattr of security.selinux: {out}"
    );
    assert!(out.starts_with("1\n"), "other security.* names work: {out}");
    let listing = bash(&format!("ls -l {m}"));
    let modes: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(modes.len(), 50, "{listing}");
    assert!(modes.iter().all(|mode| mode.len() == 10), "{listing}");
    f.umount();
    // getfattr and setfattr asked once each; ls remembers "not supported" for the
    // device: one request for the whole listing, where "no such attribute" would
    // have cost one per file.
    let asked = f.log_text().matches("name \"security.selinux\"").count();
    eprintln!("security.selinux asked {asked} times");
    assert!(
        (2..=4).contains(&asked),
        "security.selinux asked {asked} times"
    );
}

#[test]
fn cp_within_the_mount_shares_blocks_and_seek_finds_the_holes() {
    let mut f = Fixture::new();
    f.env = vec![("RUST_LOG".to_string(), REQUEST_LOG.to_string())];
    f.mount();
    let m = f.mnt_str();
    // 1 MiB blocks: data in slot 4 and at the end (slot 20), holes elsewhere.
    bash(&format!(
        "set -e; cd {m}; head -c 5000000 /dev/urandom > a; \
         truncate -s 20M sparse; printf end >> sparse; \
         dd if=/dev/urandom of=sparse bs=1M seek=4 count=1 conv=notrunc status=none; \
         cp a b; cp sparse sparse2; cmp a b; cmp sparse sparse2; \
         python3 -c \"open('a', 'rb').read(1)\""
    ));
    let segments = |name: &str| {
        let py = format!(
            "import os\n\
             fd = os.open('{m}/{name}', os.O_RDONLY); out = []; pos = 0\n\
             while True:\n\
             \x20   try: d = os.lseek(fd, pos, os.SEEK_DATA)\n\
             \x20   except OSError: break\n\
             \x20   h = os.lseek(fd, d, os.SEEK_HOLE); out.append((d, h)); pos = h\n\
             print(out)"
        );
        sh("python3", &["-c", &py])
    };
    let mib = 1 << 20;
    let expect = format!(
        "[({}, {}), ({}, {})]\n",
        4 * mib,
        5 * mib,
        20 * mib,
        20 * mib + 3
    );
    assert_eq!(segments("sparse"), expect);
    // The copy kept the holes. `cp` saw a dense file (its data was not flushed yet, so
    // st_blocks counted it whole) and copied the whole range with copy_file_range:
    // holes come out as holes only because objfs shares the source's slots (a byte
    // copy would store zeros).
    assert_eq!(segments("sparse2"), expect);
    // Once flushed (and the kernel's cached attributes gone: a remount), st_blocks
    // counts the two blocks with data, so `cp` out of the mount finds the holes
    // (SEEK_DATA) and keeps them where the native side can.
    f.remount();
    let blocks = |p: &str| bash(&format!("stat -c %b {p}")).trim().to_string();
    assert_eq!(blocks(&format!("{m}/sparse")), (2 * mib / 512).to_string());
    let out = f.tmp.path().join("sparse-out");
    let out = out.to_str().unwrap();
    let probe = f.tmp.path().join("probe");
    bash(&format!(
        "truncate -s 10M {} && cp {m}/sparse {out} && cmp {m}/sparse {out}",
        probe.display()
    ));
    if blocks(probe.to_str().unwrap()) == "0" {
        let kept: u64 = blocks(out).parse().unwrap();
        assert!(
            kept < 4 * mib / 512,
            "cp out wrote the holes: {kept} blocks"
        );
    }
    // Unaligned and misaligned ranges, into the middle of an existing file, compared
    // with the same calls on a native file.
    let native = f.tmp.path().join("native");
    std::fs::create_dir(&native).unwrap();
    let n = native.to_str().unwrap();
    bash(&format!(
        "cp {m}/a {n}/a && cp {m}/a {n}/c && cp {m}/a {m}/c"
    ));
    let ranges = |d: &str| {
        format!(
            "import os\n\
             s = os.open('{d}/a', os.O_RDONLY); t = os.open('{d}/c', os.O_WRONLY)\n\
             for (so, do, n) in [(100, 1048676, 3000000), (7, 4000000, 2500000), (0, 0, 10), (4999990, 100, 50)]:\n\
             \x20   done = 0\n\
             \x20   while done < n:\n\
             \x20       k = os.copy_file_range(s, t, n - done, so + done, do + done)\n\
             \x20       if k == 0: break\n\
             \x20       done += k\n\
             \x20   print(done)"
        )
    };
    let on_mount = sh("python3", &["-c", &ranges(m)]);
    assert_eq!(on_mount, sh("python3", &["-c", &ranges(n)]));
    assert_eq!(on_mount, "3000000\n2500000\n10\n10\n");
    f.umount();
    let log = f.log_text();
    assert!(
        log.contains("COPY_FILE_RANGE"),
        "cp did not reach objfs's copy"
    );
    assert!(log.contains("LSEEK"), "SEEK_DATA did not reach objfs");
    // Python's open() asks TCGETS (isatty): answered ENOTTY, with no warning logged.
    assert!(log.contains("IOCTL"), "python's isatty did not reach objfs");
    assert!(
        !log.contains("Not Implemented"),
        "a request fuser had to refuse"
    );
    f.mount();
    for name in ["b", "sparse2", "c"] {
        let orig = if name == "c" {
            native.join("c")
        } else {
            f.path(if name == "b" { "a" } else { "sparse" })
        };
        assert!(
            std::fs::read(f.path(name)).unwrap() == std::fs::read(orig).unwrap(),
            "{name} differs after remount"
        );
    }
    f.umount();
    let out = f.objfs_ok(&["fsck", f.store_str()]);
    assert!(out.contains("clean"), "{out}");
}

#[test]
fn with_the_writeback_cache_seek_leaves_holes_to_the_kernel() {
    let mut f = Fixture::new();
    f.extra = vec!["--writeback-cache".into()];
    f.mount();
    let m = f.mnt_str();
    // The kernel does not write its dirty pages back before asking SEEK_DATA, so
    // objfs could call data only the kernel holds a hole: the kernel answers (the
    // whole file is data) and cp copies every byte.
    let py = format!(
        "import os\n\
         fd = os.open('{m}/f', os.O_RDWR | os.O_CREAT, 0o644)\n\
         os.pwrite(fd, b'x', 5 << 20)\n\
         print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))"
    );
    assert_eq!(
        sh("python3", &["-c", &py]),
        format!("0 {}\n", (5 << 20) + 1)
    );
    bash(&format!("cp {m}/f {m}/g && cmp {m}/f {m}/g"));
    f.umount();
}

#[test]
fn tar_sparse_archives_the_data_a_writer_still_holds_in_the_kernel() {
    for extra in [vec!["--writeback-cache".to_string()], vec![]] {
        let mut f = Fixture::new();
        f.extra = extra.clone();
        f.mount();
        let m = f.mnt_str();
        let o = f.tmp.path().join("out");
        std::fs::create_dir(&o).unwrap();
        let o = o.display();
        // One file written with write(2) (with the writeback cache the kernel keeps
        // it, size and all), one created and written through a shared mapping, and a
        // sparse one that existed before, opened without O_CREAT and mapped (kept by
        // the kernel either way; with zero-message opens objfs never hears of that
        // open); another process archives them while the writer holds them.
        bash(&format!("truncate -s 3M {m}/c"));
        std::fs::write(
            format!("{o}/writer.py"),
            format!(
                "import os, mmap, time\n\
                 a = os.open('{m}/a', os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)\n\
                 os.write(a, b'important' * 20000)\n\
                 b = os.open('{m}/b', os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)\n\
                 os.ftruncate(b, 180000)\n\
                 mm = mmap.mmap(b, 180000)\n\
                 mm[:] = b'mapped!!!' * 20000\n\
                 c = os.open('{m}/c', os.O_RDWR)\n\
                 mc = mmap.mmap(c, 3 << 20)\n\
                 mc[(2 << 20) + 5:(2 << 20) + 14] = b'in a hole'\n\
                 open('{o}/ready', 'w').close()\n\
                 time.sleep(4)\n"
            ),
        )
        .unwrap();
        std::fs::write(
            format!("{o}/check.py"),
            format!(
                "c = bytearray(3 << 20); c[(2 << 20) + 5:(2 << 20) + 14] = b'in a hole'\n\
                 print(open('{o}/x/a', 'rb').read() == b'important' * 20000,\n\
                 \x20     open('{o}/x/b', 'rb').read() == b'mapped!!!' * 20000,\n\
                 \x20     open('{o}/x/c', 'rb').read() == c)\n"
            ),
        )
        .unwrap();
        // Without the writeback cache objfs has the kernel write a mapping's dirty
        // pages back before it calls any range a hole, so the file's times move while
        // tar reads it, and tar says so (status 1): the writer did change it.
        let tolerated = if extra.is_empty() { 1 } else { 0 };
        let out = bash(&format!(
            "python3 {o}/writer.py & \
             for _ in $(seq 100); do [ -e {o}/ready ] && break; sleep 0.05; done; sleep 1; \
             stat -c '%n %b' {m}/a {m}/b {m}/c >&2; \
             rc=0; tar --sparse -cf {o}/x.tar -C {m} a b c 2>{o}/tar.err || rc=$?; \
             cat {o}/tar.err >&2; \
             if [ $rc -gt {tolerated} ] || {{ [ $rc = 1 ] && grep -v 'file changed as we read it' {o}/tar.err; }}; \
             then echo \"tar failed: $rc\"; fi; \
             mkdir {o}/x && tar -xf {o}/x.tar -C {o}/x && python3 {o}/check.py; wait"
        ));
        assert_eq!(out, "True True True\n", "{extra:?}");
        f.umount();
    }
}

#[test]
fn files_open_and_close_without_requests_and_an_unlinked_open_file_lives_until_closed() {
    let mut f = Fixture::new();
    f.env = vec![("RUST_LOG".to_string(), REQUEST_LOG.to_string())];
    f.mount();
    let m = f.mnt_str();
    let out = f.tmp.path().join("out");
    bash(&format!(
        "mkdir {m}/d && for i in $(seq 1 40); do echo file $i > {m}/d/$i; done; \
         cat {m}/d/* > /dev/null; cp -a {m}/d {out}; diff -r {m}/d {out}",
        out = out.display()
    ));
    // Unlinked while open: the kernel still knows the inode (its lookup), so objfs
    // keeps it, through a reclaim of the kernel's caches, until the last close.
    let py = format!(
        "import os\n\
         fd = os.open('{m}/gone', os.O_RDWR | os.O_CREAT, 0o644)\n\
         data = os.urandom(3 << 20)\n\
         os.write(fd, data)\n\
         os.link('{m}/gone', '{m}/twin')\n\
         os.unlink('{m}/gone'); os.unlink('{m}/twin')\n\
         open('/proc/sys/vm/drop_caches', 'w').write('3')\n\
         os.pwrite(fd, b'after', 1 << 20)\n\
         os.fsync(fd)\n\
         data = data[:1 << 20] + b'after' + data[(1 << 20) + 5:]\n\
         print(os.pread(fd, 3 << 20, 0) == data, os.fstat(fd).st_nlink, sorted(os.listdir('{m}')))\n\
         os.close(fd)"
    );
    assert_eq!(sh("python3", &["-c", &py]), "True 0 ['d']\n");
    // The kernel forgets the closed file's inode (FORGET), which destroys it.
    std::thread::sleep(std::time::Duration::from_millis(500));
    f.umount();
    let log = f.log_text();
    let requests = |op: &str| log.matches(&format!(" {op} ")).count();
    // Each answered ENOSYS once; files are created with MKNOD.
    let once = ["OPEN", "CREATE", "FLUSH"].map(requests);
    assert!(
        once.iter().all(|&n| n <= 1),
        "OPEN, CREATE, FLUSH: {once:?}"
    );
    assert_eq!(requests("RELEASE"), 0);
    assert!(requests("MKNOD") >= 41);
    assert!(requests("FORGET") + requests("BATCH_FORGET") > 0);
    // Nothing was left for the next mount to reclaim.
    f.mount();
    f.umount();
    assert!(
        !f.log_text().contains("reclaimed"),
        "the unlinked file outlived its last close"
    );
    let fsck = f.objfs_ok(&["fsck", f.store_str()]);
    assert!(fsck.contains("clean"), "{fsck}");
}

#[test]
fn seek_writes_back_only_the_hole_it_reports_and_open_requests_bring_opens_back() {
    let mut f = Fixture::new();
    f.env = vec![("RUST_LOG".to_string(), REQUEST_LOG.to_string())];
    f.mount();
    let m = f.mnt_str().to_string();
    // Data in slots 0 and 4 (1 MiB blocks), holes between and after.
    let py = format!(
        "import os\n\
         fd = os.open('{m}/s', os.O_RDWR | os.O_CREAT, 0o644)\n\
         os.pwrite(fd, b'a' * (1 << 20), 0); os.pwrite(fd, b'b' * (1 << 20), 4 << 20)\n\
         os.ftruncate(fd, 6 << 20); os.fsync(fd)\n\
         whole = os.pread(fd, 6 << 20, 0)\n\
         open('{m}/.mark-seek', 'w').close()\n\
         h = os.lseek(fd, 0, os.SEEK_HOLE); d = os.lseek(fd, h, os.SEEK_DATA)\n\
         again = os.pread(fd, 1 << 20, 0) + os.pread(fd, 1 << 20, 4 << 20)\n\
         print(h, d, again == whole[:1 << 20] + whole[4 << 20:5 << 20])"
    );
    assert_eq!(
        sh("python3", &["-c", &py]),
        format!("{} {} True\n", 1 << 20, 4 << 20)
    );
    f.umount();
    let log = f.log_text();
    let after = &log[log.find(".mark-seek").expect("marker")..];
    // The data pages stayed cached: only the holes' were dropped.
    let refetched: Vec<u64> = after
        .lines()
        .filter(|l| l.contains(" READ fh"))
        .filter_map(|l| {
            l.split("offset Ok(")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()
        })
        .filter(|o| *o < 1 << 20 || (4 << 20..5 << 20).contains(o))
        .collect();
    assert!(
        refetched.is_empty(),
        "a seek dropped cached data: {refetched:?}"
    );
    // --open-requests: every open and close is a request again.
    f.extra = vec!["--open-requests".into()];
    f.mount();
    bash(&format!(
        "ls {m}/.mark-open 2>/dev/null || true; cat {m}/s > /dev/null; cat {m}/s > /dev/null"
    ));
    f.umount();
    let log = f.log_text();
    let after = &log[log.rfind(".mark-open").expect("marker")..];
    assert!(after.matches(" OPEN ").count() >= 2, "{after}");
    assert!(after.matches(" RELEASE ").count() >= 2, "{after}");
}

#[test]
fn with_one_request_thread_seek_calls_a_possible_hole_data_at_once() {
    let mut f = Fixture::new();
    f.extra = vec!["--threads".into(), "1".into()];
    f.mount();
    let m = f.mnt_str();
    // No thread would be free to take the WRITEs a write-back of mapped pages needs:
    // the seek does not wait for them (it would wait 2 s in vain) and calls the file
    // data, which is never wrong.
    let py = format!(
        "import os, mmap, time\n\
         fd = os.open('{m}/s', os.O_RDWR | os.O_CREAT, 0o644)\n\
         os.ftruncate(fd, 3 << 20)\n\
         mm = mmap.mmap(fd, 3 << 20); mm[(2 << 20) + 1] = 7\n\
         t = time.monotonic()\n\
         print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE), time.monotonic() - t < 1)"
    );
    assert_eq!(sh("python3", &["-c", &py]), format!("0 {} True\n", 3 << 20));
    f.umount();
}

#[test]
fn a_name_renamed_away_during_a_listing_never_comes_back() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    // The save pattern that lost data: write a temporary name, rename it over the
    // target, and reuse the temporary name next time. A listing read meanwhile
    // must not bring the old name back as a cached name for the renamed file (an
    // open with O_TRUNC through it truncated the file the rename kept). objfs sends
    // 512 entries per reply: f0700 comes in the second, a readdirplus (the rename's
    // lookups made the kernel ask for one), read after the rename.
    let py = format!(
        "import os\n\
         d = '{m}/dir'; os.makedirs(d)\n\
         open(d + '/a', 'w').write('precious data')\n\
         fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)\n\
         os.rename(d + '/a', d + '/b')\n\
         out = [os.listdir(fd), os.path.exists(d + '/a')]\n\
         os.close(fd)\n\
         for i in range(3000): open(d + '/f%04d' % i, 'w').close()\n\
         open(d + '/f0700', 'w').write('precious too')\n\
         open('/proc/sys/vm/drop_caches', 'w').write('2')\n\
         it = os.scandir(d); next(it)\n\
         os.rename(d + '/f0700', d + '/saved')\n\
         rest = [e.name for e in it]\n\
         out += [len(rest) > 2000, os.path.exists(d + '/f0700')]\n\
         open(d + '/a', 'w').write('new'); open(d + '/f0700', 'w').write('new')\n\
         out += [open(d + '/b').read(), open(d + '/saved').read()]\n\
         print(out)"
    );
    assert_eq!(
        sh("python3", &["-c", &py]),
        "[['b'], False, True, False, 'precious data', 'precious too']\n"
    );
}

#[test]
fn a_listing_goes_on_past_a_batch_whose_names_were_all_removed() {
    let f = Fixture::mounted();
    let m = f.mnt_str();
    // objfs answers 512 entries a request; all of the second batch go while the
    // listing is read. Its reply must not come back empty (the end, for the kernel):
    // the names present throughout must all be listed.
    let py = format!(
        "import os\n\
         d = '{m}/dir'; os.makedirs(d)\n\
         for i in range(1500): open(d + '/a%04d' % i, 'w').close()\n\
         for i in range(10): open(d + '/z%d' % i, 'w').close()\n\
         it = os.scandir(d); next(it)\n\
         for i in range(1500): os.unlink(d + '/a%04d' % i)\n\
         print(sorted(e.name for e in it if e.name.startswith('z')))"
    );
    let expected: Vec<String> = (0..10).map(|i| format!("'z{i}'")).collect();
    assert_eq!(
        sh("python3", &["-c", &py]),
        format!("[{}]\n", expected.join(", "))
    );
}
