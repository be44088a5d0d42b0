//! The committed golden images: accidental format changes fail here.
//!
//! Re-bless (only for a deliberate, versioned format change) with
//! `KHO_BLESS=1 cargo test -p kho-core --test integration golden`.

use std::path::PathBuf;

use kho_core::{Image, SectionKind};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/golden")
        .join(name)
}

/// Compare `bytes` with the committed file `name` (writing it first under
/// `KHO_BLESS=1`), and return the committed bytes.
fn check_golden(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = golden_path(name);
    if std::env::var_os("KHO_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let committed = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless with KHO_BLESS=1)", path.display()));
    assert!(
        committed == bytes,
        "image bytes differ from {} (first difference at {:?}); a format change needs a version bump and KHO_BLESS=1",
        path.display(),
        committed.iter().zip(bytes).position(|(a, b)| a != b)
    );
    committed
}

#[test]
fn golden_image_matches() {
    // The sample without its TREE section: this file pins the layout of the
    // bulk sections alone.
    let committed = check_golden("image-v1.bin", &super::sample_builder().build().unwrap());
    let img = Image::parse(&committed).unwrap();
    assert_eq!(img.folio_count(), 12);
    assert_eq!(img.header().version_major, 1);
    assert!(img.section(SectionKind::Tree).is_none());
}

#[test]
fn golden_full_image_matches() {
    // Every section, the metadata tree included: the tree's encoding inside
    // an image is pinned too.
    let committed = check_golden("image-v1-full.bin", &super::sample_image());
    let img = Image::parse(&committed).unwrap();
    let kinds: Vec<_> = img.sections().map(|s| s.kind).collect();
    assert_eq!(kinds, SectionKind::KNOWN);
    assert_eq!(img.tree(), Some(&super::sample_tree()));
    assert_eq!(img.folio_count(), 12);
}
