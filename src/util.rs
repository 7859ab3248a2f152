//! Small helpers shared by several layers: randomness, sizes, time.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Drops one count of `key`; true when that was the last one (the key is then gone).
pub fn release_count<K: std::hash::Hash + Eq>(
    counts: &mut std::collections::HashMap<K, u32>,
    key: &K,
) -> bool {
    match counts.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            counts.remove(key);
            true
        }
        None => false,
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the OS random source is available");
    buf
}

pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("the OS random source is available");
    hex::encode(buf)
}

pub fn unix_now() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            (
                -(d.as_secs() as i64) - 1,
                1_000_000_000 - d.subsec_nanos().max(1),
            )
        }
    }
}

/// Parses a size: plain bytes or a K/M/G/T suffix (binary units, case-insensitive,
/// optional trailing "B" or "iB").
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid size '{text}' (use bytes or a K/M/G/T suffix, e.g. 64M)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size '{text}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The supplementary groups of process `pid`, from /proc (empty if it is gone).
pub fn supplementary_groups(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `work` while a scoped thread calls `tick` every `period` (keeping a lease
/// alive through work that may outlast it). No tick starts after `work` ends.
pub fn with_ticks<T>(period: Duration, tick: impl Fn() + Sync, work: impl FnOnce() -> T) -> T {
    let stop = (Mutex::new(false), Condvar::new());
    std::thread::scope(|s| {
        // If no thread can be had, `work` runs without ticks.
        let _ticker = std::thread::Builder::new()
            .name("objfs-ticks".into())
            .spawn_scoped(s, || {
                let (lock, cv) = &stop;
                let mut stopped = lock.lock().unwrap();
                loop {
                    stopped = cv
                        .wait_timeout_while(stopped, period, |stopped| !*stopped)
                        .unwrap()
                        .0;
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    tick();
                    stopped = lock.lock().unwrap();
                }
            });
        // Stops the ticker even if `work` panics (the scope would wait for it).
        struct Stop<'a>(&'a (Mutex<bool>, Condvar));
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                *self.0.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                self.0.1.notify_all();
            }
        }
        let _stop = Stop(&stop);
        work()
    })
}

/// Runs `work` on every item at once: the first on this thread, each other on a
/// scoped thread of its own, or on this thread too where no thread can be had. An
/// item whose `work` panicked yields `failed(item)`. Results are in item order.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> R + Sync,
    failed: impl Fn(&T) -> R,
) -> Vec<R> {
    let Some((first, others)) = items.split_first() else {
        return Vec::new();
    };
    let work = &work;
    std::thread::scope(|s| {
        let threads: Vec<_> = others
            .iter()
            .map(|item| {
                std::thread::Builder::new()
                    .spawn_scoped(s, move || work(item))
                    .ok()
            })
            .collect();
        let here = |item: &T| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(item)))
                .unwrap_or_else(|_| failed(item))
        };
        let mut out = Vec::with_capacity(items.len());
        out.push(here(first));
        for (item, thread) in others.iter().zip(threads) {
            out.push(match thread {
                Some(t) => t.join().unwrap_or_else(|_| failed(item)),
                None => here(item),
            });
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_ticks_ticks_while_work_runs_and_stops_with_it() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let ticks = AtomicU32::new(0);
        let tick = || {
            ticks.fetch_add(1, Ordering::SeqCst);
        };
        let out = with_ticks(Duration::from_millis(20), tick, || {
            std::thread::sleep(Duration::from_millis(210));
            7
        });
        assert_eq!(out, 7);
        let seen = ticks.load(Ordering::SeqCst);
        assert!((5..=11).contains(&seen), "{seen} ticks in 210 ms");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(ticks.load(Ordering::SeqCst), seen, "ticked after the work");
        // Work that panics stops the ticker instead of leaving the scope waiting.
        let panicked = std::panic::catch_unwind(|| {
            with_ticks(Duration::from_millis(5), || {}, || panic!("boom"))
        });
        assert!(panicked.is_err());
    }

    #[test]
    fn in_parallel_keeps_item_order_and_reports_a_panic_as_failed() {
        let items: Vec<u32> = (0..9).collect();
        let out = in_parallel(
            &items,
            |&i| {
                assert!(i != 0 && i != 5, "boom");
                i * 10
            },
            |&i| i + 1000,
        );
        // 0 ran on this thread, 5 on one of its own: both panics are caught.
        assert_eq!(out, vec![1000, 10, 20, 30, 40, 1005, 60, 70, 80]);
        assert!(in_parallel(&[] as &[u32], |&i| i, |&i| i).is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        for bad in [
            "",
            "M",
            "-1",
            "1.5M",
            "12X",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(10), "10 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
