//! A lenient reading of an image's header and section table, with the CRC
//! of every part computed from the bytes.
//!
//! `kho inspect` shows each section's CRC status from this view rather
//! than from the parsed image, and when the parser rejects an image it
//! still shows what the header and table say, so one can see which part
//! is broken. Nothing here validates: fields are shown as stored. Memory is
//! bounded by the input (at most one entry per 32 bytes of it).

use kho_alloc::check::crc32;
use kho_core::image::layout::{
    RawHeader, RawSection, ENTRY_SIZE, HEADER_CRC_OFFSET, HEADER_SIZE, MAGIC,
};
use kho_core::SectionKind;
use serde_json::{json, Value};
use zerocopy::FromBytes as _;

/// A stored CRC against the bytes it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crc {
    /// The bytes match.
    Ok,
    /// The bytes have this CRC instead.
    Bad(u32),
    /// The bytes lie (partly) outside the input.
    OutOfBounds,
}

impl Crc {
    fn of(stored: u32, bytes: Option<&[u8]>) -> Crc {
        match bytes.map(crc32) {
            Some(c) if c == stored => Crc::Ok,
            Some(c) => Crc::Bad(c),
            None => Crc::OutOfBounds,
        }
    }

    /// `"ok"`, `"BAD (computed 0x…)"` or `"out of bounds"`.
    pub fn text(self) -> String {
        match self {
            Crc::Ok => "ok".into(),
            Crc::Bad(c) => format!("BAD (computed {c:#010x})"),
            Crc::OutOfBounds => "out of bounds".into(),
        }
    }

    /// Whether the bytes match.
    pub fn is_ok(self) -> bool {
        self == Crc::Ok
    }

    /// The CRC computed over the bytes, if they are inside the input.
    pub fn computed(self, stored: u32) -> Option<u32> {
        match self {
            Crc::Ok => Some(stored),
            Crc::Bad(c) => Some(c),
            Crc::OutOfBounds => None,
        }
    }

    /// `{"ok": .., "computed": ..}` for JSON.
    pub fn json(self, stored: u32) -> Value {
        json!({ "ok": self.is_ok(), "computed": self.computed(stored) })
    }
}

/// One section table entry as stored.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    /// Kind.
    pub kind: SectionKind,
    /// Flags.
    pub flags: u32,
    /// Offset of the section.
    pub offset: u64,
    /// Length of the section.
    pub len: u64,
    /// Stored CRC.
    pub crc32: u32,
    /// Stored CRC against the section bytes.
    pub crc: Crc,
}

/// The header and section table as stored.
#[derive(Debug, Clone)]
pub struct View {
    /// The header fields.
    pub header: RawHeader,
    /// Whether the magic is the image magic.
    pub magic_ok: bool,
    /// Stored header CRC against the header bytes.
    pub header_crc: Crc,
    /// Stored table CRC against the table bytes.
    pub table_crc: Crc,
    /// The entries inside the input, in table order.
    pub sections: Vec<Section>,
    /// Entries the header claims that lie outside the input (or cannot be
    /// read because the entry size is below 32).
    pub missing: u64,
}

fn sub(bytes: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let s = usize::try_from(off).ok()?;
    let e = usize::try_from(off.checked_add(len)?).ok()?;
    bytes.get(s..e)
}

/// Read the header and table of the image at the start of `bytes`; `None`
/// when `bytes` cannot hold a header.
pub fn read(bytes: &[u8]) -> Option<View> {
    let (header, _) = RawHeader::read_from_prefix(bytes).ok()?;
    let len = bytes.len() as u64;
    // Bytes past image_len are not the image (a page-rounded mapping), as
    // long as image_len is plausible.
    let image_len = header.image_len.get();
    let image = if (HEADER_SIZE as u64..=len).contains(&image_len) {
        &bytes[..image_len as usize]
    } else {
        bytes
    };
    let hs = u64::from(header.header_size.get());
    let head = sub(image, 0, hs.max(HEADER_SIZE as u64)).map(|h| {
        let mut h = h.to_vec();
        h[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].fill(0);
        h
    });
    let header_crc = Crc::of(header.header_crc32.get(), head.as_deref());
    let count = u64::from(header.section_count.get());
    let stride = u64::from(header.entry_size.get());
    let table_at = header.table_offset.get();
    let table_crc = Crc::of(
        header.table_crc32.get(),
        count
            .checked_mul(stride)
            .and_then(|n| sub(image, table_at, n)),
    );
    let mut sections = Vec::new();
    let mut missing = count;
    if stride >= ENTRY_SIZE as u64 {
        for i in 0..count {
            let Some(e) = i
                .checked_mul(stride)
                .and_then(|o| table_at.checked_add(o))
                .and_then(|at| sub(image, at, ENTRY_SIZE as u64))
                .and_then(|b| RawSection::read_from_bytes(b).ok())
            else {
                break;
            };
            let (offset, len) = (e.offset.get(), e.len.get());
            sections.push(Section {
                kind: SectionKind::from_raw(e.kind.get()),
                flags: e.flags.get(),
                offset,
                len,
                crc32: e.crc32.get(),
                crc: Crc::of(e.crc32.get(), sub(image, offset, len)),
            });
            missing -= 1;
        }
    }
    Some(View {
        header,
        magic_ok: header.magic == MAGIC,
        header_crc,
        table_crc,
        sections,
        missing,
    })
}

impl View {
    /// The header as `kho inspect --json` prints it.
    pub fn header_json(&self) -> Value {
        let h = &self.header;
        json!({
            "magic_ok": self.magic_ok,
            "header_size": h.header_size.get(),
            "version": format!("{}.{}", h.version_major.get(), h.version_minor.get()),
            "version_major": h.version_major.get(),
            "version_minor": h.version_minor.get(),
            "page_shift": h.page_shift.get(),
            "flags": h.flags.get(),
            "arena_size": h.arena_size.get(),
            "image_len": h.image_len.get(),
            "generation": h.generation.get(),
            "table_offset": h.table_offset.get(),
            "section_count": h.section_count.get(),
            "entry_size": h.entry_size.get(),
            "header_crc32": h.header_crc32.get(),
            "header_crc": self.header_crc.json(h.header_crc32.get()),
            "table_crc32": h.table_crc32.get(),
            "table_crc": self.table_crc.json(h.table_crc32.get()),
        })
    }

    /// The section table as `kho inspect --json` prints it.
    pub fn sections_json(&self) -> Vec<Value> {
        self.sections
            .iter()
            .map(|s| {
                json!({
                    "kind": s.kind.to_string(),
                    "code": s.kind.raw(),
                    "required": s.flags & kho_core::image::layout::SECTION_REQUIRED != 0,
                    "flags": s.flags,
                    "offset": s.offset,
                    "len": s.len,
                    "crc32": s.crc32,
                    "crc_ok": s.crc.is_ok(),
                    "computed_crc32": s.crc.computed(s.crc32),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kho_core::image::testing::RawImage;

    fn image() -> Vec<u8> {
        let mut raw = RawImage::new(1 << 20);
        raw.set_payload(SectionKind::Extents, RawImage::extent(0x1000, 8, 1));
        raw.to_bytes()
    }

    #[test]
    fn a_valid_image_is_ok_everywhere() {
        let v = read(&image()).unwrap();
        assert!(v.magic_ok);
        assert_eq!((v.header_crc, v.table_crc), (Crc::Ok, Crc::Ok));
        assert_eq!(v.sections.len(), 2);
        assert!(v.sections.iter().all(|s| s.crc == Crc::Ok));
        assert_eq!(v.missing, 0);
    }

    #[test]
    fn damage_shows_where_it_is() {
        let good = image();
        let v = read(&good).unwrap();
        let ext = v.sections[1];
        // A flipped section byte: that section's CRC, nothing else.
        let mut b = good.clone();
        b[ext.offset as usize] ^= 1;
        let v = read(&b).unwrap();
        assert!(
            matches!(v.sections[1].crc, Crc::Bad(c) if c == crc32(&b[ext.offset as usize..][..ext.len as usize]))
        );
        assert_eq!(
            (v.header_crc, v.table_crc, v.sections[0].crc),
            (Crc::Ok, Crc::Ok, Crc::Ok)
        );
        // A flipped header byte.
        let mut b = good.clone();
        b[40] ^= 1;
        assert!(matches!(read(&b).unwrap().header_crc, Crc::Bad(_)));
        // Cut inside the second entry's section: out of bounds, and the
        // entries still there are listed.
        let v = read(&good[..ext.offset as usize + 4]).unwrap();
        assert_eq!(v.sections[1].crc, Crc::OutOfBounds);
        // Cut inside the table: the first entry only.
        let cut = (v.header.table_offset.get() + 40) as usize;
        let v = read(&good[..cut]).unwrap();
        assert_eq!((v.sections.len(), v.missing), (1, 1));
        assert_eq!(v.table_crc, Crc::OutOfBounds);
        assert!(read(&good[..HEADER_SIZE - 1]).is_none());
    }

    #[test]
    fn claimed_counts_do_not_allocate() {
        let mut raw = RawImage::new(1 << 20);
        raw.section_count = Some(u32::MAX);
        let v = read(&raw.to_bytes()).unwrap();
        assert_eq!(v.sections.len(), 1);
        assert_eq!(v.missing, u64::from(u32::MAX) - 1);
        raw.section_count = None;
        raw.entry_size = 8;
        let v = read(&raw.to_bytes()).unwrap();
        assert_eq!((v.sections.len(), v.missing), (0, 1));
    }
}
