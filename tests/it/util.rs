//! Shared helpers for the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `evald` binary.
pub fn evald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_evald"))
}

/// `tests/data/<rel>`.
pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// Run and require success, showing both streams otherwise.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn evald");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Parse a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read json")).expect("valid json")
}

/// Find the metrics dict of `case` in a summary.json.
pub fn case_metrics<'a>(summary: &'a serde_json::Value, case: &str) -> &'a serde_json::Value {
    summary["metric_per_case"]
        .as_array()
        .expect("metric_per_case")
        .iter()
        .find(|c| {
            let f = c["reference_file"].as_str().unwrap_or("");
            f.ends_with(&format!("/{case}.nii.gz"))
        })
        .map(|c| &c["metrics"])
        .unwrap_or_else(|| panic!("case {case} not in summary"))
}
