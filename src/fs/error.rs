use crate::cache::CacheError;
use crate::index::journal::IndexError;
use crate::store::StoreError;

/// Every failure of a filesystem operation. `errno` is the one place that turns
/// any of them into what the kernel is told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such attribute")]
    NoAttr,
    #[error("result does not fit the buffer")]
    Range,
    #[error("attribute value too large")]
    TooBig,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    Access,
    #[error("no space left in the store")]
    NoSpace,
    #[error("bad file handle")]
    BadHandle,
    #[error("too many links")]
    TooManyLinks,
    #[error("no data or hole at or past that offset")]
    NoSuchOffset,
    #[error("inappropriate ioctl for device")]
    NoIoctl,
    /// ENOSYS: the kernel then does the operation itself from now on.
    #[error("left to the kernel")]
    LeftToKernel,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Lease(#[from] std::sync::Arc<crate::lease::LeaseError>),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::FileTooBig => libc::EFBIG,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::NotPermitted => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::NoSpace => libc::ENOSPC,
            FsError::BadHandle => libc::EBADF,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoSuchOffset => libc::ENXIO,
            FsError::NoIoctl => libc::ENOTTY,
            FsError::LeftToKernel => libc::ENOSYS,
            FsError::Io(_) => libc::EIO,
            FsError::Lease(_) => libc::EROFS,
            FsError::Config(_) => libc::EINVAL,
        }
    }
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> FsError {
        match e {
            StoreError::NoSpace => FsError::NoSpace,
            other => FsError::Io(other.to_string()),
        }
    }
}

impl From<CacheError> for FsError {
    fn from(e: CacheError) -> FsError {
        match e {
            CacheError::Store(s) => s.into(),
            CacheError::Corrupt(c) => FsError::Io(c.to_string()),
        }
    }
}

impl From<IndexError> for FsError {
    fn from(e: IndexError) -> FsError {
        match e {
            IndexError::Store(s) => s.into(),
            other => FsError::Io(other.to_string()),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

impl PartialEq for FsError {
    fn eq(&self, other: &FsError) -> bool {
        self.errno() == other.errno() && self.to_string() == other.to_string()
    }
}

impl Eq for FsError {}

impl From<crate::lease::LeaseError> for FsError {
    fn from(e: crate::lease::LeaseError) -> FsError {
        FsError::Lease(std::sync::Arc::new(e))
    }
}
