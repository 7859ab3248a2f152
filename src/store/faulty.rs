use super::{ObjectStore, StoreError, StoreResult, StoreSpace};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Wraps a store and fails chosen operations on demand, for tests of error paths.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    fail_puts: AtomicBool,
    fail_gets: AtomicBool,
    puts: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            fail_puts: AtomicBool::new(false),
            fail_gets: AtomicBool::new(false),
            puts: AtomicU64::new(0),
        }
    }
    pub fn set_fail_puts(&self, fail: bool) {
        self.fail_puts.store(fail, Ordering::SeqCst);
    }
    pub fn set_fail_gets(&self, fail: bool) {
        self.fail_gets.store(fail, Ordering::SeqCst);
    }
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }
    fn check_put(&self, key: &str) -> StoreResult<()> {
        if self.fail_puts.load(Ordering::SeqCst) {
            return Err(StoreError::Io(format!("{key}: injected put failure")));
        }
        self.puts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl ObjectStore for FaultyStore {
    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(StoreError::Io(format!("{key}: injected get failure")));
        }
        self.inner.get(key)
    }
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.check_put(key)?;
        self.inner.put(key, data)
    }
    fn put_parts_unsynced(&self, key: &str, parts: &[&[u8]]) -> StoreResult<()> {
        self.check_put(key)?;
        self.inner.put_parts_unsynced(key, parts)
    }
    fn sync(&self) -> StoreResult<()> {
        if self.fail_puts.load(Ordering::SeqCst) {
            return Err(StoreError::Io("injected sync failure".into()));
        }
        self.inner.sync()
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.check_put(key)?;
        self.inner.put_if_absent(key, data)
    }
    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.inner.list(prefix)
    }
    fn space(&self) -> StoreResult<StoreSpace> {
        self.inner.space()
    }
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}
