//! `meta/superblock`: what a store holds and how to read it.

use super::codec::{self, FrameError};
use crate::block::Compression;
use serde::{Deserialize, Serialize};

pub const KEY: &str = "meta/superblock";
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
pub const MIN_BLOCK_SIZE: u64 = 4096;
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: u32,
    pub uuid: String,
    pub block_size: u32,
    /// How new blocks are stored: "none" or "zstd" (`block::Compression`).
    pub codec: String,
    /// Files up to this size keep their bytes inline in the index.
    pub inline_max: u32,
    pub created_unix: i64,
}

impl Superblock {
    pub fn new(block_size: u32, compression: Compression) -> Superblock {
        Superblock {
            format_version: codec::FORMAT_VERSION,
            uuid: crate::util::random_hex(16),
            block_size,
            codec: compression.name().into(),
            inline_max: 4096.min(block_size),
            created_unix: crate::util::unix_now().0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode(&codec::SUPERBLOCK, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Superblock, FrameError> {
        let sb: Superblock = codec::decode(&codec::SUPERBLOCK, bytes)?;
        if Compression::parse(&sb.codec).is_none() {
            return Err(FrameError::Decode(
                "superblock",
                format!("unknown block codec '{}'", sb.codec),
            ));
        }
        let bs = u64::from(sb.block_size);
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(FrameError::Decode(
                "superblock",
                format!("invalid block size {}", sb.block_size),
            ));
        }
        Ok(sb)
    }

    pub fn compression(&self) -> Compression {
        Compression::parse(&self.codec).unwrap_or(Compression::None)
    }
}

pub fn validate_block_size(size: u64) -> Result<u32, String> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) || !size.is_power_of_two() {
        return Err(format!(
            "block size {size} must be a power of two between 4K and 64M"
        ));
    }
    Ok(size as u32)
}
