//! The writer lease: one read-write mount per store. Generations `meta/lease-<n>` are
//! created with put-if-absent; the holder renews its generation by a heartbeat, and a
//! newer generation (a takeover) or a lapse it could not renew fences it (EROFS).
//! On stores that ignore conditional create, a read-back after writing catches most
//! races and the journal chain exposes the rest as a fork.

use crate::index::codec::{self, FrameError, Kind};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

const PREFIX: &str = "meta/lease-";
pub const LEASE: Kind = Kind {
    name: "lease",
    magic: b"OBJFSLS\x01",
};
/// How far apart two machines' clocks may be; a lease counts as live this long
/// after its stated expiry.
pub const CLOCK_SKEW_SECS: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: {err}")]
    Frame { key: String, err: FrameError },
    #[error("the store is mounted read-write by {}", .0.describe())]
    Held(Box<Holder>),
    #[error("lost the race for the writer lease to {0}")]
    Lost(String),
}

/// Who holds a lease, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub writer: String,
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
    /// Process start time in clock ticks since boot: tells a reused pid apart.
    pub start_time: u64,
    pub acquired_unix: i64,
    pub expires_unix: i64,
    pub released: bool,
    /// Where the holder is mounted (empty for tools such as gc).
    pub mountpoint: String,
}

impl Holder {
    pub fn describe(&self) -> String {
        format!(
            "{}, lease expires {}",
            self.who(),
            format_unix(self.expires_unix)
        )
    }

    fn who(&self) -> String {
        let place = if self.mountpoint.is_empty() {
            String::new()
        } else {
            format!(" at {}", self.mountpoint)
        };
        format!(
            "writer {} (pid {} on host {}{place})",
            self.writer, self.pid, self.host
        )
    }

    /// True if the holder runs on this machine (same boot).
    pub fn is_local(&self) -> bool {
        self.boot_id == boot_id()
    }

    /// A holder on this machine whose process is gone can be taken over at once.
    fn is_dead_local(&self) -> bool {
        self.boot_id == boot_id() && process_start_time(self.pid) != Some(self.start_time)
    }

    fn is_live(&self, now: i64) -> bool {
        !self.released && now <= self.expires_unix + CLOCK_SKEW_SECS && !self.is_dead_local()
    }
}

fn format_unix(t: i64) -> String {
    let now = crate::util::unix_now().0;
    if t >= now {
        format!("in {}s", t - now)
    } else {
        format!("{}s ago", now - t)
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn boot_id() -> String {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
}

/// Start time of a live (non-zombie) process, from /proc/PID/stat field 22.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// For tests: another writer takes the next lease generation, as a takeover does.
#[cfg(test)]
pub(crate) fn simulate_takeover(store: &dyn ObjectStore) {
    let (generation, mut holder) = current(store).unwrap().expect("a lease");
    holder.writer = "0ther000".into();
    store
        .put(&key(generation + 1), &codec::encode(&LEASE, &holder))
        .unwrap();
}

/// For tests: the current holder looks like a process of this machine that is gone
/// (as after a crash), so the next writer takes over at once.
#[cfg(test)]
pub(crate) fn mark_holder_dead(store: &dyn ObjectStore) {
    let (generation, mut holder) = current(store).unwrap().expect("a lease");
    holder.start_time = 1;
    holder.boot_id = boot_id();
    store
        .put(&key(generation), &codec::encode(&LEASE, &holder))
        .unwrap();
}

/// For tests: the current holder released the store (a clean unmount).
#[cfg(test)]
pub(crate) fn mark_released(store: &dyn ObjectStore) {
    let (generation, mut holder) = current(store).unwrap().expect("a lease");
    holder.released = true;
    store
        .put(&key(generation), &codec::encode(&LEASE, &holder))
        .unwrap();
}

/// Creates lease `generation` for `holder` unless it exists (`Lost`, naming whoever
/// holds the store now).
fn claim(store: &dyn ObjectStore, generation: u64, holder: &Holder) -> Result<(), LeaseError> {
    match store.put_if_absent(&key(generation), &codec::encode(&LEASE, holder)) {
        Ok(()) => Ok(()),
        Err(StoreError::AlreadyExists(_)) => {
            let other = current(store)?
                .map(|(_, h)| h.describe())
                .unwrap_or_default();
            Err(LeaseError::Lost(other))
        }
        Err(e) => Err(e.into()),
    }
}

fn key(generation: u64) -> String {
    format!("{PREFIX}{generation:020}")
}

fn parse_key(k: &str) -> Option<u64> {
    k.strip_prefix(PREFIX)?.parse().ok()
}

/// The newest lease generation and its holder, if any.
pub fn current(store: &dyn ObjectStore) -> Result<Option<(u64, Holder)>, LeaseError> {
    let Some(generation) = store
        .list(PREFIX)?
        .iter()
        .filter_map(|k| parse_key(k))
        .max()
    else {
        return Ok(None);
    };
    let k = key(generation);
    let bytes = match store.get(&k) {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let holder = codec::decode(&LEASE, &bytes).map_err(|err| LeaseError::Frame { key: k, err })?;
    Ok(Some((generation, holder)))
}

/// The writers that held the lease, newest first (as far as the store still
/// remembers them): who was the legitimate writer when two were active.
pub fn writers_newest_first(store: &dyn ObjectStore) -> Result<Vec<String>, LeaseError> {
    let mut generations: Vec<u64> = store
        .list(PREFIX)?
        .iter()
        .filter_map(|k| parse_key(k))
        .collect();
    generations.sort_unstable_by(|a, b| b.cmp(a));
    let mut writers = Vec::new();
    for generation in generations {
        let k = key(generation);
        let holder: Holder = match store.get(&k) {
            Ok(bytes) => {
                codec::decode(&LEASE, &bytes).map_err(|err| LeaseError::Frame { key: k, err })?
            }
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        writers.push(holder.writer);
    }
    Ok(writers)
}

/// A description of the live writer, if one holds the store.
pub fn live_holder(store: &dyn ObjectStore) -> Result<Option<String>, LeaseError> {
    let now = crate::util::unix_now().0;
    Ok(current(store)?
        .filter(|(_, h)| h.is_live(now))
        .map(|(_, h)| h.describe()))
}

/// A description of the writer that held the store and never released it (it
/// crashed, or lost the store while still running), once it no longer counts as live.
pub fn crashed_holder(store: &dyn ObjectStore) -> Result<Option<String>, LeaseError> {
    let now = crate::util::unix_now().0;
    Ok(current(store)?
        .filter(|(_, h)| !h.released && !h.is_live(now))
        .map(|(_, h)| h.who()))
}

pub struct Lease {
    store: Arc<dyn ObjectStore>,
    generation: u64,
    holder: Holder,
    ttl: Duration,
    /// The previous holder never released the store (it crashed, or lost the store
    /// while still running): requests it sent may still land.
    took_over: bool,
}

impl Lease {
    /// Takes the next lease generation, unless a live writer holds the store.
    pub fn acquire(
        store: Arc<dyn ObjectStore>,
        writer: &str,
        ttl: Duration,
        mountpoint: &str,
    ) -> Result<Lease, LeaseError> {
        let now = crate::util::unix_now().0;
        let mut took_over = false;
        let next = match current(&*store)? {
            Some((_, h)) if h.is_live(now) => return Err(LeaseError::Held(Box::new(h))),
            Some((g, h)) => {
                if !h.released {
                    log::warn!(
                        "taking over the lease of {} (expired or its process is gone)",
                        h.describe()
                    );
                    took_over = true;
                }
                g + 1
            }
            None => 1,
        };
        let holder = Holder {
            writer: writer.to_string(),
            host: hostname(),
            boot_id: boot_id(),
            pid: std::process::id(),
            start_time: process_start_time(std::process::id()).unwrap_or(0),
            acquired_unix: now,
            expires_unix: now + ttl.as_secs() as i64,
            released: false,
            mountpoint: mountpoint.to_string(),
        };
        claim(&*store, next, &holder)?;
        let lease = Lease {
            store,
            generation: next,
            holder,
            ttl,
            took_over,
        };
        lease.confirm_claim()?;
        Ok(lease)
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// See `took_over`: the journal is sealed above anything the previous writer
    /// may still land (`Journal::seal_after_takeover`).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True while our lease has not lapsed by our own clock.
    pub fn valid_now(&self) -> bool {
        self.valid_for(Duration::ZERO)
    }

    /// True if our lease, by our own clock, lasts at least `d` longer.
    pub fn valid_for(&self, d: Duration) -> bool {
        crate::util::unix_now().0 + (d.as_secs_f64().ceil() as i64) < self.holder.expires_unix
    }

    /// Fails if a newer generation exists or our object now names someone else.
    pub fn check_still_ours(&self) -> Result<(), LeaseError> {
        match current(&*self.store)? {
            Some((g, h)) if g == self.generation && h.writer == self.holder.writer => Ok(()),
            Some((_, h)) => Err(LeaseError::Lost(h.describe())),
            None => Err(LeaseError::Lost(
                "nobody (our lease object vanished)".into(),
            )),
        }
    }

    /// After each journal commit: no newer lease exists and ours is still there (two
    /// GETs, no listing). A writer that stalled past its lease between its check and
    /// its PUT may have been taken over; the new writer loaded the store before
    /// that PUT landed, so the commit must not be acknowledged. A takeover always
    /// creates the next generation first, and a second one deletes ours.
    pub fn probe_still_ours(&self) -> Result<bool, LeaseError> {
        match self.store.get(&key(self.generation + 1)) {
            Ok(_) => return Ok(false),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match self.store.get(&key(self.generation)) {
            Ok(bytes) => match codec::decode::<Holder>(&LEASE, &bytes) {
                Ok(h) => Ok(h.writer == self.holder.writer),
                Err(err) => Err(LeaseError::Frame {
                    key: key(self.generation),
                    err,
                }),
            },
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends the lease by its TTL; fails if it was taken over.
    pub fn renew(&mut self) -> Result<(), LeaseError> {
        self.check_still_ours()?;
        let mut next = self.holder.clone();
        next.expires_unix = crate::util::unix_now().0 + self.ttl.as_secs() as i64;
        self.store
            .put(&key(self.generation), &codec::encode(&LEASE, &next))?;
        self.holder = next;
        Ok(())
    }

    /// Runs `work` (loading an index: on S3 a large one can take longer than the
    /// lease) while a thread renews the lease every third of its term; also returns
    /// who took the store meanwhile, if someone did. A lease that lapses all the same
    /// is not renewed (see `reacquire`); a store error is retried at the next tick.
    pub fn renewed_during<T>(&mut self, work: impl FnOnce() -> T) -> (T, Option<String>) {
        let period = self.ttl / 3;
        let lease = std::sync::Mutex::new(self);
        let lost = std::sync::Mutex::new(None);
        let renew = || {
            let mut lease = lease.lock().unwrap();
            if !lease.valid_now() {
                return;
            }
            match lease.renew() {
                Ok(()) => {}
                Err(LeaseError::Lost(who)) => *lost.lock().unwrap() = Some(who),
                Err(e) => log::warn!("renewing the writer lease: {e} (will retry)"),
            }
        };
        let out = crate::util::with_ticks(period, renew, work);
        (out, lost.into_inner().unwrap())
    }

    /// For a lease that lapsed by our clock (a long index load, a stalled lease
    /// thread): rewriting our object could revive it after another writer took the
    /// store (the check and the PUT are not atomic), so this takes the next generation
    /// with a conditional create instead, which fails if anyone else took it.
    pub fn reacquire(&mut self) -> Result<(), LeaseError> {
        // An earlier try whose create landed but whose answer was lost.
        if let Some((g, h)) = current(&*self.store)?
            && g == self.generation + 1
            && h.writer == self.holder.writer
        {
            self.generation = g;
            self.holder = h;
            return self.renew();
        }
        self.check_still_ours()?;
        let now = crate::util::unix_now().0;
        let mut holder = self.holder.clone();
        holder.acquired_unix = now;
        holder.expires_unix = now + self.ttl.as_secs() as i64;
        let next = self.generation + 1;
        claim(&*self.store, next, &holder)?;
        self.generation = next;
        self.holder = holder;
        self.confirm_claim()
    }

    /// After `claim`: stores that ignore conditional create are read back to see who
    /// really won; then the generations before the previous one go.
    fn confirm_claim(&self) -> Result<(), LeaseError> {
        self.check_still_ours()?;
        self.remove_old_generations();
        Ok(())
    }

    /// Marks the lease released so the next writer need not wait for it to expire.
    pub fn release(&mut self) -> Result<(), LeaseError> {
        self.check_still_ours()?;
        let mut released = self.holder.clone();
        released.released = true;
        released.expires_unix = crate::util::unix_now().0;
        self.store
            .put(&key(self.generation), &codec::encode(&LEASE, &released))?;
        self.holder = released;
        Ok(())
    }

    fn remove_old_generations(&self) {
        let Ok(keys) = self.store.list(PREFIX) else {
            return;
        };
        for k in keys {
            if parse_key(&k).is_some_and(|g| g + 1 < self.generation) {
                let _ = self.store.delete(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn one_holder_at_a_time() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(30);
        let mut a = Lease::acquire(store.clone(), "aaaa", ttl, "/m").unwrap();
        match Lease::acquire(store.clone(), "bbbb", ttl, "") {
            Err(LeaseError::Held(who)) => {
                let d = who.describe();
                assert!(d.contains("writer aaaa") && d.contains(" at /m)"), "{d}");
            }
            other => panic!("expected Held, got {:?}", other.map(|l| l.generation)),
        }
        assert!(live_holder(&*store).unwrap().is_some());
        a.renew().unwrap();
        a.release().unwrap();
        assert!(live_holder(&*store).unwrap().is_none());
        let b = Lease::acquire(store.clone(), "bbbb", ttl, "").unwrap();
        assert_eq!(b.generation, 2);
        // The old holder notices it lost the store.
        assert!(matches!(a.renew(), Err(LeaseError::Lost(_))));
    }

    #[test]
    fn dead_local_holders_and_expired_leases_are_taken_over() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let now = crate::util::unix_now().0;
        let dead = Holder {
            writer: "dead".into(),
            host: hostname(),
            boot_id: boot_id(),
            pid: std::process::id(),
            start_time: 1, // not our start time: a previous process with our pid
            acquired_unix: now,
            expires_unix: now + 1000,
            released: false,
            mountpoint: String::new(),
        };
        store.put(&key(1), &codec::encode(&LEASE, &dead)).unwrap();
        Lease::acquire(store.clone(), "new", Duration::from_secs(30), "").unwrap();

        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let expired = Holder {
            boot_id: "another-machine".into(),
            expires_unix: now - CLOCK_SKEW_SECS - 1,
            ..dead
        };
        store
            .put(&key(7), &codec::encode(&LEASE, &expired))
            .unwrap();
        let l = Lease::acquire(store.clone(), "new", Duration::from_secs(30), "").unwrap();
        assert_eq!(l.generation, 8);
    }

    #[test]
    fn a_reacquire_whose_answer_was_lost_is_adopted_on_retry() {
        let s = Arc::new(crate::store::FaultyStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = s.clone();
        let mut a = Lease::acquire(store, "aaaa", Duration::from_secs(30), "").unwrap();
        // The conditional create lands, but its answer is lost (a timeout).
        s.set_lose_acks_for(Some(PREFIX));
        assert!(matches!(a.reacquire(), Err(LeaseError::Store(_))));
        s.set_lose_acks_for(None);
        // Nobody else touched the store: the retry finds its own generation.
        a.reacquire().unwrap();
        assert_eq!(a.generation, 2);
        assert!(a.probe_still_ours().unwrap());
    }
}
