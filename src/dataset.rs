//! Test-set layout (nnU-Net naming): images `<case>_0000.nii.gz`, labels and predictions
//! `<case>.nii.gz` (`.nii` also accepted). Pairs cases across folders and reports every
//! missing, extra or ambiguous file instead of silently skipping it.
//!
//! The test set's identity ([`manifest_hash`]) is a hash of the bytes scored, so two
//! evaluations are comparable exactly when they scored the same bytes. Each file's digest
//! is cached (keyed by path, size, mtime, ctime, inode and device), so an unchanged test
//! set is not read again for every evaluation.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    /// What the `input` files are: part of the test set (images) or the thing scored
    /// (predictions, `evald score`), which is not hashed as test set.
    pub inputs: InputRole,
}

/// What a [`Dataset`]'s input files are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InputRole {
    /// Test-set images (`<case>_0000.nii.gz`).
    #[default]
    Image,
    /// Predictions to score against the labels.
    Prediction,
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
    let mut d = pair(i, l, d1, "prediction", labels);
    d.inputs = InputRole::Prediction;
    Ok(d)
}

/// File name of the digest cache in the state folder.
pub const DIGEST_CACHE_FILE: &str = "testset-digests.json";

/// One reader/writer of a cache file at a time in this process (another process's write
/// is an atomic rename: the worst case is a lost entry, read again next time).
static CACHE_FILE_LOCK: Mutex<()> = Mutex::new(());

/// Content hash of the test set a report was computed on: sha256 over the sorted cases and,
/// per case, each test-set file's role (`image`, `label`) and sha256 of its bytes.
/// Predictions (`evald score`) are not part of the test set and are not hashed. With a
/// `cache` file (the state folder's [`DIGEST_CACHE_FILE`]), unchanged files are not read
/// again; without one every file is read.
pub fn manifest_hash(d: &Dataset, cache: Option<&Path>) -> String {
    content_hash(d, cache).0
}

/// What computing a hash had to read (the rest came from the cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashStats {
    /// Files read.
    pub files_read: usize,
    /// Bytes read.
    pub bytes_read: u64,
}

/// The key under which a file's digest is valid: any change of content changes the size,
/// mtime or ctime (ctime cannot be set back by `touch -d` or rsync), a replaced file has
/// another inode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileKey {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedDigest {
    key: FileKey,
    sha256: String,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct DigestCache {
    version: u32,
    files: BTreeMap<String, CachedDigest>,
}

const DIGEST_CACHE_VERSION: u32 = 1;

fn file_key(meta: &std::fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    // Nanoseconds fit an i64 until 2262.
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    FileKey {
        size: meta.len(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        ino: meta.ino(),
        dev: meta.dev(),
    }
}

fn load_cache(path: &Path) -> DigestCache {
    let Ok(text) = std::fs::read_to_string(path) else {
        return DigestCache::default();
    };
    match serde_json::from_str::<DigestCache>(&text) {
        Ok(c) if c.version == DIGEST_CACHE_VERSION => c,
        // Another layout or a damaged file: start again (it is only a cache).
        _ => DigestCache::default(),
    }
}

fn save_cache(path: &Path, cache: &DigestCache) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(&mut tmp, cache)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// [`manifest_hash`] with an explicit cache file (`None`: read everything), saying what
/// it read. A file that cannot be read hashes as its error (the hash then differs from any
/// readable test set; the evaluation reports the case as failed anyway).
pub fn content_hash(d: &Dataset, cache: Option<&Path>) -> (String, HashStats) {
    let _guard = cache.map(|_| {
        CACHE_FILE_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let mut store = cache.map(load_cache).unwrap_or_default();
    store.version = DIGEST_CACHE_VERSION;
    let mut stats = HashStats::default();
    let mut changed = false;
    let mut digest = |path: &Path, stats: &mut HashStats| -> String {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return format!("unreadable ({:?})", e.kind()),
        };
        let key = file_key(&meta);
        let name = path.to_string_lossy().into_owned();
        if let Some(c) = store.files.get(&name).filter(|c| c.key == key) {
            return c.sha256.clone();
        }
        match sha256_file(path) {
            Ok((sha, n)) => {
                stats.files_read += 1;
                stats.bytes_read += n;
                // Keyed by the metadata from before the read: a file changed while it was
                // read gets another key next time and is read again.
                store.files.insert(
                    name,
                    CachedDigest {
                        key,
                        sha256: sha.clone(),
                    },
                );
                changed = true;
                sha
            }
            Err(e) => format!("unreadable ({:?})", e.kind()),
        }
    };
    let mut h = sha2::Sha256::new();
    h.update(b"evald test set v2\n");
    for c in &d.cases {
        if d.inputs == InputRole::Image {
            h.update(format!(
                "{}\timage\t{}\n",
                c.id,
                digest(&c.input, &mut stats)
            ));
        }
        h.update(format!(
            "{}\tlabel\t{}\n",
            c.id,
            digest(&c.label, &mut stats)
        ));
    }
    if let (Some(path), true) = (cache, changed) {
        // Forget files that are gone, so the cache does not grow with every old test set.
        store.files.retain(|p, _| Path::new(p).exists());
        if let Err(e) = save_cache(path, &store) {
            tracing::warn!(cache = %path.display(), "cannot save the test-set digest cache: {e}");
        }
    }
    (hex::encode(h.finalize()), stats)
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

    fn tiny_set(dir: &Path) -> Dataset {
        let (img, lab) = (dir.join("i"), dir.join("l"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&lab).unwrap();
        for (case, bytes) in [("a", b"AAAA"), ("b", b"BBBB")] {
            std::fs::write(img.join(format!("{case}_0000.nii.gz")), bytes).unwrap();
            std::fs::write(lab.join(format!("{case}.nii.gz")), bytes.map(|b| b + 1)).unwrap();
        }
        pair_cases(&img, &lab).unwrap()
    }

    #[test]
    fn the_test_set_hash_follows_the_bytes_not_the_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let d = tiny_set(dir.path());
        let (h0, _) = content_hash(&d, None);
        // Touch: new mtime, same bytes.
        let f = std::fs::File::options()
            .write(true)
            .open(&d.cases[0].label)
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
            .unwrap();
        drop(f);
        assert_eq!(content_hash(&d, None).0, h0, "touching keeps the hash");
        // One byte of one image, same size.
        std::fs::write(&d.cases[1].input, b"BBBC").unwrap();
        let (h1, _) = content_hash(&d, None);
        assert_ne!(h1, h0, "one changed byte changes the hash");
        // The byte back: the hash back.
        std::fs::write(&d.cases[1].input, b"BBBB").unwrap();
        assert_eq!(content_hash(&d, None).0, h0);
        // Predictions are not the test set: scoring other predictions is the same set.
        let mut scored = d.clone();
        scored.inputs = InputRole::Prediction;
        let (hp, _) = content_hash(&scored, None);
        std::fs::write(&d.cases[0].input, b"ZZZZ").unwrap();
        assert_eq!(content_hash(&scored, None).0, hp);
    }

    #[test]
    fn the_digest_cache_reads_only_changed_files_and_never_changes_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let d = tiny_set(dir.path());
        let cache = dir.path().join(DIGEST_CACHE_FILE);
        let (h0, s0) = content_hash(&d, Some(&cache));
        assert_eq!(s0.files_read, 4, "first time: every file");
        assert_eq!(s0.bytes_read, 16);
        assert_eq!(
            content_hash(&d, None).0,
            h0,
            "same hash with or without a cache"
        );
        let (h1, s1) = content_hash(&d, Some(&cache));
        assert_eq!(
            (h1.as_str(), s1.files_read),
            (h0.as_str(), 0),
            "nothing changed"
        );
        // Touched: read again (its key changed), same hash.
        let f = std::fs::File::options()
            .write(true)
            .open(&d.cases[0].label)
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
            .unwrap();
        drop(f);
        let (h2, s2) = content_hash(&d, Some(&cache));
        assert_eq!((h2.as_str(), s2.files_read), (h0.as_str(), 1));
        // Changed bytes, same size: read again, new hash.
        std::fs::write(&d.cases[1].label, b"XXXX").unwrap();
        let (h3, s3) = content_hash(&d, Some(&cache));
        assert_eq!(s3.files_read, 1);
        assert_ne!(h3, h0);
        // A damaged cache is only a cache: everything is read again, same answer.
        std::fs::write(&cache, b"{ not json").unwrap();
        let (h4, s4) = content_hash(&d, Some(&cache));
        assert_eq!((h4.as_str(), s4.files_read), (h3.as_str(), 4));
    }
}
