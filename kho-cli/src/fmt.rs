//! Human output helpers shared by the subcommands (and `kho demo`): sizes,
//! aligned tables, colour on terminals only, hexdumps.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::IsTerminal;

/// `1536` → `"1.5 KiB"`; bytes below 1 KiB stay exact.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `0x1000`.
pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Terminal styling, enabled only when the stream is a terminal, `NO_COLOR`
/// is unset or empty (no-color.org) and `TERM` is not `dumb`.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    on: bool,
}

/// Whether to colour a stream: on a terminal only, unless `NO_COLOR` has a
/// value or the terminal is `dumb`.
pub fn colour_enabled(terminal: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty) && term.is_none_or(|t| t != "dumb")
}

impl Style {
    /// Styling for standard output.
    pub fn stdout() -> Style {
        Style {
            on: colour_enabled(
                std::io::stdout().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
                std::env::var_os("TERM").as_deref(),
            ),
        }
    }

    fn wrap(self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    /// Bold (headings).
    pub fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }

    /// Red (errors).
    pub fn red(self, s: &str) -> String {
        self.wrap("31;1", s)
    }

    /// Yellow (warnings).
    pub fn yellow(self, s: &str) -> String {
        self.wrap("33;1", s)
    }

    /// Green (clean results).
    pub fn green(self, s: &str) -> String {
        self.wrap("32;1", s)
    }
}

/// Characters of `s` a terminal shows: colour sequences (`ESC [ ... m`)
/// take no column.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            n += 1;
        }
    }
    n
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Pad on the right.
    Left,
    /// Pad on the left (numbers).
    Right,
}

/// An aligned plain-text table.
#[derive(Debug, Clone)]
pub struct Table {
    head: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(head: &[(&str, Align)]) -> Table {
        Table {
            head: head.iter().map(|(h, a)| ((*h).to_owned(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Append a row (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Render with `indent` spaces before each line; the last column is
    /// not padded so lines carry no trailing blanks.
    pub fn render(&self, indent: usize, style: Style) -> String {
        let n = self.head.len();
        let mut width: Vec<usize> = self.head.iter().map(|(h, _)| visible_len(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(visible_len(c));
            }
        }
        let line = |cells: &[String]| {
            let mut out = " ".repeat(indent);
            for (i, (w, (_, align))) in width.iter().zip(&self.head).enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(visible_len(c));
                let last = i + 1 == n;
                match align {
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(c);
                    }
                    Align::Left => {
                        out.push_str(c);
                        if !last {
                            out.push_str(&" ".repeat(pad));
                        }
                    }
                }
                if !last {
                    out.push_str("  ");
                }
            }
            let trimmed = out.trim_end().len();
            out.truncate(trimmed);
            out.push('\n');
            out
        };
        let head: Vec<String> = self.head.iter().map(|(h, _)| h.clone()).collect();
        let mut out = style.bold(line(&head).trim_end());
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// A classic 16-bytes-per-line hexdump of `bytes` found at address `at`.
/// Lines start on 16-byte aligned addresses; when `at` is not aligned, the
/// first line leaves the cells before it blank.
pub fn hexdump(at: u64, bytes: &[u8], indent: usize) -> String {
    let mut out = String::new();
    let lead = (at % 16) as usize;
    let mut line = at - lead as u64;
    let mut i = 0usize;
    while i < bytes.len() {
        let first = if i == 0 { lead } else { 0 };
        let n = (16 - first).min(bytes.len() - i);
        let chunk = &bytes[i..i + n];
        let _ = write!(out, "{}{line:#012x}  ", " ".repeat(indent));
        for j in 0..16usize {
            match j.checked_sub(first).and_then(|k| chunk.get(k)) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if j == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.push_str(&" ".repeat(first));
        for &b in chunk {
            out.push(if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            });
        }
        out.push('|');
        out.push('\n');
        i += n;
        line += 16;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(4 << 20), "4.0 MiB");
        assert_eq!(size(8 << 30), "8.0 GiB");
    }

    #[test]
    fn table_aligns_and_trims() {
        let mut t = Table::new(&[("A", Align::Left), ("N", Align::Right), ("X", Align::Left)]);
        t.row(vec!["long".into(), "1".into(), "".into()]);
        t.row(vec!["s".into(), "100".into(), "z".into()]);
        let s = t.render(2, Style { on: false });
        assert_eq!(s, "  A       N  X\n  long    1\n  s     100  z\n");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert!(colour_enabled(true, None, os("xterm-256color")));
        assert!(colour_enabled(true, None, None));
        assert!(!colour_enabled(false, None, os("xterm")), "a pipe or file");
        assert!(!colour_enabled(true, os("1"), os("xterm")));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(colour_enabled(true, os(""), os("xterm")));
        assert!(!colour_enabled(true, None, os("dumb")));
    }

    #[test]
    fn coloured_cells_align_like_plain_ones() {
        let on = Style { on: true };
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec![on.red("BAD"), "x".into()]);
        t.row(vec!["ok".into(), "y".into()]);
        let s = t.render(0, Style { on: false });
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[1], "\x1b[31;1mBAD\x1b[0m  x");
        assert_eq!(lines[2], "ok   y");
        assert_eq!(visible_len(lines[1]), visible_len(lines[2]));
    }

    #[test]
    fn hexdump_line() {
        let d = hexdump(0x10, b"AB\0", 0);
        assert!(d.starts_with("0x0000000010  41 42 00"), "{d}");
        assert!(d.trim_end().ends_with("|AB.|"), "{d}");
    }

    #[test]
    fn hexdump_lines_are_aligned_on_addresses() {
        let bytes: Vec<u8> = (0x41..0x41 + 21).collect();
        let d = hexdump(0x1c, &bytes, 2);
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 3, "{d}");
        // 0x1c: 12 blank cells, then A B C D.
        assert_eq!(
            lines[0],
            format!(
                "  0x0000000010  {}41 42 43 44  |{}ABCD|",
                "   ".repeat(12) + " ",
                " ".repeat(12)
            )
        );
        assert!(lines[1].starts_with("  0x0000000020  45 46"), "{d}");
        assert!(lines[1].ends_with("|EFGHIJKLMNOPQRST|"), "{d}");
        assert_eq!(lines[2].split_whitespace().nth(1), Some("55"));
        assert!(lines[2].ends_with("|U|"), "{d}");
    }
}
