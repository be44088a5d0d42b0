//! Fault injection for crash-consistency and failure-path tests.
//!
//! A thread arms one [`FaultPoint`] (with [`arm`], or from the `KHO_FAULT`
//! environment variable via [`arm_from_env`]); when that thread reaches the
//! point, the process dies there (by `abort` or by `SIGKILL`), or the step
//! fails with an injected I/O error ([`FaultAction::Fail`]). Arming is per
//! thread, so tests running side by side in one process do not see each
//! other's faults. Unarmed, each point costs one relaxed atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Environment variable read by [`arm_from_env`]: `point` or
/// `point:abort` / `point:kill` / `point:fail` (default `kill`).
pub const FAULT_ENV: &str = "KHO_FAULT";

/// A step of the handover where a test may crash the process or make the
/// step fail.
///
/// The points of a predecessor's freeze and commit come first, then the
/// three of every superblock publish (a commit, an abort, and the
/// successor's record that it restored the image at finish), then the
/// successor's restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultPoint {
    /// Freeze started; nothing written yet. `Fail`: freeze fails.
    BeforeFreeze,
    /// Subsystems wrote their nodes; no image yet. `Fail`: freeze fails.
    AfterSubsystemFreeze,
    /// The image is in arena memory but not durable, not published.
    /// `Fail`: freeze fails after writing the image.
    AfterImageWrite,
    /// The image is durable (`msync`), the superblock not written.
    /// `Fail`: commit fails before the slot write.
    AfterImageSync,
    /// Half of the next superblock slot is written and durable (a torn
    /// slot write). `Fail`: the slot write fails halfway.
    TornSuperblock,
    /// The whole next slot is written into the mapping, not yet `msync`ed.
    /// The page is in the page cache, so a process crash here still
    /// publishes it; only a power loss would not. `Fail`: its `msync`
    /// fails.
    BeforeSlotSync,
    /// The new superblock is published and durable. `Fail` has no effect:
    /// nothing after the publish can fail the step.
    AfterPublish,
    /// Successor: the heap claimed the preserved memory; no subsystem
    /// restored yet, nothing written. `Fail`: restore fails here.
    AfterHeapRestore,
    /// Successor: every subsystem restored; the image is not yet recorded
    /// as restored (that is `finish`). `Fail`: restore fails here.
    AfterSubsystemRestore,
}

impl FaultPoint {
    /// Every point, in the order a predecessor's commit and then its
    /// successor reach them.
    pub const ALL: [FaultPoint; 9] = [
        FaultPoint::BeforeFreeze,
        FaultPoint::AfterSubsystemFreeze,
        FaultPoint::AfterImageWrite,
        FaultPoint::AfterImageSync,
        FaultPoint::TornSuperblock,
        FaultPoint::BeforeSlotSync,
        FaultPoint::AfterPublish,
        FaultPoint::AfterHeapRestore,
        FaultPoint::AfterSubsystemRestore,
    ];

    /// The points of a superblock publish.
    pub const PUBLISH: [FaultPoint; 3] = [
        FaultPoint::TornSuperblock,
        FaultPoint::BeforeSlotSync,
        FaultPoint::AfterPublish,
    ];

    /// Kebab-case name, as in `KHO_FAULT`.
    pub const fn name(self) -> &'static str {
        match self {
            FaultPoint::BeforeFreeze => "before-freeze",
            FaultPoint::AfterSubsystemFreeze => "after-subsystem-freeze",
            FaultPoint::AfterImageWrite => "after-image-write",
            FaultPoint::AfterImageSync => "after-image-sync",
            FaultPoint::TornSuperblock => "torn-superblock",
            FaultPoint::BeforeSlotSync => "before-slot-sync",
            FaultPoint::AfterPublish => "after-publish",
            FaultPoint::AfterHeapRestore => "after-heap-restore",
            FaultPoint::AfterSubsystemRestore => "after-subsystem-restore",
        }
    }

    /// The point called `name`.
    pub fn from_name(name: &str) -> Option<FaultPoint> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether a process crash here leaves the superblock being written
    /// current (the slot is complete in the page cache or durable).
    pub const fn publishes(self) -> bool {
        matches!(self, FaultPoint::BeforeSlotSync | FaultPoint::AfterPublish)
    }

    /// Whether the point lies in a successor's restore.
    pub const fn in_restore(self) -> bool {
        matches!(
            self,
            FaultPoint::AfterHeapRestore | FaultPoint::AfterSubsystemRestore
        )
    }

    fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|p| *p == self)
            .map_or(0, |i| i as u8 + 1)
    }
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an armed point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// `abort()`: SIGABRT.
    Abort,
    /// `raise(SIGKILL)`.
    Kill,
    /// The step fails with an injected I/O error (`EIO`); the process
    /// lives on.
    Fail,
}

/// Threads with an armed point; zero keeps unarmed points at one load.
static ARMED_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's armed point (code, 0 for none) and action.
    static ARMED: Cell<(u8, FaultAction)> = const { Cell::new((0, FaultAction::Kill)) };
}

/// Arm `point` for the calling thread.
pub fn arm(point: FaultPoint, action: FaultAction) {
    let was = ARMED.with(|a| a.replace((point.code(), action))).0;
    if was == 0 {
        ARMED_THREADS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Disarm the calling thread.
pub fn disarm() {
    let was = ARMED.with(|a| a.replace((0, FaultAction::Kill))).0;
    if was != 0 {
        ARMED_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Arm the calling thread from [`FAULT_ENV`] if set. Returns the armed
/// point, or an error naming the value that is not a point or an action.
pub fn arm_from_env() -> Result<Option<FaultPoint>, String> {
    let Ok(value) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let (name, action) = match value.split_once(':') {
        Some((n, "abort")) => (n, FaultAction::Abort),
        Some((n, "kill")) => (n, FaultAction::Kill),
        Some((n, "fail")) => (n, FaultAction::Fail),
        Some((_, other)) => {
            return Err(format!(
                "{FAULT_ENV}: expected action abort, kill or fail, found {other:?}"
            ))
        }
        None => (value.as_str(), FaultAction::Kill),
    };
    let point = FaultPoint::from_name(name)
        .ok_or_else(|| format!("{FAULT_ENV}: expected a fault point, found {name:?}"))?;
    arm(point, action);
    Ok(Some(point))
}

/// The action armed at `point` on this thread, if any.
fn armed_action(point: FaultPoint) -> Option<FaultAction> {
    if ARMED_THREADS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let (code, action) = ARMED.with(Cell::get);
    (code == point.code()).then_some(action)
}

/// Whether `point` is armed on this thread.
pub(crate) fn armed(point: FaultPoint) -> bool {
    armed_action(point).is_some()
}

/// Die here if `point` is armed to crash; an injected `EIO` if it is armed
/// to fail.
pub(crate) fn hit(point: FaultPoint) -> std::io::Result<()> {
    match armed_action(point) {
        None => Ok(()),
        Some(FaultAction::Fail) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        Some(FaultAction::Kill) => super::os::kill_self(),
        Some(FaultAction::Abort) => std::process::abort(),
    }
}
