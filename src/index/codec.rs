//! Framing for metadata objects: magic, format version, sha256 of the body, body.
//! A torn or foreign object is detected before anything in it is trusted.

use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not an objfs {0} (bad magic)")]
    BadMagic(&'static str),
    #[error("{kind} has format version {found}; this objfs reads up to {supported}")]
    TooNew {
        kind: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{0} is truncated or corrupt (checksum mismatch)")]
    Corrupt(&'static str),
    #[error("{0} could not be decoded: {1}")]
    Decode(&'static str, String),
}

/// 2: journal segments may hold `Record::PatchInode`. A writer marks a version-1
/// store's superblock 2 before it journals anything (`journal::upgrade_format`), so
/// an objfs that reads only version 1 refuses the store instead of taking a segment
/// it cannot decode for damage.
/// 3: extents may be `Extent::Patched` (same upgrade path).
/// 4: the first segment of a generation may name the last segment of the one before
/// as its `prev` (a bridge, written while that generation's snapshot is in flight);
/// an older objfs would stop replay there.
pub const FORMAT_VERSION: u32 = 4;

pub struct Kind {
    pub name: &'static str,
    pub magic: &'static [u8; 8],
}

pub const SUPERBLOCK: Kind = Kind {
    name: "superblock",
    magic: b"OBJFSSB\x01",
};
pub const SNAPSHOT: Kind = Kind {
    name: "snapshot",
    magic: b"OBJFSSN\x01",
};
pub const SEGMENT: Kind = Kind {
    name: "journal segment",
    magic: b"OBJFSJN\x01",
};

const HEAD: usize = 8 + 4 + 32;

pub fn encode<T: Serialize>(kind: &Kind, value: &T) -> Vec<u8> {
    let body = bincode::serialize(value).expect("index types always serialize");
    let mut out = Vec::with_capacity(HEAD + body.len());
    out.extend_from_slice(kind.magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

pub fn decode<T: DeserializeOwned>(kind: &Kind, bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() < 8 || &bytes[..8] != kind.magic {
        return Err(FrameError::BadMagic(kind.name));
    }
    if bytes.len() < HEAD {
        return Err(FrameError::Corrupt(kind.name));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version > FORMAT_VERSION {
        return Err(FrameError::TooNew {
            kind: kind.name,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body = &bytes[HEAD..];
    if Sha256::digest(body).as_slice() != &bytes[12..HEAD] {
        return Err(FrameError::Corrupt(kind.name));
    }
    bincode::deserialize(body).map_err(|e| FrameError::Decode(kind.name, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_damage() {
        let bytes = encode(&SNAPSHOT, &vec![1u32, 2, 3]);
        assert_eq!(
            decode::<Vec<u32>>(&SNAPSHOT, &bytes).unwrap(),
            vec![1, 2, 3]
        );
        assert!(matches!(
            decode::<Vec<u32>>(&SEGMENT, &bytes),
            Err(FrameError::BadMagic(_))
        ));
        assert!(matches!(
            decode::<Vec<u32>>(&SNAPSHOT, &bytes[..bytes.len() - 1]),
            Err(FrameError::Corrupt(_))
        ));
        let mut newer = bytes.clone();
        newer[8] = 99;
        assert!(matches!(
            decode::<Vec<u32>>(&SNAPSHOT, &newer),
            Err(FrameError::TooNew { found: 99, .. })
        ));
        assert!(decode::<Vec<u32>>(&SNAPSHOT, b"garbage").is_err());
    }
}
