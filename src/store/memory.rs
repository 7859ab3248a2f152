use super::{ObjectStore, StoreError, StoreResult, StoreSpace};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// An in-memory store for tests of the layers above.
#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl ObjectStore for MemoryStore {
    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        let objects = self.objects.lock().unwrap();
        objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.into()))
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.objects
            .lock()
            .unwrap()
            .insert(key.into(), data.to_vec());
        Ok(())
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let mut objects = self.objects.lock().unwrap();
        if objects.contains_key(key) {
            return Err(StoreError::AlreadyExists(key.into()));
        }
        objects.insert(key.into(), data.to_vec());
        Ok(())
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> StoreResult<Vec<(String, u64)>> {
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect())
    }

    fn space(&self) -> StoreResult<StoreSpace> {
        Ok(StoreSpace {
            total_bytes: 1 << 40,
            free_bytes: 1 << 40,
            unbounded: false,
        })
    }

    fn describe(&self) -> String {
        "memory store".into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_contract() {
        super::super::contract::check(&super::MemoryStore::new());
    }
}
