//! The S3 backend against a real single-node Garage on 127.0.0.1: the fs suite's
//! representative subset, credentials and bucket errors, prefixes, and an outage.

mod common;
#[path = "common/garage.rs"]
mod garage;

use common::*;
use garage::{BUCKET, Garage};
use std::time::Duration;

fn s3_fixture(g: &Garage, prefix: &str) -> Fixture {
    s3_fixture_with(g, prefix, &[])
}

fn s3_fixture_with(g: &Garage, prefix: &str, mkfs: &[&str]) -> Fixture {
    let spec = format!("s3://{BUCKET}/{prefix}");
    let f = Fixture::with_store(&spec, &g.env());
    let mut args = vec!["mkfs", spec.as_str()];
    args.extend_from_slice(mkfs);
    f.objfs_ok(&args);
    f
}

#[test]
fn tree_copy_random_writes_rename_and_remount() {
    let g = Garage::start();
    // Compressed: the sample tree's text shrinks, the random file stays plain.
    let f = s3_fixture_with(&g, "fs1", &["--compression", "zstd"]);
    f.mount();
    let src = f.tmp.path().join("src");
    make_sample_tree(&src);
    let (src, m) = (src.to_str().unwrap(), f.mnt_str());
    bash(&format!(
        "cp -a '{src}' '{m}/copy' && diff -r --no-dereference '{src}' '{m}/copy'"
    ));
    bash(&format!(
        "dd if=/dev/urandom of={m}/r bs=1M count=3 status=none && \
         printf xyz | dd of={m}/r bs=1 seek=1048570 conv=notrunc status=none && \
         printf tail >> {m}/r && mv {m}/copy {m}/moved && md5sum < {m}/r > {}/sum && \
         cp {m}/r {m}/r2 && cmp {m}/r {m}/r2",
        f.tmp.path().display()
    ));
    // statfs on S3: a fixed 1 PiB less the files' sizes (two files of 3 MiB here).
    let avail: u64 = bash(&format!("df -B1 --output=avail {m} | tail -1"))
        .trim()
        .parse()
        .unwrap();
    let pib = 1u64 << 50;
    assert!(
        avail <= pib - (6 << 20) && avail > pib - (100 << 20),
        "{avail}"
    );
    f.remount();
    bash(&format!(
        "diff -r --no-dereference '{src}' '{m}/moved' && test ! -e {m}/copy && md5sum < {m}/r | cmp - {}/sum && \
         cmp {m}/r {m}/r2",
        f.tmp.path().display()
    ));
    f.umount();
    let out = f.objfs_ok(&["fsck", f.store_str(), "--verify-data"]);
    assert!(out.contains("clean"), "{out}");
    let out = f.objfs_ok(&["stat", f.store_str()]);
    assert!(out.contains("files:          16"), "{out}");
    assert!(out.contains("compression:    zstd"), "{out}");
    // Object sizes come from the bucket's listing: the text shrank.
    let percent: f64 = out
        .split("compressed to ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no compression figure: {out}"));
    assert!(percent > 0.0 && percent < 100.0, "{out}");
}

#[test]
fn crash_recovery_and_the_writer_lease() {
    let g = Garage::start();
    let f = s3_fixture(&g, "crash");
    f.mount();
    bash(&format!(
        "head -c 2500000 /dev/urandom > {0}/a && sync {0}/a && md5sum < {0}/a > {1}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    // A second writer is refused, naming the holder.
    let other = f.tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let out = f.try_mount_at(&other, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mounted read-write by"));
    f.kill_daemon();
    f.mount();
    bash(&format!(
        "md5sum < {}/a | cmp - {}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    f.umount();
    assert!(f.objfs_ok(&["fsck", f.store_str()]).contains("clean"));
}

#[test]
fn credentials_bucket_and_prefix_errors_are_clear() {
    let g = Garage::start();
    let f = s3_fixture(&g, "fs1");
    let mut bad = g.env();
    bad[1].1 = "0".repeat(64);
    let wrong = Fixture::with_store(f.store_str(), &bad);
    let out = wrong.try_mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.to_lowercase().contains("access denied"), "{err}");
    let missing = Fixture::with_store("s3://no-such-bucket-here/x", &g.env());
    let out = missing.try_mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such bucket"), "{err}");
    // An empty prefix is not created implicitly, and says how to create it.
    let fresh = Fixture::with_store(&format!("s3://{BUCKET}/fs10"), &g.env());
    let out = fresh.try_mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("objfs mkfs"), "{err}");
    // fs1 and fs10 never see each other's keys.
    fresh.objfs_ok(&["mkfs", fresh.store_str()]);
    f.mount();
    fresh.mount();
    std::fs::write(f.path("only-in-fs1"), b"1").unwrap();
    std::fs::write(fresh.path("only-in-fs10"), b"10").unwrap();
    f.remount();
    fresh.remount();
    let names = |fx: &Fixture| -> Vec<String> {
        std::fs::read_dir(&fx.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(names(&f), vec!["only-in-fs1"]);
    assert_eq!(names(&fresh), vec!["only-in-fs10"]);
    // Secrets never reach the log.
    assert!(!f.log_text().contains(garage::SECRET));
}

#[test]
fn outage_during_a_copy_loses_nothing_fsynced() {
    let mut g = Garage::start();
    let mut f = s3_fixture(&g, "outage");
    f.extra = vec![
        "--retry-budget".into(),
        "20".into(),
        "--commit-interval".into(),
        "1".into(),
    ];
    f.mount();
    bash(&format!(
        "head -c 3000000 /dev/urandom > {0}/before && sync {0}/before && md5sum < {0}/before > {1}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    let m = f.mnt_str().to_string();
    let copier = std::thread::spawn(move || {
        run_with_timeout(
            120,
            "bash",
            &[
                "-c",
                &format!(
                    "for i in $(seq 1 30); do head -c 300000 /dev/urandom > {m}/c$i || exit 1; sync {m}/c$i || exit 1; done"
                ),
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    g.stop();
    std::thread::sleep(Duration::from_secs(3));
    g.restart();
    let out = copier.join().unwrap();
    // Within the retry budget the outage is invisible; either way nothing is corrupt.
    assert!(
        out.status.success(),
        "copy failed across a 3 s outage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(f.path("after"), b"store is back").unwrap();
    f.remount();
    bash(&format!(
        "md5sum < {}/before | cmp - {}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    assert_eq!(std::fs::read(f.path("after")).unwrap(), b"store is back");
    assert!(f.path("c30").exists());
    f.umount();
    assert!(f.objfs_ok(&["fsck", f.store_str()]).contains("clean"));
}

#[test]
fn shared_aws_files_and_profiles_configure_the_store() {
    let g = Garage::start();
    let f = s3_fixture(&g, "profiles");
    let aws = f.tmp.path().join("aws");
    std::fs::create_dir(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = GKwrongwrongwrongwrongwrong\naws_secret_access_key = nope\n\n[objfs]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            garage::KEY_ID,
            garage::SECRET
        ),
    )
    .unwrap();
    std::fs::write(
        aws.join("config"),
        format!(
            "[profile objfs]\nregion = garage\nendpoint_url = {}\n",
            g.endpoint
        ),
    )
    .unwrap();
    let env = [
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            aws.join("credentials").display().to_string(),
        ),
        ("AWS_CONFIG_FILE", aws.join("config").display().to_string()),
        ("AWS_PROFILE", "objfs".to_string()),
    ];
    let p = Fixture::with_store(f.store_str(), &env);
    p.mount();
    std::fs::write(p.path("via-profile"), b"ok").unwrap();
    p.remount();
    assert_eq!(std::fs::read(p.path("via-profile")).unwrap(), b"ok");
    p.umount();
    // The default profile's wrong key is refused, clearly.
    let mut denv = env[..2].to_vec();
    denv.push(("AWS_REGION", "garage".to_string()));
    let d = Fixture::with_store(f.store_str(), &denv);
    let out = d.objfs(&["stat", d.store_str(), "--endpoint", &g.endpoint]);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && err.contains("access denied"),
        "{err}"
    );
}

#[test]
fn disk_cache_survives_remount_and_serves_reads_while_the_store_is_down() {
    let mut g = Garage::start();
    let mut f = s3_fixture(&g, "cached");
    let cache = f.tmp.path().join("cache");
    f.extra = vec![
        "--cache-dir".into(),
        cache.display().to_string(),
        "--disk-cache-size".into(),
        "64M".into(),
        "--retry-budget".into(),
        "2".into(),
    ];
    f.mount();
    bash(&format!(
        "head -c 5000000 /dev/urandom > {0}/data && md5sum < {0}/data > {1}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    f.remount();
    let cached: u64 = bash(&format!("du -sb {} | cut -f1", cache.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(
        cached >= 5_000_000,
        "written blocks went to the disk cache ({cached} bytes)"
    );
    // The store goes away; a fresh mount's reads come from the disk cache.
    g.stop();
    bash(&format!(
        "echo 3 > /proc/sys/vm/drop_caches; md5sum < {}/data | cmp - {}/sum",
        f.mnt_str(),
        f.tmp.path().display()
    ));
    g.restart();
    f.umount();
}
