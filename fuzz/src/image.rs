//! The `image_parse` target: untrusted bytes into [`Image::parse`], and a
//! full walk of every image that parses.
//!
//! This file is shared: the fuzz target calls [`run`], and kho-core's
//! regression test includes it with `#[path]` so that committed inputs go
//! through exactly the same code.
//!
//! CRC32 fields stop a byte-level fuzzer at the first check. Besides the
//! input as given, [`run`] therefore also parses a copy whose section, table
//! and header CRCs were recomputed over the ranges the input itself claims
//! ([`fix_crcs`]), so the mutations reach the section contents and the tree.

use kho_core::image::layout::{
    ENTRY_SIZE, HEADER_CRC_OFFSET, HEADER_SIZE, MAGIC, SECTION_REQUIRED,
};
use kho_core::{
    Image, Order, ParseError, Pfn, PreservedMap, RestoreError, Restorer, SectionKind, Tree,
    TreeLimits, PAGE_SHIFT,
};

/// How a target caps the heap around each call into a parser: the fuzz
/// binaries pass `kho_fuzz::mem::CAP`, which makes a call that holds more
/// heap than FORMAT.md §8 allows for its input abort; the replay tests run
/// uncapped ([`HeapCap::NONE`]).
#[derive(Clone, Copy, Debug)]
pub struct HeapCap {
    /// Cap the heap for a call on `len` input bytes.
    pub install: fn(len: usize),
    /// Lift the cap.
    pub remove: fn(),
}

impl HeapCap {
    /// No cap.
    pub const NONE: HeapCap = HeapCap {
        install: |_| {},
        remove: || {},
    };

    /// `f()` under the cap for `len` input bytes.
    pub fn around<T>(self, len: usize, f: impl FnOnce() -> T) -> T {
        (self.install)(len);
        let out = f();
        (self.remove)();
        out
    }
}

/// [`run_capped`] without a heap cap.
pub fn run(data: &[u8]) {
    run_capped(data, HeapCap::NONE);
}

/// Parse `data` as is, then with its CRCs recomputed, each parse under
/// `cap`; walk what parses.
pub fn run_capped(data: &[u8], cap: HeapCap) {
    match cap.around(data.len(), || Image::parse(data)) {
        Ok(image) => walk(&image),
        Err(e) => assert_clean_error(&e, data.len()),
    }
    let mut fixed = data.to_vec();
    if fix_crcs(&mut fixed) {
        match cap.around(fixed.len(), || Image::parse(&fixed)) {
            Ok(image) => walk(&image),
            Err(e) => assert_clean_error(&e, fixed.len()),
        }
    }
}

/// A rejection must name an offset inside the input (or its end, for a
/// truncation) and print without panicking.
pub fn assert_clean_error(e: &ParseError, input_len: usize) {
    let text = e.to_string();
    assert!(!text.is_empty());
    assert!(!e.kind().is_empty());
    if let Some(offset) = e.offset() {
        assert!(
            offset <= input_len as u64,
            "error offset {offset:#x} past an input of {input_len:#x} bytes: {e}"
        );
    }
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn le64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn put32(bytes: &mut [u8], at: usize, v: u32) {
    if let Some(b) = at.checked_add(4).and_then(|end| bytes.get_mut(at..end)) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

/// `[at, at + len)` as a `usize` range inside `bytes`, if it fits.
fn span(bytes: &[u8], at: u64, len: u64) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(at).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= bytes.len()).then_some(start..end)
}

/// Recompute every CRC32 of an image in place, over the ranges its header
/// and table claim: each section entry's CRC, then the table CRC, then the
/// header CRC. Ranges that do not fit the input are left alone. Returns
/// whether any byte changed.
///
/// Work is bounded by the input: the table walk stops at the input's end.
pub fn fix_crcs(bytes: &mut [u8]) -> bool {
    if bytes.len() < HEADER_SIZE || bytes[..8] != MAGIC {
        return false;
    }
    let before = crc32fast::hash(bytes);
    let header_size = le32(bytes, 8).map_or(HEADER_SIZE as u64, u64::from);
    let table_offset = le64(bytes, 48).unwrap_or(0);
    let count = le32(bytes, 56).map_or(0, u64::from);
    let stride = le32(bytes, 60).map_or(0, u64::from);
    if stride >= ENTRY_SIZE as u64 {
        for i in 0..count {
            let Some(eo) = i
                .checked_mul(stride)
                .and_then(|o| o.checked_add(table_offset))
            else {
                break;
            };
            let Some(entry) = span(bytes, eo, ENTRY_SIZE as u64) else {
                break;
            };
            let (off, len) = (
                le64(bytes, entry.start + 8).unwrap_or(0),
                le64(bytes, entry.start + 16).unwrap_or(0),
            );
            if let Some(section) = span(bytes, off, len) {
                let crc = crc32fast::hash(&bytes[section]);
                put32(bytes, entry.start + 24, crc);
            }
        }
    }
    if let Some(table) = count
        .checked_mul(stride)
        .and_then(|len| span(bytes, table_offset, len))
    {
        let crc = crc32fast::hash(&bytes[table]);
        put32(bytes, 64, crc);
    }
    if let Some(head) = span(bytes, 0, header_size) {
        put32(bytes, HEADER_CRC_OFFSET, 0);
        let crc = crc32fast::hash(&bytes[head]);
        put32(bytes, HEADER_CRC_OFFSET, crc);
    }
    crc32fast::hash(bytes) != before
}

/// Walk everything a parsed image offers and check the invariants a
/// successor relies on. Panics only on a real violation.
pub fn walk(image: &Image<'_>) {
    let bytes = image.bytes();
    let h = *image.header();
    assert_eq!(bytes.len() as u64, h.image_len);
    assert!(u64::from(h.header_size) <= h.image_len);
    assert_eq!(h.arena_size % (1 << PAGE_SHIFT), 0);
    let _ = format!("{image:?}");

    // Sections: inside the image, in table order, known kinds unique.
    let mut seen = [false; 6];
    let mut sections = 0u64;
    for s in image.sections() {
        sections += 1;
        let end = s.offset.checked_add(s.len).expect("section end overflows");
        assert!(end <= h.image_len, "{s:?} past the image");
        assert_eq!(
            s.crc32,
            crc32fast::hash(&bytes[s.offset as usize..end as usize])
        );
        assert_eq!(s.is_required(), s.flags & SECTION_REQUIRED != 0);
        if let Some(i) = SectionKind::KNOWN.iter().position(|&k| k == s.kind) {
            assert!(!seen[i], "{} twice", s.kind);
            seen[i] = true;
            assert_eq!(image.section(s.kind), Some(s));
        } else {
            assert!(!s.is_required(), "unknown required section {s:?}");
        }
        let _ = s.kind.to_string();
    }
    assert_eq!(sections, u64::from(h.section_count));
    assert!(seen[0], "no MEMMAP");

    walk_memmap(image);
    walk_ranges(image);
    walk_slab(image);
    walk_extents(image);
    walk_tree(image);
    restore_each_once(image);
}

fn walk_memmap(image: &Image<'_>) {
    let limit = image.arena_limit();
    // Blocks: sorted by (order, base), per order as `blocks_of` says.
    let mut prev: Option<(Order, Pfn)> = None;
    let mut blocks = 0usize;
    for b in image.blocks() {
        blocks += 1;
        if let Some(p) = prev {
            assert!((b.order, b.base) > p, "blocks out of order");
        }
        prev = Some((b.order, b.base));
    }
    assert_eq!(blocks, image.block_count());
    let per_order: usize = Order::all().map(|o| image.blocks_of(o).count()).sum();
    assert_eq!(per_order, blocks);

    // Folios: address order, disjoint, inside the arena, each found again
    // by the binary search.
    let mut count = 0u64;
    let mut bytes_per_order = [0u64; kho_core::NR_ORDERS];
    let mut prev_end = 0u64;
    for f in image.folios() {
        count += 1;
        assert!(f.pfn.0 >= prev_end, "folio {f:?} overlaps its predecessor");
        assert_eq!(f.pfn.0 % f.order.pages(), 0, "misaligned {f:?}");
        prev_end = f.end_pfn().0;
        assert!(prev_end <= limit.0, "folio {f:?} past the arena");
        assert_eq!(image.is_preserved(f.pfn), Some((f.pfn, f.order)));
        let last = Pfn(prev_end - 1);
        assert_eq!(image.is_preserved(last), Some((f.pfn, f.order)));
        bytes_per_order[f.order.index()] += f.bytes();
    }
    assert_eq!(count, image.folio_count());
    // Internal iteration yields the same folios as `next()`, also when it
    // takes over part way through.
    let mut by_next = image.folios();
    let mut rest = image.folios();
    let head = (count / 3) as usize;
    for f in rest.by_ref().take(head) {
        assert_eq!(by_next.next(), Some(f));
    }
    let folded = rest.fold(head as u64, |n, f| {
        assert_eq!(by_next.next(), Some(f), "fold and next disagree");
        n + 1
    });
    assert_eq!((folded, by_next.next()), (count, None));
    assert_eq!(bytes_per_order, image.bytes_per_order());
    assert_eq!(image.preserved_bytes(), bytes_per_order.iter().sum::<u64>());

    // Ranges: maximal, sorted runs covering exactly the folios' pages.
    let mut pages = 0u64;
    let mut prev_end: Option<Pfn> = None;
    for r in image.ranges() {
        assert!(r.start < r.end);
        if let Some(e) = prev_end {
            assert!(r.start > e, "ranges not maximal or unsorted");
        }
        prev_end = Some(r.end);
        pages += r.pages();
    }
    assert_eq!(pages << PAGE_SHIFT, image.preserved_bytes());

    // The map rebuilt in memory agrees.
    let map: PreservedMap = image.to_map();
    assert_eq!(map.folio_count(), count);
    assert!(map.folios().eq(image.folios()));
}

fn walk_ranges(image: &Image<'_>) {
    let size = image.arena_size();
    let runs: Vec<(u64, u64)> = image.ranges().map(|r| (r.start.0, r.end.0)).collect();
    let mut lists = Vec::new();
    for iter in [image.scratch(), image.kfence()] {
        let mut pages = Vec::new();
        let mut prev_end = 0u64;
        for r in iter {
            assert!(r.len > 0 && r.start >= prev_end && r.is_page_aligned());
            let end = r.end().expect("range end overflows").0;
            assert!(end <= size);
            prev_end = end;
            pages.push((r.start >> PAGE_SHIFT, end >> PAGE_SHIFT));
        }
        // Neither scratch nor the KFENCE pool holds preserved memory.
        assert!(disjoint(&pages, &runs), "preserved memory in {pages:x?}");
        lists.push(pages);
    }
    assert!(disjoint(&lists[0], &lists[1]), "KFENCE pool in scratch");
}

/// Whether two sorted lists of disjoint half-open intervals share no point;
/// a linear merge.
fn disjoint(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while let (Some(&(s0, e0)), Some(&(s1, e1))) = (a.get(i), b.get(j)) {
        if s0 < e1 && s1 < e0 {
            return false;
        }
        if e0 <= e1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    true
}

fn walk_slab(image: &Image<'_>) {
    let mut prev_id = None;
    for c in image.slab_caches() {
        assert!(prev_id < Some(c.id()));
        prev_id = Some(c.id());
        assert!(c.object_size() > 0 && c.align().is_power_of_two());
        assert!(u64::from(c.objects_per_slab()) * u64::from(c.object_size()) <= c.order().bytes());
        assert!(c.name().len() <= 32 && !c.name().contains('\0'));
        let again = image.slab_cache(c.id()).expect("cache lookup");
        assert_eq!(again.name(), c.name());
        let _ = format!("{c:?}");
    }
    let mut prev_pfn = None;
    for p in image.slab_pages() {
        assert!(prev_pfn < Some(p.pfn()));
        prev_pfn = Some(p.pfn());
        let cache = image.slab_cache(p.cache_id()).expect("page of no cache");
        assert_eq!(cache.object_size(), p.object_size());
        assert_eq!(image.is_preserved(p.pfn()), Some((p.pfn(), p.order())));
        let words = p.bitmap_words().len();
        assert_eq!(words as u64, u64::from(p.object_count().div_ceil(64)));
        let allocated: Vec<u32> = p.allocated().collect();
        assert_eq!(allocated.len() as u32, p.allocated_count());
        assert!(allocated.windows(2).all(|w| w[0] < w[1]));
        let folio_end = p.pfn().0 + p.order().pages();
        for &i in &allocated {
            assert!(i < p.object_count(), "bit {i} past the objects");
            assert!(p.is_allocated(i));
            let at = p.object_addr(i).expect("object address");
            let end = at.0 + u64::from(p.object_size());
            assert!(end <= folio_end << PAGE_SHIFT, "object {i} past its folio");
        }
        assert!(!p.is_allocated(p.object_count()));
        assert_eq!(p.object_addr(p.object_count()), None);
        let again = image.slab_page(p.pfn()).expect("page lookup");
        assert_eq!(again.allocated_count(), p.allocated_count());
        let _ = format!("{p:?}");
    }
}

fn walk_extents(image: &Image<'_>) {
    // Every byte of every extent lies in one coalesced preserved run.
    let mut runs = image.ranges().peekable();
    let mut prev_end = 0u64;
    for e in image.extents() {
        assert!(e.range.len > 0 && e.range.start >= prev_end);
        let end = e.range.end().expect("extent end overflows").0;
        prev_end = end;
        let (first, last) = (e.range.start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT);
        while runs.peek().is_some_and(|r| r.end.0 <= first) {
            runs.next();
        }
        let run = runs.peek().expect("extent past preserved memory");
        assert!(
            run.start.0 <= first && last < run.end.0,
            "extent {e:?} outside preserved memory"
        );
    }
}

fn walk_tree(image: &Image<'_>) {
    let raw = image.tree_bytes();
    match image.tree() {
        None => assert!(raw.is_empty()),
        Some(tree) => {
            check_tree(tree);
            // The stored bytes are the canonical encoding of the tree.
            let again = tree.encode().expect("a decoded tree re-encodes");
            assert_eq!(again, raw);
        }
    }
}

/// Walk a decoded tree and check that it re-encodes to bytes that decode to
/// an equal tree.
pub fn check_tree(tree: &Tree) {
    let limits = TreeLimits::default();
    let mut nodes = 0usize;
    for (path, node) in tree.walk() {
        nodes += 1;
        assert!(path.starts_with('/'));
        let found = tree.node(&path).expect("walked path resolves");
        assert!(
            core::ptr::eq(found.node(), node),
            "{path} resolves elsewhere"
        );
    }
    assert_eq!(nodes, tree.node_count());
    assert!(tree.depth() <= limits.max_depth);
    let _ = tree.ranges().count();
    let _ = tree.to_string();
    let bytes = tree.encode().expect("a decoded tree re-encodes");
    let again = Tree::decode(&bytes, &limits).expect("a re-encoded tree decodes");
    assert_eq!(&again, tree);
}

/// Every folio restores exactly once, by head PFN; tails and unpreserved
/// PFNs are refused; a second restore fails; `restore_all` agrees.
fn restore_each_once(image: &Image<'_>) {
    let mut r = Restorer::new(image);
    let total = image.folio_count();
    assert_eq!(r.remaining(), total);
    let mut done = 0u64;
    for f in image.folios() {
        if f.order.get() > 0 {
            let tail = Pfn(f.pfn.0 + 1);
            assert_eq!(
                r.restore_folio(tail),
                Err(RestoreError::NotHead {
                    pfn: tail.0,
                    head: f.pfn.0,
                    order: f.order.get()
                })
            );
        }
        assert!(!r.is_restored(f.pfn));
        assert_eq!(r.restore_folio(f.pfn), Ok(f.order));
        assert!(r.is_restored(f.pfn));
        assert_eq!(
            r.restore_folio(f.pfn),
            Err(RestoreError::AlreadyRestored {
                pfn: f.pfn.0,
                order: f.order.get()
            })
        );
        done += 1;
        assert_eq!(r.remaining(), total - done);
    }
    assert_eq!(r.remaining(), 0);
    assert_eq!(r.restore_all().count(), 0);
    // Just past the arena nothing is preserved.
    let past = image.arena_limit();
    assert!(matches!(
        r.restore_folio(past),
        Err(RestoreError::NotPreserved { .. })
    ));

    // A fresh restorer hands out the same folios in bulk, by `next()` and
    // by internal iteration.
    let mut bulk = Restorer::new(image);
    assert!(bulk.restore_all().eq(image.folios()));
    assert_eq!(bulk.remaining(), 0);
    let mut folded = Restorer::new(image);
    assert_eq!(folded.restore_all().count() as u64, total);
    assert_eq!(folded.remaining(), 0);
    for f in image.folios() {
        assert!(bulk.restore_folio(f.pfn).is_err());
    }
}
