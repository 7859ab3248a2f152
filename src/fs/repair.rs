//! fsck --repair: fixes what is provably safe in the index. Dangling entries go,
//! directories cut off from the root are linked into /lost+found (created only
//! then), parent pointers and link counts are recomputed. Data is never deleted.

use super::{Ctx, FsResult, Volume};
use crate::index::{Index, Ino, Kind, ROOT_INO};
use std::collections::{HashMap, HashSet, VecDeque};

/// Inodes reachable from the root, each with the directory that reaches it first.
fn reach(index: &Index) -> HashMap<Ino, Ino> {
    let mut parent = HashMap::from([(ROOT_INO, ROOT_INO)]);
    let mut queue = VecDeque::from([ROOT_INO]);
    while let Some(dir) = queue.pop_front() {
        for &child in index.entries(dir).into_iter().flat_map(|e| e.values()) {
            if parent.contains_key(&child) || index.get(child).is_none() {
                continue;
            }
            parent.insert(child, dir);
            if index.get(child).is_some_and(|c| c.kind == Kind::Dir) {
                queue.push_back(child);
            }
        }
    }
    parent
}

impl Volume {
    /// Repairs the index in place; returns a line per fix. Commit afterwards.
    pub fn repair(&self) -> FsResult<Vec<String>> {
        self.writable()?;
        let mut fixes = self.load_fixes.clone();
        self.remove_dangling_entries(&mut fixes);
        self.relink_detached_directories(&mut fixes)?;
        self.fix_parents_and_link_counts(&mut fixes);
        Ok(fixes)
    }

    fn remove_dangling_entries(&self, fixes: &mut Vec<String>) {
        let mut state = self.state();
        let index = &mut state.index;
        let dangling: Vec<(Ino, Vec<u8>, Ino)> = index
            .inodes()
            .filter(|i| i.kind == Kind::Dir)
            .flat_map(|d| {
                index
                    .entries(d.ino)
                    .into_iter()
                    .flatten()
                    .filter(|(_, c)| index.get(**c).is_none())
                    .map(move |(n, c)| (d.ino, n.clone(), *c))
            })
            .collect();
        for (dir, name, ino) in dangling {
            index.remove_entry(dir, &name);
            fixes.push(format!(
                "removed entry {:?} in directory {dir} (its inode {ino} is missing)",
                String::from_utf8_lossy(&name)
            ));
        }
    }

    fn relink_detached_directories(&self, fixes: &mut Vec<String>) -> FsResult<()> {
        loop {
            let detached = {
                let state = self.state();
                let reachable = reach(&state.index);
                state
                    .index
                    .inodes()
                    .filter(|i| i.kind == Kind::Dir && !reachable.contains_key(&i.ino))
                    .map(|i| i.ino)
                    .min()
            };
            let Some(dir) = detached else {
                return Ok(());
            };
            let lost = self.lost_and_found()?;
            let mut state = self.state();
            // Unhook it from wherever it still hangs (a detached parent or a cycle).
            let holders: Vec<(Ino, Vec<u8>)> = state
                .index
                .inodes()
                .filter(|i| i.kind == Kind::Dir)
                .flat_map(|d| {
                    state
                        .index
                        .entries(d.ino)
                        .into_iter()
                        .flatten()
                        .filter(|(_, c)| **c == dir)
                        .map(move |(n, _)| (d.ino, n.clone()))
                })
                .collect();
            for (holder, name) in holders {
                state.index.remove_entry(holder, &name);
            }
            let name = format!("#{dir}");
            state.index.insert_entry(lost, name.as_bytes(), dir);
            if let Some(d) = state.index.get_mut(dir) {
                d.parent = lost;
            }
            fixes.push(format!(
                "directory {dir} was cut off from the root: linked as /lost+found/{name}"
            ));
        }
    }

    fn lost_and_found(&self) -> FsResult<Ino> {
        if let Some(ino) = self.state().index.lookup(ROOT_INO, b"lost+found") {
            return Ok(ino);
        }
        Ok(self.mkdir(Ctx::root(), ROOT_INO, b"lost+found", 0o700)?.ino)
    }

    fn fix_parents_and_link_counts(&self, fixes: &mut Vec<String>) {
        let mut state = self.state();
        let parents = reach(&state.index);
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        let dirs: HashSet<Ino> = state
            .index
            .inodes()
            .filter(|i| i.kind == Kind::Dir)
            .map(|i| i.ino)
            .collect();
        for &d in &dirs {
            for &c in state.index.entries(d).into_iter().flat_map(|e| e.values()) {
                if dirs.contains(&c) {
                    *subdirs.entry(d).or_default() += 1;
                } else {
                    *links.entry(c).or_default() += 1;
                }
            }
        }
        let inos: Vec<Ino> = state.index.inodes().map(|i| i.ino).collect();
        for ino in inos {
            let is_dir = dirs.contains(&ino);
            let want = if is_dir {
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                links.get(&ino).copied().unwrap_or(0)
            };
            let want_parent = parents.get(&ino).copied();
            let Some(inode) = state.index.get(ino) else {
                continue;
            };
            if want == 0 {
                // Unlinked files are reclaimed by the next read-write mount, not here.
                continue;
            }
            let (nlink, parent) = (inode.nlink, inode.parent);
            if nlink != want {
                state.index.get_mut(ino).expect("exists").nlink = want;
                fixes.push(format!("inode {ino}: link count {nlink} -> {want}"));
            }
            if let (true, Some(p)) = (is_dir, want_parent)
                && p != parent
            {
                state.index.get_mut(ino).expect("exists").parent = p;
                fixes.push(format!("directory {ino}: parent {parent} -> {p}"));
            }
        }
    }
}
