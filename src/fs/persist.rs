//! Durability: journal commits, snapshots, fsync, deferred block deletion, and the
//! background thread that drives them.

use super::{FsError, FsResult, Volume};
use crate::block::BlockId;
use crate::index::Ino;
use crate::store::StoreError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stops the background threads when dropped or on `stop`.
pub struct Background {
    stop: Arc<(Mutex<bool>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    uploads: Vec<JoinHandle<()>>,
    volume: Arc<Volume>,
}

impl Background {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Snapshots are written in line again (the unmount's last one, for one).
        self.volume.snapshots.enabled.store(false, Ordering::SeqCst);
        // Queued uploads finish; later flushes upload synchronously.
        self.volume.uploader.close();
        for t in self.uploads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sleeps `period` unless told to stop; false once stopped.
fn wait(stop: &(Mutex<bool>, Condvar), period: Duration) -> bool {
    let (lock, cv) = stop;
    let guard = lock.lock().unwrap();
    let (guard, _) = cv
        .wait_timeout_while(guard, period, |stopped| !*stopped)
        .unwrap();
    !*guard
}

/// A snapshot writes the whole index (77 MB for 500,000 files), so under the journal
/// lock it held up every commit, and with it every fsync, for as long as it took.
/// With background threads running, the commit that finds one due only flags it,
/// and the snapshot thread writes it while later commits go on (see
/// `Journal::begin_snapshot`).
#[derive(Default)]
pub(super) struct SnapshotTrigger {
    /// The snapshot thread runs.
    enabled: AtomicBool,
    due: AtomicBool,
}

/// How often the snapshot thread looks for a snapshot a commit found due.
const SNAPSHOT_POLL: Duration = Duration::from_millis(50);

/// Written by the writer only, read by the next writer; no follower reads it.
const PENDING_FREES_KEY: &str = "meta/pending-frees";

/// One block id in hex a line.
fn encode_block_ids(ids: &[BlockId]) -> Vec<u8> {
    ids.iter()
        .map(|id| id.to_hex() + "\n")
        .collect::<String>()
        .into_bytes()
}

/// The blocks the last writer freed shortly before it unmounted: the next writer
/// deletes them once their grace period is over (`resume_frees`).
pub fn pending_frees(store: &dyn crate::store::ObjectStore) -> Vec<BlockId> {
    let listed = store.get(PENDING_FREES_KEY).ok();
    listed
        .and_then(|b| decode_block_ids(&b))
        .unwrap_or_default()
}

fn decode_block_ids(bytes: &[u8]) -> Option<Vec<BlockId>> {
    std::str::from_utf8(bytes)
        .ok()?
        .lines()
        .map(BlockId::from_hex)
        .collect()
}

impl Volume {
    /// Called once on a read-write open: a journal that recovery could not replay to
    /// its end is sealed off by a fresh snapshot before anything new is written.
    pub(super) fn after_recovery(&self) -> FsResult<()> {
        let mut journal = self.journal.lock().unwrap();
        let report = &self.load_report;
        if journal.needs_fresh_snapshot() || report.reclaimed_orphans > 0 {
            self.snapshot_locked(&mut journal)?;
        }
        drop(journal);
        self.resume_frees();
        self.note_loaded_patches();
        Ok(())
    }

    /// Blocks the last writer freed shortly before it unmounted: deleted after a new
    /// grace period, if still unreferenced then.
    fn resume_frees(&self) {
        let found = self.store.get(PENDING_FREES_KEY);
        let absent = matches!(found, Err(StoreError::NotFound(_)));
        self.pending_frees_listed.store(!absent, Ordering::Relaxed);
        match found {
            Ok(bytes) => match decode_block_ids(&bytes) {
                Some(ids) => self.queue_frees(ids),
                None => {
                    log::warn!("{PENDING_FREES_KEY} is unreadable: objfs gc deletes those blocks")
                }
            },
            Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                log::warn!("reading {PENDING_FREES_KEY}: {e} (objfs gc deletes those blocks)")
            }
        }
    }

    /// At unmount: the freed blocks still inside their grace period (a replica may
    /// still read them) are listed for the next writer, instead of staying in the
    /// store until `objfs gc`.
    fn save_pending_frees(&self) {
        let ids: Vec<BlockId> = self
            .free_queue
            .lock()
            .unwrap()
            .iter()
            .map(|(_, id)| *id)
            .collect();
        let result = if ids.is_empty() {
            if !self.pending_frees_listed.load(Ordering::Relaxed) {
                // Nothing to replace: spares a DELETE per unmount.
                return;
            }
            self.store.delete(PENDING_FREES_KEY)
        } else {
            self.store.put(PENDING_FREES_KEY, &encode_block_ids(&ids))
        };
        if let Err(e) = result {
            log::warn!("writing {PENDING_FREES_KEY}: {e} (objfs gc deletes those blocks)");
        }
    }

    /// Writes every index change since the last commit as one journal segment.
    pub fn commit(&self) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        let mut journal = self.journal.lock().unwrap();
        self.check_lease()?;
        if journal.snapshot_owed() {
            // A PUT failed and may yet land: the commit is a snapshot under a newer
            // generation instead of another segment (see `Journal::snapshot_owed`).
            return self.snapshot_locked(&mut journal);
        }
        // Blocks before the index that points at them: every block these changes
        // reference was installed before they were taken, so the sync in
        // `commit_taken` covers it.
        let changes = self.state().index.take_changes();
        self.commit_taken(&mut journal, changes)?;
        if self.snapshot_due(&journal) {
            if self.snapshots.enabled.load(Ordering::SeqCst) {
                self.snapshots.due.store(true, Ordering::SeqCst);
            } else if let Err(e) = self.snapshot_locked(&mut journal) {
                // Retried at the next commit; the journal is intact.
                log::warn!("snapshot failed: {e}");
            }
        }
        Ok(())
    }

    /// A snapshot rewrites the whole index, so it waits for `snapshot_segments`
    /// segments and also for the journal to reach an eighth of the last snapshot's
    /// size: at 500,000 files (a 77 MB snapshot) a snapshot every 256 small commits
    /// would keep a core busy under an fsync-heavy load. `snapshot_bytes` of journal,
    /// or sixteen times the segments, are due anyway (replay time at a mount).
    fn snapshot_due(&self, journal: &crate::index::journal::Journal) -> bool {
        let cfg = &self.config;
        journal.bytes >= cfg.snapshot_bytes
            || journal.segments >= cfg.snapshot_segments.saturating_mul(16)
            || (journal.segments >= cfg.snapshot_segments
                && journal.bytes >= journal.snapshot_size / 8)
    }

    /// Writes a snapshot without holding the journal lock while it is encoded and
    /// stored: pending changes are committed as a segment first, so the snapshot holds
    /// exactly the current snapshot and chain; commits meanwhile start the next
    /// generation's chain over a bridge. If the snapshot fails, that chain goes on and
    /// a later snapshot takes its place; nothing committed depends on it.
    pub fn snapshot_in_background(&self) -> FsResult<()> {
        let (generation, view) = {
            let mut journal = self.journal.lock().unwrap();
            if journal.snapshot_owed() {
                // A failed segment PUT: the next commit writes one the old way.
                return Ok(());
            }
            self.check_lease()?;
            let (changes, view, next_ino) = {
                let mut state = self.state();
                let changes = state.index.take_changes();
                let view = state.index.snapshot_view(journal.next_generation());
                (changes, view, state.index.next_ino())
            };
            self.commit_taken(&mut journal, changes)?;
            let generation = match journal.begin_snapshot(next_ino) {
                Ok(g) => g,
                Err(e) => {
                    self.fence_on_fork(&e);
                    return Err(e.into());
                }
            };
            debug_assert_eq!(generation, view.generation());
            // Commits that found one due while this waited for the lock counted the
            // chain this replaces.
            self.snapshots.due.store(false, Ordering::SeqCst);
            (generation, view)
        };
        let landed = crate::index::journal::put_snapshot(&*self.store, generation, &view);
        drop(view);
        let remove = self
            .journal
            .lock()
            .unwrap()
            .end_snapshot(generation, landed.as_ref().ok().copied());
        landed?;
        log::info!("wrote snapshot generation {generation}");
        // A writer that lost its lease meanwhile leaves the store to the new one.
        if let Some(before) = remove
            && self.check_lease().is_ok()
        {
            crate::index::journal::remove_generations_before(&*self.store, before);
        }
        Ok(())
    }

    /// Writes `changes`, taken from the index, as one segment (after the blocks they
    /// reference); on failure they go back to the index for the next commit.
    fn commit_taken(
        &self,
        journal: &mut crate::index::journal::Journal,
        changes: crate::index::Changes,
    ) -> FsResult<()> {
        if let Err(e) = self.store.sync() {
            self.state().index.restore(changes);
            return Err(e.into());
        }
        let wrote = !changes.is_empty();
        if wrote && let Err(e) = journal.commit(&changes) {
            log::error!("journal commit failed: {e}");
            self.fence_on_fork(&e);
            self.state().index.restore(changes);
            return Err(e.into());
        }
        // The segment is in the store; it counts only if no other writer took the
        // store meanwhile. (It stays there either way: the other writer may have
        // loaded it and built on it.)
        if wrote || self.lease_unconfirmed.load(Ordering::SeqCst) {
            self.confirm_lease()?;
        }
        self.queue_frees(changes.unreferenced);
        Ok(())
    }

    /// See `Lease::probe_still_ours`. A taken-over volume is fenced and the commit
    /// reported failed. Until a probe succeeds, no later commit is acknowledged
    /// either, even one with nothing new to write (`lease_unconfirmed`).
    fn confirm_lease(&self) -> FsResult<()> {
        let probe = match self.lease.lock().unwrap().as_ref() {
            Some(lease) => lease.probe_still_ours(),
            None => return Ok(()),
        };
        match probe {
            Ok(true) => {
                self.lease_unconfirmed.store(false, Ordering::SeqCst);
                Ok(())
            }
            Ok(false) => {
                self.fence("another writer took the store over during a commit");
                Err(FsError::ReadOnly)
            }
            Err(e) => {
                self.lease_unconfirmed.store(true, Ordering::SeqCst);
                log::error!("checking the writer lease: {e}");
                Err(FsError::Io(e.to_string()))
            }
        }
    }

    /// A second writer's segment beside ours: stop before the chains diverge further.
    fn fence_on_fork(&self, e: &crate::index::journal::IndexError) {
        if matches!(e, crate::index::journal::IndexError::Fork { .. }) {
            self.fence(&e.to_string());
        }
    }

    /// Metadata is written only under a valid lease.
    fn check_lease(&self) -> FsResult<()> {
        if self.is_fenced() {
            return Err(FsError::ReadOnly);
        }
        let lapsed = match self.lease.lock().unwrap().as_ref() {
            Some(l) => !l.valid_now(),
            None => return Err(FsError::ReadOnly),
        };
        if lapsed {
            // The lease thread has not run since (a machine that was suspended, a
            // stalled thread): the lease is taken again here where that is safe, as
            // that thread would, instead of racing it to stop the volume.
            self.renew_lease();
            let still = self
                .lease
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|l| l.valid_now());
            if !still {
                self.fence("the writer lease lapsed (renewals failed)");
            }
        }
        match self.is_fenced() {
            true => Err(FsError::ReadOnly),
            false => Ok(()),
        }
    }

    /// Renews the writer lease; fences the volume if it was lost or lapsed.
    pub fn renew_lease(&self) {
        let mut guard = self.lease.lock().unwrap();
        let Some(lease) = guard.as_mut() else {
            return;
        };
        // A lapsed lease is not rewritten (that could revive one another writer has
        // just taken): where conditional create is atomic it is taken again under the
        // next generation (`Lease::reacquire`); elsewhere (S3: Garage ignores it, and
        // two writers could both win) the volume stops.
        let renewed = if lease.valid_now() {
            lease.renew()
        } else if self.store.conditional_create_is_atomic() {
            lease.reacquire()
        } else {
            self.fence("the writer lease lapsed (renewals failed)");
            return;
        };
        match renewed {
            Ok(()) => {}
            Err(crate::lease::LeaseError::Lost(who)) => {
                self.fence(&format!("the writer lease was taken over by {who}"))
            }
            // Retried at the next tick; once lapsed, taken again or stopped (above).
            Err(e) => log::warn!("renewing the writer lease failed (will retry): {e}"),
        }
    }

    fn release_lease(&self) {
        if let Some(mut lease) = self.lease.lock().unwrap().take()
            && let Err(e) = lease.release()
        {
            log::warn!("releasing the writer lease: {e}");
        }
    }

    fn snapshot_locked(&self, journal: &mut crate::index::journal::Journal) -> FsResult<()> {
        self.check_lease()?;
        let (changes, view) = {
            let mut state = self.state();
            let changes = state.index.take_changes();
            let view = state.index.snapshot_view(journal.next_generation());
            (changes, view)
        };
        if let Err(e) = self.store.sync() {
            self.state().index.restore(changes);
            return Err(e.into());
        }
        // Encoded straight from the view: the index is not cloned.
        match journal.write_snapshot(view.generation(), &view) {
            Ok(remove) => {
                log::info!("wrote snapshot generation {}", view.generation());
                // As for a segment: acknowledged only if the store is still ours,
                // and only then may what it replaces go.
                self.confirm_lease()?;
                if let Some(before) = remove {
                    crate::index::journal::remove_generations_before(&*self.store, before);
                }
                self.queue_frees(changes.unreferenced);
                Ok(())
            }
            Err(e) => {
                self.state().index.restore(changes);
                Err(e.into())
            }
        }
    }

    fn queue_frees(&self, ids: Vec<crate::block::BlockId>) {
        if ids.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut q = self.free_queue.lock().unwrap();
        q.extend(ids.into_iter().map(|id| (now, id)));
    }

    /// Deletes blocks freed by a commit at least `grace` ago that are still unreferenced.
    pub fn delete_freed_blocks(&self, grace: Duration) -> usize {
        let due: Vec<_> = {
            let mut q = self.free_queue.lock().unwrap();
            let mut due = Vec::new();
            while q.front().is_some_and(|(t, _)| t.elapsed() >= grace) {
                due.push(q.pop_front().expect("checked"));
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        // Only while the store is ours, checked against the store itself (blocks are
        // named by their content, so a writer that took the store over may hold
        // these very blocks again), and again before each DELETE by our own clock
        // and the fence (a takeover the lease thread notices meanwhile).
        if self.check_lease().is_err() || self.confirm_lease().is_err() {
            self.requeue_frees(due);
            return 0;
        }
        let mut deleted = 0;
        let mut due = due.into_iter();
        while let Some((at, id)) = due.next() {
            if self.check_lease().is_err() || !self.lease_outlasts_delete() {
                let mut rest = vec![(at, id)];
                rest.extend(due);
                self.requeue_frees(rest);
                break;
            }
            if !self.state().index.begin_delete(id) {
                continue;
            }
            self.cache.forget(&id);
            match self.store.delete(&id.key()) {
                Ok(()) => deleted += 1,
                Err(e) => log::warn!("deleting block {id:?}: {e} (objfs gc will retry)"),
            }
            self.state().index.end_delete(id);
        }
        deleted
    }

    /// A DELETE may take effect until the store's delete deadline: it is sent only
    /// if our lease outlasts that, so it cannot land after a takeover (which waits
    /// for the lease to lapse) when the new writer may have stored the block again.
    fn lease_outlasts_delete(&self) -> bool {
        let deadline = self.store.delete_deadline();
        let lease = self.lease.lock().unwrap();
        lease.as_ref().is_some_and(|l| l.valid_for(deadline))
    }

    /// Puts back freed ids not deleted this time, in front, with their times.
    fn requeue_frees(&self, ids: Vec<(Instant, BlockId)>) {
        let mut q = self.free_queue.lock().unwrap();
        for entry in ids.into_iter().rev() {
            q.push_front(entry);
        }
    }

    /// fsync(2) on a file: its blocks, then every index change so far, are durable.
    pub fn fsync(&self, ino: Ino) -> FsResult<()> {
        self.fsync_handle(ino, None)
    }

    /// fsync(2) through a descriptor: a write-back failure is reported once to each
    /// descriptor that was open when it happened; the data stays dirty for a retry.
    pub fn fsync_handle(&self, ino: Ino, fh: Option<u64>) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        let flushed = self.flush_file(ino);
        self.report_write_error(ino, fh)?;
        flushed?;
        self.commit()
    }

    /// close(2): reports (once per descriptor) an error from an earlier background
    /// write-back of the file. The data itself is written back later, or by fsync.
    pub fn flush(&self, ino: Ino, fh: Option<u64>) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        self.report_write_error(ino, fh)
    }

    fn report_write_error(&self, ino: Ino, fh: Option<u64>) -> FsResult<()> {
        // Internal callers see only their own flush's result.
        let Some(fh) = fh else {
            return Ok(());
        };
        let seen = self.handle_error_seen(fh);
        match self.write_error_since(ino, seen) {
            Some((seq, e)) => {
                self.set_handle_error_seen(fh, seq);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Everything dirty to the store, journal committed.
    pub fn sync_all(&self) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        let flushed = self.flush_all();
        let committed = self.commit();
        flushed.and(committed)
    }

    /// Final flush at unmount: data, journal, and a snapshot so the next mount
    /// replays nothing.
    pub fn shutdown(&self) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        if self.is_fenced() {
            return Err(FsError::ReadOnly);
        }
        // Unmounted: the kernel holds nothing any more, and its last FORGETs may
        // never have been read.
        self.forget_all();
        self.sync_all()?;
        let mut journal = self.journal.lock().unwrap();
        if journal.segments > 0 {
            self.snapshot_locked(&mut journal)?;
        }
        drop(journal);
        self.delete_freed_blocks(self.config.free_grace);
        if self.is_fenced() {
            // Another writer holds the store (and the list is its own now).
            return Err(FsError::ReadOnly);
        }
        self.save_pending_frees();
        self.release_lease();
        // The volume is closed: nothing more may reach the store.
        self.fenced.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Starts the threads that flush and commit every `commit_interval` and renew
    /// the writer lease every third of its TTL (separate, so a long flush never
    /// lets the lease lapse).
    pub fn start_background(self: &Arc<Self>) -> Background {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let spawn = |name: &str, body: fn(&Volume, &(Mutex<bool>, Condvar))| {
            let volume = Arc::clone(self);
            let signal = stop.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&volume, &signal))
                .expect("spawn background thread")
        };
        self.snapshots.enabled.store(true, Ordering::SeqCst);
        let threads = vec![
            spawn("objfs-commit", Volume::commit_loop),
            spawn("objfs-lease", Volume::lease_loop),
            spawn("objfs-snapshot", Volume::snapshot_loop),
        ];
        Background {
            stop,
            threads,
            uploads: self.start_uploads(),
            volume: Arc::clone(self),
        }
    }

    fn commit_loop(&self, stop: &(Mutex<bool>, Condvar)) {
        let failing = AtomicBool::new(false);
        while wait(stop, self.config.commit_interval) {
            if self.is_fenced() {
                continue;
            }
            match self.sync_all() {
                Ok(()) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        log::info!("store writes succeed again");
                    }
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        log::error!("background commit failed (will retry): {e}");
                    }
                }
            }
            self.fold_patches(false);
            self.delete_freed_blocks(self.config.free_grace);
        }
    }

    fn snapshot_loop(&self, stop: &(Mutex<bool>, Condvar)) {
        while wait(stop, SNAPSHOT_POLL) {
            if self.is_fenced() || !self.snapshots.due.swap(false, Ordering::SeqCst) {
                continue;
            }
            if let Err(e) = self.snapshot_in_background() {
                // The next commit past the thresholds asks again.
                log::warn!("snapshot failed: {e}");
            }
        }
    }

    fn lease_loop(&self, stop: &(Mutex<bool>, Condvar)) {
        // At once: loading a large index may have used much of the first term.
        self.renew_lease();
        while wait(stop, self.config.lease_ttl / 3) {
            if !self.is_fenced() {
                self.renew_lease();
            }
        }
    }
}

/// What a follower refresh changed, for the kernel's caches.
#[derive(Debug, Default)]
pub struct Changed {
    pub inodes: Vec<Ino>,
    pub entries: Vec<(Ino, Vec<u8>)>,
    /// Everything may have changed (reloaded from a new snapshot).
    pub all: Vec<Ino>,
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty() && self.entries.is_empty() && self.all.is_empty()
    }
}

impl Volume {
    /// Read-only mounts: apply what the writer committed since the last refresh.
    pub fn refresh(&self) -> FsResult<Changed> {
        use crate::index::Record;
        use crate::index::journal::Followed;
        let mut journal = self.journal.lock().unwrap();
        let mut changed = Changed::default();
        match journal.follow()? {
            Followed::Nothing => {}
            Followed::Records(records) => {
                let mut state = self.state();
                for r in records {
                    match &r {
                        Record::PutInode(i) | Record::PatchInode { inode: i, .. } => {
                            changed.inodes.push(i.ino)
                        }
                        Record::DelInode(ino) => changed.inodes.push(*ino),
                        Record::PutEntry { dir, name, .. } | Record::DelEntry { dir, name } => {
                            changed.entries.push((*dir, name.clone()));
                            changed.inodes.push(*dir);
                        }
                    }
                    state.index.apply(r);
                }
            }
            Followed::NewGeneration => {
                let loaded = crate::index::journal::load(self.store.clone(), "reader")?;
                let mut state = self.state();
                changed.all = state.index.inodes().map(|i| i.ino).collect();
                let old = std::mem::replace(&mut state.index, loaded.index);
                drop(state);
                // Freeing a large index takes a while: not under the state lock.
                drop(old);
                *journal = loaded.journal;
                log::info!("reloaded from snapshot generation {}", journal.generation());
            }
        }
        changed.inodes.sort_unstable();
        changed.inodes.dedup();
        Ok(changed)
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> FsError {
        FsError::Io(e.to_string())
    }
}
