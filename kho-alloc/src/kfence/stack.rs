//! Stack traces for allocation, free and report sites, rendered to text at
//! capture time so that a signal handler can print them without allocating.

use super::sys;
use super::text::Out;

#[cfg(test)]
thread_local! {
    /// Stacks rendered by this thread, for tests of when stacks are taken.
    pub(crate) static RENDERS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Frames kept per stack.
pub(crate) const MAX_FRAMES: usize = 16;

/// Frames of the capture machinery itself, dropped from raw stacks:
/// `capture_ips` and `render`.
const RAW_SKIP: usize = 2;

/// Appends the current stack to `out`, one indented line per frame, and
/// returns the first frame's name (the function that called into the pool),
/// if known.
///
/// With `symbolize`, frames are resolved to function names through the
/// standard library's backtrace (slow: use for tests and debugging). Without
/// it, each frame is a return address with its object file and offset, which
/// `addr2line` resolves offline.
pub(crate) fn render(symbolize: bool, out: &mut Vec<u8>) -> Option<String> {
    #[cfg(test)]
    RENDERS.with(|n| n.set(n.get() + 1));
    if symbolize {
        render_symbolized(out)
    } else {
        render_raw(out)
    }
}

fn render_raw(out: &mut Vec<u8>) -> Option<String> {
    let mut ips = [0usize; MAX_FRAMES + RAW_SKIP];
    let n = sys::capture_ips(&mut ips);
    let mut first = None;
    let mut line = Vec::with_capacity(96);
    out.reserve(n * 48);
    for (i, &ip) in ips.iter().take(n).skip(RAW_SKIP).enumerate() {
        line.clear();
        line.hex(ip as u64);
        if let Some(info) = sys::describe_ip(ip) {
            if let Some((name, sym_off)) = &info.symbol {
                line.s(" ");
                line.s(name);
                line.s("+");
                line.hex(*sym_off as u64);
            }
            line.s(" (");
            line.s(&info.object);
            line.s("+");
            line.hex(info.offset as u64);
            line.s(")");
        }
        if i == 0 {
            first = Some(String::from_utf8_lossy(&line).into_owned());
        }
        out.s("  #");
        out.dec(i as u64);
        out.s(" ");
        out.put(&line);
        out.s("\n");
    }
    first
}

/// Whether a resolved frame belongs to the capture machinery or the pool.
fn is_internal(name: &str) -> bool {
    name.starts_with("std::backtrace")
        || name.starts_with("<std::backtrace")
        || name.starts_with("backtrace::")
        || name.contains("kho_alloc::kfence::")
}

fn render_symbolized(out: &mut Vec<u8>) -> Option<String> {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let mut first = None;
    let mut kept = 0usize;
    let mut skipping = true;
    for line in bt.lines() {
        let trimmed = line.trim_start();
        let Some((num, name)) = trimmed.split_once(": ") else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if skipping && is_internal(name) {
            continue;
        }
        skipping = false;
        if first.is_none() {
            first = Some(name.to_owned());
        }
        out.s("  #");
        out.dec(kept as u64);
        out.s(" ");
        out.s(name);
        out.s("\n");
        kept += 1;
        if kept == MAX_FRAMES {
            break;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "symbolization reads files")]
    fn symbolized_stack_names_the_caller() {
        let mut out = Vec::new();
        let first = render(true, &mut out);
        let text = String::from_utf8(out).unwrap();
        // Debug info may be absent in some builds; when frames resolve, the
        // test function is among them and internal frames are not first.
        if text.contains("symbolized_stack_names_the_caller") {
            let first = first.unwrap();
            assert!(!is_internal(&first), "{first}");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    #[cfg_attr(miri, ignore = "backtrace(3)")]
    fn raw_stack_has_frames() {
        let mut out = Vec::new();
        let first = render(false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("  #0 0x"), "{text}");
        assert!(first.unwrap().starts_with("0x"));
    }
}
