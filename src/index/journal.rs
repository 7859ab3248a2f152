//! Persistence of the index in the store: `meta/snapshot-<generation>` holds the whole index,
//! `meta/journal-<generation>-<seq>-<writer>` the changes committed after it. Each segment names
//! its predecessor, so the journal is one chain and a second writer shows as a fork.

use super::codec::{self, FrameError};
use super::superblock::{self, Superblock};
use super::{Changes, Index, Record, SnapshotBody};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: {err}")]
    Frame { key: String, err: FrameError },
    #[error("{0} does not hold an objfs filesystem")]
    NotObjfs(String),
    #[error("{0} already holds an objfs filesystem")]
    AlreadyFormatted(String),
    #[error("{0} is not empty and does not hold an objfs filesystem; refusing to format it")]
    NotEmpty(String),
    #[error("no readable snapshot in {0}: the index cannot be recovered")]
    NoSnapshot(String),
    #[error(
        "journal fork at generation {generation} sequence {seq}: segments from writers {writers} (two writers were active); refusing to mount (`objfs fsck --repair` keeps one writer's chain)"
    )]
    Fork {
        generation: u64,
        seq: u64,
        writers: String,
    },
}

impl IndexError {
    /// Written by a newer objfs: not damage, and skipping it would lose it.
    fn is_too_new(&self) -> bool {
        matches!(
            self,
            IndexError::Frame {
                err: FrameError::TooNew { .. },
                ..
            }
        )
    }
}

const SNAPSHOT_PREFIX: &str = "meta/snapshot-";
/// Generations a writer skips after a takeover (`Journal::seal_after_takeover`): more
/// than a writer could take in snapshot attempts before its lease ran out.
pub const TAKEOVER_GAP: u64 = 1 << 20;
const JOURNAL_PREFIX: &str = "meta/journal-";
/// Segments of a losing branch, set aside by `resolve_forks` (never read by `load`).
pub const FORKED_PREFIX: &str = "meta/forked/";

/// Two or more segments with one sequence number: two writers were active.
fn fork(generation: u64, seq: u64, keys: &[String]) -> IndexError {
    let writers: Vec<String> = keys
        .iter()
        .filter_map(|k| parse_segment_key(k).map(|p| p.2))
        .collect();
    IndexError::Fork {
        generation,
        seq,
        writers: writers.join(", "),
    }
}

pub fn snapshot_key(generation: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{generation:020}")
}

pub fn segment_key(generation: u64, seq: u64, writer: &str) -> String {
    format!("{JOURNAL_PREFIX}{generation:020}-{seq:020}-{writer}")
}

fn parse_snapshot_key(key: &str) -> Option<u64> {
    key.strip_prefix(SNAPSHOT_PREFIX)?.parse().ok()
}

/// (generation, seq, writer)
pub fn parse_segment_key(key: &str) -> Option<(u64, u64, String)> {
    let rest = key.strip_prefix(JOURNAL_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let generation = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let writer = parts.next()?.to_string();
    (!writer.is_empty()).then_some((generation, seq, writer))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Segment {
    pub generation: u64,
    pub seq: u64,
    pub writer: String,
    /// Key of the previous segment of this generation; None for the first.
    pub prev: Option<String>,
    pub next_ino: u64,
    pub records: Vec<Record>,
}

/// What recovery found, for logs, `stat` and `fsck`.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub generation: u64,
    pub segments: u64,
    pub records: u64,
    pub reclaimed_orphans: usize,
    /// Problems that stopped replay early or skipped objects.
    pub warnings: Vec<String>,
    pub snapshot_bytes: u64,
    pub journal_bytes: u64,
    /// An object listed during the load was gone when read: a writer compacted the
    /// journal meanwhile (`load` then loads again).
    pub vanished: bool,
}

impl LoadReport {
    pub fn clean(&self) -> bool {
        self.warnings.is_empty()
    }
}

pub struct Loaded {
    pub superblock: Superblock,
    pub index: Index,
    pub journal: Journal,
    pub report: LoadReport,
}

/// The writer's position in the journal chain.
pub struct Journal {
    store: Arc<dyn ObjectStore>,
    writer: String,
    /// Where commits go on (a writer) or reading resumes (a follower).
    chain: Chain,
    /// Segments and bytes since the snapshot: compaction triggers.
    pub segments: u64,
    pub bytes: u64,
    /// Bytes of the newest snapshot (as loaded or written): a big index is
    /// compacted less often (`Volume::snapshot_due`).
    pub snapshot_size: u64,
    /// False when recovery hit damage: old objects are then kept as evidence.
    clean: bool,
    /// The highest generation any object in the store names: a new snapshot goes
    /// above it, never over an existing one.
    floor: u64,
    /// The next snapshot seals the store after a takeover (`seal_after_takeover`).
    sealing: bool,
    /// A segment or snapshot PUT failed. It may have landed all the same, or land
    /// later (an S3 request still in flight after the client gave up), so its key is
    /// never written again: rewriting a segment would change what a follower may
    /// have read, and a landed snapshot would hide every later segment of the old
    /// generation from a load. Until a snapshot under a newer generation succeeds,
    /// every commit is a snapshot attempt.
    snapshot_owed: bool,
}

pub fn read_superblock(store: &dyn ObjectStore) -> Result<Superblock, IndexError> {
    let bytes = match store.get(superblock::KEY) {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(IndexError::NotObjfs(store.describe())),
        Err(e) => return Err(e.into()),
    };
    Superblock::decode(&bytes).map_err(|err| IndexError::Frame {
        key: superblock::KEY.into(),
        err,
    })
}

/// Before a writer journals anything: a store made by an older objfs gets the
/// current format version in its superblock, so that objfs refuses the store rather
/// than reading records it does not know as a torn journal.
pub fn upgrade_format(store: &dyn ObjectStore, sb: &Superblock) -> Result<Superblock, IndexError> {
    if sb.format_version >= codec::FORMAT_VERSION {
        return Ok(sb.clone());
    }
    let mut upgraded = sb.clone();
    upgraded.format_version = codec::FORMAT_VERSION;
    store.put(superblock::KEY, &upgraded.encode())?;
    log::info!(
        "store format upgraded from version {} to {}",
        sb.format_version,
        codec::FORMAT_VERSION
    );
    Ok(upgraded)
}

/// Creates a filesystem in an empty store.
pub fn mkfs(store: &dyn ObjectStore, block_size: u32) -> Result<Superblock, IndexError> {
    mkfs_with(store, block_size, crate::block::Compression::None)
}

/// `mkfs`, storing new blocks compressed as `compression` says.
pub fn mkfs_with(
    store: &dyn ObjectStore,
    block_size: u32,
    compression: crate::block::Compression,
) -> Result<Superblock, IndexError> {
    match read_superblock(store) {
        Ok(_) | Err(IndexError::Frame { .. }) => {
            return Err(IndexError::AlreadyFormatted(store.describe()));
        }
        Err(IndexError::NotObjfs(_)) => {}
        Err(e) => return Err(e),
    }
    if !store.list("")?.is_empty() {
        return Err(IndexError::NotEmpty(store.describe()));
    }
    let sb = Superblock::new(block_size, compression);
    // SAFETY of ownership: files belong to whoever runs mkfs, like a fresh ext4 root.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let index = Index::new_filesystem(block_size, uid, gid);
    store.put(
        &snapshot_key(0),
        &codec::encode(&codec::SNAPSHOT, &index.snapshot_view(0)),
    )?;
    match store.put_if_absent(superblock::KEY, &sb.encode()) {
        Ok(()) => Ok(sb),
        Err(StoreError::AlreadyExists(_)) => Err(IndexError::AlreadyFormatted(store.describe())),
        Err(e) => Err(e.into()),
    }
}

fn list_snapshots(store: &dyn ObjectStore) -> Result<Vec<u64>, IndexError> {
    let mut gens: Vec<u64> = store
        .list(SNAPSHOT_PREFIX)?
        .iter()
        .filter_map(|k| parse_snapshot_key(k))
        .collect();
    gens.sort_unstable();
    Ok(gens)
}

/// Snapshot generations and journal segments as one listing of `meta/` showed them:
/// a follower's look at an idle store costs one LIST (three before; on S3 each is a
/// billed request, every second, for every follower).
struct Listing {
    snapshots: Vec<u64>,
    /// generation -> sequence number -> keys (more than one: a fork)
    segments: BTreeMap<u64, BTreeMap<u64, Vec<String>>>,
}

impl Listing {
    fn read(store: &dyn ObjectStore) -> Result<Listing, IndexError> {
        let mut listing = Listing {
            snapshots: Vec::new(),
            segments: BTreeMap::new(),
        };
        for key in store.list("meta/")? {
            if let Some(generation) = parse_snapshot_key(&key) {
                listing.snapshots.push(generation);
            } else if let Some((generation, seq, _)) = parse_segment_key(&key) {
                let by_seq = listing.segments.entry(generation).or_default();
                by_seq.entry(seq).or_default().push(key);
            }
        }
        listing.snapshots.sort_unstable();
        Ok(listing)
    }

    fn newest_snapshot(&self) -> Option<u64> {
        self.snapshots.last().copied()
    }

    fn segments(&self, generation: u64) -> BTreeMap<u64, Vec<String>> {
        self.segments.get(&generation).cloned().unwrap_or_default()
    }

    /// The oldest generation above `generation` that has segments.
    fn next_generation(&self, generation: u64) -> Option<u64> {
        self.segments
            .range(generation + 1..)
            .next()
            .map(|(&g, _)| g)
    }
}

/// Segments of one generation, grouped by sequence number.
fn list_segments(
    store: &dyn ObjectStore,
    generation: u64,
) -> Result<BTreeMap<u64, Vec<String>>, IndexError> {
    let mut by_seq: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for key in store.list(&format!("{JOURNAL_PREFIX}{generation:020}-"))? {
        if let Some((g, seq, _)) = parse_segment_key(&key)
            && g == generation
        {
            by_seq.entry(seq).or_default().push(key);
        }
    }
    Ok(by_seq)
}

/// What `resolve_forks` did at one fork.
#[derive(Debug)]
pub struct ForkResolution {
    pub generation: u64,
    pub seq: u64,
    /// The writer whose chain was kept.
    pub kept: String,
    /// Keys moved under `meta/forked/`.
    pub moved: Vec<String>,
}

/// Two writers at once (possible only on stores without conditional create) leave
/// two segments with one sequence number, and `load` refuses the store. A writer that
/// sees this at commit sets its own segment aside (it was never acknowledged), so a
/// lasting fork needs a crash between the write and that check. This keeps, at each
/// fork, the chain (followed by `prev` links) that runs longest, since its writer and
/// whoever mounted after it went on committing; on a tie the one started by the writer
/// that comes first in `preferred` (the newest lease holders first), then the smaller
/// key. Every other segment from the fork on is moved to `meta/forked/`, kept for
/// inspection rather than deleted. Only under the writer lease.
pub fn resolve_forks(
    store: &dyn ObjectStore,
    preferred: &[String],
) -> Result<Vec<ForkResolution>, IndexError> {
    let generations: std::collections::BTreeSet<u64> = store
        .list(JOURNAL_PREFIX)?
        .iter()
        .filter_map(|k| parse_segment_key(k).map(|p| p.0))
        .collect();
    let mut resolved = Vec::new();
    for generation in generations {
        loop {
            let by_seq = list_segments(store, generation)?;
            let Some((&seq, keys)) = by_seq.iter().find(|(_, keys)| keys.len() > 1) else {
                break;
            };
            let mut prevs = HashMap::new();
            let mut chains = Vec::new();
            for key in keys {
                chains.push(chain_from(store, &by_seq, seq, key, &mut prevs)?);
            }
            let rank = |chain: &Vec<String>| {
                let writer = writer_of(&chain[0]);
                preferred
                    .iter()
                    .position(|p| *p == writer)
                    .unwrap_or(usize::MAX)
            };
            let kept = chains
                .iter()
                .max_by(|a, b| {
                    a.len()
                        .cmp(&b.len())
                        .then(rank(b).cmp(&rank(a)))
                        .then(b[0].cmp(&a[0]))
                })
                .expect("a fork has keys")
                .clone();
            let mut moved = Vec::new();
            for key in by_seq.range(seq..).flat_map(|(_, keys)| keys) {
                if !kept.contains(key) {
                    move_aside(store, key)?;
                    moved.push(key.clone());
                }
            }
            let writer = writer_of(&kept[0]);
            log::warn!(
                "journal fork at generation {generation} sequence {seq}: kept the chain of writer {writer}, set aside {}",
                moved.join(", ")
            );
            resolved.push(ForkResolution {
                generation,
                seq,
                kept: writer,
                moved,
            });
        }
    }
    Ok(resolved)
}

fn writer_of(key: &str) -> String {
    parse_segment_key(key).map(|p| p.2).unwrap_or_default()
}

/// `start` and the segments after it that name their predecessor as `prev`.
fn chain_from(
    store: &dyn ObjectStore,
    by_seq: &BTreeMap<u64, Vec<String>>,
    seq: u64,
    start: &str,
    prevs: &mut HashMap<String, Option<String>>,
) -> Result<Vec<String>, IndexError> {
    let mut chain = vec![start.to_string()];
    for s in seq + 1.. {
        let Some(keys) = by_seq.get(&s) else {
            break;
        };
        let mut next = None;
        for key in keys {
            if prev_of(store, key, prevs)?.as_deref() == chain.last().map(String::as_str) {
                next = Some(key.clone());
                break;
            }
        }
        match next {
            Some(k) => chain.push(k),
            None => break,
        }
    }
    Ok(chain)
}

/// A segment's `prev`, read once; an unreadable segment continues no chain.
fn prev_of(
    store: &dyn ObjectStore,
    key: &str,
    prevs: &mut HashMap<String, Option<String>>,
) -> Result<Option<String>, IndexError> {
    if let Some(p) = prevs.get(key) {
        return Ok(p.clone());
    }
    let prev = match store.get(key) {
        Ok(bytes) => codec::decode::<Segment>(&codec::SEGMENT, &bytes)
            .ok()
            .and_then(|s| s.prev),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    prevs.insert(key.to_string(), prev.clone());
    Ok(prev)
}

/// Copies a segment under `meta/forked/`, then deletes the original.
fn move_aside(store: &dyn ObjectStore, key: &str) -> Result<(), IndexError> {
    let bytes = store.get(key)?;
    let name = key.strip_prefix("meta/").unwrap_or(key);
    store.put(&format!("{FORKED_PREFIX}{name}"), &bytes)?;
    store.delete(key)?;
    Ok(())
}

/// What the first segment of a chain must name as its predecessor.
#[derive(Clone, Debug, PartialEq)]
enum FirstPrev {
    /// The chain of the snapshot a load started from: nothing, or a bridge from the
    /// generation before, which the snapshot covers.
    Any,
    /// A chain reached over a bridge: exactly the key it bridges from.
    Exactly(String),
}

/// A position in one generation's chain of segments.
struct Chain {
    generation: u64,
    seq: u64,
    last_key: Option<String>,
    first_prev: FirstPrev,
}

impl Chain {
    /// What the first segment of the next generation's chain names as `prev` when it
    /// was written while that generation's snapshot was not yet durable.
    fn bridge(&self) -> String {
        self.last_key
            .clone()
            .unwrap_or_else(|| snapshot_key(self.generation))
    }

    fn follows(&self, segment: &Segment, seq: u64) -> bool {
        let prev_ok = match (seq, &self.first_prev) {
            (1, FirstPrev::Any) => true,
            (1, FirstPrev::Exactly(bridge)) => segment.prev.as_ref() == Some(bridge),
            _ => segment.prev == self.last_key,
        };
        prev_ok && segment.generation == self.generation && segment.seq == seq
    }
}

/// Applies `chain`'s segments after its position to `index`. True when it ran to the
/// chain's end; false when damage or a gap stopped it (a warning in `report`).
fn replay_chain(
    store: &dyn ObjectStore,
    chain: &mut Chain,
    index: &mut Index,
    report: &mut LoadReport,
) -> Result<bool, IndexError> {
    let segments = list_segments(store, chain.generation)?;
    let mut fetched = fetch_run(store, &segments, chain.seq + 1).into_iter();
    for (&s, keys) in segments.range(chain.seq + 1..) {
        if s != chain.seq + 1 {
            let w = format!(
                "journal gap: segment {} missing; replay stopped",
                chain.seq + 1
            );
            log::warn!("{w}");
            report.warnings.push(w);
            return Ok(false);
        }
        if keys.len() > 1 {
            return Err(fork(chain.generation, s, keys));
        }
        let key = &keys[0];
        let bytes = match fetched.next() {
            Some(fetched) => fetched,
            None => store.get(key),
        };
        let segment = bytes.map_err(IndexError::from).and_then(|bytes| {
            report.journal_bytes += bytes.len() as u64;
            codec::decode::<Segment>(&codec::SEGMENT, &bytes).map_err(|err| IndexError::Frame {
                key: key.clone(),
                err,
            })
        });
        let segment = match segment {
            Err(IndexError::Store(e)) if !matches!(e, StoreError::NotFound(_)) => {
                return Err(IndexError::Store(e));
            }
            Ok(seg) if chain.follows(&seg, s) => seg,
            Err(e) if e.is_too_new() => return Err(e),
            Ok(_) => {
                let w = format!("{key}: does not follow the previous segment; replay stopped");
                log::warn!("{w}");
                report.warnings.push(w);
                return Ok(false);
            }
            Err(e) => {
                report.vanished |= matches!(e, IndexError::Store(StoreError::NotFound(_)));
                let w = format!("torn or corrupt journal segment, replay stopped there: {e}");
                log::warn!("{w}");
                report.warnings.push(w);
                return Ok(false);
            }
        };
        report.records += segment.records.len() as u64;
        for record in segment.records {
            index.apply(record);
        }
        index.set_next_ino(segment.next_ino);
        chain.seq = s;
        chain.last_key = Some(key.clone());
        report.segments += 1;
    }
    Ok(true)
}

/// Segment GETs in flight at once during a load.
const LOAD_FETCHES: usize = 16;

/// The bytes of the segments from `first` on, in order, up to the first gap or fork
/// (the replay reports those), fetched `LOAD_FETCHES` at a time: on S3 a long
/// journal would otherwise cost one round trip after another.
fn fetch_run(
    store: &dyn ObjectStore,
    segments: &BTreeMap<u64, Vec<String>>,
    first: u64,
) -> Vec<Result<Vec<u8>, StoreError>> {
    let keys: Vec<&String> = segments
        .range(first..)
        .zip(first..)
        .take_while(|((s, keys), want)| **s == *want && keys.len() == 1)
        .map(|((_, keys), _)| &keys[0])
        .collect();
    if keys.len() < 2 {
        return Vec::new();
    }
    let lanes: Vec<usize> = (0..LOAD_FETCHES.min(keys.len())).collect();
    let per_lane = crate::util::in_parallel(
        &lanes,
        |&lane| {
            keys.iter()
                .skip(lane)
                .step_by(lanes.len())
                .map(|key| store.get(key))
                .collect::<Vec<_>>()
        },
        |_| Vec::new(),
    );
    // Lane i holds keys i, i + lanes, ...: interleave them back into key order. A
    // lane that panicked is short; its keys are fetched again in the replay loop.
    let mut lanes_iter: Vec<_> = per_lane.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(keys.len());
    for i in 0..keys.len() {
        match lanes_iter[i % lanes.len()].next() {
            Some(result) => out.push(result),
            None => break,
        }
    }
    out
}

/// The chain that goes on from the end of `chain` in a newer generation whose
/// snapshot is missing (still being written when the store was last used, or its PUT
/// failed): its first segment names `chain`'s last one (`Chain::bridge`). Only the
/// next generation that has segments can hold it.
enum Bridge {
    To(Chain),
    /// No newer generation has segments.
    End,
    /// This newer generation has segments, and they do not go on from here.
    Unlinked(u64),
}

fn bridged_chain(
    store: &dyn ObjectStore,
    chain: &Chain,
    listing: &Listing,
) -> Result<Bridge, IndexError> {
    let Some(generation) = listing.next_generation(chain.generation) else {
        return Ok(Bridge::End);
    };
    let segments = listing.segments(generation);
    let Some(keys) = segments.get(&1) else {
        return Ok(Bridge::Unlinked(generation));
    };
    let bridge = chain.bridge();
    for key in keys {
        let prev = match store.get(key) {
            Ok(bytes) => match codec::decode::<Segment>(&codec::SEGMENT, &bytes) {
                Ok(segment) => segment.prev,
                Err(err) if matches!(err, FrameError::TooNew { .. }) => {
                    return Err(IndexError::Frame {
                        key: key.clone(),
                        err,
                    });
                }
                Err(_) => None,
            },
            // Listed, then gone: a writer compacted meanwhile (a load starts again,
            // a follower reloads).
            Err(e) => return Err(e.into()),
        };
        if prev.as_ref() == Some(&bridge) {
            return Ok(Bridge::To(Chain {
                generation,
                seq: 0,
                last_key: None,
                first_prev: FirstPrev::Exactly(bridge),
            }));
        }
    }
    Ok(Bridge::Unlinked(generation))
}

/// Loads at most this many times while a writer compacts under the load.
const LOAD_ATTEMPTS: u32 = 5;

/// Recovery (`load_once`), again when objects vanished under it: a follower
/// reloading, or `fsck` or `stat` reading a mounted store, can list objects that the
/// writer deletes before they are read (the old generation after a snapshot), which
/// would read as damage.
pub fn load(store: Arc<dyn ObjectStore>, writer: &str) -> Result<Loaded, IndexError> {
    let mut attempt = 1;
    loop {
        let vanished = match load_once(store.clone(), writer) {
            Ok(loaded) if loaded.report.vanished => Ok(loaded),
            Err(IndexError::Store(StoreError::NotFound(key))) => {
                Err(IndexError::Store(StoreError::NotFound(key)))
            }
            other => return other,
        };
        if attempt >= LOAD_ATTEMPTS {
            return vanished;
        }
        log::info!(
            "objects vanished during the load (a writer compacted meanwhile); loading again"
        );
        attempt += 1;
    }
}

/// Recovery: the newest readable snapshot, then its chain of segments in order.
fn load_once(store: Arc<dyn ObjectStore>, writer: &str) -> Result<Loaded, IndexError> {
    let superblock = read_superblock(&*store)?;
    let mut report = LoadReport::default();
    let gens = list_snapshots(&*store)?;
    let mut found = None;
    for &generation in gens.iter().rev() {
        let key = snapshot_key(generation);
        let loaded = store.get(&key).map_err(IndexError::from).and_then(|bytes| {
            report.snapshot_bytes = bytes.len() as u64;
            codec::decode::<SnapshotBody>(&codec::SNAPSHOT, &bytes).map_err(|err| {
                IndexError::Frame {
                    key: key.clone(),
                    err,
                }
            })
        });
        match loaded {
            Ok(body) => {
                found = Some((generation, body));
                break;
            }
            Err(e) if e.is_too_new() => return Err(e),
            // The store failing is not damage: give up rather than fall back.
            Err(IndexError::Store(e)) if !matches!(e, StoreError::NotFound(_)) => {
                return Err(IndexError::Store(e));
            }
            Err(e) => {
                report.vanished |= matches!(e, IndexError::Store(StoreError::NotFound(_)));
                let w = format!("skipping unreadable snapshot: {e}");
                log::warn!("{w}");
                report.warnings.push(w);
            }
        }
    }
    let Some((generation, body)) = found else {
        return Err(IndexError::NoSnapshot(store.describe()));
    };
    if gens.last() != Some(&generation) {
        report.warnings.push(format!(
            "recovered from older snapshot generation {generation}"
        ));
    }
    let mut index = Index::from_snapshot(body, superblock.block_size);
    report.generation = generation;

    let mut chain = Chain {
        generation,
        seq: 0,
        last_key: None,
        first_prev: FirstPrev::Any,
    };
    while replay_chain(&*store, &mut chain, &mut index, &mut report)? {
        match bridged_chain(&*store, &chain, &Listing::read(&*store)?)? {
            Bridge::To(next) => chain = next,
            Bridge::End => break,
            Bridge::Unlinked(newer) => {
                let w = format!(
                    "journal segments of generation {newer} do not continue the replayed journal; not replayed"
                );
                log::warn!("{w}");
                report.warnings.push(w);
                break;
            }
        }
    }
    // (A failing listing here leaves the report as it is.)
    if !report.clean() && list_snapshots(&*store).unwrap_or_default().last() > gens.last() {
        // A snapshot landed during the load: what looked like damage (a gap, a chain
        // cut short) is more likely the writer deleting what it replaced.
        report.vanished = true;
    }
    let orphans = index.finish_load();
    report.reclaimed_orphans = orphans.len();
    if !orphans.is_empty() {
        log::info!(
            "reclaimed {} unlinked inodes left by a previous mount",
            orphans.len()
        );
    }
    let newest_segment_gen = store
        .list(JOURNAL_PREFIX)?
        .iter()
        .filter_map(|k| parse_segment_key(k).map(|p| p.0))
        .max()
        .unwrap_or(0);
    let floor = gens.last().copied().unwrap_or(0).max(newest_segment_gen);
    let journal = Journal {
        store,
        writer: writer.to_string(),
        chain,
        segments: report.segments,
        bytes: report.journal_bytes,
        snapshot_size: report.snapshot_bytes,
        clean: report.clean(),
        floor,
        sealing: false,
        snapshot_owed: false,
    };
    Ok(Loaded {
        superblock,
        index,
        journal,
        report,
    })
}

/// What a read-only follower found in the store since it last looked.
pub enum Followed {
    Nothing,
    /// Records of new segments, in order.
    Records(Vec<Record>),
    /// The writer compacted into a newer snapshot: reload from scratch.
    NewGeneration,
}

impl Journal {
    /// For read-only followers: the records the writer committed since we last looked,
    /// over bridges into newer generations too (a writer goes on committing while its
    /// snapshot is written).
    pub fn follow(&mut self) -> Result<Followed, IndexError> {
        let listing = Listing::read(&*self.store)?;
        if listing
            .newest_snapshot()
            .is_some_and(|g| g > self.chain.generation)
        {
            return Ok(Followed::NewGeneration);
        }
        let mut records = Vec::new();
        match self.follow_chains(&listing, &mut records) {
            Ok(true) => {}
            Ok(false) => return Ok(Followed::NewGeneration),
            // Our position has moved past what was read: hand it over, and let the
            // next look meet the error again.
            Err(e) if !records.is_empty() => log::warn!("following the journal: {e}"),
            Err(e) => return Err(e),
        }
        Ok(if records.is_empty() {
            Followed::Nothing
        } else {
            Followed::Records(records)
        })
    }

    /// Reads new segments into `records`, over bridges; false when compaction
    /// removed the chain (reload).
    fn follow_chains(
        &mut self,
        listing: &Listing,
        records: &mut Vec<Record>,
    ) -> Result<bool, IndexError> {
        loop {
            match self.follow_chain(listing, records)? {
                Some(true) => {}
                Some(false) => return Ok(true),
                None => return Ok(false),
            }
            let bridge = match bridged_chain(&*self.store, &self.chain, listing) {
                Err(IndexError::Store(StoreError::NotFound(_))) => return Ok(false),
                other => other?,
            };
            match bridge {
                Bridge::To(next) => self.chain = next,
                // Not yet: the writer's snapshot may still land (then a reload).
                Bridge::End | Bridge::Unlinked(_) => return Ok(true),
            }
        }
    }

    /// Reads the current chain's new segments into `records`: Some(true) when it
    /// reached the chain's end, Some(false) when it must wait (a segment not there yet
    /// or not following), None when compaction removed the chain.
    fn follow_chain(
        &mut self,
        listing: &Listing,
        records: &mut Vec<Record>,
    ) -> Result<Option<bool>, IndexError> {
        for (&s, keys) in listing
            .segments(self.chain.generation)
            .range(self.chain.seq + 1..)
        {
            if s != self.chain.seq + 1 {
                return Ok(Some(false));
            }
            if keys.len() > 1 {
                return Err(fork(self.chain.generation, s, keys));
            }
            let key = &keys[0];
            let bytes = match self.store.get(key) {
                Ok(b) => b,
                // Compaction removed it between list and get.
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let segment: Segment =
                codec::decode(&codec::SEGMENT, &bytes).map_err(|err| IndexError::Frame {
                    key: key.clone(),
                    err,
                })?;
            if !self.chain.follows(&segment, s) {
                log::warn!("{key} does not follow the segment we read last; waiting");
                return Ok(Some(false));
            }
            records.extend(segment.records);
            self.chain.seq = s;
            self.chain.last_key = Some(key.clone());
        }
        Ok(Some(true))
    }

    pub fn generation(&self) -> u64 {
        self.chain.generation
    }

    /// The generation the next snapshot gets.
    /// See `snapshot_owed`: the next commit must be a snapshot.
    pub fn snapshot_owed(&self) -> bool {
        self.snapshot_owed
    }

    pub fn next_generation(&self) -> u64 {
        self.chain.generation.max(self.floor) + 1
    }

    pub fn needs_fresh_snapshot(&self) -> bool {
        !self.clean || self.sealing
    }

    /// After taking the store over from a writer that never released it: the next
    /// snapshot goes `TAKEOVER_GAP` generations above anything in the store. That
    /// writer may have had a snapshot or segment PUT in flight (an S3 request the
    /// server completes after the client is gone, or a writer cut off from the store
    /// that sends it late), under a generation it took without writing anything yet.
    /// Landing later, such a snapshot would sit above this writer's chain and hide
    /// its commits from every load; now it lands below the seal and is ignored.
    pub fn seal_after_takeover(&mut self) {
        self.floor = self
            .floor
            .max(self.chain.generation)
            .saturating_add(TAKEOVER_GAP);
        self.sealing = true;
    }

    /// Writes one segment holding `changes`; durable when it returns.
    pub fn commit(&mut self, changes: &Changes) -> Result<(), IndexError> {
        debug_assert!(!self.snapshot_owed, "a commit while a snapshot is owed");
        let seq = self.chain.seq + 1;
        let key = segment_key(self.chain.generation, seq, &self.writer);
        let segment = Segment {
            generation: self.chain.generation,
            seq,
            writer: self.writer.clone(),
            prev: self.chain.last_key.clone(),
            next_ino: changes.next_ino,
            records: changes.records.clone(),
        };
        let bytes = codec::encode(&codec::SEGMENT, &segment);
        if let Err(e) = self.store.put(&key, &bytes) {
            self.snapshot_owed = true;
            return Err(e.into());
        }
        // A second writer (on a store without conditional create) shows up as another
        // segment with our sequence number: stop before the chains diverge further.
        // Where conditional create holds (a local store), the lease keeps a second
        // writer out and the check after each commit (`Lease::probe_still_ours`)
        // catches a takeover; listing all of meta/ there cost up to milliseconds.
        if self.store.conditional_create_is_atomic() {
            self.chain.seq = seq;
            self.chain.last_key = Some(key);
            self.segments += 1;
            self.bytes += bytes.len() as u64;
            return Ok(());
        }
        let same_seq = match self.store.list(&format!(
            "{JOURNAL_PREFIX}{:020}-{seq:020}-",
            self.chain.generation
        )) {
            Ok(keys) => keys,
            Err(e) => {
                // The segment is there, unchecked: it is not acknowledged, and the
                // changes go again in the snapshot that follows.
                self.snapshot_owed = true;
                return Err(e.into());
            }
        };
        if same_seq.len() > 1 {
            // Not acknowledged, so it goes: whichever writer listed first without
            // seeing ours keeps a clean chain. Failing that, fsck --repair decides.
            if let Err(e) = move_aside(&*self.store, &key) {
                log::warn!("setting aside {key} after a fork: {e}");
            }
            return Err(fork(self.chain.generation, seq, &same_seq));
        }
        self.chain.seq = seq;
        self.chain.last_key = Some(key);
        self.segments += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Starts a snapshot written while commits go on: the next generation is taken
    /// now (its key is never used for anything else), and later commits form its
    /// chain, whose first segment names the current chain's last one (a bridge). Until
    /// `put_snapshot` lands, a load reaches those segments over the bridge from the
    /// current snapshot and chain, which stay until `end_snapshot`; the snapshot must
    /// hold exactly what they hold (the caller commits pending changes first).
    /// `next_ino` is the index's, for the empty segment this may write first.
    pub fn begin_snapshot(&mut self, next_ino: u64) -> Result<u64, IndexError> {
        debug_assert!(
            !self.snapshot_owed,
            "a background snapshot while one is owed"
        );
        if self.chain.seq == 0 && matches!(self.chain.first_prev, FirstPrev::Exactly(_)) {
            // This chain is empty and began over a bridge, and whether its own
            // snapshot landed is not known (a failed PUT may land all the same). A
            // load from that snapshot would take only a bridge from it; one from the
            // snapshot before, only the bridge this chain began with. An empty
            // segment satisfies both, and the new bridge starts from it.
            self.commit(&Changes {
                next_ino,
                ..Changes::default()
            })?;
        }
        let generation = self.next_generation();
        let bridge = self.chain.bridge();
        self.floor = generation;
        self.chain = Chain {
            generation,
            seq: 0,
            // The next commit names it as `prev`.
            last_key: Some(bridge.clone()),
            first_prev: FirstPrev::Exactly(bridge),
        };
        self.segments = 0;
        self.bytes = 0;
        Ok(generation)
    }

    /// After `put_snapshot` of a `begin_snapshot` generation: the older generations
    /// may go if it landed (returned for `remove_generations_before`, which needs no
    /// lock); if it failed, its chain goes on over the bridge and a later snapshot
    /// takes its place.
    pub fn end_snapshot(&mut self, generation: u64, landed: Option<u64>) -> Option<u64> {
        let size = landed?;
        if self.chain.generation == generation {
            // (Not when an in-line snapshot has gone above it meanwhile.)
            self.snapshot_size = size;
        }
        if self.chain.generation == generation && self.chain.seq == 0 {
            // No commit has crossed the bridge yet, and the chain it names goes now:
            // the generation's first segment follows its snapshot, and so does the
            // next snapshot's bridge (`Chain::bridge`).
            self.chain.last_key = None;
            self.chain.first_prev = FirstPrev::Any;
        }
        if self.clean {
            Some(generation)
        } else {
            log::warn!(
                "kept objects older than generation {generation} after recovering from damage (fsck can inspect them)"
            );
            self.clean = true;
            None
        }
    }

    /// Writes the whole index (a `SnapshotBody`, or what encodes as one) as the next
    /// generation, then removes what it replaces.
    /// Returns the generation below which objects may now go
    /// (`remove_generations_before`), which the caller does once it has checked the
    /// store is still its own.
    pub fn write_snapshot(
        &mut self,
        generation: u64,
        body: &impl serde::Serialize,
    ) -> Result<Option<u64>, IndexError> {
        debug_assert_eq!(generation, self.next_generation());
        match put_snapshot(&*self.store, generation, body) {
            Ok(size) => {
                self.snapshot_size = size;
                self.sealing = false;
            }
            Err(e) => {
                // It may exist now or later: the next one goes above it, and nothing
                // else is written before that one succeeds.
                self.floor = self.floor.max(generation);
                self.snapshot_owed = true;
                return Err(e);
            }
        }
        self.snapshot_owed = false;
        let old_gen = self.chain.generation;
        self.chain = Chain {
            generation,
            seq: 0,
            last_key: None,
            first_prev: FirstPrev::Any,
        };
        self.floor = generation;
        self.segments = 0;
        self.bytes = 0;
        if self.clean {
            Ok(Some(generation))
        } else {
            log::warn!(
                "kept generation {old_gen} objects after recovering from damage (fsck can inspect them)"
            );
            self.clean = true;
            Ok(None)
        }
    }
}

/// Encodes and stores the whole index as snapshot `generation`; its size.
pub fn put_snapshot(
    store: &dyn ObjectStore,
    generation: u64,
    body: &impl serde::Serialize,
) -> Result<u64, IndexError> {
    let bytes = codec::encode(&codec::SNAPSHOT, body);
    store.put(&snapshot_key(generation), &bytes)?;
    Ok(bytes.len() as u64)
}

/// Only after a newer snapshot is durable; failures here just leave garbage.
pub fn remove_generations_before(store: &dyn ObjectStore, generation: u64) {
    let old = |key: &String| {
        parse_segment_key(key)
            .map(|(g, _, _)| g)
            .or_else(|| parse_snapshot_key(key))
            .is_some_and(|g| g < generation)
    };
    let keys = match store.list("meta/") {
        Ok(k) => k,
        Err(e) => {
            log::warn!("listing old generations: {e}");
            return;
        }
    };
    // Segments first, so a crash midway never leaves segments without their snapshot.
    let (segments, others): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .filter(old)
        .partition(|k| k.starts_with(JOURNAL_PREFIX));
    for key in segments.iter().chain(others.iter()) {
        if let Err(e) = store.delete(key) {
            log::warn!("deleting {key}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Inode, Kind, ROOT_INO};
    use crate::store::MemoryStore;

    fn add_file(index: &mut Index, name: &str) -> u64 {
        let ino = index.alloc_ino();
        index.insert_inode(Inode::new(ino, Kind::File, 0o644, 0, 0));
        index.insert_entry(ROOT_INO, name.as_bytes(), ino);
        ino
    }

    /// A fresh store with one segment per name, committed by `writer`.
    /// Adds file `name` and commits it as one segment.
    fn commit_file(l: &mut Loaded, name: &str) {
        add_file(&mut l.index, name);
        l.journal.commit(&l.index.take_changes()).unwrap();
    }

    /// A fresh load replays cleanly to exactly `want`.
    fn loads_clean(store: &Arc<dyn ObjectStore>, writer: &str, want: &[&str]) {
        let r = load(store.clone(), writer).unwrap();
        assert!(r.report.clean(), "{:?}", r.report.warnings);
        assert_eq!(names(&r.index), want);
    }

    fn with_segments(names: &[&str], writer: &str) -> (Arc<dyn ObjectStore>, Loaded) {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        mkfs(&*store, 4096).unwrap();
        let mut l = load(store.clone(), writer).unwrap();
        for name in names {
            commit_file(&mut l, name);
        }
        (store, l)
    }

    fn names(index: &Index) -> Vec<String> {
        index
            .entries(ROOT_INO)
            .unwrap()
            .keys()
            .map(|k| String::from_utf8(k.clone()).unwrap())
            .collect()
    }

    #[test]
    fn mkfs_refuses_twice_and_foreign_stores() {
        let store = MemoryStore::new();
        mkfs(&store, 4096).unwrap();
        assert!(matches!(
            mkfs(&store, 4096),
            Err(IndexError::AlreadyFormatted(_))
        ));
        let other = MemoryStore::new();
        other.put("photos/cat.jpg", b"x").unwrap();
        assert!(matches!(mkfs(&other, 4096), Err(IndexError::NotEmpty(_))));
        assert!(matches!(
            load(Arc::new(other), "w"),
            Err(IndexError::NotObjfs(_))
        ));
    }

    #[test]
    fn commits_snapshots_and_recovers() {
        let (store, mut l) = with_segments(&["a", "b"], "w1");
        let r = load(store.clone(), "w2").unwrap();
        assert_eq!(names(&r.index), vec!["a", "b"]);
        assert_eq!(r.report.segments, 2);

        // Compaction: a new generation replaces the old objects.
        let body = l.index.snapshot_body(l.journal.next_generation());
        let before = l.journal.write_snapshot(body.generation, &body).unwrap();
        remove_generations_before(&*store, before.unwrap());
        commit_file(&mut l, "c");
        let keys = store.list("meta/").unwrap();
        assert_eq!(
            keys,
            vec![
                segment_key(1, 1, "w1"),
                "meta/snapshot-00000000000000000001".to_string(),
                "meta/superblock".to_string()
            ]
        );
        let r = load(store, "w3").unwrap();
        assert_eq!(names(&r.index), vec!["a", "b", "c"]);
    }

    /// Applies what a follower reads to its index; true when it read anything.
    fn follow_into(reader: &mut Loaded) -> bool {
        match reader.journal.follow().unwrap() {
            Followed::Nothing => false,
            Followed::Records(records) => {
                for r in records {
                    reader.index.apply(r);
                }
                true
            }
            Followed::NewGeneration => {
                *reader = load(reader.journal.store.clone(), "reader").unwrap();
                true
            }
        }
    }

    #[test]
    fn commits_during_a_snapshot_are_found_over_the_bridge_whether_or_not_it_lands() {
        for chain_before in [&["a", "b"][..], &[][..]] {
            let (store, mut l) = with_segments(chain_before, "w1");
            let mut reader = load(store.clone(), "reader").unwrap();
            let view = l.index.snapshot_view(l.journal.next_generation());
            let generation = l.journal.begin_snapshot(l.index.next_ino()).unwrap();
            assert_eq!(generation, view.generation());
            // Commits while the snapshot is being written: the next generation's chain.
            for name in ["c", "d"] {
                add_file(&mut l.index, name);
                l.journal.commit(&l.index.take_changes()).unwrap();
            }
            let mut all: Vec<String> = chain_before.iter().map(|s| s.to_string()).collect();
            all.extend(["c".to_string(), "d".to_string()]);
            // The snapshot never lands: the old snapshot, its chain and the bridge.
            let r = load(store.clone(), "w2").unwrap();
            assert_eq!(names(&r.index), all, "after {chain_before:?}");
            assert!(r.report.clean(), "{:?}", r.report.warnings);
            assert_eq!(r.journal.generation(), generation);
            assert!(follow_into(&mut reader));
            assert_eq!(names(&reader.index), all);

            // It lands: loads start from it, and the old generation goes.
            put_snapshot(&*store, generation, &view).unwrap();
            let before = l.journal.end_snapshot(generation, Some(1)).unwrap();
            remove_generations_before(&*store, before);
            assert!(
                store
                    .list("meta/")
                    .unwrap()
                    .iter()
                    .all(|k| !k.contains(&format!("{:020}", generation - 1)))
            );
            let r = load(store.clone(), "w3").unwrap();
            assert_eq!(names(&r.index), all);
            assert!(r.report.clean(), "{:?}", r.report.warnings);
            assert_eq!(r.report.segments, 2);
            // The follower that crossed the bridge goes on in the same chain, and so
            // does one that starts from the new snapshot.
            let mut late = load(store.clone(), "late").unwrap();
            commit_file(&mut l, "e");
            all.push("e".to_string());
            for follower in [&mut reader, &mut late] {
                assert!(follow_into(follower));
                assert_eq!(names(&follower.index), all);
            }
        }
    }

    #[test]
    fn a_snapshot_right_after_one_that_landed_bridges_from_it() {
        let (store, mut l) = with_segments(&["a", "b"], "w1");
        // A background snapshot lands with no commit meanwhile, and the old
        // generation goes.
        let view = l.index.snapshot_view(l.journal.next_generation());
        let first = l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        put_snapshot(&*store, first, &view).unwrap();
        let before = l.journal.end_snapshot(first, Some(1)).unwrap();
        remove_generations_before(&*store, before);
        // The next one begins at once; a commit while it is written; then a crash.
        l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        commit_file(&mut l, "c");
        loads_clean(&store, "w2", &["a", "b", "c"]);
    }

    #[test]
    fn a_failed_snapshot_leaves_its_chain_to_the_next_one() {
        let (store, mut l) = with_segments(&["a"], "w1");
        let late = l.index.snapshot_view(l.journal.next_generation());
        let first = l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        l.journal.end_snapshot(first, None);
        commit_file(&mut l, "b");
        // A second snapshot in the background, over the first one's bridged chain.
        let view = l.index.snapshot_view(l.journal.next_generation());
        let second = l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        assert!(second > first);
        commit_file(&mut l, "c");
        // Neither landed: two bridges.
        loads_clean(&store, "w2", &["a", "b", "c"]);
        put_snapshot(&*store, second, &view).unwrap();
        let r = load(store.clone(), "w3").unwrap();
        assert_eq!(names(&r.index), vec!["a", "b", "c"]);
        assert_eq!(r.report.generation, second);
        // The first one lands late (a PUT still in flight): older than the second.
        put_snapshot(&*store, first, &late).unwrap();
        let r = load(store, "w4").unwrap();
        assert_eq!(names(&r.index), vec!["a", "b", "c"]);
    }

    /// A background snapshot whose PUT reported failure but landed, then a second
    /// one begun with no commit between: loads from either snapshot, and a follower,
    /// reach the commit made while the second was written. (Found by review.)
    #[test]
    fn a_snapshot_that_failed_but_landed_then_another_lose_nothing() {
        let (store, mut l) = with_segments(&["a", "b"], "w1");
        let mut reader = load(store.clone(), "reader").unwrap();
        let view1 = l.index.snapshot_view(l.journal.next_generation());
        let first = l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        put_snapshot(&*store, first, &view1).unwrap();
        assert_eq!(l.journal.end_snapshot(first, None), None);
        l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        commit_file(&mut l, "c");
        loads_clean(&store, "w2", &["a", "b", "c"]);
        // Without the landed one, from the snapshot before it.
        store.delete(&snapshot_key(first)).unwrap();
        loads_clean(&store, "w3", &["a", "b", "c"]);
        follow_into(&mut reader);
        follow_into(&mut reader);
        assert_eq!(names(&reader.index), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_newer_chain_that_does_not_bridge_from_the_end_is_not_replayed() {
        let (store, mut l) = with_segments(&["a", "b"], "w1");
        l.journal.begin_snapshot(l.index.next_ino()).unwrap();
        commit_file(&mut l, "c");
        // The old chain's last segment is lost: the bridge names a segment that is
        // not the end of what replays, so the newer chain must not be applied.
        store.delete(&segment_key(0, 2, "w1")).unwrap();
        let r = load(store, "w2").unwrap();
        assert_eq!(names(&r.index), vec!["a"]);
        assert!(
            r.report
                .warnings
                .iter()
                .any(|w| w.contains("do not continue")),
            "{:?}",
            r.report.warnings
        );
        // A writer seals that off with a fresh snapshot and keeps the objects.
        assert!(r.journal.needs_fresh_snapshot());
    }

    #[test]
    fn a_writer_marks_an_older_store_and_a_newer_segment_refuses_to_load() {
        let (store, _l) = with_segments(&["a"], "w");
        // The superblock as an objfs of format 1 wrote it.
        let mut old = read_superblock(&*store).unwrap();
        old.format_version = 1;
        let mut bytes = old.encode();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        store.put(superblock::KEY, &bytes).unwrap();
        let sb = read_superblock(&*store).unwrap();
        assert_eq!(sb.format_version, 1);
        let up = upgrade_format(&*store, &sb).unwrap();
        assert_eq!(up.format_version, codec::FORMAT_VERSION);
        let stored = store.get(superblock::KEY).unwrap();
        let version = u32::from_le_bytes(stored[8..12].try_into().unwrap());
        assert_eq!(version, codec::FORMAT_VERSION);
        assert_eq!(read_superblock(&*store).unwrap(), up);
        // A segment of a newer objfs fails the load instead of ending replay there
        // (a writer would then seal it off as damage).
        let key = segment_key(0, 1, "w");
        let mut seg = store.get(&key).unwrap();
        seg[8..12].copy_from_slice(&(codec::FORMAT_VERSION + 1).to_le_bytes());
        store.put(&key, &seg).unwrap();
        assert!(matches!(
            load(store.clone(), "x"),
            Err(IndexError::Frame {
                err: FrameError::TooNew { .. },
                ..
            })
        ));
    }

    #[test]
    fn torn_segment_stops_replay_with_a_warning() {
        let (store, _l) = with_segments(&["a", "b"], "w");
        let key = segment_key(0, 2, "w");
        let bytes = store.get(&key).unwrap();
        store.put(&key, &bytes[..bytes.len() / 2]).unwrap();
        let r = load(store.clone(), "x").unwrap();
        assert_eq!(names(&r.index), vec!["a"]);
        assert!(!r.report.clean());
        assert!(r.journal.needs_fresh_snapshot());
    }

    /// What a writer that crashed between writing its segment and checking for a fork
    /// leaves: its segment beside `key`, same sequence number, same predecessor.
    fn crashed_twin(store: &Arc<dyn ObjectStore>, key: &str, writer: &str) -> String {
        let (generation, seq, _) = parse_segment_key(key).unwrap();
        let twin = segment_key(generation, seq, writer);
        store.put(&twin, &store.get(key).unwrap()).unwrap();
        twin
    }

    #[test]
    fn a_writer_that_sees_a_fork_sets_its_unacknowledged_segment_aside() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        mkfs(&*store, 4096).unwrap();
        let mut a = load(store.clone(), "aaaa").unwrap();
        let mut b = load(store.clone(), "bbbb").unwrap();
        commit_file(&mut a, "a");
        add_file(&mut b.index, "b");
        match b.journal.commit(&b.index.take_changes()) {
            Err(IndexError::Fork { writers, .. }) => assert_eq!(writers, "aaaa, bbbb"),
            other => panic!("expected a fork, got {other:?}"),
        }
        // Only the acknowledged chain is left; the other is kept aside.
        let l = load(store.clone(), "c").unwrap();
        assert_eq!(names(&l.index), ["a"]);
        assert_eq!(store.list(FORKED_PREFIX).unwrap().len(), 1);
    }

    #[test]
    fn fork_refuses_to_load() {
        let (store, l) = with_segments(&["a"], "aaaa");
        crashed_twin(&store, l.journal.chain.last_key.as_ref().unwrap(), "bbbb");
        match load(store, "c") {
            Err(IndexError::Fork { writers, .. }) => assert_eq!(writers, "aaaa, bbbb"),
            other => panic!("expected a fork, got {:?}", other.map(|l| l.report)),
        }
    }

    #[test]
    fn resolving_a_fork_keeps_the_chain_that_went_on_and_sets_the_other_aside() {
        // v commits 1-2; w takes over and commits 3-4, then x mounts after w and
        // commits 5-6; v's late segment 3 (it crashed before checking) is the fork.
        let (store, v) = with_segments(&["v1", "v2"], "vvvv");
        let mut w = load(store.clone(), "wwww").unwrap();
        for name in ["w3", "w4"] {
            add_file(&mut w.index, name);
            w.journal.commit(&w.index.take_changes()).unwrap();
        }
        let mut x = load(store.clone(), "xxxx").unwrap();
        for name in ["x5", "x6"] {
            add_file(&mut x.index, name);
            x.journal.commit(&x.index.take_changes()).unwrap();
        }
        let mut late = v;
        add_file(&mut late.index, "v3");
        let v3 = segment_key(0, 3, "vvvv");
        let seg = Segment {
            generation: 0,
            seq: 3,
            writer: "vvvv".into(),
            prev: late.journal.chain.last_key.clone(),
            next_ino: 100,
            records: late.index.take_changes().records,
        };
        store
            .put(&v3, &codec::encode(&codec::SEGMENT, &seg))
            .unwrap();
        assert!(matches!(
            load(store.clone(), "c"),
            Err(IndexError::Fork { .. })
        ));
        // Even the newest lease holder loses the tie-break to a longer chain.
        let done = resolve_forks(&*store, &["vvvv".into()]).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].seq, done[0].kept.as_str()), (3, "wwww"));
        assert_eq!(done[0].moved, vec![v3]);
        let l = load(store.clone(), "c").unwrap();
        assert_eq!(names(&l.index), ["v1", "v2", "w3", "w4", "x5", "x6"]);
        assert!(l.report.clean(), "{:?}", l.report.warnings);
        // Set aside, not deleted; and nothing left to do.
        let aside = store.list(FORKED_PREFIX).unwrap();
        assert_eq!(
            aside,
            vec![format!("{FORKED_PREFIX}journal-{:020}-{:020}-vvvv", 0, 3)]
        );
        assert!(resolve_forks(&*store, &[]).unwrap().is_empty());
    }

    #[test]
    fn a_tied_fork_goes_to_the_newest_lease_holder() {
        for (preferred, kept) in [("aaaa", "aaaa"), ("bbbb", "bbbb")] {
            let (store, l) = with_segments(&["a"], "aaaa");
            crashed_twin(&store, l.journal.chain.last_key.as_ref().unwrap(), "bbbb");
            let done = resolve_forks(&*store, &[preferred.into(), "zzzz".into()]).unwrap();
            assert_eq!(done[0].kept, kept);
            let left = store.list(JOURNAL_PREFIX).unwrap();
            assert_eq!(left.len(), 1);
            assert!(left[0].ends_with(kept), "{left:?}");
            assert_eq!(names(&load(store, "c").unwrap().index), ["a"]);
        }
    }

    #[test]
    fn a_fallback_never_overwrites_a_newer_snapshot_and_store_errors_fail() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        mkfs(&*store, 4096).unwrap();
        let mut l = load(store.clone(), "w").unwrap();
        add_file(&mut l.index, "a");
        let body = l.index.snapshot_body(l.journal.next_generation());
        let before = l.journal.write_snapshot(body.generation, &body).unwrap();
        remove_generations_before(&*store, before.unwrap());
        // Generation 1 is damaged; generation 0 is gone; put an older copy back.
        let damaged = store.get(&snapshot_key(1)).unwrap();
        store.put(&snapshot_key(1), &damaged[..20]).unwrap();
        store
            .put(
                &snapshot_key(0),
                &codec::encode(
                    &codec::SNAPSHOT,
                    &Index::new_filesystem(4096, 0, 0).snapshot_body(0),
                ),
            )
            .unwrap();
        let r = load(store.clone(), "x").unwrap();
        assert_eq!(r.report.generation, 0);
        assert_eq!(
            r.journal.next_generation(),
            2,
            "generation 1 is kept as evidence"
        );
        // A store that fails reads is an error, not damage to skip.
        let faulty = Arc::new(crate::store::FaultyStore::new(store.clone()));
        faulty.set_fail_gets(true);
        assert!(matches!(load(faulty, "y"), Err(IndexError::Store(_))));
    }

    #[test]
    fn a_long_journal_is_fetched_in_parallel_and_replayed_in_order() {
        let names_in: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
        let refs: Vec<&str> = names_in.iter().map(String::as_str).collect();
        let (store, _l) = with_segments(&refs, "w");
        let r = load(store.clone(), "x").unwrap();
        assert_eq!(names(&r.index), names_in);
        assert!(r.report.clean(), "{:?}", r.report.warnings);
        assert_eq!(r.report.segments, 50);
        // A torn segment in the middle stops replay right there.
        let key = segment_key(0, 37, "w");
        let mut bytes = store.get(&key).unwrap();
        bytes.truncate(bytes.len() / 2);
        store.put(&key, &bytes).unwrap();
        let r = load(store, "y").unwrap();
        assert_eq!(names(&r.index), names_in[..36]);
        assert!(
            r.report.warnings.iter().any(|w| w.contains("torn")),
            "{:?}",
            r.report.warnings
        );
    }

    #[test]
    fn a_missing_segment_stops_replay_at_the_gap() {
        let (store, _l) = with_segments(&["a", "b", "c"], "w");
        store.delete(&segment_key(0, 2, "w")).unwrap();
        let r = load(store, "x").unwrap();
        assert_eq!(names(&r.index), vec!["a"]);
        assert!(
            r.report.warnings.iter().any(|w| w.contains("gap")),
            "{:?}",
            r.report.warnings
        );
        assert!(r.journal.needs_fresh_snapshot());
    }
}
