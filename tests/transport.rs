//! The two ways requests reach objfs: /dev/fuse (the default) and, with --io-uring,
//! io_uring queues where the fuse module's enable_uring switch is on (scripts/test.sh
//! turns it on; pjdfstest and fsx also run through them, in posix_suites.rs). Both
//! must serve the same filesystem.

mod common;
use common::*;

/// The fuse module's switch is on and io_uring itself is not disabled.
fn kernel_offers_io_uring() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).map(|v| v.trim().to_string());
    read("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v == "Y")
        && read("/proc/sys/kernel/io_uring_disabled").map_or(true, |v| v == "0")
}

fn transport_line(f: &Fixture) -> String {
    // Logged by a queue thread once INIT is done: may come just after mount returns.
    wait_until(std::time::Duration::from_secs(10), || {
        f.log_text().contains("FUSE transport:")
    });
    f.log_text()
        .lines()
        .rfind(|l| l.contains("FUSE transport:"))
        .unwrap_or_else(|| panic!("no transport line in the log:\n{}", f.log_text()))
        .to_string()
}

/// Everything the shell does to a tree, with a native copy to compare against:
/// copies in and out, renames, links, xattrs, truncation, holes, modes, times.
fn workout(f: &Fixture) {
    let src = f.tmp.path().join("src");
    if !src.exists() {
        make_sample_tree(&src);
    }
    let (src, m) = (src.to_str().unwrap(), f.mnt_str());
    let out = f.tmp.path().join("out");
    let _ = std::fs::remove_dir_all(&out);
    bash(&format!(
        "set -e; rm -rf '{m}/t'; cp -a '{src}' '{m}/t'; diff -r --no-dereference '{src}' '{m}/t'
         mv '{m}/t/a' '{m}/t/moved'; mv '{m}/t/moved' '{m}/t/a'
         ln '{m}/t/exec.sh' '{m}/t/exec-link'; test \"$(stat -c %h '{m}/t/exec.sh')\" = 2; rm '{m}/t/exec-link'
         setfattr -n user.k -v value '{m}/t/private'
         test \"$(getfattr --only-values -n user.k '{m}/t/private')\" = value
         setfattr -x user.k '{m}/t/private'
         ! getfattr -n user.k '{m}/t/private' 2>/dev/null
         chmod 640 '{m}/t/private'; test \"$(stat -c %a '{m}/t/private')\" = 640; chmod 600 '{m}/t/private'
         touch -d '2001-01-01 00:00:00.5' '{m}/t/empty-dir'; touch -d '2001-01-01 00:00:00.5' '{src}/empty-dir'
         dd if=/dev/urandom of='{m}/big' bs=1M count=3 status=none; cp '{m}/big' '{m}/big2'; cmp '{m}/big' '{m}/big2'
         truncate -s 10M '{m}/big2'; test \"$(stat -c %s '{m}/big2')\" = 10485760
         fallocate -l 2M '{m}/alloc'; test \"$(stat -c %s '{m}/alloc')\" = 2097152
         mkfifo '{m}/fifo'; test -p '{m}/fifo'; rm '{m}/fifo' '{m}/alloc' '{m}/big' '{m}/big2'
         df '{m}' >/dev/null
         cp -a '{m}/t' '{out}'; diff -r --no-dereference '{src}' '{out}'",
        out = out.display()
    ));
    let listing = |root: &str| {
        bash(&format!(
            "cd '{root}' && find . -printf '%y %m %s %n %l %p\\n' | sort -k6"
        ))
    };
    assert_eq!(listing(src), listing(&format!("{m}/t")));
}

#[test]
fn io_uring_is_used_where_the_kernel_offers_it_when_asked() {
    let mut f = Fixture::new();
    f.extra = vec!["--io-uring".into()];
    f.mount();
    let line = transport_line(&f);
    if kernel_offers_io_uring() {
        assert!(line.contains("io_uring,"), "{line}");
    } else {
        assert!(line.contains("FUSE transport: /dev/fuse ("), "{line}");
    }
    workout(&f);
    f.remount();
    workout(&f);
}

#[test]
fn requests_go_through_dev_fuse_by_default() {
    let f = Fixture::mounted();
    let line = transport_line(&f);
    assert!(line.ends_with("FUSE transport: /dev/fuse"), "{line}");
    workout(&f);
    f.remount();
    workout(&f);
}

#[test]
fn a_queue_that_cannot_register_turns_io_uring_off_and_the_mount_serves_on() {
    if !kernel_offers_io_uring() || !cfg!(debug_assertions) {
        eprintln!("skipped: no io_uring queues, or a release build (no fault hook)");
        return;
    }
    let mut f = Fixture::new();
    f.extra = vec!["--io-uring".into()];
    // Honoured by debug builds only: queue 0 fails to register its slot.
    f.env = vec![("OBJFS_TEST_RING_REGISTER_FAILS".into(), "1".into())];
    f.mount();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || f
            .log_text()
            .contains("turned off for this mount")),
        "{}",
        f.log_text()
    );
    // The kernel would otherwise hold every request for the queue that never came.
    workout(&f);
    f.umount();
}
