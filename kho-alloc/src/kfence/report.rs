//! Bug reports: a structured value and KFENCE-format text.
//!
//! ```text
//! ==================================================================
//! BUG: KFENCE: use-after-free read in <first frame of the access>
//!
//! Use-after-free read at 0x7f0c3a5ff004 (4B into kfence-#3):
//!   <access stack, or the faulting instruction pointer>
//!
//! kfence-#3: 0x7f0c3a5ff000-0x7f0c3a5ff01f, size=32, cache=size-32, arena 0x107000
//!
//! allocated by thread 4242 at 0.000812s:
//!   <allocation stack>
//!
//! freed by thread 4242 at 0.000901s:
//!   <free stack>
//! ==================================================================
//! ```
//!
//! As in the kernel, an out-of-bounds distance to the right is measured from
//! the object's first byte, to the left from the access to the object; an
//! address inside the object is given as its offset (`4B into`). A fault's
//! site is its instruction pointer, with the loaded object and offset that
//! `addr2line -e OBJECT` resolves; frees name their caller's stack.

use std::fmt;

use kho_core::PhysAddr;

use super::pool::{ObjectState, Placement};
use super::text::Out;

/// The kind of memory access that faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
    /// The platform does not say.
    Unknown,
}

impl Access {
    /// `"read"`, `"write"` or `"access"`.
    pub const fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Unknown => "access",
        }
    }
}

/// Which side of an object an out-of-bounds access hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Below the object's first byte.
    Left,
    /// At or past the object's end.
    Right,
}

impl Side {
    /// `"left"` or `"right"`.
    pub const fn name(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReportKind {
    /// An access hit a guard page next to an allocated object.
    OutOfBounds {
        /// Load or store.
        access: Access,
        /// Side of the object.
        side: Side,
        /// Bytes from the access to the object (left) or from the object's
        /// first byte to the access (right).
        distance: usize,
    },
    /// An access hit the page of a freed object.
    UseAfterFree {
        /// Load or store.
        access: Access,
    },
    /// An access hit pool memory that belongs to no live or freed object.
    InvalidAccess {
        /// Load or store.
        access: Access,
    },
    /// A free of a pointer that is not the start of a live pool object (an
    /// interior pointer, a guard page, an unused slot, or not pool memory).
    InvalidFree,
    /// A second free of a pool object.
    DoubleFree,
    /// On free, bytes of the object's page outside the object no longer held
    /// their canary.
    Corruption {
        /// Up to 16 bytes from the first corrupted one: `Some(byte)` where
        /// the canary was overwritten, `None` where it is intact or outside
        /// the canary area.
        bytes: [Option<u8>; 16],
    },
}

impl ReportKind {
    /// The words after `BUG: KFENCE: ` in the title.
    pub fn title(&self) -> String {
        let mut v = Vec::new();
        title_words(&mut v, self);
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// A snapshot of the pool object a report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Slot index, printed as `kfence-#index`.
    pub index: usize,
    /// Address of the object's first byte.
    pub addr: usize,
    /// Arena offset of the object's first byte.
    pub phys: PhysAddr,
    /// Requested size in bytes.
    pub size: usize,
    /// Name of the cache or size class it was allocated for.
    pub cache: String,
    /// State when the report was made.
    pub state: ObjectState,
    /// Edge of the page the object was placed at.
    pub placement: Placement,
    /// Thread that allocated it.
    pub alloc_thread: u64,
    /// Nanoseconds from pool creation to the allocation.
    pub alloc_ns: u64,
    /// Allocation stack, one line per frame.
    pub alloc_stack: String,
    /// Thread that freed it, nanoseconds from pool creation, and the free
    /// stack, if it was freed.
    pub freed: Option<(u64, u64, String)>,
}

/// A bug found by the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub(crate) kind: ReportKind,
    pub(crate) addr: usize,
    pub(crate) object: Option<Box<ObjectInfo>>,
    pub(crate) text: String,
}

impl Report {
    /// What went wrong.
    pub fn kind(&self) -> ReportKind {
        self.kind
    }

    /// The faulting address, or the pointer passed to free.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The object concerned, if any.
    pub fn object(&self) -> Option<&ObjectInfo> {
        self.object.as_deref()
    }

    /// Signed offset of [`addr`](Self::addr) from the first byte of the
    /// object concerned (for a use-after-free, the offset of the access
    /// into the freed object).
    pub fn offset(&self) -> Option<isize> {
        let obj = self.object.as_deref()?;
        Some((self.addr as isize).wrapping_sub(obj.addr as isize))
    }

    /// The KFENCE-format text, without the separator lines.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first line of the text (`BUG: KFENCE: ...`).
    pub fn title(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Report {}

/// Where reports go. Called in normal (not signal) context, after the pool's
/// internal lock has been released.
pub trait ReportSink: Send + Sync {
    /// Receives one report.
    fn report(&self, report: &Report);
}

impl<F: Fn(&Report) + Send + Sync> ReportSink for F {
    fn report(&self, report: &Report) {
        self(report)
    }
}

/// The default sink: writes the text between separator lines to standard
/// error.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrSink;

impl ReportSink for StderrSink {
    fn report(&self, report: &Report) {
        let mut v = Vec::with_capacity(report.text.len() + 2 * SEPARATOR.len());
        v.s(SEPARATOR);
        v.s(&report.text);
        v.s(SEPARATOR);
        super::sys::write_all(2, &v);
    }
}

/// The line around each report.
pub(crate) const SEPARATOR: &str =
    "==================================================================\n";

/// Read access to object metadata, from a live slot (signal context) or a
/// snapshot.
pub(crate) trait ObjView {
    fn index(&self) -> usize;
    fn addr(&self) -> usize;
    fn phys(&self) -> u64;
    fn size(&self) -> usize;
    fn cache(&self, out: &mut dyn Out);
    fn alloc_info(&self) -> (u64, u64);
    fn alloc_stack(&self, out: &mut dyn Out);
    /// Thread and time of the free, if freed.
    fn free_info(&self) -> Option<(u64, u64)>;
    fn free_stack(&self, out: &mut dyn Out);
}

impl ObjView for ObjectInfo {
    fn index(&self) -> usize {
        self.index
    }
    fn addr(&self) -> usize {
        self.addr
    }
    fn phys(&self) -> u64 {
        self.phys.raw()
    }
    fn size(&self) -> usize {
        self.size
    }
    fn cache(&self, out: &mut dyn Out) {
        out.s(&self.cache);
    }
    fn alloc_info(&self) -> (u64, u64) {
        (self.alloc_thread, self.alloc_ns)
    }
    fn alloc_stack(&self, out: &mut dyn Out) {
        out.s(&self.alloc_stack);
    }
    fn free_info(&self) -> Option<(u64, u64)> {
        self.freed.as_ref().map(|(t, ns, _)| (*t, *ns))
    }
    fn free_stack(&self, out: &mut dyn Out) {
        if let Some((_, _, s)) = &self.freed {
            out.s(s);
        }
    }
}

/// Where the bad access or free happened.
pub(crate) enum Site<'a> {
    /// A fault: the instruction pointer (0 when the platform gives none),
    /// printed with its object and offset when known.
    Ip(usize),
    /// A free: the name of the first frame and the rendered stack.
    Stack { first: &'a str, stack: &'a [u8] },
}

fn title_words(out: &mut dyn Out, kind: &ReportKind) {
    match kind {
        ReportKind::OutOfBounds { access, .. } => {
            out.s("out-of-bounds ");
            out.s(access.name());
        }
        ReportKind::UseAfterFree { access } => {
            out.s("use-after-free ");
            out.s(access.name());
        }
        ReportKind::InvalidAccess { access } => {
            out.s("invalid ");
            out.s(access.name());
        }
        ReportKind::InvalidFree => out.s("invalid free"),
        ReportKind::DoubleFree => out.s("double free"),
        ReportKind::Corruption { .. } => out.s("memory corruption"),
    }
}

fn object_ref(out: &mut dyn Out, obj: Option<&dyn ObjView>, prefix: &str) {
    if let Some(o) = obj {
        out.s(prefix);
        out.s("kfence-#");
        out.dec(o.index() as u64);
        out.s(")");
    }
}

/// `NB left of`, `NB into` or `NB right of` the object, then its name.
fn position(out: &mut dyn Out, addr: usize, o: &dyn ObjView) {
    let start = o.addr();
    let end = start.saturating_add(o.size());
    if addr < start {
        out.dec((start - addr) as u64);
        out.s("B left of ");
    } else if addr < end {
        out.dec((addr - start) as u64);
        out.s("B into ");
    } else {
        out.dec((addr - start) as u64);
        out.s("B right of ");
    }
    out.s("kfence-#");
    out.dec(o.index() as u64);
}

/// A code address, with its object and offset when the loader knows them.
fn code_addr(out: &mut dyn Out, ip: usize) {
    out.hex(ip as u64);
    if let Some((object, offset)) = super::sys::describe_ip_loaded(ip) {
        out.s(" (");
        out.s(object);
        out.s("+");
        out.hex(offset as u64);
        out.s(")");
    }
}

fn timestamp(out: &mut dyn Out, ns: u64) {
    out.dec(ns / 1_000_000_000);
    out.s(".");
    out.dec_padded((ns % 1_000_000_000) / 1000, 6);
    out.s("s");
}

/// Renders a report. Allocation-free when `out` is, so the fault handler can
/// use it.
pub(crate) fn render(
    out: &mut dyn Out,
    kind: &ReportKind,
    addr: usize,
    site: &Site<'_>,
    obj: Option<&dyn ObjView>,
) {
    out.s("BUG: KFENCE: ");
    title_words(out, kind);
    out.s(" in ");
    match site {
        Site::Ip(0) => out.s("<unknown>"),
        Site::Ip(ip) => code_addr(out, *ip),
        Site::Stack { first, .. } => {
            if first.is_empty() {
                out.s("<unknown>");
            } else {
                out.s(first);
            }
        }
    }
    out.s("\n\n");
    match kind {
        ReportKind::OutOfBounds {
            access,
            side,
            distance,
        } => {
            out.s("Out-of-bounds ");
            out.s(access.name());
            out.s(" at ");
            out.hex(addr as u64);
            out.s(" (");
            out.dec(*distance as u64);
            out.s("B ");
            out.s(side.name());
            out.s(" of ");
            match obj {
                Some(o) => {
                    out.s("kfence-#");
                    out.dec(o.index() as u64);
                }
                None => out.s("?"),
            }
            out.s("):\n");
        }
        ReportKind::UseAfterFree { access } => {
            out.s("Use-after-free ");
            out.s(access.name());
            out.s(" at ");
            out.hex(addr as u64);
            if let Some(o) = obj {
                out.s(" (");
                position(out, addr, o);
                out.s(")");
            }
            out.s(":\n");
        }
        ReportKind::InvalidAccess { access } => {
            out.s("Invalid ");
            out.s(access.name());
            out.s(" at ");
            out.hex(addr as u64);
            object_ref(out, obj, " (near ");
            out.s(":\n");
        }
        ReportKind::InvalidFree => {
            out.s("Invalid free of ");
            out.hex(addr as u64);
            match obj {
                Some(o) => {
                    out.s(" (");
                    position(out, addr, o);
                    out.s(")");
                }
                None => out.s(" (not a KFENCE object)"),
            }
            out.s(":\n");
        }
        ReportKind::DoubleFree => {
            out.s("Double free of ");
            out.hex(addr as u64);
            object_ref(out, obj, " (in ");
            out.s(":\n");
        }
        ReportKind::Corruption { bytes } => {
            out.s("Corrupted memory at ");
            out.hex(addr as u64);
            out.s(" [");
            for b in bytes {
                match b {
                    Some(v) => {
                        out.s(" ");
                        out.hex(u64::from(*v));
                    }
                    None => out.s(" ."),
                }
            }
            out.s(" ]");
            object_ref(out, obj, " (in ");
            out.s(":\n");
        }
    }
    match site {
        Site::Ip(0) => {}
        Site::Ip(ip) => {
            out.s("  ip ");
            code_addr(out, *ip);
            out.s("\n");
        }
        Site::Stack { stack, .. } => out.put(stack),
    }
    let Some(o) = obj else {
        return;
    };
    out.s("\nkfence-#");
    out.dec(o.index() as u64);
    out.s(": ");
    out.hex(o.addr() as u64);
    // An empty object has no last byte: its start alone.
    if o.size() > 0 {
        out.s("-");
        out.hex((o.addr() + o.size() - 1) as u64);
    }
    out.s(", size=");
    out.dec(o.size() as u64);
    out.s(", cache=");
    o.cache(out);
    out.s(", arena ");
    out.hex(o.phys());
    out.s("\n\nallocated by thread ");
    let (tid, ns) = o.alloc_info();
    out.dec(tid);
    out.s(" at ");
    timestamp(out, ns);
    out.s(":\n");
    o.alloc_stack(out);
    if let Some((tid, ns)) = o.free_info() {
        out.s("\nfreed by thread ");
        out.dec(tid);
        out.s(" at ");
        timestamp(out, ns);
        out.s(":\n");
        o.free_stack(out);
    }
}

/// Builds a report value, rendering its text.
pub(crate) fn build(
    kind: ReportKind,
    addr: usize,
    site: &Site<'_>,
    object: Option<ObjectInfo>,
) -> Report {
    let mut v = Vec::new();
    render(
        &mut v,
        &kind,
        addr,
        site,
        object.as_ref().map(|o| o as &dyn ObjView),
    );
    Report {
        kind,
        addr,
        object: object.map(Box::new),
        text: String::from_utf8_lossy(&v).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ObjectInfo {
        ObjectInfo {
            index: 3,
            addr: 0x1000,
            phys: PhysAddr(0x7000),
            size: 32,
            cache: "size-32".into(),
            state: ObjectState::Freed,
            placement: Placement::Left,
            alloc_thread: 7,
            alloc_ns: 1_500_000_000,
            alloc_stack: "  #0 a\n".into(),
            freed: Some((8, 2_000_001_000, "  #0 b\n".into())),
        }
    }

    #[test]
    fn out_of_bounds_text() {
        let r = build(
            ReportKind::OutOfBounds {
                access: Access::Read,
                side: Side::Left,
                distance: 1,
            },
            0xfff,
            &Site::Ip(0x4242),
            Some(info()),
        );
        assert_eq!(
            r.text(),
            "BUG: KFENCE: out-of-bounds read in 0x4242\n\n\
             Out-of-bounds read at 0xfff (1B left of kfence-#3):\n  ip 0x4242\n\n\
             kfence-#3: 0x1000-0x101f, size=32, cache=size-32, arena 0x7000\n\n\
             allocated by thread 7 at 1.500000s:\n  #0 a\n\n\
             freed by thread 8 at 2.000001s:\n  #0 b\n"
        );
        assert_eq!(r.title(), "BUG: KFENCE: out-of-bounds read in 0x4242");
    }

    #[test]
    fn corruption_and_invalid_free_text() {
        let mut bytes = [None; 16];
        bytes[0] = Some(0x2a);
        bytes[2] = Some(0);
        let r = build(
            ReportKind::Corruption { bytes },
            0x1020,
            &Site::Stack {
                first: "f",
                stack: b"  #0 f\n",
            },
            Some(info()),
        );
        assert!(r.text().starts_with(
            "BUG: KFENCE: memory corruption in f\n\n\
             Corrupted memory at 0x1020 [ 0x2a . 0x0 . . . . . . . . . . . . . ] (in kfence-#3):\n  #0 f\n"
        ));
        let r = build(
            ReportKind::InvalidFree,
            0x99,
            &Site::Stack {
                first: "",
                stack: b"",
            },
            None,
        );
        assert_eq!(
            r.text(),
            "BUG: KFENCE: invalid free in <unknown>\n\n\
             Invalid free of 0x99 (not a KFENCE object):\n"
        );
        assert_eq!(r.kind().title(), "invalid free");
        assert_eq!(r.offset(), None);
    }

    #[test]
    fn positions_relative_to_the_object() {
        let site = Site::Stack {
            first: "f",
            stack: b"",
        };
        let uaf = build(
            ReportKind::UseAfterFree {
                access: Access::Write,
            },
            0x1005,
            &Site::Ip(0),
            Some(info()),
        );
        assert!(
            uaf.text().starts_with(
                "BUG: KFENCE: use-after-free write in <unknown>\n\n\
                 Use-after-free write at 0x1005 (5B into kfence-#3):\n\n"
            ),
            "{uaf}"
        );
        assert_eq!(uaf.offset(), Some(5));
        for (addr, words) in [
            (0xfff, "(1B left of kfence-#3)"),
            (0x1001, "(1B into kfence-#3)"),
            (0x1ff8, "(4088B right of kfence-#3)"),
        ] {
            let r = build(ReportKind::InvalidFree, addr, &site, Some(info()));
            assert!(
                r.text()
                    .contains(&format!("Invalid free of {addr:#x} {words}:")),
                "{r}"
            );
        }
        let mut empty = info();
        empty.size = 0;
        let r = build(ReportKind::DoubleFree, 0x1000, &site, Some(empty));
        assert!(r.text().contains("\nkfence-#3: 0x1000, size=0, "), "{r}");
        assert!(r.text().contains("(in kfence-#3)"), "{r}");
    }
}
