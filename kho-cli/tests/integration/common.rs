//! Running the built binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// What one run printed and returned.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `kho args...` with the fixtures directory as working directory, so
/// paths in the output are bare file names.
pub fn kho(args: &[&str]) -> Out {
    kho_in(&fixtures(), args)
}

/// Run `kho args...` in `dir`.
pub fn kho_in(dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(args)
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .output()
        .expect("run kho");
    Out {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// `kho-cli/tests/golden/`.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compare `actual` with the golden file `name`, or write it when
/// blessing. Returns a description of the mismatch.
pub fn compare(name: &str, actual: &str) -> Option<String> {
    let path = golden_dir().join(name);
    if std::env::var_os("KHO_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(expected) if expected == actual => None,
        Ok(expected) => Some(format!(
            "{name}: output differs from the golden file\n--- expected\n{expected}\n--- actual\n{actual}"
        )),
        Err(e) => Some(format!("{name}: no golden file ({e}); run with KHO_BLESS=1")),
    }
}

pub fn record(out: &Out) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.code, out.stdout, out.stderr
    )
}

/// One row of the table in `fixtures/README.md`.
#[derive(Debug, Clone)]
pub struct Row {
    /// The file name.
    pub file: String,
    /// Exit code of `kho check`.
    pub exit: i32,
    /// Finding codes, sorted (exit 0 and 1).
    pub codes: Vec<String>,
    /// Fragments of the one-line error, quoted in backticks (exit 2).
    pub error: Vec<String>,
}

/// The fixture table of `fixtures/README.md`, in table order.
pub fn fixture_table() -> Vec<Row> {
    let readme = std::fs::read_to_string(fixtures().join("README.md")).unwrap();
    let files = readme
        .split("## Files")
        .nth(1)
        .expect("README.md has a Files section");
    let mut rows = Vec::new();
    for line in files.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 6, "four columns: {line}");
        let file = cells[1].trim_matches('`').to_owned();
        let exit = cells[3]
            .parse()
            .unwrap_or_else(|_| panic!("exit code of {file}: {:?}", cells[3]));
        let last = cells[4];
        let mut codes: Vec<String> = last
            .match_indices("KHO-")
            .filter_map(|(i, _)| last.get(i..i + 8))
            .map(str::to_owned)
            .collect();
        codes.sort();
        let error = last
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        rows.push(Row {
            file,
            exit,
            codes,
            error,
        });
    }
    rows
}
