//! Write-back workers: a block that a write fills up to its end is sealed and uploaded
//! in the background while the writer goes on, so a sequential write streams instead
//! of stopping for every batch. The queue is bounded: a writer faster than the store
//! waits (backpressure), and memory stays bounded. A job names a version of a dirty
//! block, not its bytes: a block written again before its job starts is not uploaded
//! (the newer version goes at its own job or flush), and the writer changes the
//! buffer in place instead of copying it away from the queue.

use super::{FsError, Volume};
use crate::index::{Extent, Ino};
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

pub(super) struct Job {
    pub ino: Ino,
    pub slot: u64,
    pub version: u64,
}

#[derive(Default)]
pub(super) struct Uploader {
    tx: Mutex<Option<SyncSender<Job>>>,
    /// Jobs queued or running, per file.
    pending: Mutex<HashMap<Ino, usize>>,
    idle: Condvar,
}

impl Uploader {
    pub fn running(&self) -> bool {
        self.tx.lock().unwrap().is_some()
    }

    /// Queues jobs; blocks while the queue is full. False if no workers run.
    pub fn submit(&self, jobs: Vec<Job>) -> bool {
        let Some(tx) = self.tx.lock().unwrap().clone() else {
            return false;
        };
        for job in jobs {
            *self.pending.lock().unwrap().entry(job.ino).or_default() += 1;
            let ino = job.ino;
            if tx.send(job).is_err() {
                self.done(ino);
                return false;
            }
        }
        true
    }

    fn done(&self, ino: Ino) {
        let mut pending = self.pending.lock().unwrap();
        if let Some(n) = pending.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&ino);
            }
        }
        self.idle.notify_all();
    }

    /// Waits until no job of this file is queued or running.
    pub fn wait_for(&self, ino: Ino) {
        let mut pending = self.pending.lock().unwrap();
        while pending.contains_key(&ino) {
            pending = self.idle.wait(pending).unwrap();
        }
    }

    /// Closes the queue; workers finish what is queued and exit.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }
}

impl Volume {
    /// Starts the upload workers (part of the background machinery).
    pub(super) fn start_uploads(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let workers = self.config.upload_threads.max(1);
        let (tx, rx) = sync_channel::<Job>(workers * 2);
        *self.uploader.tx.lock().unwrap() = Some(tx);
        let rx = Arc::new(Mutex::new(rx));
        (0..workers)
            .map(|i| {
                let volume = Arc::clone(self);
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("objfs-upload-{i}"))
                    .spawn(move || volume.upload_loop(&rx))
                    .expect("spawn upload worker")
            })
            .collect()
    }

    fn upload_loop(&self, rx: &Mutex<Receiver<Job>>) {
        loop {
            let job = match rx.lock().unwrap().recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            let ino = job.ino;
            self.upload_job(job);
            self.uploader.done(ino);
        }
    }

    /// The job's block, if that version is still the dirty one.
    fn job_data(&self, job: &Job) -> Option<Arc<Vec<u8>>> {
        let fd = self.file_data_of(job.ino)?;
        let file = fd.lock().unwrap();
        let block = file.dirty.get(&job.slot)?;
        (block.version == job.version).then(|| block.data.clone())
    }

    fn upload_job(&self, job: Job) {
        let Some(data) = self.job_data(&job) else {
            return;
        };
        let result = self.upload_block(&data);
        let fd = self.file_data_of(job.ino);
        let mut file = fd.as_ref().map(|f| f.lock().unwrap());
        let mut state = self.state();
        match result {
            Ok(id) => {
                if let Some(file) = file.as_mut() {
                    let current = file
                        .dirty
                        .get(&job.slot)
                        .is_some_and(|b| b.version == job.version);
                    if current {
                        let len = data.len() as u32;
                        let patched = state
                            .index
                            .get(job.ino)
                            .and_then(|i| i.extents.get(&job.slot))
                            .map_or(0, Extent::patch_bytes);
                        self.patched.lock().unwrap().note(job.ino, patched, 0);
                        state
                            .index
                            .set_extent(job.ino, job.slot, Extent::Block { id, len });
                        file.dirty.remove(&job.slot);
                        self.account_dirty(-(i64::from(len)));
                        if file.dirty.is_empty() {
                            state.index.mark_data_flushed(job.ino);
                        }
                    }
                }
                state.index.end_upload(id);
            }
            Err(e) => {
                log::error!("write-back of inode {} block {}: {e}", job.ino, job.slot);
                if let Some(file) = file.as_mut() {
                    file.error = Some((self.next_error_seq(), e));
                    file.failing = true;
                }
            }
        }
    }
}

impl From<std::sync::mpsc::SendError<Job>> for FsError {
    fn from(_: std::sync::mpsc::SendError<Job>) -> FsError {
        FsError::Io("upload queue closed".into())
    }
}
