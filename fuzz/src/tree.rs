//! The `tree_decode` target: untrusted bytes into [`Tree::decode`] with the
//! default limits; a tree that decodes must re-encode to the same bytes
//! (the decoder accepts only the canonical encoding) and decode again to an
//! equal tree.
//!
//! Shared with kho-core's regression test through `#[path]`.

use kho_core::{Tree, TreeLimits};

/// Decode `data`; on success, walk, re-encode and decode again.
pub fn run(data: &[u8]) {
    let limits = TreeLimits::default();
    match Tree::decode(data, &limits) {
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
