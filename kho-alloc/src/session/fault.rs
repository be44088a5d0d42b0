//! Fault injection for crash-consistency tests.
//!
//! A process arms one [`FaultPoint`] (with [`arm`], or from the
//! `KHO_FAULT` environment variable via [`arm_from_env`]); when the commit
//! path reaches that point the process dies there, by `abort` or by
//! `SIGKILL`. Unarmed, each point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};

/// Environment variable read by [`arm_from_env`]: `point` or
/// `point:abort` / `point:kill` (default `kill`).
pub const FAULT_ENV: &str = "KHO_FAULT";

/// A step of the freeze and commit path where a test may crash the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultPoint {
    /// Freeze started; nothing written yet.
    BeforeFreeze,
    /// Subsystems wrote their nodes; no image yet.
    AfterSubsystemFreeze,
    /// The image is in arena memory but not durable, not published.
    AfterImageWrite,
    /// The image is durable (`msync`), the superblock not written.
    AfterImageSync,
    /// Half of the next superblock slot is written (a torn slot write).
    TornSuperblock,
    /// The new superblock is published and durable.
    AfterPublish,
}

impl FaultPoint {
    /// Every point, in the order the commit path reaches them.
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::BeforeFreeze,
        FaultPoint::AfterSubsystemFreeze,
        FaultPoint::AfterImageWrite,
        FaultPoint::AfterImageSync,
        FaultPoint::TornSuperblock,
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
            FaultPoint::AfterPublish => "after-publish",
        }
    }

    /// The point called `name`.
    pub fn from_name(name: &str) -> Option<FaultPoint> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether a crash here must leave the new image published.
    pub const fn publishes(self) -> bool {
        matches!(self, FaultPoint::AfterPublish)
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

/// How an armed point kills the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// `abort()`: SIGABRT.
    Abort,
    /// `raise(SIGKILL)`.
    Kill,
}

static ARMED: AtomicU8 = AtomicU8::new(0);
static ACTION: AtomicU8 = AtomicU8::new(0);

/// Arm `point`: the process dies when it reaches it.
pub fn arm(point: FaultPoint, action: FaultAction) {
    ACTION.store(u8::from(action == FaultAction::Kill), Ordering::SeqCst);
    ARMED.store(point.code(), Ordering::SeqCst);
}

/// Disarm.
pub fn disarm() {
    ARMED.store(0, Ordering::SeqCst);
}

/// Arm from [`FAULT_ENV`] if set. Returns the armed point, or an error
/// naming the value that is not a point.
pub fn arm_from_env() -> Result<Option<FaultPoint>, String> {
    let Ok(value) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let (name, action) = match value.split_once(':') {
        Some((n, "abort")) => (n, FaultAction::Abort),
        Some((n, "kill")) => (n, FaultAction::Kill),
        Some((_, other)) => {
            return Err(format!(
                "{FAULT_ENV}: expected action abort or kill, found {other:?}"
            ))
        }
        None => (value.as_str(), FaultAction::Kill),
    };
    let point = FaultPoint::from_name(name)
        .ok_or_else(|| format!("{FAULT_ENV}: expected a fault point, found {name:?}"))?;
    arm(point, action);
    Ok(Some(point))
}

/// Whether `point` is armed.
pub(crate) fn armed(point: FaultPoint) -> bool {
    ARMED.load(Ordering::Relaxed) == point.code()
}

/// Die here if `point` is armed.
pub(crate) fn hit(point: FaultPoint) {
    if armed(point) {
        if ACTION.load(Ordering::SeqCst) == 1 {
            super::os::kill_self();
        }
        std::process::abort();
    }
}
