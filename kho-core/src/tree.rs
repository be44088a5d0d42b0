//! The metadata tree: named nodes, a `compatible` string each, and typed
//! properties, carried in the `TREE` section of a handover image.
//!
//! It plays the part of the flattened device tree in Linux KHO: each
//! subsystem that hands state over owns a node (`/kv-store`, compatible
//! `"kv-store-v1"`) and records in it what its successor needs to find that
//! state again. A property that points into the arena has its own type,
//! [`Value::Range`], so a checker can prove that every pointer in the tree
//! lands in preserved memory ([`Tree::ranges`]).
//!
//! ```
//! use kho_core::tree::{Node, Tree, TreeLimits};
//! use kho_core::{PhysAddr, PhysRange};
//!
//! let tree = Tree::new(
//!     Node::root("kho-root-v1").with_child(
//!         Node::new("kv-store", "kv-store-v1")
//!             .with_u64("entries", 3)
//!             .with_range("index", PhysRange::new(PhysAddr(0x10000), 0x2000)),
//!     ),
//! );
//! let bytes = tree.encode()?;
//! let back = Tree::decode(&bytes, &TreeLimits::default())?;
//! let kv = back.node("/kv-store")?;
//! kv.expect_compatible("kv-store-v1")?;
//! assert_eq!(kv.u64_prop("entries")?, 3);
//! assert_eq!(back, tree);
//! # Ok::<(), kho_core::tree::TreeError>(())
//! ```
//!
//! # Shape
//!
//! The root node's name is the empty string and its path is `/`; every other
//! node's path is its parent's path, a `/` (omitted after the root) and its
//! name: `/kv-store/shard0`. Node names and property names are 1 to
//! [`TreeLimits::max_name_len`] bytes of UTF-8 without `/` or NUL, unique
//! among siblings (node names) or within their node (property names). A
//! `compatible` string is any UTF-8 of at most `max_name_len` bytes, and
//! may be empty. The root sits at depth 0 and a child one deeper than its
//! parent; a tree is accepted when no node is deeper than
//! [`TreeLimits::max_depth`].
//!
//! # Wire format (`TREE` section, version 1)
//!
//! The encoding is [postcard] 1.x of this flat structure, the nodes listed in
//! pre-order (a node, then each of its children's subtrees, in order):
//!
//! ```text
//! struct WireTree   { version: u8, nodes: Vec<WireNode> }
//! struct WireNode   { parent: u32, name: str, compatible: str, props: Vec<WireProp> }
//! struct WireProp   { name: str, value: WireValue }
//! enum   WireValue  { U64(u64) = 0, Bytes([u8]) = 1, Str(str) = 2, Range(PhysRange) = 3 }
//! struct PhysRange  { start: u64, len: u64 }
//! ```
//!
//! Postcard writes the fields of a struct one after another with no padding,
//! tags or alignment; byte by byte that gives:
//!
//! ```text
//! offset 0   u8       version, = 1 (TREE_VERSION), a plain byte
//! offset 1   varint   node count N (>= 1; <= max_nodes and <= 2^32)
//! then N nodes, each:
//!            varint   parent: pre-order index of the parent node; 0 for the
//!                     root (node 0), which is its own nominal parent
//!            varint   name length L, then L bytes of UTF-8 (root: L = 0)
//!            varint   compatible length, then that many bytes of UTF-8
//!            varint   property count P (<= max_props)
//!            then P properties, each:
//!                varint   name length, then the name's UTF-8 bytes
//!                varint   type tag: 0 = u64, 1 = bytes, 2 = string, 3 = range
//!                tag 0:   varint   the value
//!                tag 1:   varint   length, then that many raw bytes
//!                tag 2:   varint   length, then that many bytes of UTF-8
//!                tag 3:   varint   start, varint len (arena byte offsets)
//! nothing may follow the last node
//! ```
//!
//! A varint is postcard's unsigned LEB128: seven value bits per byte, least
//! significant group first, high bit set on every byte except the last; at
//! most 5 bytes for a `u32` (parent, type tag) and 10 for a `u64` (counts,
//! lengths, values). Decoding accepts only the minimal encoding, so each tree
//! has exactly one encoding and `encode(decode(b)) == b` for every accepted `b`.
//!
//! For example, a root compatible with `"kho-v1"` and one child `kv`
//! (`"kv-store-v1"`) holding `n = 300` and `idx = [0x10000, +0x2000)`
//! encodes to 44 bytes:
//!
//! ```
//! # use kho_core::tree::{Node, Tree};
//! # use kho_core::{PhysAddr, PhysRange};
//! let tree = Tree::new(
//!     Node::root("kho-v1").with_child(
//!         Node::new("kv", "kv-store-v1")
//!             .with_u64("n", 300)
//!             .with_range("idx", PhysRange::new(PhysAddr(0x10000), 0x2000)),
//!     ),
//! );
//! let expected: &[u8] = &[
//!     0x01, // version
//!     0x02, // two nodes
//!     0x00, 0x00, 0x06, b'k', b'h', b'o', b'-', b'v', b'1', 0x00, // root: parent 0,
//!     //       name "", compatible "kho-v1", no properties
//!     0x00, 0x02, b'k', b'v', // node 1: parent 0, name "kv"
//!     0x0b, b'k', b'v', b'-', b's', b't', b'o', b'r', b'e', b'-', b'v', b'1',
//!     0x02, // two properties
//!     0x01, b'n', 0x00, 0xac, 0x02, // "n": tag 0 (u64), 300
//!     0x03, b'i', b'd', b'x', 0x03, 0x80, 0x80, 0x04, 0x80, 0x40, // "idx": tag 3
//!     //       (range), start 0x10000, len 0x2000
//! ];
//! assert_eq!(tree.encode()?, expected);
//! # Ok::<(), kho_core::tree::TreeError>(())
//! ```
//!
//! Node `i > 0` names as its parent a node on the path from the root to node
//! `i - 1` (that node itself or one of its ancestors) — exactly the nodes a
//! pre-order listing can return to. Anything else is [`TreeError::BadParent`].
//!
//! # Decoding untrusted bytes
//!
//! [`Tree::decode`] reads the flat list with an explicit stack (never
//! recursion), checks each claimed count against both its cap and the bytes
//! left (a node takes at least 4 bytes, a property at least 3), reserves
//! space for at most 16 properties on a claim's word and grows only with
//! what it actually reads, and checks name and value sizes while they are
//! still borrowed from the input, so memory use follows the input length:
//! at most 64 heap bytes per input byte plus 64 KiB. The worst inputs are
//! the most nodes of 4 to 6 bytes each (about 50 heap bytes per input byte:
//! a decoded node is 96 bytes, and the canonical-form check re-encodes the
//! tree); `kho-core/tests/memory.rs` measures them. Lists of a decoded node
//! that are at most half full are trimmed when the node is complete.
//!
//! In order, the first failing check wins:
//!
//! 1. input length `<= max_encoded_bytes`, else [`TreeError::TooLarge`];
//! 2. the version byte is present ([`TreeError::Decode`] at offset 0) and
//!    equals [`TREE_VERSION`] ([`TreeError::UnsupportedVersion`]);
//! 3. the node count decodes, is not 0 ([`TreeError::Decode`]), is within
//!    the cap ([`TreeError::TooManyNodes`]) and fits the remaining bytes
//!    ([`TreeError::Decode`]);
//! 4. for each node in order: the parent index ([`TreeError::Decode`],
//!    [`TreeError::BadParent`]), the name, the depth
//!    ([`TreeError::TooDeep`]), the name's and compatible's lengths
//!    ([`TreeError::NameTooLong`]), the property count (cap:
//!    [`TreeError::TooManyProps`]; remaining bytes: [`TreeError::Decode`]),
//!    and each property: it decodes, its name length, its value size
//!    ([`TreeError::ValueTooLarge`]);
//! 5. no bytes follow the last node ([`TreeError::TrailingBytes`]);
//! 6. per node in pre-order, the tree rules of [`Tree::encode`]: the root's
//!    name is empty, other names are valid ([`TreeError::BadName`]), and
//!    property names, then child names, are unique
//!    ([`TreeError::DuplicateName`]);
//! 7. the input is the canonical encoding of the tree it describes
//!    ([`TreeError::Decode`], "minimal varint encoding").
//!
//! [`Tree::encode`] applies the same rules, so it never produces bytes that
//! `decode` with the same limits would reject.
//!
//! Dropping a [`Node`], walking, dumping and encoding are iterative too. The
//! derived `Clone`, `PartialEq`, `Hash`, `Debug` and `Serialize`
//! implementations recurse once per level, which a decoded tree bounds by
//! [`TreeLimits::max_depth`].

use core::fmt;
use std::collections::HashSet;
use std::rc::Rc;

use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::addr::PhysRange;

/// Version byte at offset 0 of every tree encoding written by this crate.
pub const TREE_VERSION: u8 = 1;

/// Smallest possible encoding of one node: parent, name length, compatible
/// length and property count, one varint byte each.
const MIN_NODE_BYTES: usize = 4;
/// Smallest possible encoding of one property: name length, type tag and a
/// one-byte value (an empty name is rejected later, with a precise error).
const MIN_PROP_BYTES: usize = 3;

/// Most properties reserved for on the strength of a claimed count alone.
const PROPS_RESERVED: u64 = 16;

/// Caps applied by [`Tree::decode`] and [`Tree::encode_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeLimits {
    /// Deepest accepted node; the root is at depth 0. Default 16.
    pub max_depth: usize,
    /// Most nodes in a tree, the root included. Default 4096. Never more
    /// than 2^32, the most a `u32` parent index can name.
    pub max_nodes: usize,
    /// Most properties on one node. Default 256.
    pub max_props: usize,
    /// Longest node name, property name or `compatible` string, in bytes.
    /// Default 255.
    pub max_name_len: usize,
    /// Longest `bytes` or `string` property value, in bytes. Default 1 MiB.
    pub max_value_len: usize,
    /// Longest whole encoding, in bytes. Default 16 MiB.
    pub max_encoded_bytes: usize,
}

impl TreeLimits {
    /// The default caps, usable in `const` context.
    pub const DEFAULT: TreeLimits = TreeLimits {
        max_depth: 16,
        max_nodes: 4096,
        max_props: 256,
        max_name_len: 255,
        max_value_len: 1 << 20,
        max_encoded_bytes: 16 << 20,
    };
}

impl Default for TreeLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a tree was refused, or a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// The encoding is longer than [`TreeLimits::max_encoded_bytes`].
    #[error("tree encoding is {len:#x} bytes, more than the maximum {max:#x}")]
    TooLarge {
        /// Length of the encoding.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The bytes at `offset` are not a valid encoding of the expected field.
    #[error("tree decode error at offset {offset:#x}: expected {what}, found {found}")]
    Decode {
        /// Byte offset of the field that failed to decode.
        offset: usize,
        /// The field that was expected there.
        what: &'static str,
        /// What was found instead.
        found: &'static str,
    },
    /// A node lies deeper than [`TreeLimits::max_depth`].
    #[error("node {path} is at depth {depth}, deeper than the maximum {max}")]
    TooDeep {
        /// Path of the offending node.
        path: String,
        /// Its depth (the root is at depth 0).
        depth: usize,
        /// The cap.
        max: usize,
    },
    /// More nodes than [`TreeLimits::max_nodes`].
    #[error("tree has {found} nodes, more than the maximum {max}")]
    TooManyNodes {
        /// The number of nodes, as claimed by the encoding or counted.
        found: u64,
        /// The cap.
        max: usize,
    },
    /// A node has more properties than [`TreeLimits::max_props`].
    #[error("node {path} has {found} properties, more than the maximum {max}")]
    TooManyProps {
        /// Path of the node.
        path: String,
        /// The number of properties, as claimed or counted.
        found: u64,
        /// The cap.
        max: usize,
    },
    /// A name or `compatible` string is longer than
    /// [`TreeLimits::max_name_len`].
    #[error("{what} in node {path} is {len} bytes long, more than the maximum {max}")]
    NameTooLong {
        /// Path of the node holding the string (for a node name: its parent).
        path: String,
        /// Which string: `"node name"`, `"compatible"` or `"property name"`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A node or property name is empty or contains `/` or NUL, or the root
    /// node's name is not empty.
    #[error("bad {what} {name:?} in node {path}: expected {expected}")]
    BadName {
        /// Path of the node holding the name (for a node name: its parent).
        path: String,
        /// Which name: `"node name"`, `"root name"` or `"property name"`.
        what: &'static str,
        /// The rule the name breaks.
        expected: &'static str,
        /// The offending name.
        name: String,
    },
    /// Two children of one node, or two properties of one node, share a name.
    #[error("duplicate {what} {name:?} in node {path}")]
    DuplicateName {
        /// Path of the node whose children or properties collide.
        path: String,
        /// `"child node"` or `"property"`.
        what: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A `bytes` or `string` value is longer than
    /// [`TreeLimits::max_value_len`].
    #[error("property {prop:?} of node {path} holds {len} bytes, more than the maximum {max}")]
    ValueTooLarge {
        /// Path of the node.
        path: String,
        /// Name of the property.
        prop: String,
        /// Length of the value in bytes.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Node `index` names a parent that a pre-order listing cannot have at
    /// that point (not the previous node or one of its ancestors; not 0 for
    /// the root).
    #[error("node {index} names parent {parent}, which is not an open ancestor")]
    BadParent {
        /// Pre-order index of the node.
        index: u64,
        /// The parent index it names.
        parent: u32,
    },
    /// Bytes remain after the last node.
    #[error("{len} trailing bytes after the tree at offset {offset:#x}")]
    TrailingBytes {
        /// Offset of the first trailing byte.
        offset: usize,
        /// Number of trailing bytes.
        len: usize,
    },
    /// The version byte is not [`TREE_VERSION`].
    #[error("unsupported tree version {found}, expected {expected}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this crate reads.
        expected: u8,
    },
    /// A required property is absent.
    #[error("node {path} has no property {prop:?}")]
    Missing {
        /// Path of the node.
        path: String,
        /// Name of the property.
        prop: String,
    },
    /// A property has another type than the one asked for.
    #[error("property {prop:?} of node {path} is a {found}, expected a {expected}")]
    WrongType {
        /// Path of the node.
        path: String,
        /// Name of the property.
        prop: String,
        /// The type asked for.
        expected: &'static str,
        /// The type it has.
        found: &'static str,
    },
    /// A node's `compatible` string is not the one expected.
    #[error("node {path} is compatible with {found:?}, expected {expected:?}")]
    Incompatible {
        /// Path of the node.
        path: String,
        /// The compatible string expected.
        expected: String,
        /// The compatible string found.
        found: String,
    },
    /// No node at this path.
    #[error("no node at path {path:?}")]
    NotFound {
        /// The path looked up.
        path: String,
    },
    /// The serializer failed while writing an encoding.
    #[error("tree encoding failed: {found}")]
    Encode {
        /// The serializer's complaint.
        found: &'static str,
    },
}

/// Result alias for tree operations.
pub type TreeResult<T> = Result<T, TreeError>;

/// A typed property value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// An unsigned integer.
    U64(u64),
    /// Opaque bytes.
    Bytes(Vec<u8>),
    /// A UTF-8 string.
    Str(String),
    /// A byte range in the arena; a checker verifies it lies in preserved
    /// memory.
    Range(PhysRange),
}

impl Value {
    /// The type's name as printed in dumps and errors: `"u64"`, `"bytes"`,
    /// `"string"` or `"range"`.
    pub const fn type_name(&self) -> &'static str {
        match self {
            Value::U64(_) => "u64",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "string",
            Value::Range(_) => "range",
        }
    }

    /// The integer, if this is a [`Value::U64`].
    pub const fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            _ => None,
        }
    }

    /// The bytes, if this is a [`Value::Bytes`].
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a [`Value::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The range, if this is a [`Value::Range`].
    pub const fn as_range(&self) -> Option<PhysRange> {
        match self {
            Value::Range(v) => Some(*v),
            _ => None,
        }
    }

    /// Length of a `bytes` or `string` payload, the quantity capped by
    /// [`TreeLimits::max_value_len`]; 0 for fixed-size values.
    fn payload_len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Str(s) => s.len(),
            Value::U64(_) | Value::Range(_) => 0,
        }
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::U64(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}

impl From<PhysRange> for Value {
    fn from(v: PhysRange) -> Self {
        Value::Range(v)
    }
}

impl fmt::Display for Value {
    /// The value as it appears in a dump: `<0x2a>`, `"text"`,
    /// `[de ad be ef]` (the first 64 bytes, then the length),
    /// `<range 0x1000 +0x2000>` (start and length).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        match self {
            Value::U64(v) => write!(f, "<{v:#x}>"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Range(r) => write!(f, "<range {:#x} +{:#x}>", r.start, r.len),
            Value::Bytes(b) => {
                f.write_str("[")?;
                for (i, byte) in b.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                if b.len() > SHOWN {
                    write!(f, " ...] /* {} bytes */", b.len())
                } else {
                    f.write_str("]")
                }
            }
        }
    }
}

/// A named, typed property of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Property {
    /// The name, unique within its node.
    pub name: String,
    /// The value.
    pub value: Value,
}

impl Property {
    /// A property named `name` holding `value`.
    pub fn new(name: impl Into<String>, value: impl Into<Value>) -> Self {
        Property {
            name: name.into(),
            value: value.into(),
        }
    }
}

impl Serialize for Property {
    /// `{"name": ..., "type": "u64" | "bytes" | "string" | "range", "value": ...}`
    /// with bytes as a lowercase hex string and a range as
    /// `{"start": ..., "len": ...}`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Property", 3)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("type", self.value.type_name())?;
        match &self.value {
            Value::U64(v) => s.serialize_field("value", v)?,
            Value::Str(v) => s.serialize_field("value", v)?,
            Value::Range(v) => s.serialize_field("value", v)?,
            Value::Bytes(v) => s.serialize_field("value", &hex(v))?,
        }
        s.end()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A node of the metadata tree.
///
/// Fields are public for direct construction and editing; [`Tree::encode`]
/// checks every rule listed in the [module docs](self) before writing.
/// `Node` implements `Drop` (iteratively, so deep trees cannot overflow the
/// stack), so move a field out with [`core::mem::take`] rather than by
/// destructuring.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Node {
    /// The name, unique among siblings; empty only for the root.
    pub name: String,
    /// What the node's contents follow, e.g. `"kv-store-v1"`.
    pub compatible: String,
    /// Properties, in insertion order.
    pub props: Vec<Property>,
    /// Child nodes, in insertion order.
    pub children: Vec<Node>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Flatten the subtree so that no drop recurses more than one level,
        // however deep the tree.
        let mut pending = core::mem::take(&mut self.children);
        while let Some(mut node) = pending.pop() {
            pending.append(&mut node.children);
        }
    }
}

impl Node {
    /// A node with no properties or children.
    pub fn new(name: impl Into<String>, compatible: impl Into<String>) -> Self {
        Node {
            name: name.into(),
            compatible: compatible.into(),
            props: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A root node: empty name, the given `compatible`.
    pub fn root(compatible: impl Into<String>) -> Self {
        Node::new("", compatible)
    }

    /// Set property `name` to `value`, replacing a property of that name.
    pub fn set_prop(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        let name = name.into();
        let value = value.into();
        match self.props.iter_mut().find(|p| p.name == name) {
            Some(p) => p.value = value,
            None => self.props.push(Property { name, value }),
        }
    }

    /// Remove property `name`, returning its value.
    pub fn remove_prop(&mut self, name: &str) -> Option<Value> {
        let i = self.props.iter().position(|p| p.name == name)?;
        Some(self.props.remove(i).value)
    }

    /// Append a child node.
    pub fn push_child(&mut self, child: Node) {
        self.children.push(child);
    }

    /// Builder form of [`Node::set_prop`].
    #[must_use]
    pub fn with_prop(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set_prop(name, value);
        self
    }

    /// Builder: set a `u64` property.
    #[must_use]
    pub fn with_u64(self, name: impl Into<String>, value: u64) -> Self {
        self.with_prop(name, Value::U64(value))
    }

    /// Builder: set a `bytes` property.
    #[must_use]
    pub fn with_bytes(self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.with_prop(name, Value::Bytes(value.into()))
    }

    /// Builder: set a `string` property.
    #[must_use]
    pub fn with_str(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.with_prop(name, Value::Str(value.into()))
    }

    /// Builder: set a `range` property pointing into the arena.
    #[must_use]
    pub fn with_range(self, name: impl Into<String>, value: PhysRange) -> Self {
        self.with_prop(name, Value::Range(value))
    }

    /// Builder: append a child node.
    #[must_use]
    pub fn with_child(mut self, child: Node) -> Self {
        self.children.push(child);
        self
    }

    /// The child called `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The child called `name`, mutably.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// The property called `name`.
    pub fn prop(&self, name: &str) -> Option<&Property> {
        self.props.iter().find(|p| p.name == name)
    }

    /// The value of the property called `name`.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.prop(name).map(|p| &p.value)
    }

    /// The `u64` property `name`. Errors name this node by its own name;
    /// [`NodeRef`] reports full paths.
    pub fn u64_prop(&self, name: &str) -> TreeResult<u64> {
        self.typed(self.label(), name, "u64", Value::as_u64)
    }

    /// The `bytes` property `name`.
    pub fn bytes_prop(&self, name: &str) -> TreeResult<&[u8]> {
        self.typed(self.label(), name, "bytes", Value::as_bytes)
    }

    /// The `string` property `name`.
    pub fn str_prop(&self, name: &str) -> TreeResult<&str> {
        self.typed(self.label(), name, "string", Value::as_str)
    }

    /// The `range` property `name`.
    pub fn range_prop(&self, name: &str) -> TreeResult<PhysRange> {
        self.typed(self.label(), name, "range", Value::as_range)
    }

    /// `Ok` if this node's `compatible` is exactly `expected`.
    pub fn expect_compatible(&self, expected: &str) -> TreeResult<()> {
        self.check_compatible(self.label(), expected)
    }

    fn label(&self) -> &str {
        if self.name.is_empty() {
            "/"
        } else {
            &self.name
        }
    }

    fn typed<'a, T>(
        &'a self,
        path: &str,
        name: &str,
        expected: &'static str,
        get: impl FnOnce(&'a Value) -> Option<T>,
    ) -> TreeResult<T> {
        let value = self.value(name).ok_or_else(|| TreeError::Missing {
            path: path.to_owned(),
            prop: name.to_owned(),
        })?;
        get(value).ok_or_else(|| TreeError::WrongType {
            path: path.to_owned(),
            prop: name.to_owned(),
            expected,
            found: value.type_name(),
        })
    }

    fn check_compatible(&self, path: &str, expected: &str) -> TreeResult<()> {
        if self.compatible == expected {
            Ok(())
        } else {
            Err(TreeError::Incompatible {
                path: path.to_owned(),
                expected: expected.to_owned(),
                found: self.compatible.clone(),
            })
        }
    }
}

/// A node together with its path from the root, as returned by
/// [`Tree::node`]. Dereferences to [`Node`]; its typed getters report the
/// full path in errors.
#[derive(Debug, Clone)]
pub struct NodeRef<'a> {
    path: String,
    node: &'a Node,
}

impl<'a> NodeRef<'a> {
    /// The node's path, `/` for the root.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The node itself, with the tree's lifetime.
    pub fn node(&self) -> &'a Node {
        self.node
    }

    /// The child called `name`, with its path.
    pub fn child(&self, name: &str) -> Option<NodeRef<'a>> {
        let node = self.node.child(name)?;
        Some(NodeRef {
            path: join(&self.path, &node.name),
            node,
        })
    }

    /// The children, each with its path.
    pub fn children(&self) -> impl Iterator<Item = NodeRef<'a>> + '_ {
        self.node.children.iter().map(move |node| NodeRef {
            path: join(&self.path, &node.name),
            node,
        })
    }

    /// The `u64` property `name`.
    pub fn u64_prop(&self, name: &str) -> TreeResult<u64> {
        self.node.typed(&self.path, name, "u64", Value::as_u64)
    }

    /// The `bytes` property `name`.
    pub fn bytes_prop(&self, name: &str) -> TreeResult<&'a [u8]> {
        self.node.typed(&self.path, name, "bytes", Value::as_bytes)
    }

    /// The `string` property `name`.
    pub fn str_prop(&self, name: &str) -> TreeResult<&'a str> {
        self.node.typed(&self.path, name, "string", Value::as_str)
    }

    /// The `range` property `name`.
    pub fn range_prop(&self, name: &str) -> TreeResult<PhysRange> {
        self.node.typed(&self.path, name, "range", Value::as_range)
    }

    /// `Ok` if the node's `compatible` is exactly `expected`, else
    /// [`TreeError::Incompatible`] naming this path.
    pub fn expect_compatible(&self, expected: &str) -> TreeResult<()> {
        self.node.check_compatible(&self.path, expected)
    }
}

impl core::ops::Deref for NodeRef<'_> {
    type Target = Node;

    fn deref(&self) -> &Node {
        self.node
    }
}

/// The path of child `name` under the node at `parent`.
fn join(parent: &str, name: &str) -> String {
    let mut path = String::with_capacity(parent.len() + 1 + name.len());
    path.push_str(parent);
    if !parent.ends_with('/') {
        path.push('/');
    }
    path.push_str(name);
    path
}

/// The metadata tree: a root [`Node`] whose name is empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Tree {
    root: Node,
}

impl Tree {
    /// A tree with this root. The root's name should be empty (see
    /// [`Node::root`]); [`Tree::encode`] refuses any other.
    pub fn new(root: Node) -> Self {
        Tree { root }
    }

    /// The root node.
    pub fn root(&self) -> &Node {
        &self.root
    }

    /// The root node, mutably.
    pub fn root_mut(&mut self) -> &mut Node {
        &mut self.root
    }

    /// The root node, by value.
    pub fn into_root(self) -> Node {
        self.root
    }

    /// The node at `path`: `/` is the root, `/a/b` the child `b` of the
    /// root's child `a`. Empty components (`//`, a trailing `/`) are
    /// ignored; a path that does not start with `/` is not found.
    pub fn node(&self, path: &str) -> TreeResult<NodeRef<'_>> {
        let not_found = || TreeError::NotFound {
            path: path.to_owned(),
        };
        let rest = path.strip_prefix('/').ok_or_else(not_found)?;
        let mut at = NodeRef {
            path: String::from("/"),
            node: &self.root,
        };
        for name in rest.split('/').filter(|s| !s.is_empty()) {
            at = at.child(name).ok_or_else(not_found)?;
        }
        Ok(at)
    }

    /// Every node with its path, in pre-order, without recursion.
    pub fn walk(&self) -> Walk<'_> {
        Walk {
            stack: vec![(String::from("/"), &self.root)],
        }
    }

    /// Every [`Value::Range`] property as (node path, property name, range),
    /// in pre-order of nodes and insertion order of properties.
    pub fn ranges(&self) -> impl Iterator<Item = (String, &str, PhysRange)> + '_ {
        self.walk().flat_map(|(path, node)| {
            node.props.iter().filter_map(move |p| {
                p.value
                    .as_range()
                    .map(|r| (path.clone(), p.name.as_str(), r))
            })
        })
    }

    /// Number of nodes, the root included.
    pub fn node_count(&self) -> usize {
        let mut count = 0usize;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += 1;
            stack.extend(node.children.iter());
        }
        count
    }

    /// Depth of the deepest node (0 for a lone root).
    pub fn depth(&self) -> usize {
        let mut max = 0;
        let mut stack = vec![(&self.root, 0usize)];
        while let Some((node, depth)) = stack.pop() {
            max = max.max(depth);
            stack.extend(node.children.iter().map(|c| (c, depth + 1)));
        }
        max
    }

    /// Encode with the default limits, refusing a tree that
    /// [`Tree::decode`] with [`TreeLimits::default`] would reject.
    pub fn encode(&self) -> TreeResult<Vec<u8>> {
        self.encode_with(&TreeLimits::DEFAULT)
    }

    /// Encode, refusing a tree that [`Tree::decode`] with `limits` would
    /// reject.
    pub fn encode_with(&self, limits: &TreeLimits) -> TreeResult<Vec<u8>> {
        let nodes = self.flatten(limits)?;
        let wire = WireTree {
            version: TREE_VERSION,
            nodes,
        };
        let bytes = postcard::to_allocvec(&wire).map_err(|e| TreeError::Encode {
            found: postcard_fault(&e),
        })?;
        if bytes.len() > limits.max_encoded_bytes {
            return Err(TreeError::TooLarge {
                len: bytes.len(),
                max: limits.max_encoded_bytes,
            });
        }
        Ok(bytes)
    }

    /// Decode and validate untrusted bytes; see the [module docs](self) for
    /// the format and the order of checks. Allocates in proportion to
    /// `bytes.len()` only, and never recurses.
    pub fn decode(bytes: &[u8], limits: &TreeLimits) -> TreeResult<Tree> {
        if bytes.len() > limits.max_encoded_bytes {
            return Err(TreeError::TooLarge {
                len: bytes.len(),
                max: limits.max_encoded_bytes,
            });
        }
        let mut r = Reader {
            input: bytes,
            pos: 0,
        };
        let version: u8 = r.take("version byte")?;
        if version != TREE_VERSION {
            return Err(TreeError::UnsupportedVersion {
                found: version,
                expected: TREE_VERSION,
            });
        }
        let count_at = r.pos;
        let count: u64 = r.take("node count")?;
        if count == 0 {
            return Err(TreeError::Decode {
                offset: count_at,
                what: "node count >= 1",
                found: "0 (no root node)",
            });
        }
        let max_nodes = node_cap(limits);
        if count > max_nodes as u64 {
            return Err(TreeError::TooManyNodes {
                found: count,
                max: max_nodes,
            });
        }
        if count > (r.remaining() / MIN_NODE_BYTES) as u64 {
            return Err(TreeError::Decode {
                offset: count_at,
                what: "node count that fits the remaining input",
                found: "more nodes than the remaining bytes can hold",
            });
        }

        // The path from the root to the last node read; each entry is
        // (pre-order index, node still collecting children).
        let mut open: Vec<(u32, Node)> = Vec::new();
        for index in 0..count {
            let parent: u32 = r.take("parent index")?;
            if index == 0 {
                if parent != 0 {
                    return Err(TreeError::BadParent { index, parent });
                }
            } else {
                let at = open
                    .iter()
                    .rposition(|(i, _)| *i == parent)
                    .ok_or(TreeError::BadParent { index, parent })?;
                close_to(&mut open, at + 1);
            }
            let depth = open.len();
            let name: &str = r.take("node name")?;
            let path = || open_path(&open, name);
            if depth > limits.max_depth {
                return Err(TreeError::TooDeep {
                    path: path(),
                    depth,
                    max: limits.max_depth,
                });
            }
            if name.len() > limits.max_name_len {
                return Err(TreeError::NameTooLong {
                    path: open_path_parent(&open),
                    what: "node name",
                    len: name.len(),
                    max: limits.max_name_len,
                });
            }
            let compatible: &str = r.take("compatible string")?;
            if compatible.len() > limits.max_name_len {
                return Err(TreeError::NameTooLong {
                    path: path(),
                    what: "compatible",
                    len: compatible.len(),
                    max: limits.max_name_len,
                });
            }
            let props_at = r.pos;
            let nprops: u64 = r.take("property count")?;
            if nprops > limits.max_props as u64 {
                return Err(TreeError::TooManyProps {
                    path: path(),
                    found: nprops,
                    max: limits.max_props,
                });
            }
            if nprops > (r.remaining() / MIN_PROP_BYTES) as u64 {
                return Err(TreeError::Decode {
                    offset: props_at,
                    what: "property count that fits the remaining input",
                    found: "more properties than the remaining bytes can hold",
                });
            }
            // A claim buys at most a small reservation; the rest grows
            // with properties actually read.
            let mut props = Vec::with_capacity(nprops.min(PROPS_RESERVED) as usize);
            for _ in 0..nprops {
                let prop: WireProp<'_> = r.take("property")?;
                if prop.name.len() > limits.max_name_len {
                    return Err(TreeError::NameTooLong {
                        path: path(),
                        what: "property name",
                        len: prop.name.len(),
                        max: limits.max_name_len,
                    });
                }
                let len = prop.value.payload_len();
                if len > limits.max_value_len {
                    return Err(TreeError::ValueTooLarge {
                        path: path(),
                        prop: prop.name.to_owned(),
                        len,
                        max: limits.max_value_len,
                    });
                }
                props.push(prop.to_property());
            }
            let node = Node {
                name: name.to_owned(),
                compatible: compatible.to_owned(),
                props,
                children: Vec::new(),
            };
            // `index < count <= node_cap(limits)`, so it fits the u32 parent
            // field; the fallback is unreachable.
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            open.push((index, node));
        }
        if r.remaining() > 0 {
            return Err(TreeError::TrailingBytes {
                offset: r.pos,
                len: r.remaining(),
            });
        }
        close_to(&mut open, 1);
        let root = match open.pop() {
            Some((_, mut root)) => {
                trim(&mut root);
                root
            }
            None => {
                return Err(TreeError::Decode {
                    offset: count_at,
                    what: "root node",
                    found: "none",
                })
            }
        };
        let tree = Tree { root };

        // Names, uniqueness and the root's name; then canonical form, which
        // leaves non-minimal varints as the only possible difference.
        let canonical = tree.encode_with(limits)?;
        if let Some(offset) = canonical.iter().zip(bytes).position(|(a, b)| a != b) {
            return Err(TreeError::Decode {
                offset,
                what: "minimal varint encoding",
                found: "a non-canonical encoding",
            });
        }
        if canonical.len() != bytes.len() {
            return Err(TreeError::Decode {
                offset: canonical.len().min(bytes.len()),
                what: "minimal varint encoding",
                found: "a non-canonical encoding",
            });
        }
        Ok(tree)
    }

    /// Check every rule and list the nodes in wire form, pre-order, without
    /// recursion.
    fn flatten(&self, limits: &TreeLimits) -> TreeResult<Vec<WireNode<'_>>> {
        // Sized once: a list grown by doubling holds up to twice its nodes
        // and, while it moves, three times.
        let mut out: Vec<WireNode<'_>> =
            Vec::with_capacity(self.node_count().min(node_cap(limits)));
        // (node, parent index, depth, parent's path); siblings share the
        // parent's path.
        let mut stack: Vec<(&Node, u32, usize, Rc<str>)> = vec![(&self.root, 0, 0, Rc::from(""))];
        while let Some((node, parent, depth, parent_path)) = stack.pop() {
            let too_many = || TreeError::TooManyNodes {
                found: self.node_count() as u64,
                max: node_cap(limits),
            };
            let index = out.len();
            if index >= node_cap(limits) {
                return Err(too_many());
            }
            let index = u32::try_from(index).map_err(|_| too_many())?;
            let is_root = index == 0;
            if depth > limits.max_depth {
                return Err(TreeError::TooDeep {
                    path: node_path(&parent_path, node, is_root),
                    depth,
                    max: limits.max_depth,
                });
            }
            check_node(node, is_root, &parent_path, limits)?;
            out.push(WireNode {
                parent,
                name: &node.name,
                compatible: &node.compatible,
                props: node.props.iter().map(WireProp::from_property).collect(),
            });
            if !node.children.is_empty() {
                let shared: Rc<str> = Rc::from(node_path(&parent_path, node, is_root));
                for child in node.children.iter().rev() {
                    stack.push((child, index, depth + 1, Rc::clone(&shared)));
                }
            }
        }
        Ok(out)
    }
}

/// [`TreeLimits::max_nodes`], lowered to what a u32 parent index can name.
fn node_cap(limits: &TreeLimits) -> usize {
    let wire_max = u64::from(u32::MAX) + 1;
    usize::try_from(wire_max).map_or(limits.max_nodes, |w| limits.max_nodes.min(w))
}

/// Attach every open node above `keep` entries to its parent.
///
/// A closed node has all its children, so lists at most half full are
/// trimmed: a vector grown one push at a time holds room for at least four
/// children, which for a chain of single children quadruples the tree.
fn close_to(open: &mut Vec<(u32, Node)>, keep: usize) {
    while open.len() > keep {
        let Some((_, mut node)) = open.pop() else {
            return;
        };
        trim(&mut node);
        if let Some((_, parent)) = open.last_mut() {
            parent.children.push(node);
        }
    }
}

/// Drop the spare room of a node's lists when it is at least their length.
fn trim(node: &mut Node) {
    if node.children.capacity() >= 2 * node.children.len() {
        node.children.shrink_to_fit();
    }
    if node.props.capacity() >= 2 * node.props.len() {
        node.props.shrink_to_fit();
    }
}

/// Path of a node called `name` whose ancestors are `open`.
fn open_path(open: &[(u32, Node)], name: &str) -> String {
    join(&open_path_parent(open), name)
}

/// Path of the last node in `open`.
fn open_path_parent(open: &[(u32, Node)]) -> String {
    let mut path = String::from("/");
    for (_, node) in open.iter().skip(1) {
        path = join(&path, &node.name);
    }
    path
}

/// The per-node rules: names, lengths, counts, uniqueness.
fn check_node(
    node: &Node,
    is_root: bool,
    parent_path: &str,
    limits: &TreeLimits,
) -> TreeResult<()> {
    // Paths are built only for an error.
    let path = || node_path(parent_path, node, is_root);
    if is_root {
        if !node.name.is_empty() {
            return Err(TreeError::BadName {
                path: String::from("/"),
                what: "root name",
                expected: "the empty string",
                name: node.name.clone(),
            });
        }
    } else {
        if node.name.len() > limits.max_name_len {
            return Err(TreeError::NameTooLong {
                path: parent_path.to_owned(),
                what: "node name",
                len: node.name.len(),
                max: limits.max_name_len,
            });
        }
        if let Some(expected) = name_fault(&node.name) {
            return Err(TreeError::BadName {
                path: parent_path.to_owned(),
                what: "node name",
                expected,
                name: node.name.clone(),
            });
        }
    }
    if node.compatible.len() > limits.max_name_len {
        return Err(TreeError::NameTooLong {
            path: path(),
            what: "compatible",
            len: node.compatible.len(),
            max: limits.max_name_len,
        });
    }
    if node.props.len() > limits.max_props {
        return Err(TreeError::TooManyProps {
            path: path(),
            found: node.props.len() as u64,
            max: limits.max_props,
        });
    }
    for prop in &node.props {
        if prop.name.len() > limits.max_name_len {
            return Err(TreeError::NameTooLong {
                path: path(),
                what: "property name",
                len: prop.name.len(),
                max: limits.max_name_len,
            });
        }
        if let Some(expected) = name_fault(&prop.name) {
            return Err(TreeError::BadName {
                path: path(),
                what: "property name",
                expected,
                name: prop.name.clone(),
            });
        }
        let len = prop.value.payload_len();
        if len > limits.max_value_len {
            return Err(TreeError::ValueTooLarge {
                path: path(),
                prop: prop.name.clone(),
                len,
                max: limits.max_value_len,
            });
        }
    }
    if let Some(name) = first_duplicate(node.props.iter().map(|p| p.name.as_str())) {
        return Err(TreeError::DuplicateName {
            path: path(),
            what: "property",
            name: name.to_owned(),
        });
    }
    if let Some(name) = first_duplicate(node.children.iter().map(|c| c.name.as_str())) {
        return Err(TreeError::DuplicateName {
            path: path(),
            what: "child node",
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Path of `node`, whose parent's path is `parent_path`.
fn node_path(parent_path: &str, node: &Node, is_root: bool) -> String {
    if is_root {
        String::from("/")
    } else {
        join(parent_path, &node.name)
    }
}

/// The first name that repeats an earlier one: a linear scan for the short
/// lists that are typical, a hash set beyond.
fn first_duplicate<'a, I>(names: I) -> Option<&'a str>
where
    I: ExactSizeIterator<Item = &'a str> + Clone,
{
    const LINEAR: usize = 16;
    if names.len() <= LINEAR {
        return names
            .clone()
            .enumerate()
            .find(|&(i, name)| names.clone().take(i).any(|e| e == name))
            .map(|(_, name)| name);
    }
    let mut seen = HashSet::with_capacity(names.len());
    names.into_iter().find(|name| !seen.insert(*name))
}

/// The rule a node or property name breaks, if any.
fn name_fault(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a non-empty name")
    } else if name.contains('/') {
        Some("a name without '/'")
    } else if name.contains('\0') {
        Some("a name without NUL")
    } else {
        None
    }
}

/// A cursor over the input that names the offset of every failure.
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    fn take<T: Deserialize<'a>>(&mut self, what: &'static str) -> TreeResult<T> {
        let rest = self.input.get(self.pos..).unwrap_or(&[]);
        match postcard::take_from_bytes::<T>(rest) {
            Ok((value, tail)) => {
                self.pos = self.input.len() - tail.len();
                Ok(value)
            }
            Err(e) => Err(TreeError::Decode {
                offset: self.pos,
                what,
                found: postcard_fault(&e),
            }),
        }
    }
}

fn postcard_fault(e: &postcard::Error) -> &'static str {
    use postcard::Error as E;
    match e {
        E::DeserializeUnexpectedEnd => "end of input",
        E::DeserializeBadVarint => "a malformed or out-of-range varint",
        E::DeserializeBadUtf8 => "invalid UTF-8",
        E::DeserializeBadEnum => "an enum tag above u32::MAX",
        E::SerdeDeCustom => "an invalid value (e.g. an unknown property type tag)",
        E::DeserializeBadBool | E::DeserializeBadChar | E::DeserializeBadOption => {
            "an invalid primitive"
        }
        _ => "a malformed encoding",
    }
}

/// The flat form written to the `TREE` section; see the module docs.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WireTree<'a> {
    version: u8,
    #[serde(borrow)]
    nodes: Vec<WireNode<'a>>,
}

/// One node of the pre-order listing.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WireNode<'a> {
    parent: u32,
    name: &'a str,
    compatible: &'a str,
    #[serde(borrow)]
    props: Vec<WireProp<'a>>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WireProp<'a> {
    name: &'a str,
    #[serde(borrow)]
    value: WireValue<'a>,
}

/// Variant order is the wire tag: do not reorder.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum WireValue<'a> {
    U64(u64),
    Bytes(&'a [u8]),
    Str(&'a str),
    Range(PhysRange),
}

impl<'a> WireProp<'a> {
    fn from_property(p: &'a Property) -> Self {
        let value = match &p.value {
            Value::U64(v) => WireValue::U64(*v),
            Value::Bytes(v) => WireValue::Bytes(v),
            Value::Str(v) => WireValue::Str(v),
            Value::Range(v) => WireValue::Range(*v),
        };
        WireProp {
            name: &p.name,
            value,
        }
    }

    fn to_property(&self) -> Property {
        let value = match self.value {
            WireValue::U64(v) => Value::U64(v),
            WireValue::Bytes(v) => Value::Bytes(v.to_vec()),
            WireValue::Str(v) => Value::Str(v.to_owned()),
            WireValue::Range(v) => Value::Range(v),
        };
        Property {
            name: self.name.to_owned(),
            value,
        }
    }
}

impl WireValue<'_> {
    fn payload_len(&self) -> usize {
        match self {
            WireValue::Bytes(b) => b.len(),
            WireValue::Str(s) => s.len(),
            WireValue::U64(_) | WireValue::Range(_) => 0,
        }
    }
}

/// Pre-order iterator over a tree's nodes and their paths; see
/// [`Tree::walk`].
#[derive(Debug, Clone)]
pub struct Walk<'a> {
    stack: Vec<(String, &'a Node)>,
}

impl<'a> Iterator for Walk<'a> {
    type Item = (String, &'a Node);

    fn next(&mut self) -> Option<Self::Item> {
        let (path, node) = self.stack.pop()?;
        for child in node.children.iter().rev() {
            self.stack.push((join(&path, &child.name), child));
        }
        Some((path, node))
    }
}

impl fmt::Display for Tree {
    /// A `dtc -O dts`-like dump: nested braces, `compatible` first, then
    /// properties with typed values (see [`Value`]'s `Display`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_dump(f, &self.root, true)
    }
}

impl fmt::Display for Node {
    /// The subtree rooted here, in the same form as [`Tree`]'s dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_dump(f, self, self.name.is_empty())
    }
}

fn write_dump(f: &mut fmt::Formatter<'_>, top: &Node, top_is_root: bool) -> fmt::Result {
    enum Step<'a> {
        Open(&'a Node, usize),
        Close(usize),
    }
    let indent = |f: &mut fmt::Formatter<'_>, depth: usize| -> fmt::Result {
        for _ in 0..depth {
            f.write_str("\t")?;
        }
        Ok(())
    };
    let mut steps = vec![Step::Open(top, 0)];
    while let Some(step) = steps.pop() {
        match step {
            Step::Open(node, depth) => {
                indent(f, depth)?;
                if depth == 0 && top_is_root {
                    f.write_str("/ {\n")?;
                } else {
                    writeln!(f, "{} {{", node.name.escape_debug())?;
                }
                indent(f, depth + 1)?;
                writeln!(f, "compatible = {:?};", node.compatible)?;
                for p in &node.props {
                    indent(f, depth + 1)?;
                    writeln!(f, "{} = {};", p.name.escape_debug(), p.value)?;
                }
                steps.push(Step::Close(depth));
                for child in node.children.iter().rev() {
                    steps.push(Step::Open(child, depth + 1));
                }
            }
            Step::Close(depth) => {
                indent(f, depth)?;
                f.write_str("};\n")?;
            }
        }
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PhysAddr;
    use proptest::prelude::*;

    /// Writes tree encodings field by field, so malformed inputs are built
    /// in code rather than hand-edited bytes.
    struct Enc(Vec<u8>);

    impl Enc {
        /// Starts with the current version byte.
        fn new() -> Self {
            Enc(vec![TREE_VERSION])
        }

        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }

        /// Minimal unsigned LEB128, as postcard writes it.
        fn var(mut self, mut v: u64) -> Self {
            loop {
                let low = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(low);
                    return self;
                }
                self.0.push(low | 0x80);
            }
        }

        fn str(self, s: &str) -> Self {
            self.var(s.len() as u64).raw(s.as_bytes())
        }

        fn node(self, parent: u64, name: &str, compatible: &str, nprops: u64) -> Self {
            self.var(parent).str(name).str(compatible).var(nprops)
        }

        fn prop_u64(self, name: &str, v: u64) -> Self {
            self.str(name).var(0).var(v)
        }

        fn prop_bytes(self, name: &str, b: &[u8]) -> Self {
            self.str(name).var(1).var(b.len() as u64).raw(b)
        }

        fn prop_str(self, name: &str, v: &str) -> Self {
            self.str(name).var(2).str(v)
        }

        fn prop_range(self, name: &str, r: PhysRange) -> Self {
            self.str(name).var(3).var(r.start).var(r.len)
        }
    }

    fn lim() -> TreeLimits {
        TreeLimits::default()
    }

    fn decode(bytes: &[u8]) -> TreeResult<Tree> {
        Tree::decode(bytes, &lim())
    }

    fn sample() -> Tree {
        Tree::new(
            Node::root("kho-root-v1")
                .with_u64("generation", 7)
                .with_child(
                    Node::new("kv-store", "kv-store-v1")
                        .with_u64("entries", 300)
                        .with_range("index", PhysRange::new(PhysAddr(0x10000), 0x2000))
                        .with_bytes("key", vec![0xde, 0xad])
                        .with_str("label", "main")
                        .with_child(
                            Node::new("shard0", "kv-shard-v1")
                                .with_range("data", PhysRange::new(PhysAddr(0x40000), 0x1000)),
                        ),
                )
                .with_child(Node::new("slab", "slab-v1")),
        )
    }

    /// A chain of `n` nodes, each the only child of the previous one.
    fn chain(n: u64) -> Vec<u8> {
        let mut e = Enc::new().var(n).node(0, "", "", 0);
        for i in 1..n {
            e = e.node(i - 1, "n", "", 0);
        }
        e.0
    }

    /// A tree of `depth + 1` nodes in one chain.
    fn deep_tree(depth: usize) -> Tree {
        let mut node = Node::new("n", "");
        for _ in 1..depth {
            node = Node::new("n", "").with_child(node);
        }
        let root = Node::root("");
        Tree::new(if depth == 0 {
            root
        } else {
            root.with_child(node)
        })
    }

    #[test]
    fn encoding_matches_the_documented_layout() {
        let expected = Enc::new()
            .var(4)
            .node(0, "", "kho-root-v1", 1)
            .prop_u64("generation", 7)
            .node(0, "kv-store", "kv-store-v1", 4)
            .prop_u64("entries", 300)
            .prop_range("index", PhysRange::new(PhysAddr(0x10000), 0x2000))
            .prop_bytes("key", &[0xde, 0xad])
            .prop_str("label", "main")
            .node(1, "shard0", "kv-shard-v1", 1)
            .prop_range("data", PhysRange::new(PhysAddr(0x40000), 0x1000))
            .node(0, "slab", "slab-v1", 0)
            .0;
        let t = sample();
        let bytes = t.encode().unwrap();
        assert_eq!(bytes, expected);
        // 300 as a varint is two bytes, low group first.
        let at = bytes.windows(2).position(|w| w == [0xac, 0x02]);
        assert!(at.is_some());
        assert_eq!(decode(&bytes).unwrap(), t);
        // The hand-written reader and postcard's derive read the same thing.
        let wire: WireTree<'_> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(wire.version, TREE_VERSION);
        let parents: Vec<u32> = wire.nodes.iter().map(|n| n.parent).collect();
        assert_eq!(parents, [0, 0, 1, 0]);
        assert_eq!(wire.nodes[1].props[3].value, WireValue::Str("main"));
    }

    #[test]
    fn lookups_and_typed_getters() {
        let t = sample();
        assert_eq!(t.node("/").unwrap().compatible, "kho-root-v1");
        assert_eq!(t.node("/").unwrap().path(), "/");
        let kv = t.node("/kv-store").unwrap();
        assert_eq!(kv.path(), "/kv-store");
        kv.expect_compatible("kv-store-v1").unwrap();
        assert_eq!(kv.u64_prop("entries").unwrap(), 300);
        assert_eq!(kv.bytes_prop("key").unwrap(), [0xde, 0xad]);
        assert_eq!(kv.str_prop("label").unwrap(), "main");
        assert_eq!(
            kv.range_prop("index").unwrap(),
            PhysRange::new(PhysAddr(0x10000), 0x2000)
        );
        let shard = t.node("/kv-store/shard0/").unwrap();
        assert_eq!(shard.path(), "/kv-store/shard0");
        assert_eq!(kv.child("shard0").unwrap().path(), "/kv-store/shard0");
        assert_eq!(kv.children().count(), 1);
        assert_eq!(t.root().child("slab").unwrap().compatible, "slab-v1");
        assert!(t.root().child("nope").is_none());
        assert!(kv.prop("nope").is_none());
        assert_eq!(kv.value("entries"), Some(&Value::U64(300)));
        // Node's own getters name the node by its name.
        assert_eq!(
            kv.node().u64_prop("label"),
            Err(TreeError::WrongType {
                path: "kv-store".into(),
                prop: "label".into(),
                expected: "u64",
                found: "string",
            })
        );
        assert_eq!(t.node_count(), 4);
        assert_eq!(t.depth(), 2);
    }

    #[test]
    fn lookup_errors() {
        let t = sample();
        let kv = t.node("/kv-store").unwrap();
        assert_eq!(
            kv.u64_prop("missing"),
            Err(TreeError::Missing {
                path: "/kv-store".into(),
                prop: "missing".into()
            })
        );
        assert_eq!(
            kv.range_prop("entries"),
            Err(TreeError::WrongType {
                path: "/kv-store".into(),
                prop: "entries".into(),
                expected: "range",
                found: "u64",
            })
        );
        assert!(matches!(
            kv.bytes_prop("label"),
            Err(TreeError::WrongType {
                found: "string",
                ..
            })
        ));
        assert!(matches!(
            kv.str_prop("key"),
            Err(TreeError::WrongType { found: "bytes", .. })
        ));
        assert_eq!(
            kv.expect_compatible("kv-store-v2"),
            Err(TreeError::Incompatible {
                path: "/kv-store".into(),
                expected: "kv-store-v2".into(),
                found: "kv-store-v1".into(),
            })
        );
        assert_eq!(
            t.root().expect_compatible("x"),
            Err(TreeError::Incompatible {
                path: "/".into(),
                expected: "x".into(),
                found: "kho-root-v1".into(),
            })
        );
        for path in ["/kv-store/shard1", "kv-store", "/slab/x", ""] {
            assert_eq!(
                t.node(path).map(|n| n.path().to_owned()),
                Err(TreeError::NotFound { path: path.into() })
            );
        }
    }

    #[test]
    fn walk_and_ranges_are_pre_order() {
        let t = sample();
        let paths: Vec<String> = t.walk().map(|(p, _)| p).collect();
        assert_eq!(paths, ["/", "/kv-store", "/kv-store/shard0", "/slab"]);
        let ranges: Vec<(String, &str, PhysRange)> = t.ranges().collect();
        assert_eq!(
            ranges,
            [
                (
                    "/kv-store".to_owned(),
                    "index",
                    PhysRange::new(PhysAddr(0x10000), 0x2000)
                ),
                (
                    "/kv-store/shard0".to_owned(),
                    "data",
                    PhysRange::new(PhysAddr(0x40000), 0x1000)
                ),
            ]
        );
    }

    #[test]
    fn builders_replace_and_remove() {
        let mut n = Node::new("a", "c").with_u64("x", 1).with_str("x", "two");
        assert_eq!(n.props.len(), 1);
        assert_eq!(n.str_prop("x").unwrap(), "two");
        n.set_prop("y", PhysRange::new(PhysAddr(1), 2));
        n.push_child(Node::new("k", ""));
        n.child_mut("k").unwrap().set_prop("z", &b"zz"[..]);
        assert_eq!(n.remove_prop("x"), Some(Value::Str("two".into())));
        assert_eq!(n.remove_prop("x"), None);
        assert_eq!(n.child("k").unwrap().bytes_prop("z").unwrap(), b"zz");
        assert_eq!(Value::from(5u64).as_u64(), Some(5));
        assert_eq!(Value::from(String::from("s")).as_str(), Some("s"));
        assert_eq!(Value::from(vec![1u8]).as_bytes(), Some(&[1u8][..]));
        assert_eq!(Value::from("s").as_range(), None);
        assert_eq!(Property::new("p", 3u64).value, Value::U64(3));
        let t = Tree::new(Node::root("r").with_child(n));
        assert_eq!(t.clone().into_root(), *t.root());
    }

    #[test]
    fn display_dump() {
        let mut t = sample();
        t.root_mut().set_prop("blob", vec![0u8; 70]);
        let text = t.to_string();
        let expected_head = "/ {\n\tcompatible = \"kho-root-v1\";\n\tgeneration = <0x7>;\n";
        assert!(text.starts_with(expected_head), "{text}");
        assert!(text.contains("\tkv-store {\n\t\tcompatible = \"kv-store-v1\";\n"));
        assert!(text.contains("\t\tentries = <0x12c>;\n"));
        assert!(text.contains("\t\tindex = <range 0x10000 +0x2000>;\n"));
        assert!(text.contains("\t\tkey = [de ad];\n"));
        assert!(text.contains("\t\tlabel = \"main\";\n"));
        assert!(text.contains("\t\tshard0 {\n\t\t\tcompatible = \"kv-shard-v1\";\n"));
        assert!(text.contains(" ...] /* 70 bytes */;\n"));
        assert!(text.ends_with("\tslab {\n\t\tcompatible = \"slab-v1\";\n\t};\n};\n"));
        let braces_open = text.matches('{').count();
        assert_eq!(braces_open, text.matches("};").count());
        let kv = t.root().child("kv-store").unwrap().to_string();
        assert!(kv.starts_with("kv-store {\n"));
    }

    #[test]
    fn json_output() {
        let t = Tree::new(
            Node::root("r").with_child(
                Node::new("a", "a-v1")
                    .with_u64("n", 5)
                    .with_bytes("b", vec![0x00, 0xab, 0x7f])
                    .with_str("s", "x\"y")
                    .with_range("r", PhysRange::new(PhysAddr(0x1000), 0x20)),
            ),
        );
        let json = serde_json::to_value(&t).unwrap();
        let expected = serde_json::json!({
            "name": "",
            "compatible": "r",
            "props": [],
            "children": [{
                "name": "a",
                "compatible": "a-v1",
                "props": [
                    {"name": "n", "type": "u64", "value": 5},
                    {"name": "b", "type": "bytes", "value": "00ab7f"},
                    {"name": "s", "type": "string", "value": "x\"y"},
                    {"name": "r", "type": "range", "value": {"start": 4096, "len": 32}},
                ],
                "children": [],
            }],
        });
        assert_eq!(json, expected);
    }

    // ---- every rejection ----

    #[test]
    fn too_large() {
        let bytes = sample().encode().unwrap();
        let small = TreeLimits {
            max_encoded_bytes: bytes.len() - 1,
            ..lim()
        };
        let expected = TreeError::TooLarge {
            len: bytes.len(),
            max: bytes.len() - 1,
        };
        assert_eq!(Tree::decode(&bytes, &small), Err(expected.clone()));
        assert_eq!(sample().encode_with(&small), Err(expected));
        let exact = TreeLimits {
            max_encoded_bytes: bytes.len(),
            ..lim()
        };
        assert!(Tree::decode(&bytes, &exact).is_ok());
        // The default cap is 16 MiB, checked before anything is read.
        let huge = vec![0u8; (16 << 20) + 1];
        assert_eq!(
            decode(&huge),
            Err(TreeError::TooLarge {
                len: (16 << 20) + 1,
                max: 16 << 20
            })
        );
    }

    #[test]
    fn decode_errors_carry_offsets() {
        assert_eq!(
            decode(&[]),
            Err(TreeError::Decode {
                offset: 0,
                what: "version byte",
                found: "end of input"
            })
        );
        assert!(matches!(
            decode(&Enc::new().0),
            Err(TreeError::Decode {
                offset: 1,
                what: "node count",
                ..
            })
        ));
        assert!(matches!(
            decode(&Enc::new().var(0).0),
            Err(TreeError::Decode {
                offset: 1,
                what: "node count >= 1",
                ..
            })
        ));
        // A varint that never terminates.
        assert!(matches!(
            decode(&Enc::new().raw(&[0xff; 11]).0),
            Err(TreeError::Decode {
                offset: 1,
                what: "node count",
                found: "a malformed or out-of-range varint"
            })
        ));
        // Invalid UTF-8 in the root's compatible string, at offset 4.
        let bad = Enc::new()
            .var(1)
            .var(0)
            .str("")
            .var(2)
            .raw(&[0xc3, 0x28])
            .var(0);
        assert_eq!(
            decode(&bad.0),
            Err(TreeError::Decode {
                offset: 4,
                what: "compatible string",
                found: "invalid UTF-8"
            })
        );
        // Unknown property type tag 4; the property starts at offset 6.
        let bad = Enc::new()
            .var(1)
            .node(0, "", "", 1)
            .str("p")
            .var(4)
            .var(0)
            .var(0);
        assert_eq!(
            decode(&bad.0),
            Err(TreeError::Decode {
                offset: 6,
                what: "property",
                found: "an invalid value (e.g. an unknown property type tag)"
            })
        );
        // A parent index wider than u32.
        let bad = Enc::new().var(1).var(1 << 32).str("").str("").var(0);
        assert!(matches!(
            decode(&bad.0),
            Err(TreeError::Decode {
                offset: 2,
                what: "parent index",
                ..
            })
        ));
    }

    #[test]
    fn claimed_counts_are_checked_against_the_input() {
        let open = TreeLimits {
            max_nodes: usize::MAX,
            max_props: usize::MAX,
            ..lim()
        };
        // Two nodes claimed, room for one.
        let bad = Enc::new().var(2).node(0, "", "", 0);
        assert_eq!(
            Tree::decode(&bad.0, &open),
            Err(TreeError::Decode {
                offset: 1,
                what: "node count that fits the remaining input",
                found: "more nodes than the remaining bytes can hold"
            })
        );
        // A property count the input cannot hold, with the cap lifted.
        let bad = Enc::new().var(1).node(0, "", "", 1 << 60).raw(&[0; 8]);
        assert_eq!(
            Tree::decode(&bad.0, &open),
            Err(TreeError::Decode {
                offset: 5,
                what: "property count that fits the remaining input",
                found: "more properties than the remaining bytes can hold"
            })
        );
    }

    #[test]
    fn huge_claimed_node_count_fails_fast() {
        // Ten bytes claiming 2^60 nodes: were that count trusted for a
        // reservation, the allocation would abort the test process.
        let bytes = Enc::new().var(1 << 60).0;
        assert_eq!(bytes.len(), 10);
        assert_eq!(
            decode(&bytes),
            Err(TreeError::TooManyNodes {
                found: 1 << 60,
                max: 4096
            })
        );
        let open = TreeLimits {
            max_nodes: usize::MAX,
            ..lim()
        };
        // Even with the cap lifted, a u32 parent index names at most 2^32.
        assert_eq!(
            Tree::decode(&bytes, &open),
            Err(TreeError::TooManyNodes {
                found: 1 << 60,
                max: 1 << 32
            })
        );
        // 2^32 nodes pass the cap and fail against the input length.
        let bytes = Enc::new().var(1 << 32).0;
        assert!(matches!(
            Tree::decode(&bytes, &open),
            Err(TreeError::Decode {
                offset: 1,
                what: "node count that fits the remaining input",
                ..
            })
        ));
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            assert!(Tree::decode(&bytes, &open).is_err());
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn too_deep_at_cap_plus_one() {
        for max in [0usize, 1, 16] {
            let l = TreeLimits {
                max_depth: max,
                ..lim()
            };
            let ok = deep_tree(max);
            assert_eq!(ok.depth(), max);
            let bytes = ok.encode_with(&l).unwrap();
            assert_eq!(Tree::decode(&bytes, &l).unwrap(), ok);
            assert_eq!(bytes, chain(max as u64 + 1));

            let deep = deep_tree(max + 1);
            let path = format!("/{}", vec!["n"; max + 1].join("/"));
            let expected = TreeError::TooDeep {
                path,
                depth: max + 1,
                max,
            };
            assert_eq!(deep.encode_with(&l), Err(expected.clone()));
            assert_eq!(Tree::decode(&chain(max as u64 + 2), &l), Err(expected));
        }
    }

    #[test]
    fn hundred_thousand_levels_do_not_recurse() {
        // Run on a small stack: any recursion per level would overflow it.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let bytes = chain(100_000);
                let many = TreeLimits {
                    max_nodes: 200_000,
                    ..lim()
                };
                assert!(matches!(
                    Tree::decode(&bytes, &many),
                    Err(TreeError::TooDeep {
                        depth: 17,
                        max: 16,
                        ..
                    })
                ));
                assert!(matches!(
                    decode(&bytes),
                    Err(TreeError::TooManyNodes { found: 100_000, .. })
                ));
                // With every cap lifted the deep tree is built, walked,
                // re-encoded and dropped, all without recursion.
                let unbounded = TreeLimits {
                    max_depth: usize::MAX,
                    ..many
                };
                let t = Tree::decode(&bytes, &unbounded).unwrap();
                assert_eq!(t.depth(), 99_999);
                assert_eq!(t.node_count(), 100_000);
                assert_eq!(t.walk().count(), 100_000);
                assert_eq!(t.encode_with(&unbounded).unwrap(), bytes);
                drop(t);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn wide_tree_at_the_node_cap() {
        let mut root = Node::root("wide");
        for i in 0..4095 {
            root.push_child(Node::new(format!("c{i}"), "leaf").with_u64("i", i));
        }
        let t = Tree::new(root);
        let bytes = t.encode().unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.node_count(), 4096);
        assert_eq!(back, t);
        assert_eq!(back.node("/c4094").unwrap().u64_prop("i").unwrap(), 4094);

        let mut t = t;
        t.root_mut().push_child(Node::new("one-more", ""));
        let expected = TreeError::TooManyNodes {
            found: 4097,
            max: 4096,
        };
        assert_eq!(t.encode(), Err(expected.clone()));
        let big = TreeLimits {
            max_nodes: 4097,
            ..lim()
        };
        assert_eq!(decode(&t.encode_with(&big).unwrap()), Err(expected));
    }

    #[test]
    fn too_many_props() {
        let mut n = Node::root("");
        for i in 0..257u64 {
            n.set_prop(format!("p{i}"), i);
        }
        let t = Tree::new(n);
        let expected = TreeError::TooManyProps {
            path: "/".into(),
            found: 257,
            max: 256,
        };
        assert_eq!(t.encode(), Err(expected.clone()));
        let more = TreeLimits {
            max_props: 257,
            ..lim()
        };
        assert_eq!(decode(&t.encode_with(&more).unwrap()), Err(expected));
        let _ = t.root_mut_for_test().remove_prop("p0");
    }

    impl Tree {
        fn root_mut_for_test(mut self) -> Node {
            core::mem::take(self.root_mut())
        }
    }

    #[test]
    fn names_too_long() {
        let long = "x".repeat(256);
        let cases = [
            (
                Tree::new(Node::root("").with_child(Node::new(long.clone(), ""))),
                "/",
                "node name",
            ),
            (
                Tree::new(Node::root("").with_child(Node::new("a", long.clone()))),
                "/a",
                "compatible",
            ),
            (
                Tree::new(Node::root("").with_child(Node::new("a", "").with_u64(long.clone(), 1))),
                "/a",
                "property name",
            ),
        ];
        let wide = TreeLimits {
            max_name_len: 256,
            ..lim()
        };
        for (t, path, what) in cases {
            let expected = TreeError::NameTooLong {
                path: path.into(),
                what,
                len: 256,
                max: 255,
            };
            assert_eq!(t.encode(), Err(expected.clone()));
            assert_eq!(decode(&t.encode_with(&wide).unwrap()), Err(expected));
        }
        let ok = Tree::new(Node::root("").with_child(Node::new("x".repeat(255), "y".repeat(255))));
        assert_eq!(decode(&ok.encode().unwrap()).unwrap(), ok);
    }

    #[test]
    fn bad_names() {
        let cases: [(Vec<u8>, TreeError); 6] = [
            (
                Enc::new().var(2).node(0, "", "", 0).node(0, "", "", 0).0,
                TreeError::BadName {
                    path: "/".into(),
                    what: "node name",
                    expected: "a non-empty name",
                    name: String::new(),
                },
            ),
            (
                Enc::new().var(2).node(0, "", "", 0).node(0, "a/b", "", 0).0,
                TreeError::BadName {
                    path: "/".into(),
                    what: "node name",
                    expected: "a name without '/'",
                    name: "a/b".into(),
                },
            ),
            (
                Enc::new().var(2).node(0, "", "", 0).node(0, "a\0", "", 0).0,
                TreeError::BadName {
                    path: "/".into(),
                    what: "node name",
                    expected: "a name without NUL",
                    name: "a\0".into(),
                },
            ),
            (
                Enc::new().var(1).node(0, "root", "", 0).0,
                TreeError::BadName {
                    path: "/".into(),
                    what: "root name",
                    expected: "the empty string",
                    name: "root".into(),
                },
            ),
            (
                Enc::new()
                    .var(2)
                    .node(0, "", "", 0)
                    .node(0, "a", "", 1)
                    .prop_u64("", 1)
                    .0,
                TreeError::BadName {
                    path: "/a".into(),
                    what: "property name",
                    expected: "a non-empty name",
                    name: String::new(),
                },
            ),
            (
                Enc::new().var(1).node(0, "", "", 1).prop_u64("x/y", 1).0,
                TreeError::BadName {
                    path: "/".into(),
                    what: "property name",
                    expected: "a name without '/'",
                    name: "x/y".into(),
                },
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(decode(&bytes), Err(expected));
        }
        // encode refuses the same trees.
        let t = Tree::new(Node::root("").with_child(Node::new("a/b", "")));
        assert!(matches!(t.encode(), Err(TreeError::BadName { .. })));
        let t = Tree::new(Node::new("r", ""));
        assert!(matches!(
            t.encode(),
            Err(TreeError::BadName {
                what: "root name",
                ..
            })
        ));
    }

    #[test]
    fn duplicate_names() {
        let dup_nodes = Enc::new()
            .var(3)
            .node(0, "", "", 0)
            .node(0, "a", "", 0)
            .node(0, "a", "", 0)
            .0;
        let expected = TreeError::DuplicateName {
            path: "/".into(),
            what: "child node",
            name: "a".into(),
        };
        assert_eq!(decode(&dup_nodes), Err(expected.clone()));
        let t = Tree::new(
            Node::root("")
                .with_child(Node::new("a", ""))
                .with_child(Node::new("a", "")),
        );
        assert_eq!(t.encode(), Err(expected));

        // Same name under different parents is fine.
        let ok = Enc::new()
            .var(3)
            .node(0, "", "", 0)
            .node(0, "a", "", 0)
            .node(1, "a", "", 0)
            .0;
        assert!(decode(&ok).is_ok());

        let dup_props = Enc::new()
            .var(1)
            .node(0, "", "", 2)
            .prop_u64("p", 1)
            .prop_str("p", "x")
            .0;
        let expected = TreeError::DuplicateName {
            path: "/".into(),
            what: "property",
            name: "p".into(),
        };
        assert_eq!(decode(&dup_props), Err(expected.clone()));
        let mut root = Node::root("");
        root.props.push(Property::new("p", 1u64));
        root.props.push(Property::new("p", "x"));
        assert_eq!(Tree::new(root).encode(), Err(expected));

        // Long lists take the hashed path; the first repeat is reported.
        for n in [3usize, 16, 17, 40] {
            let mut root = Node::root("");
            for i in 0..n {
                root.props.push(Property::new(format!("p{i}"), 0u64));
                root.push_child(Node::new(format!("c{i}"), ""));
            }
            assert!(Tree::new(root.clone()).encode().is_ok());
            let mut dup_prop = root.clone();
            dup_prop
                .props
                .push(Property::new(format!("p{}", n / 2), 1u64));
            assert_eq!(
                Tree::new(dup_prop).encode(),
                Err(TreeError::DuplicateName {
                    path: "/".into(),
                    what: "property",
                    name: format!("p{}", n / 2),
                })
            );
            root.children.insert(n / 2, Node::new("c0", ""));
            assert_eq!(
                Tree::new(root).encode(),
                Err(TreeError::DuplicateName {
                    path: "/".into(),
                    what: "child node",
                    name: "c0".into(),
                })
            );
        }
    }

    #[test]
    fn values_too_large() {
        let small = TreeLimits {
            max_value_len: 4,
            ..lim()
        };
        for (value, len) in [
            (Value::Bytes(vec![0; 5]), 5),
            (Value::Str("hello!".into()), 6),
        ] {
            let t = Tree::new(
                Node::root("").with_child(Node::new("n", "").with_prop("v", value.clone())),
            );
            let expected = TreeError::ValueTooLarge {
                path: "/n".into(),
                prop: "v".into(),
                len,
                max: 4,
            };
            assert_eq!(t.encode_with(&small), Err(expected.clone()));
            assert_eq!(Tree::decode(&t.encode().unwrap(), &small), Err(expected));
        }
        // Default cap: 1 MiB is accepted, one more byte is not.
        let t = Tree::new(Node::root("").with_bytes("big", vec![7; 1 << 20]));
        assert_eq!(decode(&t.encode().unwrap()).unwrap(), t);
        let t = Tree::new(Node::root("").with_bytes("big", vec![7; (1 << 20) + 1]));
        assert!(matches!(
            t.encode(),
            Err(TreeError::ValueTooLarge { len, .. }) if len == (1 << 20) + 1
        ));
    }

    #[test]
    fn bad_parents() {
        // Root must name 0.
        let b = Enc::new().var(1).node(3, "", "", 0).0;
        assert_eq!(
            decode(&b),
            Err(TreeError::BadParent {
                index: 0,
                parent: 3
            })
        );
        // Forward reference.
        let b = Enc::new().var(2).node(0, "", "", 0).node(1, "a", "", 0).0;
        assert_eq!(
            decode(&b),
            Err(TreeError::BadParent {
                index: 1,
                parent: 1
            })
        );
        // Node 3 names node 1, whose subtree closed when node 2 (its
        // sibling) began.
        let b = Enc::new()
            .var(4)
            .node(0, "", "", 0)
            .node(0, "a", "", 0)
            .node(0, "b", "", 0)
            .node(1, "c", "", 0)
            .0;
        assert_eq!(
            decode(&b),
            Err(TreeError::BadParent {
                index: 3,
                parent: 1
            })
        );
    }

    #[test]
    fn trailing_bytes_and_version() {
        let mut bytes = sample().encode().unwrap();
        let len = bytes.len();
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode(&bytes),
            Err(TreeError::TrailingBytes {
                offset: len,
                len: 2
            })
        );
        let mut bytes = sample().encode().unwrap();
        bytes[0] = 2;
        assert_eq!(
            decode(&bytes),
            Err(TreeError::UnsupportedVersion {
                found: 2,
                expected: TREE_VERSION
            })
        );
    }

    #[test]
    fn non_minimal_varints_are_refused() {
        // The root's property count 0 written as two bytes (0x80 0x00).
        let b = Enc::new().var(1).node(0, "", "", 0).0;
        assert!(decode(&b).is_ok());
        let mut long = b.clone();
        let last = long.len() - 1;
        long[last] = 0x80;
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(TreeError::Decode {
                offset: last,
                what: "minimal varint encoding",
                found: "a non-canonical encoding"
            })
        );
    }

    #[test]
    fn error_messages_name_the_numbers() {
        let e = TreeError::Decode {
            offset: 0x1f,
            what: "node name",
            found: "end of input",
        };
        assert_eq!(
            e.to_string(),
            "tree decode error at offset 0x1f: expected node name, found end of input"
        );
        let e = TreeError::TooManyNodes {
            found: 5000,
            max: 4096,
        };
        assert_eq!(
            e.to_string(),
            "tree has 5000 nodes, more than the maximum 4096"
        );
        let e = TreeError::Encode {
            found: "buffer full",
        };
        assert_eq!(e.to_string(), "tree encoding failed: buffer full");
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            let r = decode(&bytes[..len]);
            assert!(
                matches!(r, Err(TreeError::Decode { offset, .. }) if offset <= len),
                "prefix of {len} bytes: {r:?}"
            );
        }
    }

    // ---- properties ----

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::U64),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            "\\PC{0,20}".prop_map(Value::Str),
            (any::<u64>(), any::<u64>())
                .prop_map(|(s, l)| Value::Range(PhysRange::new(PhysAddr(s), l))),
        ]
    }

    /// A node with unique child and property names: `@` never occurs in
    /// the generated stems, so `stem@index` cannot collide.
    fn arb_node() -> impl Strategy<Value = Node> {
        let leaf = (
            "[a-z0-9_.-]{1,8}",
            "[ -~]{0,16}",
            proptest::collection::vec(("[a-z0-9,_-]{1,8}", arb_value()), 0..5),
        )
            .prop_map(|(name, compatible, props)| {
                let mut n = Node::new(name, compatible);
                for (i, (stem, v)) in props.into_iter().enumerate() {
                    n.set_prop(format!("{stem}@{i}"), v);
                }
                n
            });
        leaf.prop_recursive(5, 64, 6, |inner| {
            (inner.clone(), proptest::collection::vec(inner, 0..6)).prop_map(
                |(mut parent, children)| {
                    let base = parent.children.len();
                    for (i, mut child) in children.into_iter().enumerate() {
                        child.name = format!("{}@{}", child.name, base + i);
                        parent.children.push(child);
                    }
                    parent
                },
            )
        })
    }

    fn arb_tree() -> impl Strategy<Value = Tree> {
        arb_node().prop_map(|mut root| {
            root.name.clear();
            Tree::new(root)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip(t in arb_tree()) {
            let bytes = t.encode().unwrap();
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(back.encode().unwrap(), bytes.clone());
            let wire: WireTree<'_> = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(wire.nodes.len(), t.node_count());
            prop_assert_eq!(t.walk().count(), t.node_count());
            let nranges = t
                .walk()
                .map(|(_, n)| n.props.iter().filter(|p| p.value.as_range().is_some()).count())
                .sum::<usize>();
            prop_assert_eq!(t.ranges().count(), nranges);
        }

        #[test]
        fn mutated_encodings_never_panic(
            t in arb_tree(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = t.encode().unwrap();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let keep = cut.index(bytes.len() + 1);
            for input in [&bytes[..], &bytes[..keep]] {
                if let Ok(back) = decode(input) {
                    // Anything accepted is canonical.
                    prop_assert_eq!(back.encode().unwrap(), input.to_vec());
                }
            }
        }
    }
}
