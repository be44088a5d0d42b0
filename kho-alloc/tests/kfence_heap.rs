//! The KFENCE sampler wired into the heap: exclusion with the real
//! allocator, the image's KFENCE section, disable at freeze (and in a forked
//! child), `NOWAIT` requests never sampled, sampled objects aligned as
//! their size class, and real out-of-bounds and use-after-free accesses
//! through heap objects caught by the fault handler.
// Under Miri: guard pages (mprotect), signals and child processes are
// unsupported.
#![cfg(not(miri))]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use kho_alloc::fault::{self, FaultMode};
use kho_alloc::kfence::{PoolConfig, SampleMode, Sampler};
use kho_alloc::{Arena, ArenaConfig, Error, GfpFlags, Heap, Obj, Region};
use kho_core::{Image, PhysRange};

const CHILD: &str = "KHO_KFENCE_HEAP_CHILD";

/// Returns from the test when the host cannot hold a KFENCE pool (it needs
/// 4 KiB pages).
macro_rules! require_pool_pages {
    () => {
        // SAFETY: sysconf has no memory-safety preconditions.
        let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host != kho_core::PAGE_SIZE as libc::c_long {
            eprintln!("skipped: host pages are {host} bytes, the pool needs 4096");
            return;
        }
    };
}

fn heap() -> Heap {
    let config = ArenaConfig::with_size(64 << 20);
    Heap::new(Arena::anonymous(&config).expect("arena")).expect("heap")
}

/// A heap sampling every eligible request.
fn sampling_heap() -> (Heap, usize) {
    let heap = heap();
    let objects = heap
        .enable_kfence(SampleMode::Count(1), PoolConfig::default())
        .expect("kfence")
        .pool()
        .capacity();
    (heap, objects)
}

fn sampler(heap: &Heap) -> &Sampler {
    heap.kfence().expect("sampler")
}

fn is_child(name: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(name)
}

fn spawn(name: &str) -> (std::process::Output, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// The access word fault reports use on this platform.
fn rw(write: bool) -> &'static str {
    match (cfg!(target_arch = "x86_64"), write) {
        (false, _) => "access",
        (true, false) => "read",
        (true, true) => "write",
    }
}

/// With every eligible request sampled, 100,000 mixed allocations (a fifth
/// `PRESERVE`) never put a sampled object outside the KFENCE region, in
/// preserved memory, or serve a `PRESERVE` request from the pool.
#[test]
fn heap_sampling_respects_exclusion() {
    require_pool_pages!();
    let heap = heap();
    let sampler = heap
        .enable_kfence(SampleMode::Count(1), PoolConfig::default())
        .expect("kfence");
    let capacity = sampler.pool().capacity() as u64;
    let mut live: Vec<Obj> = Vec::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut sampled, mut preserve_requests) = (0u64, 0u64);
    for _ in 0..100_000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let preserve = rng % 5 == 0;
        let flags = if preserve {
            GfpFlags::PRESERVE
        } else {
            GfpFlags::NONE
        };
        preserve_requests += u64::from(preserve);
        let size = (rng >> 8) as usize % 2000 + 1;
        let obj = heap.alloc(size, flags).expect("alloc");
        let pfn = obj.addr().pfn();
        let region = heap.region_of(pfn);
        if region == Some(Region::Kfence) {
            sampled += 1;
            assert!(!preserve, "PRESERVE request served from the KFENCE pool");
            assert!(!heap.is_preserved(pfn));
            assert!(sampler.pool().owns(heap.bytes(&obj).unwrap().as_ptr()));
            // The pool's pages can never be preserved.
            assert!(heap.preserve_range(obj.range()).is_err());
        } else {
            assert!(matches!(
                region,
                Some(Region::General | Region::Preservable)
            ));
        }
        assert_eq!(heap.bytes(&obj).unwrap().len(), size);
        live.push(obj);
        if live.len() > 300 || rng % 3 == 0 {
            let i = (rng >> 24) as usize % live.len();
            heap.free(live.swap_remove(i)).expect("free");
        }
    }
    for obj in live {
        heap.free(obj).expect("free");
    }
    let s = sampler.stats();
    assert_eq!(s.total_allocs, sampled);
    assert!(sampled > 4_000, "{sampled}");
    assert_eq!((s.allocated, s.bugs), (0, 0));
    // Preservable requests are counted as excluded, never served.
    assert_eq!(s.skipped_excluded, preserve_requests);
    // Up to 300 live objects exceed the pool's slots (the heap sizes the
    // pool to the KFENCE region): the pool fills up.
    assert!((8..300).contains(&capacity), "{capacity}");
    assert!(s.skipped_capacity > 0);
}

/// Freeze disables sampling (promptly, with no traffic) and writes the
/// pool's ranges into the image's KFENCE section.
#[test]
fn freeze_disables_sampling_and_records_the_pool() {
    require_pool_pages!();
    let heap = heap();
    let ranges = {
        let sampler = heap
            .enable_kfence(
                SampleMode::Interval(Duration::from_secs(3600)),
                PoolConfig::default(),
            )
            .expect("kfence");
        assert!(sampler.is_enabled());
        sampler.pool().ranges()
    };
    let kfence = heap.layout().bytes_of(Region::Kfence);
    for r in &ranges {
        assert!(r.start >= kfence.start && r.start + r.len <= kfence.start + kfence.len);
    }
    let t = Instant::now();
    heap.freeze_and_commit(None).expect("freeze");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let sampler = heap.kfence().expect("sampler");
    assert!(!sampler.is_enabled());
    assert!(!sampler.stats().enabled);
    let obj = heap.alloc(64, GfpFlags::NONE).unwrap();
    assert_ne!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
    heap.free(obj).unwrap();
    let arena = heap.into_arena().expect("sole owner");
    let image = Image::parse(arena.image_bytes().unwrap()).expect("image");
    let in_image: Vec<PhysRange> = image.kfence().collect();
    assert_eq!(in_image, ranges);
}

/// A canary overwritten through a heap object is reported on free, as a
/// typed error naming the object.
#[test]
fn heap_free_reports_corruption() {
    require_pool_pages!();
    let heap = heap();
    let sampler = heap
        .enable_kfence(SampleMode::Count(1), PoolConfig::default())
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    sampler
        .pool()
        .set_sink(std::sync::Arc::new(move |r: &kho_alloc::kfence::Report| {
            sink.lock().unwrap().push(r.text().to_owned())
        }));
    // Objects until one is left-placed: its canary follows it in the page.
    loop {
        let mut obj = heap.alloc(24, GfpFlags::NONE).unwrap();
        assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
        let addr = obj.addr().raw();
        if addr % 4096 != 0 {
            heap.free(obj).unwrap();
            continue;
        }
        let p = heap.bytes_mut(&mut obj).unwrap().as_mut_ptr();
        // SAFETY: one byte past the 24-byte object, inside its accessible
        // pool page (left placement): the canary area, which this test
        // corrupts on purpose.
        unsafe { p.wrapping_add(24).write_volatile(0x55) };
        match heap.free(obj) {
            Err(Error::KfenceReport { addr: a, title }) => {
                assert_eq!(a, addr);
                assert!(
                    title.starts_with("BUG: KFENCE: memory corruption"),
                    "{title}"
                );
            }
            other => panic!("{other:?}"),
        }
        break;
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(sampler.stats().bugs, 1);
}

/// A use-after-free through a heap object faults and is reported by the
/// fault handler; the process dies of SIGSEGV.
#[test]
fn heap_use_after_free_faults() {
    require_pool_pages!();
    let name = "heap_use_after_free_faults";
    if is_child(name) {
        let heap = heap();
        let sampler = heap
            .enable_kfence(SampleMode::Count(1), PoolConfig::default())
            .unwrap();
        fault::install(sampler.pool(), FaultMode::Reraise).unwrap();
        let obj = heap.alloc(100, GfpFlags::NONE).unwrap();
        assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
        let p = heap.bytes(&obj).unwrap().as_ptr();
        eprintln!("EXPECT Use-after-free {} at {:#x}", rw(false), p as usize);
        heap.free(obj).unwrap();
        // SAFETY: `p` is in the (now protected) pool page of the freed
        // object: the read faults and the handler reports it.
        let v = unsafe { p.read_volatile() };
        eprintln!("no fault: {v}");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(
        stderr.contains(&format!("BUG: KFENCE: use-after-free {}", rw(false))),
        "{stderr}"
    );
    let expect = stderr
        .lines()
        .find_map(|l| l.strip_prefix("EXPECT "))
        .unwrap();
    assert!(
        stderr.contains(&format!("{expect} (0B into kfence-#")),
        "{stderr}"
    );
    assert!(stderr.contains("cache=size-128"), "{stderr}");
}

/// Out-of-bounds accesses through the heap's API (one byte below a
/// left-placed object, one past a right-placed one) fault on the guard
/// pages and are reported against the object.
fn heap_oob_child(write: bool) {
    let (heap, objects) = sampling_heap();
    fault::install(sampler(&heap).pool(), FaultMode::Reraise).unwrap();
    let mut kept = Vec::new();
    for _ in 0..objects {
        let mut obj = heap.alloc(64, GfpFlags::NONE).unwrap();
        assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
        let left = obj.addr().raw() % 4096 == 0;
        if left == write {
            kept.push(obj);
            continue;
        }
        let bytes = heap.bytes_mut(&mut obj).unwrap();
        assert_eq!(bytes.len(), 64);
        let p = bytes.as_mut_ptr();
        let target = if write {
            p.wrapping_add(64)
        } else {
            p.wrapping_sub(1)
        };
        let (distance, side) = if write { (64, "right") } else { (1, "left") };
        eprintln!(
            "EXPECT Out-of-bounds {} at {:#x} ({distance}B {side} of kfence-#",
            rw(write),
            target as usize
        );
        if write {
            // SAFETY: one byte past the object's slice: the guard page after
            // this right-placed object, which faults on purpose.
            unsafe { target.write_volatile(1) };
        } else {
            // SAFETY: one byte before the object's slice: the guard page
            // before this left-placed object, which faults on purpose.
            let _ = unsafe { target.read_volatile() };
        }
        eprintln!("no fault");
        return;
    }
    panic!("no suitably placed object in {objects}");
}

fn check_heap_oob(name: &str, write: bool) {
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(
        stderr.contains(&format!("BUG: KFENCE: out-of-bounds {}", rw(write))),
        "{stderr}"
    );
    let expect = stderr
        .lines()
        .find_map(|l| l.strip_prefix("EXPECT "))
        .unwrap();
    assert!(stderr.contains(expect), "{stderr}");
    assert!(stderr.contains(", size=64, cache=size-64, "), "{stderr}");
    assert!(!stderr.contains("no fault"), "{stderr}");
}

#[test]
fn heap_out_of_bounds_read_left_faults() {
    require_pool_pages!();
    let name = "heap_out_of_bounds_read_left_faults";
    if is_child(name) {
        heap_oob_child(false);
        return;
    }
    check_heap_oob(name, false);
}

#[test]
fn heap_out_of_bounds_write_right_faults() {
    require_pool_pages!();
    let name = "heap_out_of_bounds_write_right_faults";
    if is_child(name) {
        heap_oob_child(true);
        return;
    }
    check_heap_oob(name, true);
}

/// A `NOWAIT` request is never sampled (a sampled allocation captures a
/// stack, which may block); it leaves the count gate where it was, so the
/// next eligible request is sampled.
#[test]
fn nowait_requests_are_never_sampled() {
    require_pool_pages!();
    let (heap, _) = sampling_heap();
    let before = sampler(&heap).stats();
    for _ in 0..100 {
        let obj = heap.alloc(64, GfpFlags::NOWAIT).unwrap();
        assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::General));
        heap.free(obj).unwrap();
    }
    let after = sampler(&heap).stats();
    assert_eq!(
        after.skipped_incompatible - before.skipped_incompatible,
        100
    );
    assert_eq!(after.total_allocs, before.total_allocs);
    let obj = heap.alloc(64, GfpFlags::NONE).unwrap();
    assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
    heap.free(obj).unwrap();
}

/// A sampled object has its size class's alignment, so typed views of it
/// work as they do for unsampled objects.
#[test]
fn sampled_objects_are_aligned_as_their_class() {
    require_pool_pages!();
    let (heap, _) = sampling_heap();
    for (size, align) in [(64usize, 64u64), (4096, 64), (96, 8), (16, 16), (24, 8)] {
        for _ in 0..8 {
            let obj = heap.alloc(size, GfpFlags::NONE).unwrap();
            assert_eq!(heap.region_of(obj.addr().pfn()), Some(Region::Kfence));
            assert_eq!(obj.addr().raw() % align, 0, "size {size}");
            if size == 64 {
                assert!(heap.view::<[u64; 8]>(&obj).is_ok());
            }
            heap.free(obj).unwrap();
        }
    }
}

/// In a forked child the timer thread does not exist: freezing there (which
/// disables the sampler) and dropping the heap still return.
#[test]
fn freeze_and_drop_in_a_forked_child_return() {
    require_pool_pages!();
    let heap = heap();
    heap.enable_kfence(
        SampleMode::Interval(Duration::from_secs(3600)),
        PoolConfig::default(),
    )
    .unwrap();
    // SAFETY: the child freezes and drops the heap (no lock another thread
    // of the parent could hold is needed for that) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = heap.freeze(None).is_ok();
        drop(heap);
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, still running.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("freeze or drop hung in the forked child");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
}
