//! Handover sessions: the bounded, cancellable handover of a running
//! service's state to its successor.
//!
//! A service registers [`Subsystem`]s. The predecessor walks
//!
//! ```text
//!            prepare            freeze             commit
//!   NORMAL ──────────► PREPARED ───────► FROZEN ───────────► COMMITTED ─► exec / exit
//!     ▲  ▲  ▲             │                │                    │
//!     │  │  └── cancel ───┘                │                    │
//!     │  └───── cancel ────────────────────┘                    │
//!     └──────── abort (publishes "no handover") ────────────────┘
//! ```
//!
//! and the successor
//!
//! ```text
//!             restore             finish
//!   INCOMING ─────────► RESTORED ───────► FINISHED ──prepare──► PREPARED ...
//!     │
//!     └── abandon_handover (publishes "no handover", cold start) ──► NORMAL
//! ```
//!
//! [`State::after`] is the whole table, including the operations that keep
//! the state ([`Op::Register`], [`Op::ColdStart`], [`Op::ExecEnv`]); any
//! other step is refused with [`SessionError::InvalidTransition`] naming
//! the operation and the state, and changes nothing.
//!
//! - **prepare** is the heavy work while the service still runs:
//!   subsystems preserve their folios through [`PrepareCx`], which records
//!   them for cancel.
//! - **freeze** is the blackout: the KFENCE samplers (the heap's own and
//!   any attached with [`Session::attach_sampler`]) are disabled, deferred
//!   frees are drained ([`Session::attach_deferred`]), every subsystem
//!   writes its state into its own node of the metadata tree (`compatible`
//!   plus typed properties, pointers as [`PhysRange`]), and the heap scrubs
//!   and records its preservable slabs and writes the image into a fresh
//!   folio of general memory that its own MEMMAP preserves. Freeze takes
//!   no lock an allocation path holds for long and waits on no future
//!   work; it allocates only in proportion to the metadata (see
//!   [`Heap::freeze`]).
//! - **commit** makes the image durable (`msync`), then publishes it by
//!   writing the other superblock slot with the next generation and a CRC.
//!   A crash anywhere before the slot is complete leaves the previous
//!   generation; [`FaultPoint`]s let tests crash, or fail, at every step.
//! - **cancel** never fails, never blocks and never allocates: it calls
//!   each prepared subsystem's `cancel`, and queues the cleanup records
//!   allocated at registration plus the session's own, to which it hands
//!   (by one atomic swap) what must be undone: the frozen image, what
//!   prepare preserved, the samplers freeze disabled. They run after a
//!   grace period of the epoch [`Domain`], at [`Session::poll`],
//!   [`Session::barrier`] or the next prepare.
//! - **abort** takes a committed handover back when the successor cannot
//!   be started (a failed `exec`): it publishes a superblock with no image,
//!   then undoes the rest as cancel does.
//!
//! Frees from a signal handler ([`crate::deferred`]) that arrive after
//! freeze drained the list are not part of the handover: the image records
//! the object as live, the successor receives it among the restored
//! objects no subsystem takes, and [`Session::finish`] frees it.
//!
//! # Restore
//!
//! A successor finds its arena by `exec` ([`inherited_arena`], the memfd or
//! file descriptor named by [`ARENA_FD_ENV`], as QEMU's cpr-exec passes
//! it; the descriptor itself is used, never a reopen of it) or by
//! reopening the arena file (a restart), then calls [`Session::start`],
//! [`Session::restore`] and [`Session::finish`]. The handover is consumed
//! (recorded in the superblock as restored) only by `finish`, once every
//! subsystem holds its state: a successor that dies or fails before that
//! leaves the image for the next one. The outcomes of
//! [`restore`](Session::restore) are:
//!
//! | failure | session afterwards | arena |
//! |---|---|---|
//! | image CRC, format, geometry, generation, placement; tree root, an unclaimed node, an incompatible node the subsystem does not cold-start | INCOMING | untouched |
//! | a subsystem's `restore` or `cold_start` fails, or the restore fails after them | INCOMING: every subsystem that restored was told to [`abort_restore`](Subsystem::abort_restore), the heap dropped | untouched |
//! | the same, but a subsystem kept a handle to the heap | NORMAL over the restored heap; unclaimed memory freed | image recorded as restored |
//!
//! From INCOMING, restore may be called again, or
//! [`abandon_handover`](Session::abandon_handover) starts cold.

pub(crate) mod fault;
#[allow(unsafe_code)]
mod os;
#[allow(unsafe_code)]
mod undo;

use std::sync::Arc;
use std::time::Duration;

use kho_core::{Folio, Image, Node, PhysRange, Tree, TreeError};

use crate::arena::Arena;
use crate::deferred::{DeferredFrees, DrainStats};
use crate::epoch::{Cleanup, Domain};
use crate::heap::{FreezeStats, Heap, Pages, Refused, RestoreError, Restored};
use crate::kfence::{SampleMode, Sampler};
use crate::layout::Layout;

pub use fault::{arm, arm_from_env, disarm, FaultAction, FaultPoint, FAULT_ENV};
pub use os::{cloexec, monotonic_ns};
use undo::{Undo, UndoShared};

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
            (State::Normal | State::Incoming | State::Finished, Op::Register) => Some(self),
            (State::Normal, Op::ColdStart) => Some(State::Normal),
            (State::Normal | State::Finished, Op::Prepare) => Some(State::Prepared),
            (State::Prepared, Op::Freeze) => Some(State::Frozen),
            (State::Frozen, Op::Commit) => Some(State::Committed),
            (State::Prepared | State::Frozen, Op::Cancel) => Some(State::Normal),
            (State::Committed, Op::ExecEnv) => Some(State::Committed),
            (State::Committed, Op::Abort) => Some(State::Normal),
            (State::Incoming, Op::Restore) => Some(State::Restored),
            (State::Incoming, Op::Abandon) => Some(State::Normal),
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
    /// [`Session::register`].
    Register,
    /// [`Session::cold_start`].
    ColdStart,
    /// [`Session::prepare`].
    Prepare,
    /// [`Session::freeze`].
    Freeze,
    /// [`Session::commit`].
    Commit,
    /// [`Session::cancel`].
    Cancel,
    /// [`Session::exec_env`].
    ExecEnv,
    /// [`Session::abort`].
    Abort,
    /// [`Session::restore`].
    Restore,
    /// [`Session::abandon_handover`].
    Abandon,
    /// [`Session::finish`].
    Finish,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 11] = [
        Op::Register,
        Op::ColdStart,
        Op::Prepare,
        Op::Freeze,
        Op::Commit,
        Op::Cancel,
        Op::ExecEnv,
        Op::Abort,
        Op::Restore,
        Op::Abandon,
        Op::Finish,
    ];

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Register => "register",
            Op::ColdStart => "cold start",
            Op::Prepare => "prepare",
            Op::Freeze => "freeze",
            Op::Commit => "commit",
            Op::Cancel => "cancel",
            Op::ExecEnv => "exec",
            Op::Abort => "abort",
            Op::Restore => "restore",
            Op::Abandon => "abandon",
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
    /// is missing (`found` is then `"<missing>"`). For the tree's root,
    /// `subsystem` is empty.
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
    /// The session has no heap (a successor before restore) or no arena.
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

/// Context of [`Subsystem::prepare`]: preservation that the session
/// records and undoes on cancel. Memory a subsystem preserves on the heap
/// directly is not recorded, and a cancel leaves it preserved.
#[derive(Debug)]
pub struct PrepareCx<'a> {
    heap: &'a Heap,
    preserved: &'a mut Vec<Preserved>,
}

impl PrepareCx<'_> {
    /// The heap's geometry.
    pub fn layout(&self) -> &Layout {
        self.heap.layout()
    }

    /// Preserve `pages` across the handover (undone on cancel).
    pub fn preserve_pages(&mut self, pages: &Pages) -> crate::Result<()> {
        self.heap.preserve_pages(pages)?;
        self.preserved.push(Preserved::Folio(pages.folio()));
        Ok(())
    }

    /// Preserve the folio `folio` of arena memory (undone on cancel).
    pub fn preserve_folio(&mut self, folio: Folio) -> crate::Result<()> {
        self.heap.preserve_folio(folio)?;
        self.preserved.push(Preserved::Folio(folio));
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
    /// `compatible`). From here until cancel or abort, the state must not
    /// change.
    fn freeze(&mut self, node: &mut Node) -> std::result::Result<(), BoxError>;
    /// Abandon the handover (cancel, or abort of a committed one). Never
    /// blocks, allocates or fails.
    fn cancel(&mut self);
    /// Successor: take the state back from `node`. On error, take nothing
    /// (or give it back in [`abort_restore`](Subsystem::abort_restore)).
    fn restore(&mut self, cx: &mut RestoreCx<'_>, node: &Node)
        -> std::result::Result<(), BoxError>;
    /// Successor: the restore failed after this subsystem's `restore` or
    /// `cold_start` ran (in this subsystem or a later one). Give back
    /// everything they took — objects and folios to the heap, and every
    /// handle to it — so that the session can return the arena unconsumed.
    /// Never fails. The default does nothing, which is right for a
    /// subsystem that keeps no memory or heap handle.
    fn abort_restore(&mut self) {}
    /// Successor: the handover is complete; serve.
    fn finish(&mut self) {}
    /// Successor: the node is missing or incompatible. The default fails
    /// the restore; return [`Recovery::ColdStart`] to start empty instead.
    /// Called while the image is validated, before anything is restored.
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
    /// No handover; call [`Session::cold_start`] once the subsystems are
    /// registered.
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

/// What restore does with a subsystem, decided while validating.
enum Plan {
    Restore,
    Cold(String),
}

/// A handover session.
pub struct Session {
    state: State,
    heap: Option<Heap>,
    arena: Option<Arena>,
    entries: Vec<Entry>,
    domain: Domain,
    sampler: Option<(Arc<Sampler>, SampleMode)>,
    /// Mode of the heap's own sampler ([`Heap::kfence`]) after a cancel.
    heap_kfence_mode: SampleMode,
    deferred: Option<Arc<DeferredFrees>>,
    /// What a cancel would undo now (`None` only in cancel's hand-over).
    undo: Option<Box<Undo>>,
    undo_shared: Arc<UndoShared>,
    undo_record: Cleanup,
    /// Whether [`exec_env`](Self::exec_env) cleared `FD_CLOEXEC`.
    inheritable: bool,
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

impl Session {
    fn build(heap: Option<Heap>, arena: Option<Arena>, state: State) -> Session {
        let undo_shared = Arc::new(UndoShared::default());
        let u = Arc::clone(&undo_shared);
        let undo_record = Cleanup::new(move || u.run_pending());
        let undo = heap.as_ref().map(|h| {
            Box::new(Undo {
                heap: Some(h.clone()),
                ..Undo::default()
            })
        });
        Session {
            state,
            heap,
            arena,
            entries: Vec::new(),
            domain: Domain::new(DEFAULT_READERS),
            sampler: None,
            heap_kfence_mode: SampleMode::default(),
            deferred: None,
            undo,
            undo_shared,
            undo_record,
            inheritable: false,
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
    /// built over the arena, the session is [`State::Normal`], and
    /// [`cold_start`](Self::cold_start) comes once the subsystems are
    /// registered.
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
    /// record is allocated now.
    pub fn register(&mut self, sub: Box<dyn Subsystem>) -> Result<()> {
        self.transition(Op::Register)?;
        if self.entries.iter().any(|e| e.sub.name() == sub.name()) {
            return Err(SessionError::DuplicateSubsystem {
                name: sub.name().to_owned(),
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

    /// NORMAL: call [`Subsystem::cold_start`] on every subsystem (a
    /// successor that found no handover, or a first start).
    pub fn cold_start(&mut self) -> Result<()> {
        self.transition(Op::ColdStart)?;
        self.cold_start_all()
    }

    fn cold_start_all(&mut self) -> Result<()> {
        let heap = self.heap_or_err()?.clone();
        for e in &mut self.entries {
            e.sub
                .cold_start(&heap)
                .map_err(|source| SessionError::Subsystem {
                    subsystem: e.sub.name().to_owned(),
                    op: Op::ColdStart,
                    source,
                })?;
        }
        Ok(())
    }

    /// Disable `sampler` at every freeze (and, if freeze disabled it,
    /// re-enable it in `mode` after a cancel or abort).
    pub fn attach_sampler(&mut self, sampler: Arc<Sampler>, mode: SampleMode) {
        self.sampler = Some((sampler, mode));
    }

    /// The mode the heap's own KFENCE sampler ([`Heap::kfence`]) is
    /// re-enabled in after a cancel or abort, if freeze disabled it
    /// (default: the default time gate).
    pub fn set_heap_kfence_mode(&mut self, mode: SampleMode) {
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

    /// Wait until the undo record of an earlier cancel has run: prepare
    /// preserves the same memory again.
    fn settle_undo(&self) {
        loop {
            self.domain.wait_for(&self.undo_record);
            if self.undo_shared.pending.is_empty() {
                return;
            }
            // Handed over while the record was running: run it again.
            self.domain.defer(&self.undo_record);
        }
    }

    /// The working undo record, created (or reused) if needed. Never called
    /// from cancel.
    fn undo_mut(&mut self) -> &mut Undo {
        let heap = self.heap.clone();
        let shared = &self.undo_shared;
        let u = self
            .undo
            .get_or_insert_with(|| shared.spare.take().unwrap_or_default());
        if u.heap.is_none() {
            u.heap = heap;
        }
        u
    }

    /// NORMAL/FINISHED → PREPARED: wait for an earlier cancel's cleanup,
    /// then let every subsystem prepare. A failing subsystem cancels the
    /// ones before it and the session stays where it was.
    pub fn prepare(&mut self) -> Result<()> {
        let next = self.transition(Op::Prepare)?;
        let heap = self.heap_or_err()?.clone();
        self.settle_undo();
        self.report = FreezeReport::default();
        self.undo_mut();
        let mut failed = None;
        {
            let preserved = match self.undo.as_mut() {
                Some(u) => &mut u.preserved,
                None => return Err(SessionError::NoHeap { state: self.state }),
            };
            for e in &mut self.entries {
                let mut cx = PrepareCx {
                    heap: &heap,
                    preserved,
                };
                match e.sub.prepare(&mut cx) {
                    Ok(()) => e.prepared = true,
                    Err(source) => {
                        failed = Some(SessionError::Subsystem {
                            subsystem: e.sub.name().to_owned(),
                            op: Op::Prepare,
                            source,
                        });
                        break;
                    }
                }
            }
        }
        if let Some(err) = failed {
            let from = self.state;
            self.cancel_inner();
            self.settle_undo();
            self.state = from;
            return Err(err);
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
            Ok(drained) => {
                self.report.started_ns = started_ns;
                self.report.drained = drained;
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

    fn freeze_inner(&mut self) -> Result<DrainStats> {
        let io = |source| SessionError::Io {
            op: "freeze",
            source,
        };
        fault::hit(FaultPoint::BeforeFreeze).map_err(io)?;
        let heap = self.heap_or_err()?.clone();
        let sampler = self.sampler.clone();
        let heap_mode = self.heap_kfence_mode;
        let undo = self.undo_mut();
        // Re-enabled on cancel only if freeze is what turned it off.
        if let Some((s, mode)) = sampler {
            if s.is_enabled() {
                s.disable();
                undo.sampler = Some((s, mode));
            }
        }
        if let Some(k) = heap.kfence() {
            if k.is_enabled() {
                k.disable();
                undo.heap_kfence = Some(heap_mode);
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
        fault::hit(FaultPoint::AfterSubsystemFreeze).map_err(io)?;
        let frozen = heap.freeze(Some(&tree))?;
        self.report.stats = frozen.stats();
        self.undo_mut().frozen = Some(frozen);
        Ok(drained)
    }

    /// FROZEN → COMMITTED: make the image durable, then publish it in the
    /// other superblock slot. On error the image is discarded and the
    /// session cancels (back to NORMAL); the previous generation stays
    /// current. Once published, commit does not fail.
    pub fn commit(&mut self) -> Result<u64> {
        let next = self.transition(Op::Commit)?;
        let t = std::time::Instant::now();
        let heap = self.heap_or_err()?.clone();
        let Some(frozen) = self.undo.as_mut().and_then(|u| u.frozen.take()) else {
            return Err(SessionError::InvalidTransition {
                op: Op::Commit,
                from: self.state,
            });
        };
        let generation = match heap.commit(frozen) {
            Ok(g) => g,
            Err(e) => {
                self.cancel_inner();
                return Err(e.into());
            }
        };
        self.report.commit = t.elapsed();
        self.report.generation = generation;
        self.report.preserved_bytes = self.report.stats.preserved_bytes;
        self.state = next;
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
    /// image, unpreserve what prepare preserved, re-enable the samplers
    /// freeze disabled) to run after a grace period.
    /// [`barrier`](Self::barrier) waits for them.
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
        if let Some(mut u) = self.undo.take() {
            // Only this session fills the mailbox and it is empty unless a
            // record was handed over while the cleanup was running (then it
            // is chained, never dropped here: dropping could block).
            u.next = self.undo_shared.pending.take();
            if let Some(back) = self.undo_shared.pending.put(u) {
                self.undo = Some(back);
            }
            self.domain.defer(&self.undo_record);
        }
        self.state = State::Normal;
    }

    /// COMMITTED → NORMAL, when the successor cannot be started (a failed
    /// `exec`): publish a superblock with no image, so that no successor
    /// restores this handover, set `FD_CLOEXEC` again if
    /// [`exec_env`](Self::exec_env) cleared it, then undo the rest as
    /// [`cancel`](Self::cancel) does (subsystems' `cancel`, unpreserve,
    /// re-enable samplers). On error (the publish failed) the session stays
    /// COMMITTED and the handover published. Returns the new generation.
    pub fn abort(&mut self) -> Result<u64> {
        self.transition(Op::Abort)?;
        let heap = self.heap_or_err()?.clone();
        let generation = heap.withdraw()?;
        if std::mem::take(&mut self.inheritable) {
            if let Some(f) = heap.arena().file() {
                // The successor never ran; its descriptor must not leak
                // into the service's later children.
                let _ = os::set_cloexec(std::os::fd::AsRawFd::as_raw_fd(f), true);
            }
        }
        self.cancel_inner();
        Ok(generation)
    }

    /// Run the cleanups whose grace period has passed; never waits.
    pub fn poll(&self) -> usize {
        self.domain.poll()
    }

    /// Wait for every cleanup queued before the call.
    pub fn barrier(&self) {
        self.domain.barrier();
    }

    /// Cleanup steps that failed so far: an unpreserve or discard the heap
    /// refused, a sampler that would not re-enable, a restored object
    /// `finish` could not free.
    pub fn cleanup_errors(&self) -> u64 {
        self.undo_shared
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Prepare an `exec` of the successor: clear `FD_CLOEXEC` on the
    /// arena's descriptor and return the environment variable
    /// ([`ARENA_FD_ENV`], descriptor number) to give the new program.
    /// Allowed once committed; [`abort`](Self::abort) sets `FD_CLOEXEC`
    /// again.
    pub fn exec_env(&mut self) -> Result<(&'static str, String)> {
        self.transition(Op::ExecEnv)?;
        let fd = self.heap_or_err()?.arena().inheritable_fd()?;
        self.inheritable = true;
        Ok((ARENA_FD_ENV, fd.to_string()))
    }

    /// INCOMING → RESTORED: validate the image and the metadata tree
    /// against the registered subsystems, restore the heap, and give every
    /// subsystem its node (or a cold start, if it chose one for a missing
    /// or incompatible node). The image is recorded as restored by
    /// [`finish`](Self::finish), not here. See the
    /// [module documentation](self#restore) for each failure's outcome.
    pub fn restore(&mut self) -> Result<&RestoreReport> {
        let next = self.transition(Op::Restore)?;
        let t = std::time::Instant::now();
        let arena = self
            .arena
            .take()
            .ok_or(SessionError::NoHeap { state: self.state })?;
        let mut plan = Vec::with_capacity(self.entries.len());
        let entries = &mut self.entries;
        let result = Heap::restore_with(arena, |image| validate(entries, image, &mut plan), false);
        let (heap, mut restored) = match result {
            Ok(r) => r,
            Err(refused) => {
                let Refused { arena, error } = *refused;
                self.arena = arena;
                return Err(match error {
                    RestoreError::Heap(e) => e.into(),
                    RestoreError::Check(e) => e,
                });
            }
        };
        let io = |source| SessionError::Io {
            op: "restore",
            source,
        };
        if let Err(e) = fault::hit(FaultPoint::AfterHeapRestore) {
            return Err(self.roll_back(0, heap, restored, io(e)));
        }
        let tree = restored.tree.take();
        let mut report = RestoreReport {
            generation: restored.generation,
            ..RestoreReport::default()
        };
        for (i, step) in plan.iter().enumerate() {
            let e = &mut self.entries[i];
            let name = e.sub.name().to_owned();
            let r = match step {
                Plan::Cold(why) => e.sub.cold_start(&heap).map(|()| {
                    report.cold_started.push((name.clone(), why.clone()));
                }),
                Plan::Restore => {
                    let node = tree.as_ref().and_then(|t| t.root().child(&name));
                    match node {
                        Some(node) => {
                            let mut cx = RestoreCx {
                                heap: &heap,
                                restored: &mut restored,
                            };
                            e.sub.restore(&mut cx, node).map(|()| {
                                report.restored.push(name.clone());
                            })
                        }
                        // Validated above; reported rather than assumed.
                        None => Err(format!("node /{name} vanished").into()),
                    }
                }
            };
            if let Err(source) = r {
                let err = SessionError::Subsystem {
                    subsystem: name,
                    op: Op::Restore,
                    source,
                };
                return Err(self.roll_back(i + 1, heap, restored, err));
            }
        }
        if let Err(e) = fault::hit(FaultPoint::AfterSubsystemRestore) {
            let n = self.entries.len();
            return Err(self.roll_back(n, heap, restored, io(e)));
        }
        report.restore = t.elapsed();
        self.heap = Some(heap);
        self.restored = Some(restored);
        self.restore_report = report;
        self.undo_mut();
        self.state = next;
        Ok(&self.restore_report)
    }

    /// Undo a restore that failed after the heap was built: the first `n`
    /// subsystems give back what they took, then the session returns to
    /// INCOMING with the arena unconsumed — or, if a handle to the heap
    /// survived, stays over that heap in NORMAL with the image consumed.
    fn roll_back(
        &mut self,
        n: usize,
        heap: Heap,
        restored: Restored,
        err: SessionError,
    ) -> SessionError {
        for e in self.entries[..n].iter_mut().rev() {
            e.sub.abort_restore();
        }
        match heap.into_arena() {
            Ok(arena) => {
                drop(restored);
                self.arena = Some(arena);
                self.state = State::Incoming;
            }
            Err(heap) => {
                let failed = free_restored(&heap, restored).1;
                let unmarked = u64::from(heap.mark_restored().is_err());
                self.undo_shared
                    .errors
                    .fetch_add(failed + unmarked, std::sync::atomic::Ordering::Relaxed);
                self.heap = Some(heap);
                self.undo_mut();
                self.state = State::Normal;
            }
        }
        err
    }

    /// INCOMING → NORMAL without restoring: publish a superblock with no
    /// image (so that no later successor restores it over memory the new
    /// heap reuses), build a fresh heap over the arena, and cold-start
    /// every subsystem. If the publish fails the session stays INCOMING.
    pub fn abandon_handover(&mut self) -> Result<()> {
        self.transition(Op::Abandon)?;
        let arena = self
            .arena
            .take()
            .ok_or(SessionError::NoHeap { state: self.state })?;
        if let Err(e) = arena.discard_image() {
            self.arena = Some(arena);
            return Err(e.into());
        }
        let heap = Heap::new(arena)?;
        self.heap = Some(heap);
        self.undo_mut();
        self.state = State::Normal;
        self.cold_start_all()
    }

    /// The last restore's report.
    pub fn restore_report(&self) -> &RestoreReport {
        &self.restore_report
    }

    /// RESTORED → FINISHED: record in the superblock that the image was
    /// restored (from here on a crash no longer hands it to another
    /// successor), call every subsystem's `finish`, and free the restored
    /// objects and folios no subsystem took. If the record cannot be
    /// written the session stays RESTORED.
    pub fn finish(&mut self) -> Result<()> {
        let next = self.transition(Op::Finish)?;
        let heap = self.heap_or_err()?.clone();
        heap.mark_restored()?;
        for e in &mut self.entries {
            e.sub.finish();
        }
        if let Some(restored) = self.restored.take() {
            let (unclaimed, failed) = free_restored(&heap, restored);
            self.restore_report.unclaimed = unclaimed;
            self.undo_shared
                .errors
                .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        }
        self.state = next;
        Ok(())
    }
}

impl Drop for Session {
    /// A session dropped mid-handover cancels it, so that its heap is left
    /// with nothing preserved for a handover that will not happen.
    fn drop(&mut self) {
        if matches!(self.state, State::Prepared | State::Frozen) {
            self.cancel_inner();
        }
    }
}

/// Check the image's tree against the subsystems before anything is
/// restored; fills `plan` with what each subsystem does.
fn validate(entries: &mut [Entry], image: &Image<'_>, plan: &mut Vec<Plan>) -> Result<()> {
    let root = match image.tree().map(Tree::root) {
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
        if !entries.iter().any(|e| e.sub.name() == child.name) {
            return Err(SessionError::Unclaimed {
                node: child.name.clone(),
                compatible: child.compatible.clone(),
            });
        }
    }
    plan.clear();
    for e in entries.iter_mut() {
        let name = e.sub.name();
        let found = match root.child(name) {
            None => Some("<missing>".to_owned()),
            Some(n) if n.compatible != e.sub.compatible() => Some(n.compatible.clone()),
            Some(_) => None,
        };
        let Some(found) = found else {
            plan.push(Plan::Restore);
            continue;
        };
        let err = SessionError::Incompatible {
            subsystem: name.to_owned(),
            expected: e.sub.compatible().to_owned(),
            found,
        };
        match e.sub.on_incompatible(&err) {
            Recovery::Fail => return Err(err),
            Recovery::ColdStart => plan.push(Plan::Cold(err.to_string())),
        }
    }
    Ok(())
}

/// Free what no subsystem took: (objects and folios, frees refused).
fn free_restored(heap: &Heap, restored: Restored) -> (u64, u64) {
    let (mut n, mut failed) = (0, 0);
    for c in restored.caches {
        for obj in c.into_objects() {
            n += 1;
            failed += u64::from(heap.free(obj).is_err());
        }
    }
    for p in restored.folios {
        n += 1;
        failed += u64::from(heap.free_pages(p).is_err());
    }
    (n, failed)
}

/// The arena inherited across `exec`: the descriptor named by
/// [`ARENA_FD_ENV`], if set, opened as it is (a reopen would be another
/// open file, not the predecessor's). `FD_CLOEXEC` is set on it again and
/// the variable removed, so that the process's own children see neither.
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
