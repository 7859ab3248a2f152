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
pub const CODEC_ZSTD: u8 = 1;
pub const TRAILER_LEN: usize = 4;
/// The largest plain block any filesystem has (its largest block size).
pub const MAX_PLAIN: usize = 64 << 20;
/// zstd's fastest level: about as fast as the disk on one core, and most of the
/// size saving of the slower ones for text and binaries.
const ZSTD_LEVEL: i32 = 1;

/// How a filesystem stores new blocks (its superblock's `codec`). Blocks of every
/// codec can be read whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn parse(name: &str) -> Option<Compression> {
        match name {
            "none" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }

    /// The stored form of a plain block into `out` (trailer included) when
    /// compressing it saves at least an eighth; false: store it plain
    /// (`trailer(CODEC_NONE)` after the bytes).
    pub fn compress_into(self, plain: &[u8], out: &mut Vec<u8>) -> bool {
        if self == Compression::None || plain.len() < 512 {
            return false;
        }
        let bound = plain.len() - plain.len() / 8 - TRAILER_LEN;
        out.clear();
        out.reserve_exact(bound + TRAILER_LEN);
        // zstd writes at most `capacity` bytes: a result that would not fit the
        // bound fails, and the block is stored plain.
        let written = COMPRESSOR.with_borrow_mut(|c| {
            if c.is_none() {
                *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            c.as_mut()?.compress_to_buffer(plain, out).ok()
        });
        if written.is_none() || out.len() > bound {
            return false;
        }
        out.extend_from_slice(&trailer(CODEC_ZSTD));
        true
    }

    /// `compress_into` a new buffer.
    #[cfg(test)]
    pub fn compress(self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.compress_into(plain, &mut out).then_some(out)
    }
}

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
    #[error("block {0:?} is corrupt: its compressed data does not expand")]
    BadFrame(BlockId),
}

/// Plain bytes -> (id, bytes to store), uncompressed (tests build stored blocks).
#[cfg(test)]
pub fn encode(plain: &[u8]) -> (BlockId, Vec<u8>) {
    let id = BlockId::of(plain);
    let mut out = Vec::with_capacity(plain.len() + 4);
    out.extend_from_slice(plain);
    out.extend_from_slice(&trailer(CODEC_NONE));
    (id, out)
}

/// Buffers for `decode_with`: where a compressed block is expanded, and what to do
/// with the stored bytes after that.
pub trait Buffers {
    fn take(&self, capacity: usize) -> Vec<u8>;
    fn give_back(&self, buf: Vec<u8>);
}

/// Fresh buffers, dropped after use.
pub struct NewBuffers;

impl Buffers for NewBuffers {
    fn take(&self, capacity: usize) -> Vec<u8> {
        Vec::with_capacity(capacity)
    }
    fn give_back(&self, _: Vec<u8>) {}
}

/// Stored bytes -> plain bytes, verified against the id they were fetched under.
/// A compressed block may expand to at most `max_plain` bytes (the filesystem's
/// block size): a damaged or hostile size field must not make us allocate more.
pub fn decode_with(
    id: BlockId,
    mut stored: Vec<u8>,
    max_plain: usize,
    buffers: &impl Buffers,
) -> Result<Vec<u8>, BlockError> {
    let n = stored.len();
    if n < 4 || stored[n - 3..] != MAGIC {
        return Err(BlockError::BadHeader(id));
    }
    let plain = match stored[n - 4] {
        CODEC_NONE => {
            stored.truncate(n - 4);
            stored
        }
        CODEC_ZSTD => {
            let plain = expand(id, &stored[..n - 4], max_plain, buffers);
            buffers.give_back(stored);
            plain?
        }
        codec => return Err(BlockError::UnknownCodec(id, codec)),
    };
    if BlockId::of(&plain) != id {
        return Err(BlockError::HashMismatch(id));
    }
    Ok(plain)
}

#[cfg(test)]
pub fn decode(id: BlockId, stored: Vec<u8>) -> Result<Vec<u8>, BlockError> {
    decode_with(id, stored, MAX_PLAIN, &NewBuffers)
}

/// A zstd frame back to its bytes, at most `max_plain` of them.
fn expand(
    id: BlockId,
    frame: &[u8],
    max_plain: usize,
    buffers: &impl Buffers,
) -> Result<Vec<u8>, BlockError> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= max_plain.min(MAX_PLAIN) as u64 => size as usize,
        _ => return Err(BlockError::BadFrame(id)),
    };
    let mut plain = buffers.take(size);
    plain.clear();
    plain.reserve_exact(size);
    let expanded = DECOMPRESSOR.with_borrow_mut(|d| {
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        d.as_mut()?.decompress_to_buffer(frame, &mut plain).ok()
    });
    match expanded {
        Some(n) if n == size => Ok(plain),
        _ => {
            buffers.give_back(plain);
            Err(BlockError::BadFrame(id))
        }
    }
}

// zstd contexts are costly to set up (tables of several hundred KiB): one per
// thread, reused for every block.
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
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
    fn compressed_blocks_round_trip_and_incompressible_ones_stay_plain() {
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("line {i} of a text file\n").into_bytes())
            .take(1 << 20)
            .collect();
        let id = BlockId::of(&text);
        let stored = Compression::Zstd.compress(&text).unwrap();
        assert!(stored.len() < text.len() / 4, "{}", stored.len());
        assert_eq!(stored[stored.len() - 4], CODEC_ZSTD);
        assert_eq!(decode(id, stored.clone()).unwrap(), text);
        // Damage is an error, never wrong bytes or a panic.
        for at in [0, 5, stored.len() / 2, stored.len() - 6] {
            let mut bad = stored.clone();
            bad[at] ^= 0x5a;
            assert!(decode(id, bad).is_err(), "damage at {at}");
        }
        assert!(decode(id, stored[..stored.len() / 2].to_vec()).is_err());
        let random: Vec<u8> = (0..2048u32)
            .flat_map(|i| Sha256::digest(i.to_le_bytes()))
            .collect();
        assert!(Compression::Zstd.compress(&random).is_none());
        assert!(Compression::None.compress(&text).is_none());
        assert_eq!(Compression::parse("zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::parse("lz5"), None);
    }

    #[test]
    fn a_frame_claiming_a_huge_size_is_refused() {
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let frame = c.compress(&vec![0u8; 4096]).unwrap();
        let id = BlockId::of(&vec![0u8; 4096]);
        let mut stored = frame.clone();
        stored.extend_from_slice(&trailer(CODEC_ZSTD));
        assert_eq!(decode(id, stored).unwrap(), vec![0u8; 4096]);
        // A frame header whose content size says 1 TiB: refused before allocating.
        let mut big = Vec::new();
        big.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0xc0]);
        big.extend_from_slice(&(1u64 << 40).to_le_bytes());
        big.extend_from_slice(&trailer(CODEC_ZSTD));
        assert!(decode(id, big).is_err());
    }

    #[test]
    fn a_frame_expanding_past_the_block_size_is_refused() {
        let plain = vec![7u8; 65536];
        let id = BlockId::of(&plain);
        let stored = Compression::Zstd.compress(&plain).unwrap();
        assert_eq!(
            decode_with(id, stored.clone(), 4096, &NewBuffers),
            Err(BlockError::BadFrame(id))
        );
        assert_eq!(decode_with(id, stored, 65536, &NewBuffers).unwrap(), plain);
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
