//! The committed golden image: accidental format changes fail here.
//!
//! Re-bless (only for a deliberate, versioned format change) with
//! `KHO_BLESS=1 cargo test -p kho-core --test integration golden`.

use std::path::PathBuf;

use kho_core::Image;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/golden/image-v1.bin")
}

#[test]
fn golden_image_matches() {
    // The sample without its TREE section: the tree's own encoding has its
    // own tests, and this file pins the image layout.
    let bytes = super::sample_builder().build().unwrap();
    let path = golden_path();
    if std::env::var_os("KHO_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless with KHO_BLESS=1)", path.display()));
    assert!(
        committed == bytes,
        "image bytes differ from {} (first difference at {:?}); a format change needs a version bump and KHO_BLESS=1",
        path.display(),
        committed.iter().zip(&bytes).position(|(a, b)| a != b)
    );
    let img = Image::parse(&committed).unwrap();
    assert_eq!(img.folio_count(), 12);
    assert_eq!(img.header().version_major, 1);
}
