//! Offline tools on a store: `stat` and `fsck`.

use crate::block::BlockId;
use crate::fs::{Volume, VolumeConfig};
use crate::index::{Extent, Ino, Kind, ROOT_INO};
use crate::store::{ObjectStore, StoreLocation, StoreOptions};
use crate::util::format_bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

type CliResult<T> = Result<T, String>;

fn open_existing(spec: &str, opts: &StoreOptions) -> CliResult<Arc<dyn ObjectStore>> {
    let location = StoreLocation::parse_with(spec, opts)?;
    crate::daemon::open_or_create(&location, spec, true, &mut |m| println!("{m}"))
}

fn load_read_only(spec: &str, opts: &StoreOptions) -> CliResult<Volume> {
    let store = open_existing(spec, opts)?;
    Volume::load(
        store,
        VolumeConfig {
            read_only: true,
            ..VolumeConfig::default()
        },
    )
    .map_err(|e| format!("{spec}: {e}"))
}

pub fn stat(spec: &str, opts: &StoreOptions) -> CliResult<()> {
    let volume = load_read_only(spec, opts)?;
    let u = volume.usage();
    let report = volume.load_report();
    let sb = volume.superblock();
    let stored = stored_bytes(&volume);
    println!("store:          {spec}");
    println!("uuid:           {}", sb.uuid);
    println!("block size:     {}", format_bytes(u64::from(sb.block_size)));
    println!("compression:    {}", sb.codec);
    println!("files:          {}", u.files);
    println!("directories:    {}", u.dirs);
    println!("other nodes:    {}", u.other);
    println!(
        "logical bytes:  {} ({})",
        u.logical_bytes,
        format_bytes(u.logical_bytes)
    );
    println!(
        "stored bytes:   {} ({}; each distinct block once, plus inline bytes)",
        stored.plain,
        format_bytes(stored.plain)
    );
    let objects = objects_in_store(&volume, &stored).map_err(|e| format!("{spec}: {e}"))?;
    println!(
        "in the store:   {} ({}) in {} block objects{}",
        objects.referenced_bytes,
        format_bytes(objects.referenced_bytes),
        objects.referenced,
        match sb.compression() {
            crate::block::Compression::None => String::new(),
            _ => format!(
                ", compressed to {:.0}% of their plain size",
                percent(objects.referenced_bytes, stored.plain - stored.inline)
            ),
        }
    );
    if objects.freed > 0 {
        println!(
            "freed:          {} block objects, {} (freed shortly before the last unmount; the next writer deletes them)",
            objects.freed,
            format_bytes(objects.freed_bytes)
        );
    }
    if objects.unreferenced > 0 {
        println!(
            "unreferenced:   {} block objects, {} (not in the committed index: a mounted writer's newest blocks, or garbage that objfs gc deletes)",
            objects.unreferenced,
            format_bytes(objects.unreferenced_bytes)
        );
    }
    println!("inline bytes:   {}", u.inline_bytes);
    println!("blocks:         {}", u.blocks);
    let ratio = if stored.plain == 0 {
        1.0
    } else {
        u.logical_bytes as f64 / stored.plain as f64
    };
    println!("dedup ratio:    {ratio:.2}");
    println!(
        "index size:     {} (snapshot generation {}, {} journal segments, {} bytes)",
        format_bytes(report.snapshot_bytes + report.journal_bytes),
        report.generation,
        report.segments,
        report.journal_bytes
    );
    for w in &report.warnings {
        println!("warning:        {w}");
    }
    Ok(())
}

/// What the filesystem's content occupies, as the index says.
struct Stored {
    /// Each distinct block's plain length once, plus inline and patch bytes.
    plain: u64,
    inline: u64,
    /// The distinct blocks.
    blocks: HashSet<BlockId>,
}

fn stored_bytes(volume: &Volume) -> Stored {
    let mut blocks: HashMap<BlockId, u64> = HashMap::new();
    let mut inline = 0;
    let mut count = |id: &BlockId, len: u64| {
        let v = blocks.entry(*id).or_default();
        *v = (*v).max(len);
    };
    volume.with_index(|index| {
        for inode in index.inodes() {
            for e in inode.extents.values() {
                match e {
                    Extent::Block { id, len } => count(id, u64::from(*len)),
                    Extent::Inline(d) => inline += d.len() as u64,
                    Extent::Patched { base, base_len, .. } => {
                        if let Some(id) = base {
                            count(id, u64::from(*base_len));
                        }
                        inline += e.patch_bytes();
                    }
                }
            }
        }
    });
    Stored {
        plain: blocks.values().sum::<u64>() + inline,
        inline,
        blocks: blocks.into_keys().collect(),
    }
}

/// The block objects in the store, as its listing says (sizes after compression).
#[derive(Default)]
struct Objects {
    referenced: u64,
    referenced_bytes: u64,
    /// Listed in `meta/pending-frees`.
    freed: u64,
    freed_bytes: u64,
    unreferenced: u64,
    unreferenced_bytes: u64,
}

fn objects_in_store(volume: &Volume, stored: &Stored) -> Result<Objects, String> {
    let mut objects = Objects::default();
    let listed = volume
        .store()
        .list_sizes("blocks/")
        .map_err(|e| e.to_string())?;
    let freed: HashSet<BlockId> = crate::fs::pending_frees(&**volume.store())
        .into_iter()
        .collect();
    for (key, size) in listed {
        let id = key.rsplit('/').next().and_then(BlockId::from_hex);
        if id.is_some_and(|id| stored.blocks.contains(&id)) {
            objects.referenced += 1;
            objects.referenced_bytes += size;
        } else if id.is_some_and(|id| freed.contains(&id)) {
            objects.freed += 1;
            objects.freed_bytes += size;
        } else {
            objects.unreferenced += 1;
            objects.unreferenced_bytes += size;
        }
    }
    Ok(objects)
}

fn percent(part: u64, whole: u64) -> f64 {
    match whole {
        0 => 100.0,
        _ => part as f64 * 100.0 / whole as f64,
    }
}

/// Fixes what is safe (see fs::repair), under the writer lease.
fn repair(spec: &str, opts: &StoreOptions) -> CliResult<()> {
    let store = open_existing(spec, opts)?;
    let config = VolumeConfig {
        resolve_forks: true,
        ..VolumeConfig::default()
    };
    let volume =
        Volume::load(store, config).map_err(|e| format!("{spec}: refusing to repair: {e}"))?;
    let fixes = volume.repair().map_err(|e| format!("{spec}: {e}"))?;
    volume.renew_lease();
    for f in &fixes {
        println!("repaired: {f}");
    }
    volume
        .shutdown()
        .map_err(|e| format!("{spec}: saving the repairs failed: {e}"))?;
    if fixes.is_empty() {
        println!("nothing to repair in the index");
    }
    Ok(())
}

pub fn fsck(spec: &str, verify_data: bool, fix: bool, opts: &StoreOptions) -> CliResult<bool> {
    if fix {
        repair(spec, opts)?;
    }
    let volume = load_read_only(spec, opts)?;
    let mut problems: Vec<String> = volume
        .load_report()
        .warnings
        .iter()
        .map(|w| format!("journal: {w}"))
        .collect();
    let present: HashSet<BlockId> = volume
        .store()
        .list("blocks/")
        .map_err(|e| format!("{spec}: {e}"))?
        .iter()
        .filter_map(|k| BlockId::from_key(k))
        .collect();
    let mut referenced: HashMap<BlockId, Vec<Ino>> = HashMap::new();
    volume.with_index(|index| {
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        for inode in index.inodes() {
            if inode.kind == Kind::Dir {
                let Some(entries) = index.entries(inode.ino) else {
                    problems.push(format!("directory {} has no entry table", inode.ino));
                    continue;
                };
                for (name, &child) in entries {
                    match index.get(child) {
                        None => problems.push(format!(
                            "entry {:?} in directory {} points to missing inode {child}",
                            String::from_utf8_lossy(name),
                            inode.ino
                        )),
                        Some(c) if c.kind == Kind::Dir => {
                            *subdirs.entry(inode.ino).or_default() += 1;
                            if c.parent != inode.ino {
                                problems.push(format!(
                                    "directory {child} has wrong parent {}",
                                    c.parent
                                ));
                            }
                        }
                        Some(_) => *links.entry(child).or_default() += 1,
                    }
                }
            }
            for e in inode.extents.values() {
                if let Some(id) = e.block_id() {
                    referenced.entry(id).or_default().push(inode.ino);
                }
            }
        }
        for inode in index.inodes() {
            let expected = match inode.kind {
                Kind::Dir => 2 + subdirs.get(&inode.ino).copied().unwrap_or(0),
                _ => links.get(&inode.ino).copied().unwrap_or(0),
            };
            if inode.nlink != expected {
                problems.push(format!(
                    "inode {} has link count {} but {} links",
                    inode.ino, inode.nlink, expected
                ));
            }
        }
        if index.get(ROOT_INO).is_none_or(|r| r.kind != Kind::Dir) {
            problems.push("root directory missing".into());
        }
    });
    let paths = volume.with_index(paths_by_inode);
    let name_files = |inos: &[Ino]| -> String {
        let mut names: Vec<String> = inos
            .iter()
            .map(|i| {
                paths
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("<inode {i}>"))
            })
            .collect();
        names.sort();
        names.dedup();
        names.join(", ")
    };
    for (id, inos) in &referenced {
        if !present.contains(id) {
            problems.push(format!(
                "block {} is missing; damaged files: {}",
                id.to_hex(),
                name_files(inos)
            ));
        }
    }
    let orphans = present
        .iter()
        .filter(|id| !referenced.contains_key(*id))
        .count();
    if verify_data {
        let total = referenced.len();
        for (n, (id, inos)) in referenced.iter().enumerate() {
            if !present.contains(id) {
                continue;
            }
            if let Err(e) = volume.verify_block(*id) {
                problems.push(format!(
                    "block {}: {e}; damaged files: {}",
                    id.to_hex(),
                    name_files(inos)
                ));
            }
            if (n + 1) % 1000 == 0 {
                eprintln!("verified {}/{total} blocks", n + 1);
            }
        }
    }
    println!(
        "{spec}: {} inodes, {} referenced blocks, {orphans} unreferenced blocks",
        volume.usage().files + volume.usage().dirs + volume.usage().other,
        referenced.len()
    );
    for p in &problems {
        println!("problem: {p}");
    }
    if problems.is_empty() {
        println!("clean");
    }
    Ok(problems.is_empty())
}

/// Deletes every block no file references (blocks left by a writer that died before
/// committing, or freed while no daemon ran). Holds the writer lease meanwhile, so it
/// refuses to run beside a live writer.
pub fn gc(spec: &str, dry_run: bool, opts: &StoreOptions) -> CliResult<()> {
    let store = open_existing(spec, opts)?;
    recover_after_crash(spec, &store, dry_run)?;
    let writer = format!("gc{}", crate::util::random_hex(2));
    let mut lease = crate::lease::Lease::acquire(
        store.clone(),
        &writer,
        std::time::Duration::from_secs(300),
        "",
    )
    .map_err(|e| format!("{spec}: refusing to collect garbage: {e}"))?;
    if lease.took_over() {
        // A writer crashed since `recover_after_crash` looked: its last segment or
        // snapshot may still land and name blocks this index does not. The lease stays
        // unreleased so that the next writer seals the journal.
        return Err(format!(
            "{spec}: refusing to collect garbage: the last writer did not release the store; run objfs gc again"
        ));
    }
    let result = collect(spec, &store, &writer, dry_run, &mut lease);
    if let Err(e) = lease.release() {
        eprintln!("objfs: warning: releasing the lease: {e}");
    }
    result
}

/// After a writer that never released the store, recovers it as a mount would
/// (taking the lease over, replaying the journal and sealing it with a snapshot above
/// anything that writer may still land) and unmounts, so gc collects against an
/// index nothing late can change. Refuses, writing nothing, on a dry run or when
/// the journal does not replay cleanly: the seal would make blocks that only the
/// damaged part names look unreferenced before anyone ran fsck.
fn recover_after_crash(spec: &str, store: &Arc<dyn ObjectStore>, dry_run: bool) -> CliResult<()> {
    let crashed = crate::lease::crashed_holder(&**store).map_err(|e| format!("{spec}: {e}"))?;
    let Some(holder) = crashed else {
        return Ok(());
    };
    let refuse = |why: String| format!("{spec}: refusing to collect garbage: {why}");
    if dry_run {
        return Err(refuse(format!(
            "{holder} did not release the store; run objfs gc without --dry-run, or mount it once"
        )));
    }
    let loaded =
        crate::index::journal::load(store.clone(), "gc").map_err(|e| refuse(e.to_string()))?;
    refuse_unclean(spec, &loaded.report)?;
    eprintln!("objfs: {spec}: {holder} did not release the store; recovering it first");
    let volume =
        Volume::load(store.clone(), VolumeConfig::default()).map_err(|e| refuse(e.to_string()))?;
    let report = refuse_unclean(spec, volume.load_report());
    volume.shutdown().map_err(|e| refuse(e.to_string()))?;
    report
}

fn refuse_unclean(spec: &str, report: &crate::index::journal::LoadReport) -> CliResult<()> {
    if report.clean() {
        return Ok(());
    }
    Err(format!(
        "{spec}: refusing to collect garbage: the journal did not replay cleanly ({}); run objfs fsck and mount it once before gc",
        report.warnings.join("; ")
    ))
}

fn collect(
    spec: &str,
    store: &Arc<dyn ObjectStore>,
    writer: &str,
    dry_run: bool,
    lease: &mut crate::lease::Lease,
) -> CliResult<()> {
    // Loading and listing a large store can take a while.
    let (listed, lost) = lease.renewed_during(|| {
        let loaded = crate::index::journal::load(store.clone(), writer)?;
        let keys = store.list("blocks/")?;
        Ok::<_, crate::index::journal::IndexError>((loaded, keys))
    });
    if let Some(who) = lost {
        return Err(format!(
            "{spec}: stopped: the store was taken over by {who}"
        ));
    }
    let (loaded, keys) = listed.map_err(|e| format!("{spec}: {e}"))?;
    refuse_unclean(spec, &loaded.report)?;
    let referenced: HashSet<BlockId> = loaded
        .index
        .ledger()
        .referenced()
        .map(|(id, _)| *id)
        .collect();
    let mut freed = 0u64;
    let mut failed = 0u64;
    // A lapsed lease is taken again only where conditional create is atomic (see
    // `Volume::renew_lease`).
    let refresh = |lease: &mut crate::lease::Lease| {
        let renewed = if lease.valid_now() {
            lease.renew()
        } else if store.conditional_create_is_atomic() {
            lease.reacquire()
        } else {
            return Err("the gc lease lapsed".to_string());
        };
        renewed.map_err(|e| e.to_string())
    };
    if !dry_run {
        refresh(lease).map_err(|e| format!("{spec}: stopped: {e}"))?;
    }
    let mut renewed = std::time::Instant::now();
    for key in keys {
        let Some(id) = BlockId::from_key(&key) else {
            continue;
        };
        if referenced.contains(&id) {
            continue;
        }
        if dry_run {
            println!("would delete {key}");
            freed += 1;
            continue;
        }
        // Deleting only while the store is still ours: a writer that took over could
        // be uploading this very block again. The lease is checked by our clock
        // before each DELETE and renewed every third of its term.
        // A DELETE may take effect until the store's delete deadline.
        if !lease.valid_for(store.delete_deadline()) {
            return Err(format!("{spec}: stopped: the gc lease lapsed"));
        }
        if renewed.elapsed() >= lease.ttl() / 3 {
            refresh(lease).map_err(|e| format!("{spec}: stopped: {e}"))?;
            renewed = std::time::Instant::now();
        }
        match store.delete(&key) {
            Ok(()) => freed += 1,
            Err(e) => {
                eprintln!("objfs: deleting {key}: {e}");
                failed += 1;
            }
        }
    }
    let verb = if dry_run { "would free" } else { "freed" };
    println!(
        "{spec}: {verb} {freed} unreferenced blocks; {} blocks in use",
        referenced.len()
    );
    if failed > 0 {
        return Err(format!("{failed} blocks could not be deleted"));
    }
    Ok(())
}

/// One path for every reachable inode, for messages that name files.
fn paths_by_inode(index: &crate::index::Index) -> HashMap<Ino, String> {
    let mut paths = HashMap::from([(ROOT_INO, "/".to_string())]);
    let mut queue = std::collections::VecDeque::from([ROOT_INO]);
    while let Some(dir) = queue.pop_front() {
        let base = paths[&dir].clone();
        for (name, &child) in index.entries(dir).into_iter().flatten() {
            if paths.contains_key(&child) {
                continue;
            }
            let sep = if base.ends_with('/') { "" } else { "/" };
            paths.insert(
                child,
                format!("{base}{sep}{}", String::from_utf8_lossy(name)),
            );
            if index.get(child).is_some_and(|c| c.kind == Kind::Dir) {
                queue.push_back(child);
            }
        }
    }
    paths
}
