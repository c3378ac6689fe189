//! Test-set layout (nnU-Net naming): images `<case>_0000.nii.gz`, labels and predictions
//! `<case>.nii.gz` (`.nii` also accepted). Pairs cases across folders and reports every
//! missing, extra or ambiguous file instead of silently skipping it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::Digest;

/// One case's files.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseFiles {
    /// Case id (`case_001`).
    pub id: String,
    /// Input file: the image (`_0000`), or a prediction when scoring folders.
    pub input: PathBuf,
    /// Reference label map.
    pub label: PathBuf,
}

/// Paired cases plus the problems found while pairing.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Cases present on both sides, sorted by id.
    pub cases: Vec<CaseFiles>,
    /// Reference cases without an input (missing prediction / image).
    pub missing: Vec<String>,
    /// Inputs without a reference.
    pub extra: Vec<String>,
    /// Human-readable problems (missing, extra, duplicates), one per line.
    pub problems: Vec<String>,
}

/// Listing a folder failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot list folder: {source}")]
pub struct DatasetError {
    /// The folder.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

fn strip_nifti(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
}

fn list(
    dir: &Path,
    channel: bool,
) -> Result<(BTreeMap<String, PathBuf>, Vec<String>), DatasetError> {
    let mut out = BTreeMap::new();
    let mut dup = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|source| DatasetError {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Some(stem) = strip_nifti(&name) else {
            continue;
        };
        let id = if channel {
            match stem.strip_suffix("_0000") {
                Some(id) => id,
                None => continue, // other channels (_0001) or unrelated files
            }
        } else {
            stem
        };
        if let Some(prev) = out.insert(id.to_string(), entry.path()) {
            dup.push(format!(
                "case {id}: two files, {} and {} (keep one)",
                prev.display(),
                entry.path().display()
            ));
        }
    }
    Ok((out, dup))
}

fn pair(
    inputs: BTreeMap<String, PathBuf>,
    labels: BTreeMap<String, PathBuf>,
    mut problems: Vec<String>,
    what: &str,
    labels_dir: &Path,
) -> Dataset {
    let mut d = Dataset::default();
    for (id, label) in &labels {
        match inputs.get(id) {
            Some(input) => d.cases.push(CaseFiles {
                id: id.clone(),
                input: input.clone(),
                label: label.clone(),
            }),
            None => {
                problems.push(format!(
                    "case {id}: reference {} has no {what}",
                    label.display()
                ));
                d.missing.push(id.clone());
            }
        }
    }
    for (id, input) in &inputs {
        if !labels.contains_key(id) {
            problems.push(format!(
                "case {id}: {what} {} has no reference in {}",
                input.display(),
                labels_dir.display()
            ));
            d.extra.push(id.clone());
        }
    }
    d.problems = problems;
    d
}

/// Pair a task's images (`<case>_0000.nii.gz`) with its labels (`<case>.nii.gz`).
///
/// # Errors
/// [`DatasetError`] when a folder cannot be listed.
pub fn pair_cases(images: &Path, labels: &Path) -> Result<Dataset, DatasetError> {
    let (i, mut d1) = list(images, true)?;
    let (l, d2) = list(labels, false)?;
    d1.extend(d2);
    Ok(pair(i, l, d1, "image (<case>_0000.nii.gz)", labels))
}

/// Pair a folder of predictions (`<case>.nii.gz`) with reference labels.
///
/// # Errors
/// [`DatasetError`] when a folder cannot be listed.
pub fn pair_predictions(predictions: &Path, labels: &Path) -> Result<Dataset, DatasetError> {
    let (i, mut d1) = list(predictions, false)?;
    let (l, d2) = list(labels, false)?;
    d1.extend(d2);
    Ok(pair(i, l, d1, "prediction", labels))
}

/// sha256 over the sorted (case id, reference size, reference mtime): identifies the test
/// set a report was computed on without reading every file.
pub fn manifest_hash(d: &Dataset) -> String {
    let mut h = sha2::Sha256::new();
    for c in &d.cases {
        let meta = std::fs::metadata(&c.label).ok();
        let size = meta.as_ref().map_or(0, std::fs::Metadata::len);
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        h.update(format!("{}\t{size}\t{mtime}\n", c.id));
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_extra_cases_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = (dir.path().join("i"), dir.path().join("l"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&lab).unwrap();
        for f in [
            "a_0000.nii.gz",
            "b_0000.nii.gz",
            "b_0001.nii.gz",
            "c_0000.nii",
        ] {
            std::fs::write(img.join(f), b"").unwrap();
        }
        for f in ["a.nii.gz", "b.nii.gz", "d.nii.gz", "notes.txt"] {
            std::fs::write(lab.join(f), b"").unwrap();
        }
        let d = pair_cases(&img, &lab).unwrap();
        let ids: Vec<&str> = d.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(d.missing, ["d"]);
        assert_eq!(d.extra, ["c"]);
        assert_eq!(d.problems.len(), 2);
    }
}
