//! Allocation-free text building, usable from a signal handler.
//!
//! Reports are rendered once, through [`Out`], either into a `Vec<u8>` (normal
//! context) or into a fixed buffer flushed with `write(2)` (signal context),
//! so both produce the same text.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A byte sink for report rendering. Implementations must not allocate when
/// used from signal context.
pub(crate) trait Out {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);

    /// Appends a string.
    fn s(&mut self, s: &str) {
        self.put(s.as_bytes());
    }

    /// Appends `0x` and the lower-case hexadecimal digits of `v`.
    fn hex(&mut self, v: u64) {
        let mut buf = [0u8; 18];
        let n = fmt_hex(v, &mut buf);
        self.put(buf.get(..n).unwrap_or(&[]));
    }

    /// Appends the decimal digits of `v`.
    fn dec(&mut self, v: u64) {
        let mut buf = [0u8; 20];
        let n = fmt_dec(v, &mut buf);
        self.put(buf.get(..n).unwrap_or(&[]));
    }

    /// Appends `v` in decimal, zero-padded to `width` digits (at most 20).
    fn dec_padded(&mut self, v: u64, width: usize) {
        let mut buf = [0u8; 20];
        let n = fmt_dec(v, &mut buf);
        for _ in n..width.min(20) {
            self.put(b"0");
        }
        self.put(buf.get(..n).unwrap_or(&[]));
    }
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes `0x…` for `v` into `buf`, returning the length.
fn fmt_hex(v: u64, buf: &mut [u8; 18]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 16];
    let mut n = 0;
    let mut x = v;
    loop {
        tmp[n] = DIGITS[(x & 0xf) as usize];
        n += 1;
        x >>= 4;
        if x == 0 || n == 16 {
            break;
        }
    }
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..n {
        buf[2 + i] = tmp[n - 1 - i];
    }
    n + 2
}

/// Writes the decimal digits of `v` into `buf`, returning the length.
fn fmt_dec(v: u64, buf: &mut [u8; 20]) -> usize {
    let mut tmp = [0u8; 20];
    let mut n = 0;
    let mut x = v;
    loop {
        tmp[n] = b'0' + (x % 10) as u8;
        n += 1;
        x /= 10;
        if x == 0 || n == 20 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = tmp[n - 1 - i];
    }
    n
}

/// A fixed buffer that flushes to a file descriptor with `write(2)` when
/// full and on [`FdOut::flush`]. Async-signal-safe.
pub(crate) struct FdOut {
    fd: i32,
    buf: [u8; 512],
    len: usize,
}

impl FdOut {
    /// A writer to `fd`.
    pub(crate) const fn new(fd: i32) -> Self {
        FdOut {
            fd,
            buf: [0; 512],
            len: 0,
        }
    }

    /// Writes out what is buffered.
    pub(crate) fn flush(&mut self) {
        let pending = self.buf.get(..self.len).unwrap_or(&[]);
        super::sys::write_all(self.fd, pending);
        self.len = 0;
    }
}

impl Out for FdOut {
    fn put(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len == self.buf.len() {
                self.flush();
            }
            let room = self.buf.len() - self.len;
            let n = room.min(bytes.len());
            let (head, tail) = bytes.split_at(n);
            if let Some(dst) = self.buf.get_mut(self.len..self.len + n) {
                dst.copy_from_slice(head);
            }
            self.len += n;
            bytes = tail;
        }
    }
}

/// Bounded text stored in atomics, so that a signal handler can read it while
/// another thread may be rewriting it without a data race (a torn read only
/// garbles the text, it is never undefined behaviour).
pub(crate) struct AtomicText<const WORDS: usize> {
    len: AtomicUsize,
    words: [AtomicU64; WORDS],
}

impl<const WORDS: usize> AtomicText<WORDS> {
    /// Capacity in bytes.
    pub(crate) const CAPACITY: usize = WORDS * 8;

    /// Empty text.
    pub(crate) fn new() -> Self {
        AtomicText {
            len: AtomicUsize::new(0),
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Replaces the text with `bytes`, truncated to the capacity.
    pub(crate) fn store(&self, bytes: &[u8]) {
        let bytes = bytes.get(..Self::CAPACITY).unwrap_or(bytes);
        self.len.store(0, Ordering::Release);
        for (word, chunk) in self.words.iter().zip(bytes.chunks(8)) {
            let mut w = [0u8; 8];
            if let Some(dst) = w.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            word.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.len.store(bytes.len(), Ordering::Release);
    }

    /// Empties the text.
    pub(crate) fn clear(&self) {
        self.len.store(0, Ordering::Release);
    }

    /// Emits the text to `out` without allocating.
    pub(crate) fn emit(&self, out: &mut dyn Out) {
        let len = self.len.load(Ordering::Acquire).min(Self::CAPACITY);
        let mut left = len;
        for word in &self.words {
            if left == 0 {
                break;
            }
            let w = word.load(Ordering::Relaxed).to_le_bytes();
            let n = left.min(8);
            out.put(w.get(..n).unwrap_or(&[]));
            left -= n;
        }
    }

    /// The text as a `String` (lossy on torn or non-UTF-8 bytes).
    pub(crate) fn to_string_lossy(&self) -> String {
        let mut v = Vec::new();
        self.emit(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        let mut v = Vec::new();
        v.hex(0);
        v.s(" ");
        v.hex(0xdead_beef);
        v.s(" ");
        v.hex(u64::MAX);
        v.s(" ");
        v.dec(0);
        v.s(" ");
        v.dec(u64::MAX);
        v.s(" ");
        v.dec_padded(42, 6);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "0x0 0xdeadbeef 0xffffffffffffffff 0 18446744073709551615 000042"
        );
    }

    #[test]
    fn atomic_text_round_trips_and_truncates() {
        let t = AtomicText::<2>::new();
        assert_eq!(t.to_string_lossy(), "");
        t.store(b"hello");
        assert_eq!(t.to_string_lossy(), "hello");
        t.store(b"0123456789abcdefXYZ");
        assert_eq!(t.to_string_lossy(), "0123456789abcdef");
        t.clear();
        assert_eq!(t.to_string_lossy(), "");
    }
}
