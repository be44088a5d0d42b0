//! The live-update demo: fill a [`KvStore`], hand it over to a successor
//! started by `exec`, and verify every entry there.
//!
//! The predecessor ([`run_predecessor`]) creates a sparse arena file,
//! fills the store with deterministic values, prepares, freezes and commits
//! a handover session, then `exec`s the successor command with the arena's
//! descriptor in [`ARENA_FD_ENV`](crate::session::ARENA_FD_ENV) and its own
//! figures in [`DEMO_ENV`]. The successor ([`run_successor`]) restores,
//! finishes (it is serving from then on), verifies every entry's checksum
//! and value, runs the image checks and reports.

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
    /// Arena file to create (and keep); `None`: a temporary file (on
    /// `/dev/shm` when present), removed as soon as it is mapped.
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

/// A fresh name for a temporary arena: in `/dev/shm` when it exists (a
/// tmpfs file, like the memfd of a real cpr-exec handover, so `msync`
/// writes nothing back to a disk), else in the temporary directory.
fn temp_arena_path() -> PathBuf {
    let nanos = monotonic_ns();
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("kho-demo-{}-{nanos}.arena", std::process::id()))
}

/// Build a session with the store over a new arena at `path` and fill it.
/// Returns the session and the store handle.
pub fn fill(path: &Path, cfg: &DemoConfig) -> Result<(Session, KvHandle)> {
    if cfg.entries == 0 {
        return Err(DemoError::Config {
            what: "entries",
            expected: "at least 1",
            found: 0,
        });
    }
    let arena = Arena::create_file(path, &arena_config(cfg.entries, cfg.value_size))?;
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
/// [`run_successor`]). Returns only on error.
pub fn run_predecessor(cfg: &DemoConfig, successor: &mut Command) -> DemoError {
    match predecessor(cfg, successor) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn predecessor(cfg: &DemoConfig, successor: &mut Command) -> Result<std::convert::Infallible> {
    let (path, keep) = match &cfg.arena {
        Some(p) => (p.clone(), true),
        None => (temp_arena_path(), false),
    };
    let filled = fill(&path, cfg);
    if !keep {
        // Mapped and open (or failed): the name is no longer needed.
        let _ = std::fs::remove_file(&path);
    }
    let (mut session, handle) = filled?;
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
    /// Checker findings that the session's commit protocol produces on
    /// purpose, with the reason (not problems).
    pub expected: Vec<String>,
}

/// Check a handover image against its arena: it parses (every section,
/// CRC and the tree); no preserved folio touches scratch, KFENCE or
/// superblock pages; every range in the tree lies inside preserved
/// folios; the image itself lies in general memory. Then the full checker
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
                    let own_folio = image_in_own_folio(arena);
                    for f in report.findings {
                        let line = format!("{} {}: {}", f.code, f.severity, f.message);
                        if f.code == "KHO-I002" && own_folio {
                            // Sessions write the image into a folio that its
                            // own MEMMAP preserves, so that no successor
                            // allocation can reuse it before it is read.
                            out.expected.push(format!(
                                "{line} (the image's own folio, preserved by design)"
                            ));
                            continue;
                        }
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

/// Whether the current image is exactly covered by one preserved folio of
/// its own MEMMAP headed at the image's first page, and nothing else.
fn image_in_own_folio(arena: &Arena) -> bool {
    let Some(loc) = arena.current_image() else {
        return false;
    };
    let Some(file) = arena.file() else {
        return false;
    };
    let mut bytes = vec![0u8; loc.len as usize];
    if std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, loc.offset).is_err() {
        return false;
    }
    let Ok(image) = Image::parse(&bytes) else {
        return false;
    };
    let Some(first) = kho_core::PhysAddr(loc.offset).aligned_pfn() else {
        return false;
    };
    match image.is_preserved(first) {
        Some((head, order)) => {
            head == first && order.bytes() >= loc.len && order.bytes() < 2 * loc.len.max(PAGE_SIZE)
        }
        None => false,
    }
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
    if layout.region_of(kho_core::PhysAddr(loc.offset).pfn()) != Some(Region::General) {
        out.problems.push(format!(
            "image at {:#x} is not in general memory",
            loc.offset
        ));
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
    /// Restore (heap and subsystems) plus finish.
    pub restore: Duration,
    /// Freeze start to the successor serving (after finish).
    pub blackout: Duration,
    /// `exec` call to the successor's `main` reaching restore.
    pub exec: Duration,
    /// Image checks.
    pub checks: ImageChecks,
    /// Bytes the store occupies.
    pub store_bytes: u64,
}

impl DemoReport {
    /// Whether everything verified.
    pub fn passed(&self) -> bool {
        self.bad == 0
            && self.consistent
            && self.verified == self.predecessor.entries
            && self.checks.problems.is_empty()
            && self.checks.checker_ran
    }
}

/// The successor: take the inherited arena, restore, finish, verify.
pub fn run_successor() -> Result<DemoReport> {
    let entered = monotonic_ns();
    let figures = std::env::var(DEMO_ENV)
        .ok()
        .and_then(|s| PredecessorFigures::decode(&s))
        .ok_or_else(|| DemoError::Successor(format!("{DEMO_ENV} missing or malformed")))?;
    let arena = session::inherited_arena()?
        .ok_or_else(|| DemoError::Successor(format!("{} not set", session::ARENA_FD_ENV)))?;
    let t = std::time::Instant::now();
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
