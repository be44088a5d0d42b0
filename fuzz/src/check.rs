//! The `check` target: bytes as an arena (or a bare image) into the
//! checker behind `kho check`, which must return findings or an error and
//! never panic.
//!
//! An arena is at least [`MIN_ARENA_SIZE`] bytes and its superblocks must
//! record the file's exact length, far more than a fuzzer should mutate
//! byte by byte. So the input is read as in `arena_open`: 8 bytes
//! little-endian give the arena length (reduced to at most
//! [`MAX_ARENA`]), then come the arena's first bytes; the rest of the arena
//! is zeros, as in a sparse file. The input as given is also checked
//! directly (a bare image, or a too-short arena), and the arena is checked
//! a second time with its slot and image CRCs recomputed.
//!
//! Shared with kho-alloc's regression test through `#[path]`.

use kho_alloc::check::{self, code_info, CheckOptions, CheckReport};
use kho_alloc::layout::MIN_ARENA_SIZE;

use super::image::HeapCap;

/// Largest arena the target builds: 4 MiB.
pub const MAX_ARENA: u64 = 4 << 20;

/// [`run_capped`] without a heap cap.
pub fn run(data: &[u8]) {
    run_capped(data, HeapCap::NONE);
}

/// Run one input, every check under `cap`.
pub fn run_capped(data: &[u8], cap: HeapCap) {
    let opts = CheckOptions {
        show_bytes: true,
        max_offsets: 4,
        sample_len: 32,
    };
    let got = cap.around(data.len(), || check::check(data, &opts, &mut |_, _| {}));
    report(got, &opts, data.len());

    let Some((len, head)) = data.split_first_chunk::<8>() else {
        return;
    };
    let span = MAX_ARENA - MIN_ARENA_SIZE + 1;
    let len = MIN_ARENA_SIZE + u64::from_le_bytes(*len) % span;
    let mut arena = vec![0u8; len as usize];
    let n = head.len().min(arena.len());
    arena[..n].copy_from_slice(&head[..n]);
    arena_once(&arena, &opts, cap);
    if super::arena::fix_crcs(&mut arena) {
        arena_once(&arena, &opts, cap);
    }
}

fn arena_once(arena: &[u8], opts: &CheckOptions, cap: HeapCap) {
    let got = cap.around(arena.len(), || {
        check::check_arena(arena, opts, &mut |done, total| {
            assert!(done <= total, "progress {done} of {total}");
        })
    });
    report(got, opts, arena.len());
}

fn report(got: Result<CheckReport, check::CheckError>, opts: &CheckOptions, len: usize) {
    let r = match got {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    for f in &r.findings {
        let code = code_info(f.code).unwrap_or_else(|| panic!("unknown code {}", f.code));
        assert_eq!(code.severity, f.severity, "{}", f.code);
        assert!(!f.message.is_empty());
        assert!(f.count >= 1, "{} with no occurrence", f.code);
        assert!(f.offsets.len() <= opts.max_offsets);
        if let Some(s) = &f.sample {
            assert!(s.bytes.len() <= opts.sample_len);
        }
    }
    assert!(
        r.stats.scanned_bytes <= len as u64,
        "scanned more than the input"
    );
    assert_eq!(r.is_clean(), r.findings.is_empty());
}
