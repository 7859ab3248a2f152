//! Durability: journal commits, snapshots, fsync, deferred block deletion, and the
//! background thread that drives them.

use super::{FsError, FsResult, Volume};
use crate::index::Ino;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stops the background thread when dropped or on `stop`.
pub struct Background {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
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
        Ok(())
    }

    /// Writes every index change since the last commit as one journal segment.
    pub fn commit(&self) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        let mut journal = self.journal.lock().unwrap();
        let changes = self.state().index.take_changes();
        if !changes.is_empty() {
            if let Err(e) = journal.commit(&changes) {
                log::error!("journal commit failed: {e}");
                self.state().index.restore(changes);
                return Err(e.into());
            }
        }
        self.queue_frees(changes.unreferenced);
        let cfg = &self.config;
        if journal.segments >= cfg.snapshot_segments || journal.bytes >= cfg.snapshot_bytes {
            // A failed compaction is retried at the next commit; the journal is intact.
            if let Err(e) = self.snapshot_locked(&mut journal) {
                log::warn!("snapshot failed: {e}");
            }
        }
        Ok(())
    }

    fn snapshot_locked(&self, journal: &mut crate::index::journal::Journal) -> FsResult<()> {
        let (changes, body) = {
            let mut state = self.state();
            let changes = state.index.take_changes();
            let body = state.index.snapshot_body(journal.generation() + 1);
            (changes, body)
        };
        match journal.write_snapshot(&body) {
            Ok(()) => {
                log::info!("wrote snapshot generation {}", body.generation);
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
                due.push(q.pop_front().expect("checked").1);
            }
            due
        };
        let mut deleted = 0;
        for id in due {
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

    /// fsync(2) on a file: its blocks, then every index change so far, are durable.
    pub fn fsync(&self, ino: Ino) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        if let Some(e) = self.take_write_error(ino) {
            // Reported once, as Linux does; the data stays dirty for a retry.
            let _ = self.flush_file(ino);
            return Err(e);
        }
        self.flush_file(ino).inspect_err(|_| {
            self.take_write_error(ino);
        })?;
        self.commit()
    }

    /// close(2): push the file's data out so errors surface here, not later.
    pub fn flush(&self, ino: Ino) -> FsResult<()> {
        if self.config.read_only {
            return Ok(());
        }
        if let Some(e) = self.take_write_error(ino) {
            return Err(e);
        }
        Ok(())
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
        self.sync_all()?;
        let mut journal = self.journal.lock().unwrap();
        if journal.segments > 0 {
            self.snapshot_locked(&mut journal)?;
        }
        drop(journal);
        self.delete_freed_blocks(self.config.free_grace);
        Ok(())
    }

    /// Starts the thread that flushes and commits every `commit_interval`.
    pub fn start_background(self: &Arc<Self>) -> Background {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let volume = Arc::clone(self);
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("objfs-commit".into())
            .spawn(move || volume.background_loop(&signal))
            .expect("spawn background thread");
        Background {
            stop,
            thread: Some(thread),
        }
    }

    fn background_loop(&self, stop: &(Mutex<bool>, Condvar)) {
        let (lock, cv) = stop;
        let failing = AtomicBool::new(false);
        loop {
            let guard = lock.lock().unwrap();
            let (guard, _) = cv
                .wait_timeout_while(guard, self.config.commit_interval, |stopped| !*stopped)
                .unwrap();
            if *guard {
                return;
            }
            drop(guard);
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
            self.delete_freed_blocks(self.config.free_grace);
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> FsError {
        FsError::Io(e.to_string())
    }
}
