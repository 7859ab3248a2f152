use super::{ObjectStore, StoreError, StoreResult, StoreSpace};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Wraps a store and fails chosen operations on demand, for tests of error paths.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    fail_puts: AtomicBool,
    fail_gets: AtomicBool,
    fail_lists: AtomicBool,
    /// Puts of keys with this prefix land but report failure (a timeout after the
    /// server stored the object).
    lose_acks_for: std::sync::Mutex<Option<String>>,
    /// Puts of keys with this prefix fail without landing.
    fail_puts_for: std::sync::Mutex<Option<String>>,
    block_puts: AtomicU64,
    lists: AtomicU64,
    /// Reported as `delete_deadline` (the inner store's when None).
    delete_deadline: std::sync::Mutex<Option<std::time::Duration>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            fail_puts: AtomicBool::new(false),
            fail_gets: AtomicBool::new(false),
            fail_lists: AtomicBool::new(false),
            lose_acks_for: std::sync::Mutex::new(None),
            fail_puts_for: std::sync::Mutex::new(None),
            block_puts: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            delete_deadline: std::sync::Mutex::new(None),
        }
    }
    pub fn set_fail_puts(&self, fail: bool) {
        self.fail_puts.store(fail, Ordering::SeqCst);
    }
    pub fn set_fail_lists(&self, fail: bool) {
        self.fail_lists.store(fail, Ordering::SeqCst);
    }
    pub fn set_fail_gets(&self, fail: bool) {
        self.fail_gets.store(fail, Ordering::SeqCst);
    }
    pub fn set_lose_acks_for(&self, prefix: Option<&str>) {
        *self.lose_acks_for.lock().unwrap() = prefix.map(str::to_string);
    }
    fn acked(&self, key: &str) -> StoreResult<()> {
        match &*self.lose_acks_for.lock().unwrap() {
            Some(p) if key.starts_with(p.as_str()) => Err(StoreError::Io(format!(
                "{key}: injected timeout after the put"
            ))),
            _ => Ok(()),
        }
    }
    /// Blocks written (the lease thread's renewals, at any moment, are not counted).
    pub fn block_puts(&self) -> u64 {
        self.block_puts.load(Ordering::SeqCst)
    }
    pub fn set_delete_deadline(&self, deadline: std::time::Duration) {
        *self.delete_deadline.lock().unwrap() = Some(deadline);
    }
    /// Listings made so far.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }
    pub fn set_fail_puts_for(&self, prefix: Option<&str>) {
        *self.fail_puts_for.lock().unwrap() = prefix.map(str::to_string);
    }
    fn check_put(&self, key: &str) -> StoreResult<()> {
        let failing_prefix = match &*self.fail_puts_for.lock().unwrap() {
            Some(p) => key.starts_with(p.as_str()),
            None => false,
        };
        if self.fail_puts.load(Ordering::SeqCst) || failing_prefix {
            return Err(StoreError::Io(format!("{key}: injected put failure")));
        }
        if key.starts_with("blocks/") {
            self.block_puts.fetch_add(1, Ordering::SeqCst);
        }
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
        self.inner.put(key, data)?;
        self.acked(key)
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
        self.inner.put_if_absent(key, data)?;
        self.acked(key)
    }
    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        if self.fail_lists.load(Ordering::SeqCst) {
            return Err(StoreError::Io(format!("{prefix}: injected list failure")));
        }
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StoreResult<Vec<(String, u64)>> {
        if self.fail_lists.load(Ordering::SeqCst) {
            return Err(StoreError::Io(format!("{prefix}: injected list failure")));
        }
        self.inner.list_sizes(prefix)
    }
    fn space(&self) -> StoreResult<StoreSpace> {
        self.inner.space()
    }
    fn conditional_create_is_atomic(&self) -> bool {
        self.inner.conditional_create_is_atomic()
    }
    fn delete_deadline(&self) -> std::time::Duration {
        let set = *self.delete_deadline.lock().unwrap();
        set.unwrap_or_else(|| self.inner.delete_deadline())
    }
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }
}
