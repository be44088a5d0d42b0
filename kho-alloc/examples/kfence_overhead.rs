//! Counts what the KFENCE hook costs an unsampled allocation, in
//! instructions rather than time (wall-clock differences of ~1% drown in the
//! noise of a shared machine).
//!
//! ```text
//! kfence_overhead MODE N     MODE: none | armed | count | interval
//! ```
//!
//! runs N `Heap::alloc(64)` + `Heap::free` pairs on a heap
//! - `none`: without a sampler;
//! - `armed`: with the time gate armed at a one-hour interval, which does
//!   not fire during the run: the path every allocation takes between two
//!   samples at any interval;
//! - `count`: with a count gate of mean rate 2^31, which practically never
//!   fires: every allocation pays the thread-local countdown;
//! - `interval`: with the default 100 ms time gate. Its timer runs on wall
//!   time, so under a slow instrumenting tool it fires many more times per
//!   allocation than natively; the sampled allocations it took are printed.
//!
//! and prints, on standard error, how many allocations were sampled. Run it
//! under `valgrind --tool=cachegrind --cache-sim=no` for two values of N: the
//! difference in total instructions divided by the difference in N is the
//! cost of one pair, with start-up cost cancelled out.
//! `scripts/kfence-overhead.sh` does exactly that for the four modes.

use std::hint::black_box;
use std::time::Duration;

use kho_alloc::kfence::{PoolConfig, SampleMode, DEFAULT_INTERVAL};
use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "none".into());
    let n: u64 = args.next().unwrap_or_else(|| "100000".into()).parse()?;
    let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(256 << 20))?)?;
    let mode = match mode.as_str() {
        "none" => None,
        "armed" => Some(SampleMode::Interval(Duration::from_secs(3600))),
        "count" => Some(SampleMode::Count(1 << 31)),
        "interval" => Some(SampleMode::Interval(DEFAULT_INTERVAL)),
        other => {
            return Err(format!("unknown mode {other:?}: none | armed | count | interval").into())
        }
    };
    if let Some(mode) = mode {
        heap.enable_kfence(mode, PoolConfig::default())?;
    }
    for _ in 0..n {
        let obj = heap.alloc(64, GfpFlags::NONE)?;
        heap.free(black_box(obj))?;
    }
    let sampled = heap.kfence().map_or(0, |k| k.stats().total_allocs);
    eprintln!("sampled {sampled}");
    Ok(())
}
