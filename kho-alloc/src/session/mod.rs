//! Handover sessions: the bounded, cancellable handover of a running
//! service's state to its successor.
//!
//! A service registers [`Subsystem`]s. The predecessor walks
//!
//! ```text
//!            prepare            freeze             commit
//!   NORMAL ──────────► PREPARED ───────► FROZEN ───────────► COMMITTED ─► exec / exit
//!     ▲  ▲                │                │
//!     │  └─── cancel ─────┘                │
//!     └────── cancel ──────────────────────┘
//! ```
//!
//! and the successor
//!
//! ```text
//!             restore             finish
//!   INCOMING ─────────► RESTORED ───────► FINISHED ──prepare──► PREPARED ...
//! ```
//!
//! Any other step is refused with [`SessionError::InvalidTransition`].
//!
//! - **prepare** is the heavy work while the service still runs:
//!   subsystems preserve their folios ([`PrepareCx`]).
//! - **freeze** is the blackout: the KFENCE samplers (the heap's own and
//!   any attached with [`Session::attach_sampler`]) are disabled, deferred
//!   frees are drained, every subsystem writes its state into its own node
//!   of the metadata tree (`compatible` plus typed properties, pointers as
//!   [`PhysRange`]), and the heap scrubs and records its preservable slabs
//!   and writes the image into a fresh folio of general memory (never
//!   scratch, never the KFENCE pool; the successor claims it like a
//!   preserved folio).
//! - **commit** makes the image durable (`msync`), then publishes it by
//!   writing the other superblock slot with the next generation and a CRC.
//!   A crash anywhere before the slot is durable leaves the previous
//!   generation; [`FaultPoint`]s let tests crash at every step.
//! - **cancel** never fails, never blocks and never allocates: it calls each
//!   subsystem's `cancel` and queues cleanup records allocated at
//!   registration (discarding the frozen image, unpreserving what prepare
//!   preserved) on an epoch [`Domain`]; they run after a grace period, at
//!   [`Session::poll`] or [`Session::barrier`].
//!
//! A successor finds its arena by `exec` ([`inherited_arena`], the memfd or
//! file descriptor named by [`ARENA_FD_ENV`], as QEMU's cpr-exec passes it)
//! or by reopening the arena file (a restart), then calls [`Session::start`],
//! [`Session::restore`] and [`Session::finish`].

mod fault;
mod os;

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kho_core::{Folio, Node, PhysAddr, PhysRange, Tree, TreeError, PAGE_SIZE};

use crate::arena::Arena;
use crate::deferred::{DeferredFrees, DrainStats};
use crate::epoch::{Cleanup, Domain};
use crate::heap::{FreezeStats, FrozenImage, Heap, Pages, Restored};
use crate::kfence::Sampler;
use crate::layout::Region;
use crate::superblock::Superblock;

pub use fault::{arm, arm_from_env, disarm, FaultAction, FaultPoint, FAULT_ENV};
pub use os::monotonic_ns;

/// Environment variable naming the arena descriptor inherited across
/// `exec`.
pub const ARENA_FD_ENV: &str = "KHO_ARENA_FD";
/// `compatible` of the metadata tree's root node.
pub const SESSION_COMPATIBLE: &str = "kho-session-v1";
/// Reader slots of a session's epoch domain.
pub const DEFAULT_READERS: usize = 64;

/// A boxed error from a subsystem callback.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Serving; no handover in progress.
    Normal,
    /// Subsystems prepared; still serving.
    Prepared,
    /// Image written; blackout.
    Frozen,
    /// Image published; the successor may take over.
    Committed,
    /// A successor with an unrestored handover image.
    Incoming,
    /// A successor whose subsystems restored their state.
    Restored,
    /// A successor that finished the handover; serving.
    Finished,
}

impl State {
    /// Every state.
    pub const ALL: [State; 7] = [
        State::Normal,
        State::Prepared,
        State::Frozen,
        State::Committed,
        State::Incoming,
        State::Restored,
        State::Finished,
    ];

    /// Upper-case name, as in the documentation.
    pub const fn name(self) -> &'static str {
        match self {
            State::Normal => "NORMAL",
            State::Prepared => "PREPARED",
            State::Frozen => "FROZEN",
            State::Committed => "COMMITTED",
            State::Incoming => "INCOMING",
            State::Restored => "RESTORED",
            State::Finished => "FINISHED",
        }
    }

    /// The state `op` leads to from this one, or `None` if `op` is not
    /// allowed here.
    pub const fn after(self, op: Op) -> Option<State> {
        match (self, op) {
            (State::Normal | State::Finished, Op::Prepare) => Some(State::Prepared),
            (State::Prepared, Op::Freeze) => Some(State::Frozen),
            (State::Frozen, Op::Commit) => Some(State::Committed),
            (State::Prepared | State::Frozen, Op::Cancel) => Some(State::Normal),
            (State::Incoming, Op::Restore) => Some(State::Restored),
            (State::Restored, Op::Finish) => Some(State::Finished),
            _ => None,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A session operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Session::prepare`].
    Prepare,
    /// [`Session::freeze`].
    Freeze,
    /// [`Session::commit`].
    Commit,
    /// [`Session::cancel`].
    Cancel,
    /// [`Session::restore`].
    Restore,
    /// [`Session::finish`].
    Finish,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 6] = [
        Op::Prepare,
        Op::Freeze,
        Op::Commit,
        Op::Cancel,
        Op::Restore,
        Op::Finish,
    ];

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Prepare => "prepare",
            Op::Freeze => "freeze",
            Op::Commit => "commit",
            Op::Cancel => "cancel",
            Op::Restore => "restore",
            Op::Finish => "finish",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// `op` is not allowed in state `from`.
    #[error("{op} is not allowed in state {from}")]
    InvalidTransition {
        /// The refused operation.
        op: Op,
        /// The session's state.
        from: State,
    },
    /// The successor's node for a subsystem has another `compatible`, or
    /// is missing (`found` is then `"<missing>"`).
    #[error("subsystem {subsystem:?}: node /{subsystem} is incompatible: expected {expected:?}, found {found:?}")]
    Incompatible {
        /// Subsystem (and node) name.
        subsystem: String,
        /// `compatible` the registered subsystem understands.
        expected: String,
        /// `compatible` found in the image.
        found: String,
    },
    /// The image holds a node no registered subsystem claims.
    #[error("node /{node} (compatible {compatible:?}) is claimed by no registered subsystem")]
    Unclaimed {
        /// Node name.
        node: String,
        /// Its `compatible`.
        compatible: String,
    },
    /// Two subsystems share a name.
    #[error("subsystem name {name:?} registered twice")]
    DuplicateSubsystem {
        /// The name.
        name: String,
    },
    /// A subsystem callback failed.
    #[error("subsystem {subsystem:?} failed to {op}: {source}")]
    Subsystem {
        /// Subsystem name.
        subsystem: String,
        /// The operation.
        op: Op,
        /// Its error.
        source: BoxError,
    },
    /// The arena holds no handover for a successor.
    #[error("no handover at generation {generation}: {reason}")]
    NoHandover {
        /// Current superblock generation.
        generation: u64,
        /// Why: no image, or already restored.
        reason: &'static str,
    },
    /// The image landed outside general memory.
    #[error("image at {offset:#x} is in {found} memory, expected general memory")]
    ImagePlacement {
        /// Image offset.
        offset: u64,
        /// Region found.
        found: &'static str,
    },
    /// The arena descriptor passed in [`ARENA_FD_ENV`] is unusable.
    #[error("{var}={value:?}: {reason}")]
    Inherit {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The session has no heap (a successor before restore).
    #[error("the session has no heap in state {state}")]
    NoHeap {
        /// The session's state.
        state: State,
    },
    /// The metadata tree was refused.
    #[error("metadata tree: {0}")]
    Tree(#[from] TreeError),
    /// Allocator, arena or image error.
    #[error(transparent)]
    Heap(#[from] crate::Error),
    /// An I/O error.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Result alias for sessions.
pub type Result<T> = std::result::Result<T, SessionError>;

/// What a successor subsystem does when its node is missing or
/// incompatible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Fail the restore with the error.
    Fail,
    /// Start from scratch ([`Subsystem::cold_start`]); the report lists
    /// the subsystem and the error.
    ColdStart,
}

/// Context of [`Subsystem::prepare`]: the heap, and preservation that the
/// session undoes on cancel.
#[derive(Debug)]
pub struct PrepareCx<'a> {
    heap: &'a Heap,
    preserved: &'a mut Vec<Preserved>,
}

impl PrepareCx<'_> {
    /// The heap.
    pub fn heap(&self) -> &Heap {
        self.heap
    }

    /// Preserve `pages` across the handover (undone on cancel).
    pub fn preserve_pages(&mut self, pages: &Pages) -> crate::Result<()> {
        self.heap.preserve_pages(pages)?;
        self.preserved.push(Preserved::Folio(pages.folio()));
        Ok(())
    }

    /// Preserve the page-aligned `range` (undone on cancel).
    pub fn preserve_range(&mut self, range: PhysRange) -> crate::Result<()> {
        self.heap.preserve_range(range)?;
        self.preserved.push(Preserved::Range(range));
        Ok(())
    }
}

/// Context of [`Subsystem::restore`]: the restored heap and what it
/// handed back.
#[derive(Debug)]
pub struct RestoreCx<'a> {
    heap: &'a Heap,
    restored: &'a mut Restored,
}

impl RestoreCx<'_> {
    /// The restored heap.
    pub fn heap(&self) -> &Heap {
        self.heap
    }

    /// Preserved caches and folios not yet taken by a subsystem.
    pub fn restored(&mut self) -> &mut Restored {
        self.restored
    }
}

/// One part of a service that hands its state over.
///
/// Callbacks run on the thread driving the session. `cancel` must not
/// block, allocate or fail: anything that must wait goes into the
/// [`Cleanup`] returned by [`cleanup`](Subsystem::cleanup), which is asked
/// for once at registration and queued on cancel.
pub trait Subsystem: Send {
    /// Node name in the metadata tree (unique per session).
    fn name(&self) -> &str;
    /// The node's `compatible`, e.g. `"kv-store-v1"`.
    fn compatible(&self) -> &str;
    /// A cleanup record to queue on cancel (allocated now, at
    /// registration).
    fn cleanup(&self) -> Option<Cleanup> {
        None
    }
    /// Heavy work while the service still runs: preserve memory.
    fn prepare(&mut self, cx: &mut PrepareCx<'_>) -> std::result::Result<(), BoxError>;
    /// Blackout: write the state into `node` (already named, with its
    /// `compatible`).
    fn freeze(&mut self, node: &mut Node) -> std::result::Result<(), BoxError>;
    /// Abandon the handover. Never blocks, allocates or fails.
    fn cancel(&mut self);
    /// Successor: take the state back from `node`.
    fn restore(&mut self, cx: &mut RestoreCx<'_>, node: &Node)
        -> std::result::Result<(), BoxError>;
    /// Successor: the handover is complete; serve.
    fn finish(&mut self) {}
    /// Successor: the node is missing or incompatible. The default fails
    /// the restore; return [`Recovery::ColdStart`] to start empty instead.
    fn on_incompatible(&mut self, error: &SessionError) -> Recovery {
        let _ = error;
        Recovery::Fail
    }
    /// Start without handed-over state.
    fn cold_start(&mut self, heap: &Heap) -> std::result::Result<(), BoxError> {
        let _ = heap;
        Ok(())
    }
}

/// Memory preserved during prepare, unpreserved on cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preserved {
    /// A folio.
    Folio(Folio),
    /// A page-aligned range.
    Range(PhysRange),
}

/// What the blackout did and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FreezeReport {
    /// `CLOCK_MONOTONIC` at the start of freeze ([`monotonic_ns`]).
    pub started_ns: u64,
    /// Sampler disable, drain, subsystem freeze and image write.
    pub freeze: Duration,
    /// `msync` and superblock publish.
    pub commit: Duration,
    /// Deferred frees drained.
    pub drained: DrainStats,
    /// The heap's part.
    pub stats: FreezeStats,
    /// Bytes in the preserved folios of the image.
    pub preserved_bytes: u64,
    /// The published generation (0 before commit).
    pub generation: u64,
}

/// What a successor's restore did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreReport {
    /// Generation of the restored image.
    pub generation: u64,
    /// Heap restore plus every subsystem's restore.
    pub restore: Duration,
    /// Subsystems that restored their state.
    pub restored: Vec<String>,
    /// Subsystems that chose a cold start, with the error that made them.
    pub cold_started: Vec<(String, String)>,
    /// Restored objects and folios no subsystem took, freed at finish.
    pub unclaimed: u64,
}

/// How a session started ([`Session::start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The arena holds a handover: call [`Session::restore`].
    Handover {
        /// Generation of the image.
        generation: u64,
    },
    /// No handover; every subsystem cold-started.
    Cold {
        /// Why there was no handover.
        reason: &'static str,
    },
}

struct Entry {
    sub: Box<dyn Subsystem>,
    cleanup: Option<Cleanup>,
    prepared: bool,
}

/// What cancel hands to the session's cleanup record.
#[derive(Default)]
struct Undo {
    heap: Option<Heap>,
    preserved: Vec<Preserved>,
    frozen: Option<FrozenImage>,
    sampler: Option<(Arc<Sampler>, crate::kfence::SampleMode)>,
    /// Mode to re-enable the heap's own sampler in.
    heap_kfence: Option<crate::kfence::SampleMode>,
    /// Cleanup failures, for [`Session::cleanup_errors`].
    errors: u64,
}

/// A handover session.
pub struct Session {
    state: State,
    heap: Option<Heap>,
    arena: Option<Arena>,
    entries: Vec<Entry>,
    domain: Domain,
    sampler: Option<(Arc<Sampler>, crate::kfence::SampleMode)>,
    /// Mode of the heap's own sampler ([`Heap::kfence`]) after a cancel.
    heap_kfence_mode: crate::kfence::SampleMode,
    /// Whether this freeze disabled the heap's sampler.
    heap_kfence_disabled: bool,
    deferred: Option<Arc<DeferredFrees>>,
    preserved: Vec<Preserved>,
    frozen: Option<FrozenImage>,
    undo: Arc<Mutex<Undo>>,
    undo_record: Cleanup,
    report: FreezeReport,
    restored: Option<Restored>,
    restore_report: RestoreReport,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state)
            .field(
                "subsystems",
                &self
                    .entries
                    .iter()
                    .map(|e| e.sub.name())
                    .collect::<Vec<_>>(),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Session {
    fn build(heap: Option<Heap>, arena: Option<Arena>, state: State) -> Session {
        let undo = Arc::new(Mutex::new(Undo {
            heap: heap.clone(),
            ..Undo::default()
        }));
        let u = Arc::clone(&undo);
        let undo_record = Cleanup::new(move || {
            let mut g = lock(&u);
            let undo = &mut *g;
            let Some(heap) = undo.heap.clone() else {
                return;
            };
            for p in undo.preserved.drain(..) {
                let r = match p {
                    Preserved::Folio(f) => heap.unpreserve_folio(f),
                    Preserved::Range(r) => heap.unpreserve_range(r),
                };
                if r.is_err() {
                    undo.errors += 1;
                }
            }
            if let Some(frozen) = undo.frozen.take() {
                if heap.discard(frozen).is_err() {
                    undo.errors += 1;
                }
            }
            if let Some((sampler, mode)) = undo.sampler.take() {
                if sampler.enable(mode).is_err() {
                    undo.errors += 1;
                }
            }
            if let (Some(mode), Some(k)) = (undo.heap_kfence.take(), heap.kfence()) {
                if k.enable(mode).is_err() {
                    undo.errors += 1;
                }
            }
        });
        Session {
            state,
            heap,
            arena,
            entries: Vec::new(),
            domain: Domain::new(DEFAULT_READERS),
            sampler: None,
            heap_kfence_mode: crate::kfence::SampleMode::default(),
            heap_kfence_disabled: false,
            deferred: None,
            preserved: Vec::new(),
            frozen: None,
            undo,
            undo_record,
            report: FreezeReport::default(),
            restored: None,
            restore_report: RestoreReport::default(),
        }
    }

    /// A session over a fresh (or cold-started) heap, in [`State::Normal`].
    pub fn new(heap: &Heap) -> Session {
        Self::build(Some(heap.clone()), None, State::Normal)
    }

    /// A successor's session over `arena` (inherited or reopened). With an
    /// unrestored image the session is [`State::Incoming`] and
    /// [`restore`](Self::restore) comes next; otherwise a fresh heap is
    /// built over the arena and the session is [`State::Normal`]
    /// (subsystems registered later are cold-started by
    /// [`register`](Self::register)).
    pub fn start(arena: Arena) -> Result<(Session, Start)> {
        let generation = arena.generation();
        let reason = if arena.current_image().is_none() {
            Some("the arena holds no image")
        } else if arena.image_restored() {
            Some("the image was already restored")
        } else {
            None
        };
        match reason {
            None => Ok((
                Self::build(None, Some(arena), State::Incoming),
                Start::Handover { generation },
            )),
            Some(reason) => {
                let heap = Heap::new(arena)?;
                Ok((
                    Self::build(Some(heap), None, State::Normal),
                    Start::Cold { reason },
                ))
            }
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The heap (`None` before a successor's restore).
    pub fn heap(&self) -> Option<&Heap> {
        self.heap.as_ref()
    }

    /// The epoch domain whose grace periods cleanups wait for. Readers of
    /// state that a cancel tears down register here.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Names of the registered subsystems, in registration order.
    pub fn subsystems(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.sub.name())
    }

    /// Register a subsystem (in NORMAL, INCOMING or FINISHED). Its cleanup
    /// record is allocated now. A successor that found no handover calls
    /// [`cold_start`](Self::cold_start) once everything is registered.
    pub fn register(&mut self, sub: Box<dyn Subsystem>) -> Result<()> {
        if self.entries.iter().any(|e| e.sub.name() == sub.name()) {
            return Err(SessionError::DuplicateSubsystem {
                name: sub.name().to_owned(),
            });
        }
        if !matches!(
            self.state,
            State::Normal | State::Incoming | State::Finished
        ) {
            return Err(SessionError::InvalidTransition {
                op: Op::Prepare,
                from: self.state,
            });
        }
        let cleanup = sub.cleanup();
        self.entries.push(Entry {
            sub,
            cleanup,
            prepared: false,
        });
        Ok(())
    }

    /// Call [`Subsystem::cold_start`] on every subsystem (a successor that
    /// found no handover, or a first start).
    pub fn cold_start(&mut self) -> Result<()> {
        let heap = self.heap_or_err()?.clone();
        for e in &mut self.entries {
            e.sub
                .cold_start(&heap)
                .map_err(|source| SessionError::Subsystem {
                    subsystem: e.sub.name().to_owned(),
                    op: Op::Restore,
                    source,
                })?;
        }
        Ok(())
    }

    /// Disable `sampler` at every freeze (and re-enable it in `mode` after
    /// a cancel).
    pub fn attach_sampler(&mut self, sampler: Arc<Sampler>, mode: crate::kfence::SampleMode) {
        self.sampler = Some((sampler, mode));
    }

    /// The mode the heap's own KFENCE sampler ([`Heap::kfence`]) is
    /// re-enabled in after a cancel (default: the default time gate). Freeze
    /// always disables it.
    pub fn set_heap_kfence_mode(&mut self, mode: crate::kfence::SampleMode) {
        self.heap_kfence_mode = mode;
    }

    /// Drain `deferred` at every freeze.
    pub fn attach_deferred(&mut self, deferred: Arc<DeferredFrees>) {
        self.deferred = Some(deferred);
    }

    fn heap_or_err(&self) -> Result<&Heap> {
        self.heap
            .as_ref()
            .ok_or(SessionError::NoHeap { state: self.state })
    }

    fn transition(&self, op: Op) -> Result<State> {
        self.state.after(op).ok_or(SessionError::InvalidTransition {
            op,
            from: self.state,
        })
    }

    /// NORMAL/FINISHED → PREPARED: wait for earlier cleanups, then let every
    /// subsystem prepare. A failing subsystem cancels the ones before it
    /// and the session stays where it was.
    pub fn prepare(&mut self) -> Result<()> {
        let next = self.transition(Op::Prepare)?;
        let heap = self.heap_or_err()?.clone();
        // The undo record of an earlier cancel must have run: it shares
        // the cleanup state this prepare fills.
        self.domain.barrier();
        self.report = FreezeReport::default();
        for i in 0..self.entries.len() {
            let e = &mut self.entries[i];
            let mut cx = PrepareCx {
                heap: &heap,
                preserved: &mut self.preserved,
            };
            match e.sub.prepare(&mut cx) {
                Ok(()) => e.prepared = true,
                Err(source) => {
                    let subsystem = e.sub.name().to_owned();
                    self.cancel_inner();
                    self.domain.barrier();
                    return Err(SessionError::Subsystem {
                        subsystem,
                        op: Op::Prepare,
                        source,
                    });
                }
            }
        }
        self.state = next;
        Ok(())
    }

    /// PREPARED → FROZEN: the blackout up to the written image. On error
    /// the session cancels (back to NORMAL) and returns it.
    pub fn freeze(&mut self) -> Result<()> {
        let next = self.transition(Op::Freeze)?;
        let started_ns = monotonic_ns();
        let t = std::time::Instant::now();
        match self.freeze_inner() {
            Ok((frozen, drained)) => {
                self.report.started_ns = started_ns;
                self.report.drained = drained;
                self.report.stats = frozen.stats();
                self.frozen = Some(frozen);
                self.report.freeze = t.elapsed();
                self.state = next;
                Ok(())
            }
            Err(e) => {
                self.cancel_inner();
                Err(e)
            }
        }
    }

    fn freeze_inner(&mut self) -> Result<(FrozenImage, DrainStats)> {
        fault::hit(FaultPoint::BeforeFreeze);
        if let Some((sampler, _)) = &self.sampler {
            sampler.disable();
        }
        let heap = self.heap_or_err()?.clone();
        if let Some(k) = heap.kfence() {
            if k.is_enabled() {
                k.disable();
                self.heap_kfence_disabled = true;
            }
        }
        let drained = match &self.deferred {
            Some(d) => d.drain(),
            None => DrainStats::default(),
        };
        let mut root = Node::root(SESSION_COMPATIBLE);
        root.set_prop("subsystems", self.entries.len() as u64);
        for e in &mut self.entries {
            let mut node = Node::new(e.sub.name(), e.sub.compatible());
            e.sub
                .freeze(&mut node)
                .map_err(|source| SessionError::Subsystem {
                    subsystem: e.sub.name().to_owned(),
                    op: Op::Freeze,
                    source,
                })?;
            root.push_child(node);
        }
        let tree = Tree::new(root);
        fault::hit(FaultPoint::AfterSubsystemFreeze);
        let frozen = heap.freeze(Some(&tree))?;
        let offset = frozen.location().offset;
        let region = heap.region_of(PhysAddr(offset).pfn());
        if region != Some(Region::General) {
            let _ = heap.discard(frozen);
            return Err(SessionError::ImagePlacement {
                offset,
                found: region.map_or("no", Region::name),
            });
        }
        fault::hit(FaultPoint::AfterImageWrite);
        Ok((frozen, drained))
    }

    /// FROZEN → COMMITTED: make the image durable, then publish it in the
    /// other superblock slot. On error the session cancels (back to
    /// NORMAL); the previous generation stays current.
    pub fn commit(&mut self) -> Result<u64> {
        let next = self.transition(Op::Commit)?;
        let t = std::time::Instant::now();
        let heap = self.heap_or_err()?.clone();
        let Some(frozen) = self.frozen.take() else {
            return Err(SessionError::InvalidTransition {
                op: Op::Commit,
                from: self.state,
            });
        };
        let loc = frozen.location();
        if let Err(e) = heap
            .arena()
            .sync(PhysRange::new(PhysAddr(loc.offset), loc.len))
        {
            self.frozen = Some(frozen);
            self.cancel_inner();
            return Err(e.into());
        }
        fault::hit(FaultPoint::AfterImageSync);
        if fault::armed(FaultPoint::TornSuperblock) {
            tear_next_slot(heap.arena(), loc);
            fault::hit(FaultPoint::TornSuperblock);
        }
        let generation = match heap.commit(frozen) {
            Ok(g) => g,
            Err(e) => {
                self.cancel_inner();
                return Err(e.into());
            }
        };
        fault::hit(FaultPoint::AfterPublish);
        self.report.commit = t.elapsed();
        self.report.generation = generation;
        self.state = next;
        // Outside the blackout figures: what the image preserves.
        self.report.preserved_bytes = heap
            .arena()
            .image_bytes()
            .ok()
            .and_then(|b| kho_core::Image::parse(b).ok().map(|i| i.preserved_bytes()))
            .unwrap_or(0);
        Ok(generation)
    }

    /// Freeze and commit.
    pub fn freeze_and_commit(&mut self) -> Result<u64> {
        self.freeze()?;
        self.commit()
    }

    /// The last freeze's figures.
    pub fn freeze_report(&self) -> FreezeReport {
        self.report
    }

    /// PREPARED/FROZEN → NORMAL. Never fails, blocks or allocates: calls
    /// every prepared subsystem's `cancel` (in reverse order), then queues
    /// their cleanup records and the session's own (discard the frozen
    /// image, unpreserve, re-enable the sampler) to run after a grace
    /// period. [`barrier`](Self::barrier) waits for them.
    ///
    /// Cancel in any other state is refused as an invalid transition and
    /// changes nothing.
    pub fn cancel(&mut self) -> Result<()> {
        self.transition(Op::Cancel)?;
        self.cancel_inner();
        Ok(())
    }

    fn cancel_inner(&mut self) {
        for e in self.entries.iter_mut().rev() {
            if e.prepared {
                e.sub.cancel();
                e.prepared = false;
                if let Some(c) = &e.cleanup {
                    self.domain.defer(c);
                }
            }
        }
        // `prepare` ran a barrier, so no runner holds the undo state: the
        // lock is free. Should it ever be held, the state stays here and
        // the next cancel hands it over.
        if let Ok(mut undo) = self.undo.try_lock() {
            std::mem::swap(&mut undo.preserved, &mut self.preserved);
            if undo.frozen.is_none() {
                undo.frozen = self.frozen.take();
            }
            if undo.sampler.is_none() {
                undo.sampler = self.sampler.clone();
            }
            if std::mem::take(&mut self.heap_kfence_disabled) {
                undo.heap_kfence = Some(self.heap_kfence_mode);
            }
            drop(undo);
            self.domain.defer(&self.undo_record);
        }
        self.state = State::Normal;
    }

    /// Run the cleanups whose grace period has passed; never waits.
    pub fn poll(&self) -> usize {
        self.domain.poll()
    }

    /// Wait for every pending cleanup.
    pub fn barrier(&self) {
        self.domain.barrier();
    }

    /// Cleanup steps that failed so far (an unpreserve or discard the heap
    /// refused).
    pub fn cleanup_errors(&self) -> u64 {
        lock(&self.undo).errors
    }

    /// Prepare an `exec` of the successor: clear `FD_CLOEXEC` on the
    /// arena's descriptor and return the environment variable
    /// ([`ARENA_FD_ENV`], descriptor number) to give the new program.
    /// Allowed once committed.
    pub fn exec_env(&self) -> Result<(&'static str, String)> {
        if self.state != State::Committed {
            return Err(SessionError::InvalidTransition {
                op: Op::Commit,
                from: self.state,
            });
        }
        let fd = self.heap_or_err()?.arena().inheritable_fd()?;
        Ok((ARENA_FD_ENV, fd.to_string()))
    }

    /// INCOMING → RESTORED: validate the image, restore the heap, and give
    /// every subsystem its node. A missing or incompatible node is an
    /// error naming expected and found, unless the subsystem chooses a
    /// cold start; a node no subsystem claims is an error.
    ///
    /// Errors found before the heap is restored (a corrupt image) leave the
    /// session INCOMING with the arena untouched; see
    /// [`abandon_handover`](Self::abandon_handover). Errors after it leave
    /// the session NORMAL with the restored heap.
    pub fn restore(&mut self) -> Result<&RestoreReport> {
        let next = self.transition(Op::Restore)?;
        let t = std::time::Instant::now();
        let arena = self
            .arena
            .as_ref()
            .ok_or(SessionError::NoHeap { state: self.state })?;
        // Validate before the arena is consumed.
        let generation = kho_core::Image::parse(arena.image_bytes()?)
            .map_err(crate::Error::from)?
            .header()
            .generation;
        let Some(arena) = self.arena.take() else {
            return Err(SessionError::NoHeap { state: self.state });
        };
        let (heap, mut restored) = Heap::restore(arena)?;
        self.heap = Some(heap.clone());
        lock(&self.undo).heap = Some(heap.clone());
        self.state = State::Normal;
        let tree = restored.tree.take();
        let root = match tree.as_ref().map(Tree::root) {
            Some(root) if root.compatible == SESSION_COMPATIBLE => root,
            other => {
                return Err(SessionError::Incompatible {
                    subsystem: String::new(),
                    expected: SESSION_COMPATIBLE.to_owned(),
                    found: other.map_or_else(|| "<missing>".to_owned(), |r| r.compatible.clone()),
                })
            }
        };
        for child in &root.children {
            if !self.entries.iter().any(|e| e.sub.name() == child.name) {
                return Err(SessionError::Unclaimed {
                    node: child.name.clone(),
                    compatible: child.compatible.clone(),
                });
            }
        }
        let mut report = RestoreReport {
            generation,
            ..RestoreReport::default()
        };
        for e in &mut self.entries {
            let name = e.sub.name().to_owned();
            let node = root.child(&name);
            let mismatch = match node {
                None => Some("<missing>".to_owned()),
                Some(n) if n.compatible != e.sub.compatible() => Some(n.compatible.clone()),
                Some(_) => None,
            };
            if let Some(found) = mismatch {
                let err = SessionError::Incompatible {
                    subsystem: name.clone(),
                    expected: e.sub.compatible().to_owned(),
                    found,
                };
                match e.sub.on_incompatible(&err) {
                    Recovery::Fail => return Err(err),
                    Recovery::ColdStart => {
                        e.sub
                            .cold_start(&heap)
                            .map_err(|source| SessionError::Subsystem {
                                subsystem: name.clone(),
                                op: Op::Restore,
                                source,
                            })?;
                        report.cold_started.push((name, err.to_string()));
                        continue;
                    }
                }
            }
            let Some(node) = node else { continue };
            let mut cx = RestoreCx {
                heap: &heap,
                restored: &mut restored,
            };
            e.sub
                .restore(&mut cx, node)
                .map_err(|source| SessionError::Subsystem {
                    subsystem: name.clone(),
                    op: Op::Restore,
                    source,
                })?;
            report.restored.push(name);
        }
        report.restore = t.elapsed();
        self.restored = Some(restored);
        self.restore_report = report;
        self.state = next;
        Ok(&self.restore_report)
    }

    /// INCOMING → NORMAL without restoring: the image is discarded (a
    /// superblock without it is published), a fresh heap is built over the
    /// arena and every subsystem is cold-started.
    pub fn abandon_handover(&mut self) -> Result<()> {
        if self.state != State::Incoming {
            return Err(SessionError::InvalidTransition {
                op: Op::Restore,
                from: self.state,
            });
        }
        let arena = self
            .arena
            .take()
            .ok_or(SessionError::NoHeap { state: self.state })?;
        arena.discard_image()?;
        let heap = Heap::new(arena)?;
        lock(&self.undo).heap = Some(heap.clone());
        self.heap = Some(heap);
        self.state = State::Normal;
        self.cold_start()
    }

    /// The last restore's report.
    pub fn restore_report(&self) -> &RestoreReport {
        &self.restore_report
    }

    /// RESTORED → FINISHED: every subsystem's `finish`; restored objects and
    /// folios that no subsystem took are freed.
    pub fn finish(&mut self) -> Result<()> {
        let next = self.transition(Op::Finish)?;
        let heap = self.heap_or_err()?.clone();
        for e in &mut self.entries {
            e.sub.finish();
        }
        if let Some(restored) = self.restored.take() {
            let mut unclaimed = 0;
            for c in restored.caches {
                for obj in c.into_objects() {
                    unclaimed += 1;
                    heap.free(obj)?;
                }
            }
            for p in restored.folios {
                unclaimed += 1;
                heap.free_pages(p)?;
            }
            self.restore_report.unclaimed = unclaimed;
        }
        self.state = next;
        Ok(())
    }
}

/// The arena inherited across `exec`: the descriptor named by
/// [`ARENA_FD_ENV`], if set. The variable is removed so that the
/// process's own children do not see it.
pub fn inherited_arena() -> Result<Option<Arena>> {
    let Ok(value) = std::env::var(ARENA_FD_ENV) else {
        return Ok(None);
    };
    let bad = |reason| SessionError::Inherit {
        var: ARENA_FD_ENV,
        value: value.clone(),
        reason,
    };
    let fd: i32 = value.parse().map_err(|_| bad("not a descriptor number"))?;
    let owned = os::take_inherited(fd).map_err(bad)?;
    std::env::remove_var(ARENA_FD_ENV);
    let file = std::fs::File::from(owned);
    Ok(Some(Arena::open_file(file)?))
}

/// Write the first half of the superblock that would publish `loc` into
/// the non-current slot, durably: what a crash in the middle of the slot
/// write leaves. Only for [`FaultPoint::TornSuperblock`].
fn tear_next_slot(arena: &Arena, loc: crate::superblock::ImageLocation) {
    let cur = arena.superblock();
    let next = Superblock {
        generation: cur.generation.wrapping_add(1),
        image: Some(loc),
        flags: 0,
        ..cur
    };
    let raw = next.encode();
    let bytes = zerocopy::IntoBytes::as_bytes(&raw);
    // Slots alternate starting from slot 0 at generation 1.
    let slot = cur.generation % 2;
    if let Some(file) = arena.file() {
        let half = &bytes[..bytes.len() / 2];
        let _ = file.write_at(half, slot * PAGE_SIZE);
        let _ = file.sync_data();
    }
}
