//! Errors of the arena, the allocators and the handover paths.

use std::io;

use kho_core::{BuildError, MapError, ParseError};

/// Why one superblock slot was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The slot does not start with the arena magic.
    #[error("bad magic at offset {offset:#x}: expected {expected:#018x}, found {found:#018x}")]
    BadMagic {
        /// Byte offset of the magic in the arena.
        offset: u64,
        /// The arena magic.
        expected: u64,
        /// What the slot holds.
        found: u64,
    },
    /// The slot checksum does not match its contents.
    #[error("bad checksum at offset {offset:#x}: expected {expected:#010x}, found {found:#010x}")]
    BadCrc {
        /// Byte offset of the checksum in the arena.
        offset: u64,
        /// CRC32 computed over the slot.
        expected: u32,
        /// CRC32 stored in the slot.
        found: u32,
    },
    /// A format version this build does not read.
    #[error(
        "unsupported format version at offset {offset:#x}: expected {expected}, found {found}"
    )]
    BadVersion {
        /// Byte offset of the version field.
        offset: u64,
        /// The supported version.
        expected: u32,
        /// The stored version.
        found: u32,
    },
    /// A geometry field that is inconsistent (regions overlapping, out of
    /// the arena, misaligned, or an arena size that differs from the file).
    #[error(
        "bad geometry at offset {offset:#x}: {what}: expected {expected:#x}, found {found:#x}"
    )]
    BadGeometry {
        /// Byte offset of the field.
        offset: u64,
        /// Which field.
        what: &'static str,
        /// The bound or value it had to satisfy.
        expected: u64,
        /// The stored value.
        found: u64,
    },
}

/// Errors of kho-alloc.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on the backing file or mapping failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation (`"open"`, `"mmap"`, `"msync"`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file or requested size is smaller than an arena can be.
    #[error("arena of {len:#x} bytes is too small: need at least {min:#x}")]
    TooSmall {
        /// Bytes available.
        len: u64,
        /// Bytes required.
        min: u64,
    },
    /// Neither superblock slot carries the arena magic: not an arena.
    #[error("not a kho arena: magic at offset {offset:#x}: expected {expected:#018x}, found {found:#018x}")]
    Foreign {
        /// Byte offset of the magic.
        offset: u64,
        /// The arena magic.
        expected: u64,
        /// What the file holds there.
        found: u64,
    },
    /// Both superblock slots are invalid.
    #[error("both superblocks are bad: slot 0: {slot0}; slot 1: {slot1}")]
    BothSuperblocksBad {
        /// Why slot 0 was rejected.
        slot0: SlotError,
        /// Why slot 1 was rejected.
        slot1: SlotError,
    },
    /// A geometry value does not match what the arena records.
    #[error("geometry mismatch: {what}: expected {expected:#x}, found {found:#x}")]
    GeometryMismatch {
        /// Which quantity.
        what: &'static str,
        /// The arena's value.
        expected: u64,
        /// The other value (image, configuration).
        found: u64,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {what}: {value:#x} (limit {limit:#x})")]
    InvalidConfig {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The bound it violates.
        limit: u64,
    },
    /// A byte range outside the arena.
    #[error("range {offset:#x}+{len:#x} is outside the arena of {size:#x} bytes")]
    OutOfBounds {
        /// First byte of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Arena size.
        size: u64,
    },
    /// A write to an arena opened read-only.
    #[error("arena is mapped read-only")]
    ReadOnly,
    /// No free block of the requested order in the zone.
    #[error("out of memory: no free block of order {order} in the {zone} zone")]
    OutOfMemory {
        /// The order requested.
        order: u8,
        /// The zone searched.
        zone: &'static str,
    },
    /// `NOWAIT` was given and the allocator lock was held by someone else.
    #[error("would block: the {zone} zone is busy and NOWAIT was given")]
    WouldBlock {
        /// The busy zone.
        zone: &'static str,
    },
    /// An order above the allocator's maximum.
    #[error("order {order} exceeds the maximum order {max}")]
    InvalidOrder {
        /// The order given.
        order: u8,
        /// The allocator's maximum order.
        max: u8,
    },
    /// An object size the allocator cannot serve.
    #[error("object size {size:#x} with alignment {align:#x} is unsupported (maximum {max:#x})")]
    BadSize {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// Largest supported size.
        max: u64,
    },
    /// A free or lookup of an address that is not an allocated block head.
    #[error("address {addr:#x} is not {expected}")]
    NotAllocated {
        /// The address given.
        addr: u64,
        /// What it should have been.
        expected: &'static str,
    },
    /// A handle from a different heap.
    #[error("handle belongs to heap {found}, not heap {expected}")]
    WrongHeap {
        /// This heap's id.
        expected: u64,
        /// The handle's heap id.
        found: u64,
    },
    /// Preservation of memory that must never be preserved.
    #[error("refusing to preserve {addr:#x}+{len:#x}: page {pfn:#x} is {region} memory")]
    PreserveRefused {
        /// First byte of the request.
        addr: u64,
        /// Length of the request.
        len: u64,
        /// The offending page.
        pfn: u64,
        /// Its region.
        region: &'static str,
    },
    /// The preserved-memory map refused a change.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A preservable cache name already used with another geometry.
    #[error("cache {name:?}: {what}: expected {expected:#x}, found {found:#x}")]
    CacheMismatch {
        /// Cache name.
        name: String,
        /// Which property.
        what: &'static str,
        /// The existing (or restored) value.
        expected: u64,
        /// The requested value.
        found: u64,
    },
    /// A name that does not fit the image records.
    #[error("cache name of {len} bytes is too long (maximum {max})")]
    NameTooLong {
        /// Name length.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// The handover image failed validation.
    #[error("invalid handover image: {0}")]
    Image(#[from] ParseError),
    /// The handover image could not be written.
    #[error("cannot build handover image: {0}")]
    Build(#[from] BuildError),
    /// The arena has no committed handover image.
    #[error("the arena has no handover image")]
    NoImage,
    /// The arena's image was already restored by a successor.
    #[error("the handover image of generation {generation} was already restored")]
    AlreadyRestored {
        /// Generation of the superblock that recorded the restore.
        generation: u64,
    },
    /// The image bytes are inconsistent with the arena state.
    #[error("image inconsistent at {addr:#x}: {what}: expected {expected:#x}, found {found:#x}")]
    Inconsistent {
        /// Arena address concerned.
        addr: u64,
        /// What is wrong.
        what: &'static str,
        /// The value required.
        expected: u64,
        /// The value found.
        found: u64,
    },
    /// The KFENCE sampler could not be set up.
    #[error("KFENCE: {0}")]
    Kfence(#[from] crate::kfence::KfenceError),
    /// The KFENCE pool found a bug while freeing the object at `addr`; the
    /// full report went to the pool's report sink.
    #[error("{title} (object at {addr:#x})")]
    KfenceReport {
        /// Arena address of the object.
        addr: u64,
        /// The report's title line.
        title: String,
    },
    /// Another arena holds the file: a writable arena excludes every
    /// other, a read-only one excludes writers.
    #[error("arena {} is busy: {holder}", path.display())]
    Busy {
        /// The file (for a descriptor, what `/proc/self/fd` names).
        path: std::path::PathBuf,
        /// Who holds it.
        holder: &'static str,
    },
    /// Preservation of memory that is not part of a folio handed to an
    /// owner: free pages, slab pages, the heap's own image.
    #[error("refusing to preserve {addr:#x}+{len:#x}: page {pfn:#x} is {found}")]
    NotPreservable {
        /// First byte of the request.
        addr: u64,
        /// Length of the request.
        len: u64,
        /// The offending page.
        pfn: u64,
        /// What it is instead.
        found: &'static str,
    },
    /// A fresh heap over an arena whose handover image was not restored.
    #[error(
        "the arena holds an unrestored handover image of generation {generation} at {offset:#x}: restore or discard it first"
    )]
    PendingHandover {
        /// Generation of the superblock pointing at the image.
        generation: u64,
        /// Arena offset of the image.
        offset: u64,
    },
}

/// Result alias for kho-alloc.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}
