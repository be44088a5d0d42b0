//! The live-update demo: fill a [`KvStore`], hand it over to a successor
//! started by `exec`, and verify every entry there.
//!
//! The predecessor ([`run_predecessor`]) creates the arena (a memfd, or a
//! new file at the path given), fills the store with deterministic values,
//! prepares, freezes and commits a handover session, then `exec`s the
//! successor command with the arena's own descriptor inherited (named in
//! [`ARENA_FD_ENV`](crate::session::ARENA_FD_ENV)) and its figures in
//! [`DEMO_ENV`]. Should the `exec` fail, it aborts the handover (no
//! successor will find it) before reporting the error. The successor
//! ([`run_successor`]) takes the inherited descriptor (setting
//! `FD_CLOEXEC` on it again), restores, finishes (it is serving from then
//! on), verifies every entry's checksum and value, runs the image checks
//! and reports.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use kho_core::{Image, PhysRange, PAGE_SIZE};

use super::{KvConfig, KvHandle, KvStore, KvSubsystem, RECORD_HEADER};
use crate::arena::Arena;
use crate::heap::Heap;
use crate::layout::{ArenaConfig, Region};
use crate::session::{self, monotonic_ns, Session, Start};

/// Environment variable carrying the predecessor's figures to the
/// successor.
pub const DEMO_ENV: &str = "KHO_DEMO_STATE";
/// Name of the store's subsystem.
pub const KV_NAME: &str = "kv";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConfig {
    /// Entries to insert.
    pub entries: u64,
    /// Bytes per value.
    pub value_size: u32,
    /// Arena file to create (and keep); it must not exist. `None`: a
    /// memfd, gone with the last process holding it.
    pub arena: Option<PathBuf>,
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Session error.
    #[error(transparent)]
    Session(#[from] session::SessionError),
    /// Store error.
    #[error(transparent)]
    Kv(#[from] super::KvError),
    /// Allocator error.
    #[error(transparent)]
    Heap(#[from] crate::Error),
    /// `exec` of the successor failed.
    #[error("exec of the successor failed: {0}")]
    Exec(std::io::Error),
    /// The successor found no inherited arena or no handover.
    #[error("successor: {0}")]
    Successor(String),
    /// `--arena` names a file that exists (it may hold another handover).
    #[error("arena {path}: the file exists; give a new path")]
    ArenaExists {
        /// The path given.
        path: PathBuf,
    },
    /// The arena file could not be created.
    #[error("arena {path}: {source}")]
    ArenaCreate {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad demo parameters.
    #[error("invalid {what}: {found} (expected {expected})")]
    Config {
        /// The parameter.
        what: &'static str,
        /// What is accepted.
        expected: &'static str,
        /// The value given.
        found: u64,
    },
}

/// Result alias of the demo.
pub type Result<T> = std::result::Result<T, DemoError>;

/// The deterministic value of `key`: every byte depends on key and
/// position, so a misplaced or stale record cannot pass.
pub fn fill_value(key: u64, out: &mut [u8]) {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// An arena for `entries` values of `value_size` bytes: room for the
/// store in the preservable pool, twice over, and at least 256 MiB.
pub fn arena_config(entries: u64, value_size: u32) -> ArenaConfig {
    let stride = u64::from(RECORD_HEADER + value_size).next_multiple_of(8);
    let index = entries.saturating_mul(2).next_power_of_two().max(64) * 8;
    let need = stride.saturating_mul(entries).saturating_add(index);
    const MIB4: u64 = 4 << 20;
    // Folio rounding (4 MiB blocks) plus slack.
    let pool = need.next_multiple_of(MIB4).saturating_add(64 << 20);
    let size = (pool.saturating_mul(2))
        .max(256 << 20)
        .next_multiple_of(MIB4);
    let mut cfg = ArenaConfig::with_size(size);
    cfg.preservable = pool;
    cfg
}

/// The predecessor's figures, passed to the successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PredecessorFigures {
    /// Entries inserted.
    pub entries: u64,
    /// Value size.
    pub value_size: u32,
    /// Store digest.
    pub digest: u64,
    /// Freeze start, `CLOCK_MONOTONIC` ns.
    pub freeze_start_ns: u64,
    /// Freeze duration, ns.
    pub freeze_ns: u64,
    /// Commit duration, ns.
    pub commit_ns: u64,
    /// `exec` call, `CLOCK_MONOTONIC` ns.
    pub exec_ns: u64,
    /// Image length.
    pub image_len: u64,
    /// Preserved bytes.
    pub preserved_bytes: u64,
    /// Published generation.
    pub generation: u64,
}

impl PredecessorFigures {
    fn encode(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{},{}",
            self.entries,
            self.value_size,
            self.digest,
            self.freeze_start_ns,
            self.freeze_ns,
            self.commit_ns,
            self.exec_ns,
            self.image_len,
            self.preserved_bytes,
            self.generation
        )
    }

    fn decode(s: &str) -> Option<PredecessorFigures> {
        let v: Vec<u64> = s
            .split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        let [entries, value_size, digest, freeze_start_ns, freeze_ns, commit_ns, exec_ns, image_len, preserved_bytes, generation] =
            v[..]
        else {
            return None;
        };
        Some(PredecessorFigures {
            entries,
            value_size: u32::try_from(value_size).ok()?,
            digest,
            freeze_start_ns,
            freeze_ns,
            commit_ns,
            exec_ns,
            image_len,
            preserved_bytes,
            generation,
        })
    }
}

/// Create the demo's arena: a memfd, or a new file at `path` (an existing
/// file is refused, never truncated).
fn create_arena(path: Option<&Path>, config: &ArenaConfig) -> Result<Arena> {
    let Some(path) = path else {
        return Ok(Arena::create_memfd("kho-demo", config)?);
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(DemoError::ArenaExists {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(DemoError::ArenaCreate {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    // The file is new and empty, and ours.
    Ok(Arena::create_file(path, config)?)
}

/// Build a session with the store over a new arena (see
/// [`DemoConfig::arena`]) and fill it. Returns the session and the store
/// handle.
pub fn fill(cfg: &DemoConfig) -> Result<(Session, KvHandle)> {
    if cfg.entries == 0 {
        return Err(DemoError::Config {
            what: "entries",
            expected: "at least 1",
            found: 0,
        });
    }
    let arena = create_arena(
        cfg.arena.as_deref(),
        &arena_config(cfg.entries, cfg.value_size),
    )?;
    let heap = Heap::new(arena)?;
    let kv_cfg = KvConfig {
        capacity: cfg.entries,
        value_size: cfg.value_size,
    };
    let mut store = KvStore::new(&heap, kv_cfg)?;
    let mut value = vec![0u8; cfg.value_size as usize];
    for key in 0..cfg.entries {
        fill_value(key, &mut value);
        store.insert(key, &value)?;
    }
    let handle: KvHandle = Arc::new(RwLock::new(Some(store)));
    let mut session = Session::new(&heap);
    session.register(Box::new(KvSubsystem::new(
        KV_NAME,
        Arc::clone(&handle),
        kv_cfg,
    )))?;
    Ok((session, handle))
}

/// The predecessor: fill, hand over, `exec` `successor` (which must run
/// [`run_successor`]). Returns only on error; if the `exec` itself failed,
/// the handover was aborted first.
pub fn run_predecessor(cfg: &DemoConfig, successor: &mut Command) -> DemoError {
    match predecessor(cfg, successor) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn predecessor(cfg: &DemoConfig, successor: &mut Command) -> Result<std::convert::Infallible> {
    let (mut session, handle) = fill(cfg)?;
    let digest = handle
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or(0, KvStore::digest);
    session.prepare()?;
    let generation = session.freeze_and_commit()?;
    let r = session.freeze_report();
    let (var, fd) = session.exec_env()?;
    let mut figures = PredecessorFigures {
        entries: cfg.entries,
        value_size: cfg.value_size,
        digest,
        freeze_start_ns: r.started_ns,
        freeze_ns: r.freeze.as_nanos() as u64,
        commit_ns: r.commit.as_nanos() as u64,
        exec_ns: 0,
        image_len: r.stats.image_len,
        preserved_bytes: r.preserved_bytes,
        generation,
    };
    figures.exec_ns = monotonic_ns();
    let err = successor
        .env(var, fd)
        .env(DEMO_ENV, figures.encode())
        .exec();
    // No successor: take the handover back so that nothing restores it.
    session.abort()?;
    Err(DemoError::Exec(err))
}

/// Results of the image checks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageChecks {
    /// Preserved folios in the image.
    pub folios: u64,
    /// Tree ranges checked to lie in preserved memory.
    pub ranges: u64,
    /// Problems found, one line each.
    pub problems: Vec<String>,
    /// Warnings of the checker ([`crate::check`]), one line each.
    pub warnings: Vec<String>,
    /// Whether [`crate::check::check_arena`] ran over the whole arena.
    pub checker_ran: bool,
}

/// Check a handover image against its arena: it parses (every section,
/// CRC and the tree); no preserved folio touches scratch, KFENCE or
/// superblock pages; every range in the tree lies inside preserved
/// folios; the whole image lies in general memory, inside one folio of its
/// own MEMMAP headed at its first page. Then the full checker
/// ([`crate::check::check_arena`]) runs over a read-only mapping of the
/// arena file: its errors are problems, its warnings are listed.
pub fn check_image(arena: &Arena) -> ImageChecks {
    let mut out = check_placement(arena);
    let Some(file) = arena.file() else {
        out.problems.push("arena has no file to check".into());
        return out;
    };
    match crate::ReadOnlyFile::map(file) {
        Ok(ro) => {
            let opts = crate::check::CheckOptions::default();
            match crate::check::check_arena(ro.bytes(), &opts, &mut |_, _| {}) {
                Ok(report) => {
                    out.checker_ran = true;
                    for f in report.findings {
                        let line = format!("{} {}: {}", f.code, f.severity, f.message);
                        match f.severity {
                            crate::check::Severity::Error => out.problems.push(line),
                            _ => out.warnings.push(line),
                        }
                    }
                }
                Err(e) => out.problems.push(format!("checker: {e}")),
            }
        }
        Err(e) => out
            .problems
            .push(format!("mapping the arena for the checker: {e}")),
    }
    out
}

fn check_placement(arena: &Arena) -> ImageChecks {
    let mut out = ImageChecks::default();
    let loc = match arena.current_image() {
        Some(loc) => loc,
        None => {
            out.problems.push("no current image".into());
            return out;
        }
    };
    let layout = *arena.layout();
    let whole = PhysRange::new(kho_core::PhysAddr(loc.offset), loc.len);
    match whole.pfns() {
        Some((first, end))
            if first >= layout.general.start && end <= layout.general.end && first < end => {}
        _ => out.problems.push(format!(
            "image {whole} does not lie wholly in general memory {:#x}..{:#x}",
            layout.general.start.0 << kho_core::PAGE_SHIFT,
            layout.general.end.0 << kho_core::PAGE_SHIFT
        )),
    }
    // The image pages are claimed by the heap in the successor; read them
    // from the file rather than through the mapping.
    let mut bytes = vec![0u8; loc.len as usize];
    let read = arena
        .file()
        .map(|f| std::os::unix::fs::FileExt::read_exact_at(f, &mut bytes, loc.offset));
    if !matches!(read, Some(Ok(()))) {
        out.problems.push("image bytes unreadable".into());
        return out;
    }
    if crc32fast::hash(&bytes) != loc.crc {
        out.problems
            .push("image CRC differs from the superblock".into());
    }
    let image = match Image::parse(&bytes) {
        Ok(i) => i,
        Err(e) => {
            out.problems.push(format!("image does not parse: {e}"));
            return out;
        }
    };
    let own = kho_core::PhysAddr(loc.offset)
        .aligned_pfn()
        .and_then(|first| image.is_preserved(first).map(|f| (first, f)));
    match own {
        Some((first, (head, order))) if head == first && order.bytes() >= loc.len => {}
        _ => out.problems.push(format!(
            "image {whole} is not inside one preserved folio of its MEMMAP headed at its first page"
        )),
    }
    for f in image.folios() {
        out.folios += 1;
        for pfn in [f.pfn, kho_core::Pfn(f.end_pfn().0 - 1)] {
            match layout.region_of(pfn) {
                Some(Region::General | Region::Preservable) => {}
                other => out.problems.push(format!(
                    "preserved folio {:#x} order {} in {} memory",
                    f.pfn.0,
                    f.order.get(),
                    other.map_or("no", Region::name)
                )),
            }
        }
    }
    if let Some(tree) = image.tree() {
        for (path, name, range) in tree.ranges() {
            out.ranges += 1;
            if !range_preserved(&image, range) {
                out.problems.push(format!(
                    "{path}:{name} = {:#x}+{:#x} is not preserved memory",
                    range.start, range.len
                ));
            }
        }
    } else {
        out.problems.push("image has no metadata tree".into());
    }
    out
}

fn range_preserved(image: &Image<'_>, range: PhysRange) -> bool {
    let Some((first, end)) = range.pfns() else {
        return false;
    };
    let mut pfn = first;
    while pfn < end {
        match image.is_preserved(pfn) {
            Some((head, order)) => pfn = kho_core::Pfn(head.0 + order.pages()),
            None => return false,
        }
    }
    true
}

/// What the successor found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// The predecessor's figures.
    pub predecessor: PredecessorFigures,
    /// Entries verified good.
    pub verified: u64,
    /// Entries that failed.
    pub bad: u64,
    /// Whether count and digest match the predecessor's.
    pub consistent: bool,
    /// Opening and mapping the inherited arena, restore (heap and
    /// subsystems) and finish.
    pub restore: Duration,
    /// Freeze start to the successor serving (after finish).
    pub blackout: Duration,
    /// `exec` call to the successor's `main` reaching restore.
    pub exec: Duration,
    /// Image checks.
    pub checks: ImageChecks,
    /// Bytes the store occupies.
    pub store_bytes: u64,
    /// Whether the inherited arena descriptor has `FD_CLOEXEC` set again
    /// in the successor (its own children must not inherit it).
    pub arena_cloexec: bool,
}

impl DemoReport {
    /// Whether everything verified.
    pub fn passed(&self) -> bool {
        self.bad == 0
            && self.consistent
            && self.verified == self.predecessor.entries
            && self.checks.problems.is_empty()
            && self.checks.checker_ran
            && self.arena_cloexec
    }
}

/// The successor: take the inherited arena, restore, finish, verify.
pub fn run_successor() -> Result<DemoReport> {
    let entered = monotonic_ns();
    let figures = std::env::var(DEMO_ENV)
        .ok()
        .and_then(|s| PredecessorFigures::decode(&s))
        .ok_or_else(|| DemoError::Successor(format!("{DEMO_ENV} missing or malformed")))?;
    let t = std::time::Instant::now();
    let arena = session::inherited_arena()?
        .ok_or_else(|| DemoError::Successor(format!("{} not set", session::ARENA_FD_ENV)))?;
    let arena_cloexec = arena
        .file()
        .and_then(|f| session::cloexec(std::os::fd::AsRawFd::as_raw_fd(f)))
        .unwrap_or(false);
    let (mut session, start) = Session::start(arena)?;
    if let Start::Cold { reason } = start {
        return Err(DemoError::Successor(format!("no handover: {reason}")));
    }
    let handle: KvHandle = Arc::new(RwLock::new(None));
    let cold = KvConfig {
        capacity: figures.entries.max(1),
        value_size: figures.value_size,
    };
    session.register(Box::new(KvSubsystem::new(
        KV_NAME,
        Arc::clone(&handle),
        cold,
    )))?;
    session.restore()?;
    session.finish()?;
    let restore = t.elapsed();
    let serving = monotonic_ns();
    let guard = handle.read().unwrap_or_else(PoisonError::into_inner);
    let store = guard
        .as_ref()
        .ok_or_else(|| DemoError::Successor("the store was not restored".into()))?;
    let mut expect = vec![0u8; figures.value_size as usize];
    let r = store.verify(|key, value| {
        fill_value(key, &mut expect);
        key < figures.entries && value == expect.as_slice()
    })?;
    let heap = session
        .heap()
        .ok_or_else(|| DemoError::Successor("no heap after restore".into()))?;
    let checks = check_image(heap.arena());
    Ok(DemoReport {
        predecessor: figures,
        verified: r.good,
        bad: r.bad,
        consistent: r.consistent && store.len() == figures.entries && r.digest == figures.digest,
        restore,
        blackout: Duration::from_nanos(serving.saturating_sub(figures.freeze_start_ns)),
        exec: Duration::from_nanos(entered.saturating_sub(figures.exec_ns)),
        checks,
        store_bytes: store.footprint(),
        arena_cloexec,
    })
}

/// Whether this process is a demo successor (started by
/// [`run_predecessor`]).
pub fn is_successor() -> bool {
    std::env::var_os(DEMO_ENV).is_some()
}

/// Pages of the default arena for `entries` values (for reports).
pub fn arena_pages(entries: u64, value_size: u32) -> u64 {
    arena_config(entries, value_size).size / PAGE_SIZE
}

#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;
    use kho_core::{ImageBuilder, Pfn, PreservedMap};

    fn small(arena: Option<PathBuf>) -> DemoConfig {
        DemoConfig {
            entries: 500,
            value_size: 16,
            arena,
        }
    }

    #[test]
    fn a_demo_handover_image_checks_clean() {
        let (mut session, _kv) = fill(&small(None)).unwrap();
        session.prepare().unwrap();
        session.freeze_and_commit().unwrap();
        let checks = check_image(session.heap().unwrap().arena());
        assert!(checks.checker_ran);
        assert!(checks.problems.is_empty(), "{:?}", checks.problems);
        assert!(checks.warnings.is_empty(), "{:?}", checks.warnings);
        // Records, index and the image's own folio.
        assert_eq!(checks.folios, 3);
        assert_eq!(checks.ranges, 2);
    }

    /// An image (in a folio its MEMMAP preserves) written at `first`.
    fn image_at(first: Pfn) -> Vec<String> {
        let config = ArenaConfig::with_size(16 << 20);
        let mut arena = Arena::create_memfd("kho-demo-test", &config).unwrap();
        let layout = *arena.layout();
        let mut map = PreservedMap::new(Pfn(layout.pages));
        map.preserve_range(first.addr().unwrap(), 2 * PAGE_SIZE)
            .unwrap();
        let bytes = ImageBuilder::new(layout.size())
            .generation(2)
            .memmap(&map)
            .scratch(vec![layout.bytes_of(Region::Scratch)])
            .kfence(vec![layout.bytes_of(Region::Kfence)])
            .tree(&kho_core::Tree::new(kho_core::Node::root("test-v1")))
            .build()
            .unwrap();
        let at = first.addr().unwrap();
        arena.write(at, &bytes).unwrap();
        arena
            .commit_image(crate::ImageLocation {
                offset: at.0,
                len: bytes.len() as u64,
                crc: crc32fast::hash(&bytes),
            })
            .unwrap();
        let checks = check_image(&arena);
        assert!(checks.checker_ran);
        checks.problems
    }

    #[test]
    fn an_image_outside_general_memory_is_a_problem() {
        let layout = ArenaConfig::with_size(16 << 20).layout().unwrap();
        for first in [layout.preservable.start, Pfn(layout.general.start.0 - 1)] {
            let problems = image_at(first);
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains("does not lie wholly in general memory")),
                "{first:?}: {problems:?}"
            );
            assert!(
                problems.iter().any(|p| p.starts_with("KHO-I002")),
                "{first:?}: {problems:?}"
            );
        }
        // In general memory, the same image is clean.
        assert_eq!(image_at(layout.general.start), Vec::<String>::new());
    }

    #[test]
    fn an_existing_arena_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept.arena");
        std::fs::write(&path, b"somebody's handover").unwrap();
        match fill(&small(Some(path.clone()))) {
            Err(DemoError::ArenaExists { path: p }) => assert_eq!(p, path),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"somebody's handover");
        let missing = dir.path().join("no/such/dir/a.arena");
        assert!(matches!(
            fill(&small(Some(missing))),
            Err(DemoError::ArenaCreate { .. })
        ));
    }
}
