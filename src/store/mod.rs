//! Object stores: a flat namespace of immutable-by-convention keys.
//!
//! Everything above this layer talks to `dyn ObjectStore`; which backend is in use is
//! decided once, by `open_store`, from the STORE argument.

mod faulty;
mod local;
mod memory;
mod s3;

pub use faulty::FaultyStore;
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use s3::{S3_CAPACITY, S3Settings, S3Store};

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("store is out of space")]
    NoSpace,
    #[error("store denied access: {0}")]
    AccessDenied(String),
    #[error("no such bucket")]
    NoSuchBucket,
    #[error("store I/O error: {0}")]
    Io(String),
}

impl StoreError {
    pub fn from_io(key: &str, err: std::io::Error) -> StoreError {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                StoreError::AccessDenied(format!("{key}: {err}"))
            }
            _ if err.kind() == std::io::ErrorKind::NotFound => StoreError::NotFound(key.into()),
            _ => StoreError::Io(format!("{key}: {err}")),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Capacity figures for statfs.
#[derive(Debug, Clone, Copy)]
pub struct StoreSpace {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// No real capacity (S3): statfs reports a fixed size minus what the files use.
    pub unbounded: bool,
}

/// A flat key -> bytes store. Keys are `/`-separated ASCII; values are whole objects:
/// a reader never sees a partially written object.
pub trait ObjectStore: Send + Sync {
    fn get(&self, key: &str) -> StoreResult<Vec<u8>>;
    /// `get` into a buffer the caller may reuse; it is cleared first.
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> StoreResult<()> {
        *buf = self.get(key)?;
        Ok(())
    }
    /// Durable when it returns.
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()>;
    /// Like `put`, for the concatenation of `parts`, but durable only once a later
    /// `sync` returns (visible and atomic at once). Blocks go this way, and every
    /// commit syncs before writing the index that references them.
    fn put_parts_unsynced(&self, key: &str, parts: &[&[u8]]) -> StoreResult<()> {
        self.put(key, &parts.concat())
    }
    /// Makes every earlier `put_parts_unsynced` durable.
    fn sync(&self) -> StoreResult<()> {
        Ok(())
    }
    /// Creates the object only if the key is free; `AlreadyExists` otherwise.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> StoreResult<()>;
    /// Deleting a missing key is not an error.
    fn delete(&self, key: &str) -> StoreResult<()>;
    /// All keys starting with `prefix`, sorted.
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;
    /// `list` with each object's size in bytes (as stored: after compression).
    fn list_sizes(&self, prefix: &str) -> StoreResult<Vec<(String, u64)>> {
        self.list(prefix)?
            .into_iter()
            .map(|key| {
                let len = self.get(&key)?.len() as u64;
                Ok((key, len))
            })
            .collect()
    }
    fn exists(&self, key: &str) -> StoreResult<bool> {
        match self.get(key) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn space(&self) -> StoreResult<StoreSpace>;
    /// `put_if_absent` is atomic, so the writer lease alone keeps a second writer
    /// out (S3 engines differ: Garage ignores conditional PUTs).
    fn conditional_create_is_atomic(&self) -> bool {
        false
    }
    /// How long after a `delete` was called it may still take effect: the client
    /// gives up on it by then. A writer deletes a block only while its lease outlasts
    /// this, so no DELETE lands after another writer could have taken the store over
    /// and stored the same block again. Zero where a delete is done when it returns.
    fn delete_deadline(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Where this store lives, for messages.
    fn describe(&self) -> String;
}

/// How a STORE argument names a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Local(std::path::PathBuf),
    S3(S3Settings),
}

/// Backend options given on the command line (the rest comes from the environment).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    pub endpoint: Option<String>,
    pub path_style: Option<bool>,
    pub retry_budget: Option<std::time::Duration>,
}

impl StoreLocation {
    pub fn parse(spec: &str) -> Result<StoreLocation, String> {
        StoreLocation::parse_with(spec, &StoreOptions::default())
    }

    pub fn parse_with(spec: &str, opts: &StoreOptions) -> Result<StoreLocation, String> {
        if spec.is_empty() {
            return Err("empty STORE".into());
        }
        if let Some(rest) = spec.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(format!("{spec}: file:// URL needs a path"));
            }
            return Ok(StoreLocation::Local(rest.into()));
        }
        if spec.starts_with("s3://") {
            let mut s = S3Settings::parse(spec, opts.endpoint.as_deref(), opts.path_style)?;
            if let Some(budget) = opts.retry_budget {
                s.retry_budget = budget;
            }
            return Ok(StoreLocation::S3(s));
        }
        if let Some((scheme, _)) = spec.split_once("://") {
            return Err(format!(
                "{spec}: unsupported store scheme '{scheme}://' (use a local path, file:// or s3://)"
            ));
        }
        Ok(StoreLocation::Local(spec.into()))
    }

    /// A local path that is missing or an empty directory: a first mount may create
    /// a filesystem there. S3 prefixes are created only by `objfs mkfs`.
    pub fn is_blank(&self) -> bool {
        match self {
            StoreLocation::Local(p) => match std::fs::read_dir(p) {
                Ok(mut it) => it.next().is_none(),
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            },
            StoreLocation::S3(_) => false,
        }
    }

    pub fn open(&self, create: bool) -> StoreResult<Arc<dyn ObjectStore>> {
        match self {
            StoreLocation::Local(p) => Ok(Arc::new(LocalStore::open(p, create)?)),
            StoreLocation::S3(s) => Ok(Arc::new(S3Store::open(s.clone())?)),
        }
    }

    /// Whether statfs should report a fixed large capacity instead of real space.
    pub fn is_unbounded(&self) -> bool {
        matches!(self, StoreLocation::S3(_))
    }

    /// Whether each read waits on a network round trip (so more of them in flight pay
    /// off) rather than on this machine's disk and CPU.
    pub fn is_remote(&self) -> bool {
        matches!(self, StoreLocation::S3(_))
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every backend must share, run against each implementation.
    use super::*;

    pub fn check(store: &dyn ObjectStore) {
        assert!(matches!(store.get("a/b"), Err(StoreError::NotFound(_))));
        store.put("a/b", b"one").unwrap();
        assert_eq!(store.get("a/b").unwrap(), b"one");
        store.put("a/b", b"two").unwrap();
        assert_eq!(store.get("a/b").unwrap(), b"two");
        assert!(matches!(
            store.put_if_absent("a/b", b"x"),
            Err(StoreError::AlreadyExists(_))
        ));
        store.put_if_absent("a/c", b"three").unwrap();
        store.put("b/x", b"").unwrap();
        assert_eq!(store.list("a/").unwrap(), vec!["a/b", "a/c"]);
        assert_eq!(store.list("").unwrap(), vec!["a/b", "a/c", "b/x"]);
        assert_eq!(store.get("b/x").unwrap(), b"");
        let sized = |prefix: &str| store.list_sizes(prefix).unwrap();
        assert_eq!(sized("a/"), vec![("a/b".into(), 3), ("a/c".into(), 5)]);
        assert_eq!(sized("a/c"), vec![("a/c".into(), 5)]);
        assert_eq!(sized("").last(), Some(&("b/x".into(), 0)));
        store.delete("a/b").unwrap();
        store.delete("a/b").unwrap();
        assert!(!store.exists("a/b").unwrap());
        assert_eq!(store.list("a/").unwrap(), vec!["a/c"]);
    }
}
