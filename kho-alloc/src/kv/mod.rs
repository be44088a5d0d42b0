//! An example live-update agent: a key-value store that survives a
//! handover without rebuilding anything per entry.
//!
//! Entries and the index live in folios of the preservable pool and refer
//! to each other by arena offset, never by pointer, so a successor that
//! maps the same arena uses them where they are: restoring the store takes
//! its folios back from the heap (a few dozen for a million entries) and
//! reads its counters from its metadata node.
//!
//! ```text
//! record folios (order r)                     index folios (order i)
//! | rec 0 | rec 1 | ... | rec n-1 | tail |    | u64 | u64 | ... |   one slot per
//!   record: key u64 | len u32 | crc u32 |       0 empty, 1 deleted,  power of two,
//!           value [value_size], padded to 8     else record offset   linear probing
//! ```
//!
//! The record's CRC32 covers key, length and value; the store's digest is
//! the wrapping sum of a 64-bit mix of every live `(key, crc)`, so a
//! successor can check every entry and the whole set against what the
//! predecessor recorded. Deleted records go on a free list linked through
//! their first 8 bytes, the rest of the record zeroed.
//!
//! ```
//! use kho_alloc::kv::{KvConfig, KvStore};
//! use kho_alloc::{Arena, ArenaConfig, Heap};
//!
//! let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(64 << 20))?)?;
//! let mut kv = KvStore::new(&heap, KvConfig { capacity: 1000, value_size: 32 })?;
//! kv.insert(7, b"seven")?;
//! assert_eq!(kv.get(7)?.as_deref(), Some(&b"seven"[..]));
//! assert!(kv.remove(7)?);
//! assert_eq!(kv.get(7)?, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod demo;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use kho_core::{Folio, Node, Order, PhysRange};

use crate::epoch::Cleanup;
use crate::heap::{GfpFlags, Heap, Pages, Restored};
use crate::session::{BoxError, PrepareCx, Recovery, RestoreCx, SessionError, Subsystem};

/// `compatible` of the store's metadata node.
pub const KV_COMPATIBLE: &str = "kv-store-v1";
/// Bytes before the value in a record.
pub const RECORD_HEADER: u32 = 16;
/// Largest value size.
pub const MAX_VALUE_SIZE: u32 = 1 << 20;
/// Most record or index folios one store uses.
pub const MAX_SEGMENTS: u64 = 1 << 16;

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = 1;
/// Properties per segment node (the tree allows 256 per node).
const RANGES_PER_NODE: usize = 128;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Every record is in use.
    #[error("store is full: capacity {capacity} entries")]
    Full {
        /// Entries the store holds at most.
        capacity: u64,
    },
    /// A value longer than the store's value size.
    #[error("value of {found} bytes is longer than the value size {expected}")]
    ValueTooLong {
        /// The store's value size.
        expected: u32,
        /// The value's length.
        found: usize,
    },
    /// A configuration outside the supported range.
    #[error("invalid store configuration: {what}: {found} (limit {limit})")]
    Config {
        /// The field.
        what: &'static str,
        /// Its value.
        found: u64,
        /// The limit it breaks.
        limit: u64,
    },
    /// The metadata node does not describe a valid store.
    #[error("kv node: {what}: expected {expected}, found {found}")]
    Node {
        /// The property or check.
        what: &'static str,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A record is corrupt.
    #[error("record at {addr:#x}: {what}: expected {expected:#x}, found {found:#x}")]
    Corrupt {
        /// Arena offset of the record (or index slot).
        addr: u64,
        /// What is wrong.
        what: &'static str,
        /// Expected value.
        expected: u64,
        /// Value found.
        found: u64,
    },
    /// Allocator error.
    #[error(transparent)]
    Heap(#[from] crate::Error),
    /// Metadata tree error.
    #[error(transparent)]
    Tree(#[from] kho_core::TreeError),
    /// A write while a handover is frozen: the store's state is in the
    /// handover image and must not change until the handover is cancelled.
    #[error("store is frozen for a handover: {op} refused")]
    Frozen {
        /// The refused operation.
        op: &'static str,
    },
    /// Freeze could not get the store from its writers in time.
    #[error("store still locked by a writer after {waited:?}: freeze refused")]
    Busy {
        /// How long freeze waited.
        waited: std::time::Duration,
    },
}

/// Result alias for the store.
pub type Result<T> = std::result::Result<T, KvError>;

/// Size of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Most entries.
    pub capacity: u64,
    /// Bytes reserved for each value.
    pub value_size: u32,
}

/// Geometry derived from a configuration and the arena's largest order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    stride: u64,
    record_order: Order,
    per_folio: u64,
    record_folios: u64,
    index_slots: u64,
    index_order: Order,
    index_folios: u64,
}

fn order_for(bytes: u64, max: Order) -> Order {
    Order::covering(bytes).map_or(max, |o| o.min(max))
}

impl Geometry {
    fn new(cfg: &KvConfig, max: Order) -> Result<Geometry> {
        if cfg.value_size > MAX_VALUE_SIZE {
            return Err(KvError::Config {
                what: "value size",
                found: u64::from(cfg.value_size),
                limit: u64::from(MAX_VALUE_SIZE),
            });
        }
        if cfg.capacity == 0 || cfg.capacity > 1 << 40 {
            return Err(KvError::Config {
                what: "capacity",
                found: cfg.capacity,
                limit: 1 << 40,
            });
        }
        let stride = u64::from(RECORD_HEADER + cfg.value_size).next_multiple_of(8);
        let record_order = order_for(stride.saturating_mul(cfg.capacity), max);
        let per_folio = record_order.bytes() / stride;
        if per_folio == 0 {
            return Err(KvError::Config {
                what: "record size",
                found: stride,
                limit: record_order.bytes(),
            });
        }
        let record_folios = cfg.capacity.div_ceil(per_folio);
        // At most half full, so that probes end at an empty slot.
        let index_slots = cfg.capacity.saturating_mul(2).next_power_of_two().max(64);
        let index_order = order_for(index_slots * 8, max);
        let index_folios = (index_slots * 8).div_ceil(index_order.bytes());
        if record_folios > MAX_SEGMENTS || index_folios > MAX_SEGMENTS {
            return Err(KvError::Config {
                what: "folios",
                found: record_folios.max(index_folios),
                limit: MAX_SEGMENTS,
            });
        }
        Ok(Geometry {
            stride,
            record_order,
            per_folio,
            record_folios,
            index_slots,
            index_order,
            index_folios,
        })
    }
}

/// 64-bit mix of a live entry, summed into the digest.
fn entry_hash(key: u64, crc: u32) -> u64 {
    let mut z = key ^ (u64::from(crc) << 32 | u64::from(crc));
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn record_crc(key: u64, value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&key.to_le_bytes());
    h.update(&(value.len() as u32).to_le_bytes());
    h.update(value);
    h.finalize()
}

fn slot_of(key: u64, slots: u64) -> u64 {
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - slots.trailing_zeros())
}

/// Index slot and record offset of a key found by a probe.
type Hit = Option<(u64, u64)>;

/// The store. See the [module documentation](self).
#[derive(Debug)]
pub struct KvStore {
    heap: Heap,
    cfg: KvConfig,
    geo: Geometry,
    /// Record folios, by address.
    records: Vec<Pages>,
    /// Index folios, in slot order.
    index: Vec<Pages>,
    len: u64,
    /// Records ever handed out (the bump pointer, in records).
    next: u64,
    /// Arena offset of the first free record, 0 for none.
    free: u64,
    digest: u64,
    /// Set while a handover is frozen: writes are refused.
    frozen: Arc<AtomicBool>,
}

/// What [`KvStore::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Live entries walked.
    pub entries: u64,
    /// Records whose CRC matched and whose value the caller accepted.
    pub good: u64,
    /// Records with a bad CRC, bad offset, or a value the caller refused.
    pub bad: u64,
    /// Digest recomputed from the records.
    pub digest: u64,
    /// Whether entries and digest match the store's counters.
    pub consistent: bool,
}

impl KvStore {
    /// An empty store with room for `cfg.capacity` entries, its folios
    /// taken (zeroed) from the preservable pool.
    pub fn new(heap: &Heap, cfg: KvConfig) -> Result<KvStore> {
        let geo = Geometry::new(&cfg, heap.layout().max_order)?;
        let flags = GfpFlags::PRESERVE | GfpFlags::ZERO;
        let mut records = Vec::with_capacity(geo.record_folios as usize);
        let mut index = Vec::with_capacity(geo.index_folios as usize);
        let mut fill = || -> Result<()> {
            for _ in 0..geo.record_folios {
                records.push(heap.alloc_pages(geo.record_order, flags)?);
            }
            for _ in 0..geo.index_folios {
                index.push(heap.alloc_pages(geo.index_order, flags)?);
            }
            Ok(())
        };
        if let Err(e) = fill() {
            for p in records.into_iter().chain(index) {
                let _ = heap.free_pages(p);
            }
            return Err(e);
        }
        records.sort_by_key(|p| p.addr());
        Ok(KvStore {
            heap: heap.clone(),
            cfg,
            geo,
            records,
            index,
            len: 0,
            next: 0,
            free: 0,
            digest: 0,
            frozen: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Live entries.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The configuration.
    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// The digest of every live entry.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Whether writes are refused because a handover is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.is_frozen() {
            return Err(KvError::Frozen { op });
        }
        Ok(())
    }

    /// The folios holding records and index.
    pub fn folios(&self) -> impl Iterator<Item = &Pages> + '_ {
        self.records.iter().chain(self.index.iter())
    }

    /// Bytes of memory the store occupies.
    pub fn footprint(&self) -> u64 {
        self.folios().map(|p| p.folio().bytes()).sum()
    }

    /// Give the folios back to the heap.
    pub fn destroy(self) -> Result<()> {
        for p in self.records.into_iter().chain(self.index) {
            self.heap.free_pages(p)?;
        }
        Ok(())
    }

    fn slot_get(&self, slot: u64) -> Result<u64> {
        let per = self.geo.index_order.bytes() / 8;
        let folio = self
            .index
            .get((slot / per) as usize)
            .ok_or(KvError::Corrupt {
                addr: 0,
                what: "index slot",
                expected: self.geo.index_slots,
                found: slot,
            })?;
        let off = ((slot % per) * 8) as usize;
        let b = self.heap.page_bytes(folio)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[off..off + 8]);
        Ok(u64::from_le_bytes(w))
    }

    fn slot_set(&mut self, slot: u64, value: u64) -> Result<()> {
        let per = self.geo.index_order.bytes() / 8;
        let folio = self
            .index
            .get_mut((slot / per) as usize)
            .ok_or(KvError::Corrupt {
                addr: 0,
                what: "index slot",
                expected: self.geo.index_slots,
                found: slot,
            })?;
        let off = ((slot % per) * 8) as usize;
        let b = self.heap.page_bytes_mut(folio)?;
        b[off..off + 8].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    /// Folio index and byte offset of the record at `addr`, refusing
    /// anything that is not the start of a handed-out record.
    fn locate(&self, addr: u64) -> Result<(usize, usize)> {
        let corrupt = |what| KvError::Corrupt {
            addr,
            what,
            expected: self.geo.stride,
            found: addr,
        };
        let i = self
            .records
            .partition_point(|p| p.addr().0 <= addr)
            .checked_sub(1)
            .ok_or(corrupt("record offset below every folio"))?;
        let base = self.records[i].addr().0;
        let off = addr - base;
        if off % self.geo.stride != 0 || off / self.geo.stride >= self.geo.per_folio {
            return Err(corrupt("record offset not on a record"));
        }
        Ok((i, off as usize))
    }

    fn record(&self, addr: u64) -> Result<&[u8]> {
        let (i, off) = self.locate(addr)?;
        let b = self.heap.page_bytes(&self.records[i])?;
        Ok(&b[off..off + self.geo.stride as usize])
    }

    fn record_mut(&mut self, addr: u64) -> Result<&mut [u8]> {
        let (i, off) = self.locate(addr)?;
        let stride = self.geo.stride as usize;
        let b = self.heap.page_bytes_mut(&mut self.records[i])?;
        Ok(&mut b[off..off + stride])
    }

    /// Decode a record: key, value, stored CRC.
    fn decode<'r>(&self, rec: &'r [u8], addr: u64) -> Result<(u64, &'r [u8], u32)> {
        let key = u64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
        let len = u32::from_le_bytes(rec[8..12].try_into().unwrap_or([0; 4]));
        let crc = u32::from_le_bytes(rec[12..16].try_into().unwrap_or([0; 4]));
        if len > self.cfg.value_size {
            return Err(KvError::Corrupt {
                addr,
                what: "value length",
                expected: u64::from(self.cfg.value_size),
                found: u64::from(len),
            });
        }
        let value = &rec[16..16 + len as usize];
        Ok((key, value, crc))
    }

    /// Probe for `key`: `(slot of the key, first reusable slot)`.
    fn probe(&self, key: u64) -> Result<(Hit, Option<u64>)> {
        let mask = self.geo.index_slots - 1;
        let mut slot = slot_of(key, self.geo.index_slots);
        let mut reusable = None;
        for _ in 0..self.geo.index_slots {
            match self.slot_get(slot)? {
                EMPTY => return Ok((None, reusable.or(Some(slot)))),
                TOMBSTONE => {
                    reusable.get_or_insert(slot);
                }
                addr => {
                    let rec = self.record(addr)?;
                    if u64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8])) == key {
                        return Ok((Some((slot, addr)), reusable));
                    }
                }
            }
            slot = (slot + 1) & mask;
        }
        Ok((None, reusable))
    }

    /// The value of `key`, copied out.
    pub fn get(&self, key: u64) -> Result<Option<Vec<u8>>> {
        self.with(key, |v| v.to_vec())
    }

    /// Call `f` with the value of `key`, in place.
    pub fn with<R>(&self, key: u64, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let (hit, _) = self.probe(key)?;
        let Some((_, addr)) = hit else {
            return Ok(None);
        };
        let rec = self.record(addr)?;
        let (_, value, _) = self.decode(rec, addr)?;
        Ok(Some(f(value)))
    }

    /// Insert or replace `key`.
    pub fn insert(&mut self, key: u64, value: &[u8]) -> Result<()> {
        self.check_writable("insert")?;
        if value.len() > self.cfg.value_size as usize {
            return Err(KvError::ValueTooLong {
                expected: self.cfg.value_size,
                found: value.len(),
            });
        }
        let (hit, reusable) = self.probe(key)?;
        let crc = record_crc(key, value);
        if let Some((_, addr)) = hit {
            let old_crc = {
                let rec = self.record(addr)?;
                self.decode(rec, addr)?.2
            };
            self.write_record(addr, key, value, crc)?;
            self.digest = self
                .digest
                .wrapping_sub(entry_hash(key, old_crc))
                .wrapping_add(entry_hash(key, crc));
            return Ok(());
        }
        let slot = reusable.ok_or(KvError::Full {
            capacity: self.cfg.capacity,
        })?;
        let addr = self.alloc_record()?;
        self.write_record(addr, key, value, crc)?;
        self.slot_set(slot, addr)?;
        self.len += 1;
        self.digest = self.digest.wrapping_add(entry_hash(key, crc));
        Ok(())
    }

    fn alloc_record(&mut self) -> Result<u64> {
        if self.free != 0 {
            let addr = self.free;
            let next = {
                let rec = self.record(addr)?;
                u64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8]))
            };
            self.free = next;
            return Ok(addr);
        }
        if self.next >= self.cfg.capacity {
            return Err(KvError::Full {
                capacity: self.cfg.capacity,
            });
        }
        let n = self.next;
        let folio = &self.records[(n / self.geo.per_folio) as usize];
        self.next += 1;
        Ok(folio.addr().0 + (n % self.geo.per_folio) * self.geo.stride)
    }

    fn write_record(&mut self, addr: u64, key: u64, value: &[u8], crc: u32) -> Result<()> {
        let rec = self.record_mut(addr)?;
        rec[0..8].copy_from_slice(&key.to_le_bytes());
        rec[8..12].copy_from_slice(&(value.len() as u32).to_le_bytes());
        rec[12..16].copy_from_slice(&crc.to_le_bytes());
        rec[16..16 + value.len()].copy_from_slice(value);
        // No stale bytes of an earlier, longer value.
        rec[16 + value.len()..].fill(0);
        Ok(())
    }

    /// Remove `key`; `false` if absent. The record is zeroed.
    pub fn remove(&mut self, key: u64) -> Result<bool> {
        self.check_writable("remove")?;
        let (hit, _) = self.probe(key)?;
        let Some((slot, addr)) = hit else {
            return Ok(false);
        };
        let crc = {
            let rec = self.record(addr)?;
            self.decode(rec, addr)?.2
        };
        let free = self.free;
        let rec = self.record_mut(addr)?;
        rec.fill(0);
        rec[0..8].copy_from_slice(&free.to_le_bytes());
        self.free = addr;
        self.slot_set(slot, TOMBSTONE)?;
        self.len -= 1;
        self.digest = self.digest.wrapping_sub(entry_hash(key, crc));
        Ok(true)
    }

    /// Call `f` with every live entry, in index order (without checking
    /// CRCs); returns how many. A record the index points at wrongly is an
    /// error.
    pub fn for_each(&self, mut f: impl FnMut(u64, &[u8])) -> Result<u64> {
        let per = self.geo.index_order.bytes() / 8;
        let mut n = 0;
        for (fi, folio) in self.index.iter().enumerate() {
            let b = self.heap.page_bytes(folio)?;
            let slots = per.min(self.geo.index_slots - fi as u64 * per) as usize;
            for w in b[..slots * 8].chunks_exact(8) {
                let addr = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if addr == EMPTY || addr == TOMBSTONE {
                    continue;
                }
                let rec = self.record(addr)?;
                let (key, value, _) = self.decode(rec, addr)?;
                f(key, value);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Walk the index: check every live record's offset, CRC and (through
    /// `accept`) value, and recompute count and digest.
    pub fn verify(&self, mut accept: impl FnMut(u64, &[u8]) -> bool) -> Result<VerifyReport> {
        let mut r = VerifyReport::default();
        let per = self.geo.index_order.bytes() / 8;
        for (fi, folio) in self.index.iter().enumerate() {
            let b = self.heap.page_bytes(folio)?;
            let slots = per.min(self.geo.index_slots - fi as u64 * per) as usize;
            for w in b[..slots * 8].chunks_exact(8) {
                let addr = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if addr == EMPTY || addr == TOMBSTONE {
                    continue;
                }
                r.entries += 1;
                let ok = self.record(addr).ok().and_then(|rec| {
                    let (key, value, crc) = self.decode(rec, addr).ok()?;
                    (record_crc(key, value) == crc && accept(key, value))
                        .then(|| entry_hash(key, crc))
                });
                match ok {
                    Some(h) => {
                        r.good += 1;
                        r.digest = r.digest.wrapping_add(h);
                    }
                    None => r.bad += 1,
                }
            }
        }
        r.consistent = r.bad == 0 && r.entries == self.len && r.digest == self.digest;
        Ok(r)
    }

    /// Write the store's state into `node`.
    pub fn to_node(&self, node: &mut Node) {
        node.set_prop("value-size", u64::from(self.cfg.value_size));
        node.set_prop("capacity", self.cfg.capacity);
        node.set_prop("len", self.len);
        node.set_prop("next", self.next);
        node.set_prop("free", self.free);
        node.set_prop("digest", self.digest);
        node.set_prop("record-order", u64::from(self.geo.record_order.get()));
        node.set_prop("index-order", u64::from(self.geo.index_order.get()));
        node.set_prop("index-slots", self.geo.index_slots);
        for (kind, folios) in [("records", &self.records), ("index", &self.index)] {
            for (n, chunk) in folios.chunks(RANGES_PER_NODE).enumerate() {
                let mut child = Node::new(format!("{kind}-{n}"), "kv-segments-v1");
                for (i, p) in chunk.iter().enumerate() {
                    child.set_prop(format!("{}", n * RANGES_PER_NODE + i), p.range());
                }
                node.push_child(child);
            }
        }
    }

    /// Rebuild the store from its node after a restore: check the node,
    /// take its folios from `restored`. Nothing per entry.
    pub fn from_node(heap: &Heap, restored: &mut Restored, node: &Node) -> Result<KvStore> {
        let bad = |what: &'static str, expected: String, found: String| KvError::Node {
            what,
            expected,
            found,
        };
        node.expect_compatible(KV_COMPATIBLE)?;
        let value_size = node.u64_prop("value-size")?;
        let cfg = KvConfig {
            capacity: node.u64_prop("capacity")?,
            value_size: u32::try_from(value_size).map_err(|_| {
                bad(
                    "value-size",
                    format!("<= {MAX_VALUE_SIZE}"),
                    value_size.to_string(),
                )
            })?,
        };
        let geo = Geometry::new(&cfg, heap.layout().max_order)?;
        let check = |what: &'static str, expected: u64, found: u64| {
            if expected == found {
                Ok(())
            } else {
                Err(bad(what, expected.to_string(), found.to_string()))
            }
        };
        check(
            "record-order",
            u64::from(geo.record_order.get()),
            node.u64_prop("record-order")?,
        )?;
        check(
            "index-order",
            u64::from(geo.index_order.get()),
            node.u64_prop("index-order")?,
        )?;
        check(
            "index-slots",
            geo.index_slots,
            node.u64_prop("index-slots")?,
        )?;
        let len = node.u64_prop("len")?;
        let next = node.u64_prop("next")?;
        if next > cfg.capacity || len > next {
            return Err(bad(
                "len <= next <= capacity",
                cfg.capacity.to_string(),
                format!("len {len}, next {next}"),
            ));
        }
        let free = node.u64_prop("free")?;
        let digest = node.u64_prop("digest")?;
        // Folios taken so far; on any error they go back to the heap, so a
        // failed restore takes nothing.
        let mut taken: Vec<Pages> = Vec::new();
        let mut take =
            |kind: &str, count: u64, order: Order, taken: &mut Vec<Pages>| -> Result<()> {
                let nodes = (count as usize).div_ceil(RANGES_PER_NODE);
                for n in 0..nodes {
                    let name = format!("{kind}-{n}");
                    let child = node
                        .child(&name)
                        .ok_or_else(|| bad("segment node", name.clone(), "<missing>".to_owned()))?;
                    let end = ((n + 1) * RANGES_PER_NODE).min(count as usize);
                    for i in n * RANGES_PER_NODE..end {
                        let range: PhysRange = child.range_prop(&i.to_string())?;
                        let pfn = range.start().aligned_pfn().ok_or_else(|| {
                            bad(
                                "segment start",
                                "page aligned".into(),
                                format!("{:#x}", range.start),
                            )
                        })?;
                        check("segment length", order.bytes(), range.len)?;
                        let pages = restored.take_folio(pfn).ok_or_else(|| {
                            bad(
                                "segment",
                                "a preserved folio".into(),
                                format!("{:#x}", range.start),
                            )
                        })?;
                        let found = pages.folio();
                        taken.push(pages);
                        if found != (Folio { pfn, order }) {
                            return Err(bad(
                                "segment order",
                                order.get().to_string(),
                                found.order.get().to_string(),
                            ));
                        }
                    }
                }
                Ok(())
            };
        let took = take("records", geo.record_folios, geo.record_order, &mut taken)
            .and_then(|()| take("index", geo.index_folios, geo.index_order, &mut taken));
        if let Err(e) = took {
            for p in taken {
                let _ = heap.free_pages(p);
            }
            return Err(e);
        }
        let index = taken.split_off(geo.record_folios as usize);
        let mut records = taken;
        records.sort_by_key(|p| p.addr());
        let store = KvStore {
            heap: heap.clone(),
            cfg,
            geo,
            records,
            index,
            len,
            next,
            free,
            digest,
            frozen: Arc::new(AtomicBool::new(false)),
        };
        if store.free != 0 {
            if let Err(e) = store.locate(store.free) {
                let _ = store.destroy();
                return Err(e);
            }
        }
        Ok(store)
    }
}

/// A store shared between the service and its session subsystem.
pub type KvHandle = Arc<RwLock<Option<KvStore>>>;

/// How long freeze waits for a writer to release the store by default.
pub const FREEZE_WAIT: Duration = Duration::from_millis(50);

/// The store as a session [`Subsystem`]: prepare preserves its folios,
/// freeze stops writers and writes its node, cancel lets writers go on,
/// restore takes the store back.
///
/// Writers are quiesced without waiting on them: freeze sets the store's
/// frozen flag, so every later `insert` or `remove` fails with
/// [`KvError::Frozen`], then takes the read lock, retrying for at most
/// [`FREEZE_WAIT`] (see [`freeze_wait`](Self::freeze_wait)) while a write
/// already under way finishes; a store held longer fails the freeze with
/// [`KvError::Busy`].
#[derive(Debug)]
pub struct KvSubsystem {
    name: String,
    store: KvHandle,
    /// Configuration of a cold start.
    cold: KvConfig,
    /// Whether a successor with an incompatible node starts empty.
    cold_on_mismatch: bool,
    /// The store's frozen flag, taken at prepare.
    gate: Option<Arc<AtomicBool>>,
    wait: Duration,
}

impl KvSubsystem {
    /// A subsystem named `name` over `store`; a cold start creates an
    /// empty store of `cold`.
    pub fn new(name: &str, store: KvHandle, cold: KvConfig) -> KvSubsystem {
        KvSubsystem {
            name: name.to_owned(),
            store,
            cold,
            cold_on_mismatch: false,
            gate: None,
            wait: FREEZE_WAIT,
        }
    }

    /// Start empty instead of failing when the successor finds an
    /// incompatible or missing node.
    pub fn cold_start_on_mismatch(mut self, yes: bool) -> KvSubsystem {
        self.cold_on_mismatch = yes;
        self
    }

    /// How long freeze waits for a write under way (default
    /// [`FREEZE_WAIT`]).
    pub fn freeze_wait(mut self, wait: Duration) -> KvSubsystem {
        self.wait = wait;
        self
    }

    fn open_gate(&self) {
        if let Some(g) = &self.gate {
            g.store(false, Ordering::SeqCst);
        }
    }

    /// Give back a store taken by restore or cold start (abort_restore).
    fn drop_store(&mut self) {
        let store = self
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(store) = store {
            // Its folios go back to the heap being torn down; a refusal
            // leaves them to that heap.
            let _ = store.destroy();
        }
    }
}

fn boxed(e: KvError) -> BoxError {
    Box::new(e)
}

impl Subsystem for KvSubsystem {
    fn name(&self) -> &str {
        &self.name
    }

    fn compatible(&self) -> &str {
        KV_COMPATIBLE
    }

    fn cleanup(&self) -> Option<Cleanup> {
        None
    }

    fn prepare(&mut self, cx: &mut PrepareCx<'_>) -> std::result::Result<(), BoxError> {
        let g = self.store.read().unwrap_or_else(PoisonError::into_inner);
        self.gate = g.as_ref().map(|s| Arc::clone(&s.frozen));
        if let Some(store) = g.as_ref() {
            for p in store.folios() {
                cx.preserve_pages(p).map_err(|e| boxed(e.into()))?;
            }
        }
        Ok(())
    }

    fn freeze(&mut self, node: &mut Node) -> std::result::Result<(), BoxError> {
        if let Some(g) = &self.gate {
            g.store(true, Ordering::SeqCst);
        }
        let start = Instant::now();
        let g = loop {
            match self.store.try_read() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if start.elapsed() >= self.wait {
                        self.open_gate();
                        return Err(boxed(KvError::Busy {
                            waited: start.elapsed(),
                        }));
                    }
                    std::thread::yield_now();
                }
            }
        };
        if let Some(store) = g.as_ref() {
            store.to_node(node);
        }
        Ok(())
    }

    fn cancel(&mut self) {
        // Preservation is undone by the session; the store serves on.
        self.open_gate();
    }

    fn restore(
        &mut self,
        cx: &mut RestoreCx<'_>,
        node: &Node,
    ) -> std::result::Result<(), BoxError> {
        let heap = cx.heap().clone();
        let store = KvStore::from_node(&heap, cx.restored(), node).map_err(boxed)?;
        *self.store.write().unwrap_or_else(PoisonError::into_inner) = Some(store);
        Ok(())
    }

    fn abort_restore(&mut self) {
        self.drop_store();
    }

    fn on_incompatible(&mut self, _error: &SessionError) -> Recovery {
        if self.cold_on_mismatch {
            Recovery::ColdStart
        } else {
            Recovery::Fail
        }
    }

    fn cold_start(&mut self, heap: &Heap) -> std::result::Result<(), BoxError> {
        let store = KvStore::new(heap, self.cold).map_err(boxed)?;
        *self.store.write().unwrap_or_else(PoisonError::into_inner) = Some(store);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arena, ArenaConfig};

    fn heap() -> Heap {
        Heap::new(Arena::anonymous(&ArenaConfig::with_size(64 << 20)).unwrap()).unwrap()
    }

    #[test]
    fn insert_replace_remove_and_verify() {
        let heap = heap();
        let mut kv = KvStore::new(
            &heap,
            KvConfig {
                capacity: 500,
                value_size: 24,
            },
        )
        .unwrap();
        for k in 0..500u64 {
            kv.insert(k * 7919, &k.to_le_bytes()).unwrap();
        }
        assert!(matches!(
            kv.insert(1, b"x"),
            Err(KvError::Full { capacity: 500 })
        ));
        kv.insert(7919, b"replaced").unwrap();
        assert_eq!(kv.get(7919).unwrap().unwrap(), b"replaced");
        assert!(kv.remove(0).unwrap());
        assert!(!kv.remove(0).unwrap());
        kv.insert(1, b"reuses the freed record").unwrap();
        assert!(matches!(
            kv.insert(2, &[0; 25]),
            Err(KvError::ValueTooLong {
                expected: 24,
                found: 25
            })
        ));
        let r = kv.verify(|_, _| true).unwrap();
        assert!(r.consistent, "{r:?}");
        assert_eq!(r.entries, 500);
        // A value the caller refuses counts as bad.
        let r = kv.verify(|k, _| k != 1).unwrap();
        assert_eq!(r.bad, 1);
        assert!(!r.consistent);
    }

    /// A node that does not describe the store takes no folio: those taken
    /// before the error go back to the heap.
    #[test]
    fn a_refused_node_takes_no_folio() {
        let heap = heap();
        let mut kv = KvStore::new(
            &heap,
            KvConfig {
                capacity: 5000,
                value_size: 24,
            },
        )
        .unwrap();
        kv.insert(1, b"one").unwrap();
        for p in kv.folios() {
            heap.preserve_pages(p).unwrap();
        }
        let mut node = Node::new("kv", KV_COMPATIBLE);
        kv.to_node(&mut node);
        node.children.retain(|c| !c.name.starts_with("index"));
        let mut root = Node::root("kv-test-v1");
        root.push_child(node);
        heap.freeze_and_commit(Some(&kho_core::Tree::new(root)))
            .unwrap();
        drop(kv);
        let (heap, mut restored) = Heap::restore(heap.into_arena().unwrap()).unwrap();
        let tree = restored.tree.take().unwrap();
        let node = tree.root().child("kv").unwrap();
        match KvStore::from_node(&heap, &mut restored, node) {
            Err(KvError::Node { what, .. }) => assert_eq!(what, "segment node"),
            other => panic!("{other:?}"),
        }
        // Only the index folios, never taken, are still allocated.
        let left: u64 = restored
            .folios
            .iter()
            .map(|p| p.folio().order.pages())
            .sum();
        assert!(left > 0);
        assert_eq!(heap.stats().preservable.allocated_pages, left);
    }

    #[test]
    fn corrupt_record_is_found_not_trusted() {
        let heap = heap();
        let mut kv = KvStore::new(
            &heap,
            KvConfig {
                capacity: 10,
                value_size: 8,
            },
        )
        .unwrap();
        kv.insert(5, b"five").unwrap();
        let (_, addr) = kv.probe(5).unwrap().0.unwrap();
        kv.record_mut(addr).unwrap()[16] ^= 1;
        let r = kv.verify(|_, _| true).unwrap();
        assert_eq!((r.entries, r.bad), (1, 1));
        // A bogus offset in the index is an error, not a wild read.
        kv.slot_set(slot_of(5, kv.geo.index_slots), addr + 3)
            .unwrap();
        assert!(matches!(kv.get(5), Err(KvError::Corrupt { .. })));
    }
}
