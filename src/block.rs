//! The block codec: a block's identity is the sha256 of its plain bytes, so identical
//! blocks share one object, and every read can prove it got the right bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Bytes after every stored block's payload: codec + magic, so later codecs
/// (compression, encryption) can coexist with old blocks. A trailer rather than a
/// header: decoding a plain block is then a truncate, not a copy.
const MAGIC: [u8; 3] = *b"OBK";
pub const CODEC_NONE: u8 = 0;
pub const TRAILER_LEN: usize = 4;

pub fn trailer(codec: u8) -> [u8; TRAILER_LEN] {
    [codec, MAGIC[0], MAGIC[1], MAGIC[2]]
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    pub fn of(data: &[u8]) -> BlockId {
        BlockId(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<BlockId> {
        let bytes = hex::decode(s).ok()?;
        Some(BlockId(bytes.try_into().ok()?))
    }

    /// `blocks/ab/ab12...`: the two-character fan-out keeps local directories small.
    pub fn key(&self) -> String {
        let h = self.to_hex();
        format!("blocks/{}/{}", &h[..2], h)
    }

    pub fn from_key(key: &str) -> Option<BlockId> {
        let rest = key.strip_prefix("blocks/")?;
        let (fan, name) = rest.split_once('/')?;
        let id = BlockId::from_hex(name)?;
        (fan.len() == 2 && name.starts_with(fan)).then_some(id)
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("block {0:?} is not an objfs block")]
    BadHeader(BlockId),
    #[error("block {0:?} uses unknown codec {1}")]
    UnknownCodec(BlockId, u8),
    #[error("block {0:?} is corrupt: its content does not match its hash")]
    HashMismatch(BlockId),
}

/// Plain bytes -> (id, bytes to store).
pub fn encode(plain: &[u8]) -> (BlockId, Vec<u8>) {
    let id = BlockId::of(plain);
    let mut out = Vec::with_capacity(plain.len() + 4);
    out.extend_from_slice(plain);
    out.extend_from_slice(&trailer(CODEC_NONE));
    (id, out)
}

/// Stored bytes -> plain bytes, verified against the id they were fetched under.
pub fn decode(id: BlockId, mut stored: Vec<u8>) -> Result<Vec<u8>, BlockError> {
    let n = stored.len();
    if n < 4 || stored[n - 3..] != MAGIC {
        return Err(BlockError::BadHeader(id));
    }
    let codec = stored[n - 4];
    if codec != CODEC_NONE {
        return Err(BlockError::UnknownCodec(id, codec));
    }
    stored.truncate(n - 4);
    if BlockId::of(&stored) != id {
        return Err(BlockError::HashMismatch(id));
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_verify() {
        let (id, stored) = encode(b"hello");
        assert_eq!(decode(id, stored.clone()).unwrap(), b"hello");
        let mut bad = stored.clone();
        bad[0] ^= 1;
        assert_eq!(decode(id, bad), Err(BlockError::HashMismatch(id)));
        assert_eq!(decode(id, b"xx".to_vec()), Err(BlockError::BadHeader(id)));
        let mut other = stored;
        let n = other.len();
        other[n - 4] = 9;
        assert_eq!(decode(id, other), Err(BlockError::UnknownCodec(id, 9)));
    }

    #[test]
    fn keys() {
        let id = BlockId::of(b"x");
        let key = id.key();
        assert!(key.starts_with("blocks/2d/2d71"));
        assert_eq!(BlockId::from_key(&key), Some(id));
        assert_eq!(BlockId::from_key("blocks/zz/2d71"), None);
    }
}
