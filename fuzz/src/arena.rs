//! The `arena_open` target: bytes as the first pages of an arena file, into
//! the superblock slot choice ([`superblock::select`]) and, when the chosen
//! slot points at an image inside the given bytes, the image CRC check and
//! [`Image::parse`] with a full walk.
//!
//! Input layout: 8 bytes little-endian, the file length `fstat` would
//! report; then the file's first bytes. A file longer than the bytes given
//! reads as zeros past them, as a sparse file does.
//!
//! Besides the input as given, a copy whose slot CRCs (and the CRCs of the
//! image a slot points at) were recomputed is run too, so mutations reach
//! the geometry checks behind the CRC.
//!
//! Shared with kho-alloc's regression test through `#[path]`.

use kho_alloc::layout::MIN_ARENA_SIZE;
use kho_alloc::superblock::{self, Superblock, RAW_SIZE};
use kho_core::{Image, PAGE_SIZE};
use zerocopy::IntoBytes;

use super::image::HeapCap;

const PAGE: usize = PAGE_SIZE as usize;

/// [`run_capped`] without a heap cap.
pub fn run(data: &[u8]) {
    run_capped(data, HeapCap::NONE);
}

/// Run one input as given and with its CRCs recomputed, every parse under
/// `cap`.
pub fn run_capped(data: &[u8], cap: HeapCap) {
    let Some((len, file)) = split(data) else {
        return;
    };
    open(len, file, cap);
    let mut fixed = file.to_vec();
    if fix_crcs(&mut fixed) {
        open(len, &fixed, cap);
    }
}

fn split(data: &[u8]) -> Option<(u64, &[u8])> {
    let (len, file) = data.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*len), file))
}

/// Page `index` of the file: the bytes given, zero-filled to a page.
fn page(file: &[u8], index: usize) -> [u8; PAGE] {
    let mut out = [0u8; PAGE];
    let from = index * PAGE;
    if let Some(have) = file.get(from..) {
        let n = have.len().min(PAGE);
        out[..n].copy_from_slice(&have[..n]);
    }
    out
}

fn open(file_len: u64, file: &[u8], cap: HeapCap) {
    if file_len < MIN_ARENA_SIZE {
        // `Arena::open` refuses such a file before reading it.
        return;
    }
    let (p0, p1) = (page(file, 0), page(file, 1));
    let chosen = cap.around(2 * PAGE, || superblock::select(&p0, &p1, file_len));
    let s0 = Superblock::decode(&p0, 0, file_len);
    let s1 = Superblock::decode(&p1, PAGE_SIZE, file_len);
    for s in [&s0, &s1].into_iter().flatten() {
        // A valid slot describes exactly this file, and re-encodes to a
        // slot that decodes to itself.
        assert_eq!(s.layout.size(), file_len);
        let again = Superblock::decode(s.encode().as_bytes(), 0, file_len);
        assert_eq!(again.as_ref(), Ok(s));
    }
    let (slot, sb) = match (chosen, &s0, &s1) {
        (Ok(c), Ok(a), Ok(b)) => {
            assert_eq!(a.layout, b.layout, "slots of two geometries accepted");
            let want = if b.generation > a.generation { 1 } else { 0 };
            assert_eq!(c.0, want, "not the newest valid slot");
            c
        }
        (Ok(c), Ok(_), Err(_)) => {
            assert_eq!(c.0, 0);
            c
        }
        (Ok(c), Err(_), Ok(_)) => {
            assert_eq!(c.0, 1);
            c
        }
        (Ok(c), Err(_), Err(_)) => panic!("chose slot {} of two invalid ones", c.0),
        (Err(e), Ok(a), Ok(b)) => {
            assert_ne!(a.layout, b.layout, "refused two agreeing slots: {e}");
            return;
        }
        (Err(e), _, _) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(slot < 2);
    let Some(loc) = sb.image else {
        return;
    };
    let end = loc
        .offset
        .checked_add(loc.len)
        .expect("image end overflows");
    assert!(loc.len > 0 && end <= file_len);
    assert!(
        loc.offset >= 2 * PAGE_SIZE,
        "image over the superblock pages"
    );
    let (Ok(start), Ok(end)) = (usize::try_from(loc.offset), usize::try_from(end)) else {
        return;
    };
    let Some(bytes) = file.get(start..end) else {
        // Past the bytes given: zeros, which no image starts with.
        return;
    };
    if crc32fast::hash(bytes) != loc.crc {
        return;
    }
    if let Ok(image) = cap.around(bytes.len(), || Image::parse(bytes)) {
        super::image::walk(&image);
    }
}

/// Recompute the CRCs of both slots, and first those of the image each slot
/// points at when it lies inside `file`. Returns whether anything changed.
pub fn fix_crcs(file: &mut [u8]) -> bool {
    let before = crc32fast::hash(file);
    for slot in 0..2 {
        let base = slot * PAGE;
        let Some(raw) = file.get(base..base + RAW_SIZE) else {
            break;
        };
        let field = |at: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (offset, len) = (field(0x68), field(0x70));
        let image = usize::try_from(offset).ok().and_then(|s| {
            let e = s.checked_add(usize::try_from(len).ok()?)?;
            (e <= file.len() && s >= 2 * PAGE).then_some(s..e)
        });
        if let Some(range) = image {
            super::image::fix_crcs(&mut file[range.clone()]);
            let crc = crc32fast::hash(&file[range]);
            file[base + 0x78..base + 0x7c].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&file[base..base + RAW_SIZE - 4]);
        file[base + RAW_SIZE - 4..base + RAW_SIZE].copy_from_slice(&crc.to_le_bytes());
    }
    crc32fast::hash(file) != before
}
