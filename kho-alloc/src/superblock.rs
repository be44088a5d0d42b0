//! The superblock slots at pages 0 and 1 (LMDB-style meta pages).
//!
//! Each slot is one [`RawSuperblock`] at the start of its page, the rest of
//! the page zero. Byte layout (little-endian):
//!
//! ```text
//! 0x00 magic        u64  b"KHOARENA"
//! 0x08 version      u32  SUPERBLOCK_VERSION
//! 0x0c page_shift   u32  12
//! 0x10 arena_size   u64  bytes
//! 0x18 scratch      u64 start page, u64 pages
//! 0x28 kfence       u64 start page, u64 pages
//! 0x38 preservable  u64 start page, u64 pages
//! 0x48 general      u64 start page, u64 pages
//! 0x58 max_order    u32
//! 0x5c flags        u32  bit 0: the image was restored by a successor
//! 0x60 generation   u64
//! 0x68 image_offset u64  0 with image_len 0: no image
//! 0x70 image_len    u64
//! 0x78 image_crc    u32  CRC32 of the image bytes
//! 0x7c crc          u32  CRC32 of bytes 0x00..0x7c
//! ```
//!
//! A reader validates both slots and uses the valid one with the highest
//! generation. A writer only ever overwrites the other slot.

use kho_core::{Order, Pfn, PfnRange, PAGE_SHIFT, PAGE_SIZE};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::SlotError;
use crate::layout::Layout;

/// `b"KHOARENA"` read as a little-endian u64.
pub const ARENA_MAGIC: u64 = u64::from_le_bytes(*b"KHOARENA");
/// Superblock format version.
pub const SUPERBLOCK_VERSION: u32 = 1;
/// Flag: the image this slot points at was restored.
pub const FLAG_RESTORED: u32 = 1;
/// Size of the on-disk struct.
pub const RAW_SIZE: usize = core::mem::size_of::<RawSuperblock>();

/// One superblock slot as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawSuperblock {
    /// `ARENA_MAGIC`.
    pub magic: U64,
    /// `SUPERBLOCK_VERSION`.
    pub version: U32,
    /// log2 of the page size.
    pub page_shift: U32,
    /// Arena size in bytes.
    pub arena_size: U64,
    /// Scratch region: first page.
    pub scratch_start: U64,
    /// Scratch region: pages.
    pub scratch_pages: U64,
    /// KFENCE pool: first page.
    pub kfence_start: U64,
    /// KFENCE pool: pages.
    pub kfence_pages: U64,
    /// Preservable pool: first page.
    pub preservable_start: U64,
    /// Preservable pool: pages.
    pub preservable_pages: U64,
    /// General memory: first page.
    pub general_start: U64,
    /// General memory: pages.
    pub general_pages: U64,
    /// Largest buddy order.
    pub max_order: U32,
    /// `FLAG_*` bits.
    pub flags: U32,
    /// Incremented by every published slot.
    pub generation: U64,
    /// Arena offset of the current handover image.
    pub image_offset: U64,
    /// Length of the current handover image (0: none).
    pub image_len: U64,
    /// CRC32 of the image bytes.
    pub image_crc: U32,
    /// CRC32 of every preceding byte of this struct.
    pub crc: U32,
}

const _: () = assert!(RAW_SIZE == 128);

/// Where the current handover image lives inside the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageLocation {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC32 of the image bytes.
    pub crc: u32,
}

/// A validated superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The geometry.
    pub layout: Layout,
    /// Generation counter.
    pub generation: u64,
    /// The current image, if any.
    pub image: Option<ImageLocation>,
    /// `FLAG_*` bits.
    pub flags: u32,
}

impl Superblock {
    /// Encode into the on-disk form, computing the CRC.
    pub fn encode(&self) -> RawSuperblock {
        let l = &self.layout;
        let img = self.image.unwrap_or(ImageLocation {
            offset: 0,
            len: 0,
            crc: 0,
        });
        let mut raw = RawSuperblock {
            magic: U64::new(ARENA_MAGIC),
            version: U32::new(SUPERBLOCK_VERSION),
            page_shift: U32::new(PAGE_SHIFT),
            arena_size: U64::new(l.size()),
            scratch_start: U64::new(l.scratch.start.0),
            scratch_pages: U64::new(l.scratch.pages()),
            kfence_start: U64::new(l.kfence.start.0),
            kfence_pages: U64::new(l.kfence.pages()),
            preservable_start: U64::new(l.preservable.start.0),
            preservable_pages: U64::new(l.preservable.pages()),
            general_start: U64::new(l.general.start.0),
            general_pages: U64::new(l.general.pages()),
            max_order: U32::new(u32::from(l.max_order.get())),
            flags: U32::new(self.flags),
            generation: U64::new(self.generation),
            image_offset: U64::new(img.offset),
            image_len: U64::new(img.len),
            image_crc: U32::new(img.crc),
            crc: U32::new(0),
        };
        raw.crc = U32::new(crc32fast::hash(&raw.as_bytes()[..RAW_SIZE - 4]));
        raw
    }

    /// Validate slot bytes found at arena offset `base` of an arena of
    /// `file_len` bytes.
    pub fn decode(bytes: &[u8], base: u64, file_len: u64) -> Result<Superblock, SlotError> {
        let off = |field: usize| base + field as u64;
        let raw = RawSuperblock::read_from_prefix(bytes)
            .map(|(r, _)| r)
            .map_err(|_| SlotError::BadGeometry {
                offset: base,
                what: "slot length",
                expected: RAW_SIZE as u64,
                found: bytes.len() as u64,
            })?;
        if raw.magic.get() != ARENA_MAGIC {
            return Err(SlotError::BadMagic {
                offset: base,
                expected: ARENA_MAGIC,
                found: raw.magic.get(),
            });
        }
        let crc = crc32fast::hash(&raw.as_bytes()[..RAW_SIZE - 4]);
        if crc != raw.crc.get() {
            return Err(SlotError::BadCrc {
                offset: off(RAW_SIZE - 4),
                expected: crc,
                found: raw.crc.get(),
            });
        }
        if raw.version.get() != SUPERBLOCK_VERSION {
            return Err(SlotError::BadVersion {
                offset: off(0x08),
                expected: SUPERBLOCK_VERSION,
                found: raw.version.get(),
            });
        }
        let geo = |field: usize, what, expected: u64, found: u64| SlotError::BadGeometry {
            offset: off(field),
            what,
            expected,
            found,
        };
        if raw.page_shift.get() != PAGE_SHIFT {
            return Err(geo(
                0x0c,
                "page shift",
                u64::from(PAGE_SHIFT),
                u64::from(raw.page_shift.get()),
            ));
        }
        let size = raw.arena_size.get();
        if size != file_len {
            return Err(geo(0x10, "arena size", file_len, size));
        }
        if size % PAGE_SIZE != 0 {
            return Err(geo(0x10, "arena size alignment", PAGE_SIZE, size));
        }
        let pages = size / PAGE_SIZE;
        let range = |field: usize, start: U64, len: U64| -> Result<PfnRange, SlotError> {
            let (s, n) = (start.get(), len.get());
            let end = s.checked_add(n).filter(|&e| e <= pages).ok_or(geo(
                field,
                "region end",
                pages,
                s.saturating_add(n),
            ))?;
            Ok(PfnRange {
                start: Pfn(s),
                end: Pfn(end),
            })
        };
        let max_order = u8::try_from(raw.max_order.get())
            .ok()
            .and_then(Order::new)
            .ok_or(geo(
                0x58,
                "max order",
                u64::from(kho_core::MAX_MAP_ORDER),
                u64::from(raw.max_order.get()),
            ))?;
        let layout = Layout {
            pages,
            max_order,
            superblock: PfnRange {
                start: Pfn(0),
                end: Pfn(crate::layout::SUPERBLOCK_PAGES),
            },
            scratch: range(0x18, raw.scratch_start, raw.scratch_pages)?,
            kfence: range(0x28, raw.kfence_start, raw.kfence_pages)?,
            preservable: range(0x38, raw.preservable_start, raw.preservable_pages)?,
            general: range(0x48, raw.general_start, raw.general_pages)?,
        };
        layout
            .check()
            .map_err(|(what, expected, found)| geo(0x18, what, expected, found))?;
        let (io, il) = (raw.image_offset.get(), raw.image_len.get());
        let image = if il == 0 {
            None
        } else {
            let end = io.saturating_add(il);
            let first_free = layout.superblock.end.0 * PAGE_SIZE;
            if io < first_free || end > size {
                return Err(geo(0x68, "image range", size, end));
            }
            Some(ImageLocation {
                offset: io,
                len: il,
                crc: raw.image_crc.get(),
            })
        };
        Ok(Superblock {
            layout,
            generation: raw.generation.get(),
            image,
            flags: raw.flags.get(),
        })
    }
}

/// Validate both slots (page 0 in `slot0`, page 1 in `slot1`) of an arena
/// of `file_len` bytes and choose the one to use: the valid slot with the
/// highest generation. Returns its index and contents.
///
/// Pure: the bytes are all it reads. Two valid slots with different
/// geometry are refused (geometry never changes after format, so one of
/// them lies), as are two invalid ones.
pub fn select(slot0: &[u8], slot1: &[u8], file_len: u64) -> crate::Result<(usize, Superblock)> {
    use crate::error::Error;
    let s0 = Superblock::decode(slot0, 0, file_len);
    let s1 = Superblock::decode(slot1, PAGE_SIZE, file_len);
    match (s0, s1) {
        (Ok(a), Ok(b)) => {
            if let Some((what, older, newer)) = if b.generation > a.generation {
                first_difference(&a.layout, &b.layout)
            } else {
                first_difference(&b.layout, &a.layout)
            } {
                return Err(Error::GeometryMismatch {
                    what,
                    expected: older,
                    found: newer,
                });
            }
            Ok(if b.generation > a.generation {
                (1, b)
            } else {
                (0, a)
            })
        }
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(SlotError::BadMagic { offset, found, .. }), Err(SlotError::BadMagic { .. })) => {
            Err(Error::Foreign {
                offset,
                expected: ARENA_MAGIC,
                found,
            })
        }
        (Err(slot0), Err(slot1)) => Err(Error::BothSuperblocksBad { slot0, slot1 }),
    }
}

/// The first field in which `older` and `newer` differ, with both values,
/// as the message of [`select`] names it.
fn first_difference(older: &Layout, newer: &Layout) -> Option<(&'static str, u64, u64)> {
    let fields = |l: &Layout| {
        [
            ("superblock slots disagree on arena pages", l.pages),
            (
                "superblock slots disagree on max order",
                u64::from(l.max_order.get()),
            ),
            (
                "superblock slots disagree on scratch start",
                l.scratch.start.0,
            ),
            ("superblock slots disagree on scratch end", l.scratch.end.0),
            (
                "superblock slots disagree on kfence start",
                l.kfence.start.0,
            ),
            ("superblock slots disagree on kfence end", l.kfence.end.0),
            (
                "superblock slots disagree on preservable start",
                l.preservable.start.0,
            ),
            (
                "superblock slots disagree on preservable end",
                l.preservable.end.0,
            ),
            (
                "superblock slots disagree on general start",
                l.general.start.0,
            ),
            ("superblock slots disagree on general end", l.general.end.0),
        ]
    };
    fields(older)
        .into_iter()
        .zip(fields(newer))
        .find(|((_, o), (_, n))| o != n)
        .map(|((what, o), (_, n))| (what, o, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ArenaConfig;

    fn sample() -> Superblock {
        Superblock {
            layout: ArenaConfig::with_size(1 << 24).layout().unwrap(),
            generation: 7,
            image: Some(ImageLocation {
                offset: 0x40_0000,
                len: 0x1234,
                crc: 0xdead_beef,
            }),
            flags: 0,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let raw = sb.encode();
        let got = Superblock::decode(raw.as_bytes(), 0, 1 << 24).unwrap();
        assert_eq!(got, sb);
    }

    #[test]
    fn slots_that_disagree_name_the_field() {
        use crate::error::Error;
        let size = 1u64 << 24;
        let base = ArenaConfig::with_size(size);
        let older = Superblock {
            image: None,
            ..sample()
        };
        let mut more_kfence = base;
        more_kfence.kfence *= 2;
        let mut higher_order = base;
        higher_order.max_order = 11;
        let field = |l: &Layout, what: &str| match what {
            "max order" => u64::from(l.max_order.get()),
            // A larger KFENCE pool takes its pages from scratch.
            _ => l.scratch.end.0,
        };
        for (config, what) in [(more_kfence, "scratch end"), (higher_order, "max order")] {
            let newer = Superblock {
                layout: config.layout().unwrap(),
                generation: older.generation + 1,
                ..older
            };
            let expect = first_difference(&older.layout, &newer.layout).unwrap();
            assert_eq!(
                expect,
                (
                    &*format!("superblock slots disagree on {what}"),
                    field(&older.layout, what),
                    field(&newer.layout, what)
                )
            );
            for (s0, s1) in [(older, newer), (newer, older)] {
                match select(s0.encode().as_bytes(), s1.encode().as_bytes(), size) {
                    Err(Error::GeometryMismatch {
                        what: got,
                        expected,
                        found,
                    }) => assert_eq!((got, expected, found), expect),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(first_difference(&older.layout, &older.layout), None);
    }

    #[test]
    fn every_corruption_is_typed() {
        let raw = sample().encode();
        let bytes = raw.as_bytes().to_vec();
        // Every single-bit flip is detected (CRC32 catches all of them).
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Superblock::decode(&b, 0, 1 << 24).is_err(), "bit {i}");
        }
        assert!(matches!(
            Superblock::decode(&bytes, 0, 1 << 25),
            Err(SlotError::BadGeometry {
                what: "arena size",
                ..
            })
        ));
        assert!(matches!(
            Superblock::decode(&bytes[..64], 0, 1 << 24),
            Err(SlotError::BadGeometry { .. })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 128], 4096, 1 << 24),
            Err(SlotError::BadMagic {
                offset: 4096,
                found: 0,
                ..
            })
        ));
        // A consistent CRC over inconsistent geometry is still refused.
        let mut sb = sample();
        sb.layout.general.start = Pfn(sb.layout.general.start.0 + 1);
        assert!(matches!(
            Superblock::decode(sb.encode().as_bytes(), 0, 1 << 24),
            Err(SlotError::BadGeometry { .. })
        ));
        let mut sb = sample();
        sb.image = Some(ImageLocation {
            offset: 0,
            len: 10,
            crc: 0,
        });
        assert!(matches!(
            Superblock::decode(sb.encode().as_bytes(), 0, 1 << 24),
            Err(SlotError::BadGeometry {
                what: "image range",
                ..
            })
        ));
    }
}
