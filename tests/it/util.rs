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

/// A finished `evald demo` run: its standard output.
pub struct Demo {
    pub stdout: String,
}

impl Demo {
    /// Run `evald demo --cases N --size X,Y,Z --out OUT` and require success.
    pub fn run(out: &Path, cases: u32, size: &str) -> Self {
        let o = run_ok(
            evald()
                .args([
                    "demo",
                    "--cases",
                    &cases.to_string(),
                    "--size",
                    size,
                    "--out",
                ])
                .arg(out),
        );
        Demo {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        }
    }

    /// The path of the demo's `key: PATH` line (`report`, `summary`, `email`).
    pub fn path(&self, key: &str) -> PathBuf {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no '{key}:' line in\n{}", self.stdout))
    }
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
