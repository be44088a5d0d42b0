//! The `tree_decode` target: untrusted bytes into [`Tree::decode`] with the
//! default limits; a tree that decodes must re-encode to the same bytes
//! (the decoder accepts only the canonical encoding) and decode again to an
//! equal tree.
//!
//! Shared with kho-core's regression test through `#[path]`.

use kho_core::{Tree, TreeLimits};

use super::image::HeapCap;

/// [`run_capped`] without a heap cap.
pub fn run(data: &[u8]) {
    run_capped(data, HeapCap::NONE);
}

/// Decode `data` under `cap`; on success, walk, re-encode and decode again.
pub fn run_capped(data: &[u8], cap: HeapCap) {
    let limits = TreeLimits::default();
    match cap.around(data.len(), || Tree::decode(data, &limits)) {
        Ok(tree) => {
            let bytes = tree
                .encode_with(&limits)
                .expect("a decoded tree re-encodes");
            assert_eq!(bytes, data, "decode accepted a non-canonical encoding");
            super::image::check_tree(&tree);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
}
