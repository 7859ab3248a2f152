//! POSIX ACLs, kept in the inode's xattrs in the kernel's own encoding
//! (`system.posix_acl_access`, `system.posix_acl_default`). With FUSE_POSIX_ACL the
//! kernel enforces them and caches them; what falls to the filesystem is keeping the
//! mode and the access ACL in step (chmod, setfacl) and handing a directory's default
//! ACL down to what is created in it, as ext4 does.

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

/// Whether an xattr name is one of the two ACLs.
pub fn is_acl_name(name: &[u8]) -> bool {
    name == ACCESS || name == DEFAULT
}

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    /// Decodes and validates an ACL xattr value; None if it is not a valid ACL.
    pub fn parse(bytes: &[u8]) -> Option<Acl> {
        let body = bytes.get(HEADER..)?;
        let version = u32::from_le_bytes(bytes[..HEADER].try_into().ok()?);
        if version != VERSION || body.is_empty() || !body.len().is_multiple_of(ENTRY) {
            return None;
        }
        let entries: Vec<Entry> = body
            .chunks_exact(ENTRY)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let acl = Acl(entries);
        acl.is_valid().then_some(acl)
    }

    /// The rules of the kernel's posix_acl_valid: one owner, owning-group and other
    /// entry each, a mask whenever there are named entries, entries in tag order and
    /// named ones by increasing id (so no id twice).
    fn is_valid(&self) -> bool {
        let ordered = self
            .0
            .windows(2)
            .all(|w| (w[0].tag, w[0].id) < (w[1].tag, w[1].id) || w[0].tag < w[1].tag);
        let count = |tag| self.0.iter().filter(|e| e.tag == tag).count();
        let named = count(USER) + count(GROUP);
        let mut ids: Vec<(u16, u32)> = self
            .0
            .iter()
            .filter(|e| e.tag == USER || e.tag == GROUP)
            .map(|e| (e.tag, e.id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        self.0.iter().all(|e| {
            e.perm <= 7 && matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER)
        }) && count(USER_OBJ) == 1
            && count(GROUP_OBJ) == 1
            && count(OTHER) == 1
            && count(MASK) <= 1
            && (named == 0 || count(MASK) == 1)
            && ids.len() == named
            && ordered
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.0.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.0 {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// Only owner, group and other: the mode says all of it, so nothing is stored.
    pub fn is_minimal(&self) -> bool {
        self.0.len() == 3
    }

    fn perm(&self, tag: u16) -> u32 {
        self.0
            .iter()
            .find(|e| e.tag == tag)
            .map_or(0, |e| u32::from(e.perm))
    }

    /// The tag that stands for the mode's group bits: the mask if there is one.
    fn group_class(&self) -> u16 {
        if self.0.iter().any(|e| e.tag == MASK) {
            MASK
        } else {
            GROUP_OBJ
        }
    }

    /// The rwx bits of the mode this access ACL implies.
    pub fn mode_bits(&self) -> u32 {
        self.perm(USER_OBJ) << 6 | self.perm(self.group_class()) << 3 | self.perm(OTHER)
    }

    /// A chmod: the owner, group-class and other entries take the mode's bits.
    pub fn chmod(&mut self, mode: u32) {
        self.apply_mode(mode, |_, bits| bits);
    }

    /// A directory's default ACL made into the access ACL of a node created in it
    /// with `mode`: the owner, group-class and other entries keep only what the mode
    /// grants (the kernel's posix_acl_create_masq). Returns the new node's rwx bits.
    pub fn create_masq(&mut self, mode: u32) -> u32 {
        self.apply_mode(mode, |perm, bits| perm & bits);
        self.mode_bits()
    }

    /// Sets the owner, group-class and other entries to `f(entry's perm, the mode's
    /// bits for it)`; named entries are left alone.
    fn apply_mode(&mut self, mode: u32, f: impl Fn(u16, u16) -> u16) {
        let class = self.group_class();
        for e in &mut self.0 {
            let bits = match e.tag {
                USER_OBJ => mode >> 6,
                OTHER => mode,
                t if t == class => mode >> 3,
                _ => continue,
            };
            e.perm = f(e.perm, (bits & 7) as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        Acl(entries
            .iter()
            .map(|&(tag, perm, id)| Entry { tag, perm, id })
            .collect())
        .encode()
    }

    #[test]
    fn parses_what_it_encodes_and_refuses_invalid_acls() {
        let good = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(Acl::parse(&good).unwrap().encode(), good);
        for bad in [
            vec![],
            vec![2, 0, 0, 0],
            good[..good.len() - 1].to_vec(),
            acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0)]),
            acl(&[
                (USER_OBJ, 7, 0),
                (USER, 5, 1),
                (GROUP_OBJ, 5, 0),
                (OTHER, 0, 0),
            ]),
            acl(&[
                (USER_OBJ, 7, 0),
                (USER, 5, 1),
                (USER, 4, 1),
                (GROUP_OBJ, 5, 0),
                (MASK, 7, 0),
                (OTHER, 0, 0),
            ]),
            acl(&[(USER_OBJ, 8, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]),
            acl(&[(GROUP_OBJ, 5, 0), (USER_OBJ, 7, 0), (OTHER, 0, 0)]),
            acl(&[
                (USER_OBJ, 7, 0),
                (USER, 5, 9),
                (USER, 4, 3),
                (GROUP_OBJ, 5, 0),
                (MASK, 7, 0),
                (OTHER, 0, 0),
            ]),
        ] {
            assert!(Acl::parse(&bad).is_none(), "{bad:?}");
        }
        let mut version_1 = good.clone();
        version_1[0] = 1;
        assert!(Acl::parse(&version_1).is_none());
    }

    #[test]
    fn mode_follows_the_mask_and_chmod_moves_it() {
        let mut a = Acl::parse(&acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, 0),
            (MASK, 5, 0),
            (OTHER, 4, 0),
        ]))
        .unwrap();
        assert_eq!(a.mode_bits(), 0o654);
        a.chmod(0o700);
        assert_eq!(a.mode_bits(), 0o700);
        // The named user and the owning group keep their entries; the mask limits them.
        assert_eq!(a.perm(USER), 7);
        assert_eq!(a.perm(GROUP_OBJ), 4);
        assert!(!a.is_minimal());
    }

    #[test]
    fn inheriting_masks_the_default_acl_with_the_requested_mode() {
        let mut d = Acl::parse(&acl(&[
            (USER_OBJ, 7, 0),
            (GROUP_OBJ, 7, 0),
            (GROUP, 7, 50),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]))
        .unwrap();
        assert_eq!(d.create_masq(0o644), 0o644);
        assert_eq!(d.perm(GROUP), 7);
        assert_eq!(d.perm(MASK), 4);
        let mut minimal =
            Acl::parse(&acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 7, 0), (OTHER, 7, 0)])).unwrap();
        assert_eq!(minimal.create_masq(0o751), 0o751);
        assert!(minimal.is_minimal());
    }
}
