//! What a model is on disk, whatever runs it: one file (TorchScript, ONNX) or a folder of
//! files (an nnU-Net trained-model folder). This module owns which files make up a model,
//! how they are checked (regular files with one name, not empty, bounded), its digest, and
//! reading it back verified against that digest.
//!
//! The digest of a one-file model is the sha256 of its bytes (what earlier evald versions
//! recorded, so duplicates are still recognised); of a folder, the sha256 of the lines
//! `<sha256 of the file>  <path inside the folder>\n` sorted by path, so renaming,
//! adding or changing any member changes it and nothing else does.

use std::path::{Path, PathBuf};

use super::nnunet::plans;
use super::{ModelFormat, MAX_MODEL_BYTES};

/// A model's files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A member is missing, unreadable, not a regular file, or too large.
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// A member has more than one name (a hard link can bring in a file that is not the
    /// vendor's).
    #[error("{path}: is a hard link ({names} names for one file): copy the file itself")]
    HardLink {
        /// The file.
        path: PathBuf,
        /// Its link count.
        names: u64,
    },
    /// A member is empty.
    #[error("{path}: is empty (was the copy interrupted?)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The folder is not a model folder of the format.
    #[error(transparent)]
    Folder(#[from] plans::PlansError),
    /// The bytes are not those recorded.
    #[error("{path}: sha256 {found} is not the {expected} that was checked; not loaded")]
    Changed {
        /// The model.
        path: PathBuf,
        /// Recorded.
        expected: String,
        /// Found now.
        found: String,
    },
    /// A copy cannot be written.
    #[error("{path}: cannot write the copy: {source}")]
    Copy {
        /// The destination.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One file of a model: its path inside the model (`""` for a one-file model) and on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Relative path inside the folder, `/`-separated; empty for a one-file model.
    pub rel: String,
    /// The file.
    pub path: PathBuf,
}

/// A model read into memory, each member's bytes as hashed.
#[derive(Debug)]
pub struct Read {
    /// The model (file or folder).
    pub path: PathBuf,
    /// Its digest.
    pub sha256: String,
    /// Member bytes, in [`members`] order.
    pub files: Vec<(Member, Vec<u8>)>,
}

impl Read {
    /// The bytes of member `rel`.
    pub fn get(&self, rel: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(m, _)| m.rel == rel)
            .map(|(_, b)| &b[..])
    }
}

/// The files that make up the model at `path` for `format`, in a fixed order.
///
/// # Errors
/// [`ArtifactError::Folder`] when a folder format's folder is not one.
pub fn members(format: ModelFormat, path: &Path) -> Result<Vec<Member>, ArtifactError> {
    if !format.is_folder() {
        return Ok(vec![Member {
            rel: String::new(),
            path: path.to_path_buf(),
        }]);
    }
    // The folder's own check decides which files matter (plans, dataset, the folds'
    // checkpoints); anything else a vendor left there is not part of the model.
    let folder = plans::ModelFolder::open(path, None)?;
    let mut rels = vec![
        plans::PLANS_JSON.to_string(),
        plans::DATASET_JSON.to_string(),
    ];
    for (k, _) in &folder.folds {
        rels.push(format!("fold_{k}/{}", plans::CHECKPOINT));
    }
    rels.sort();
    Ok(rels
        .into_iter()
        .map(|rel| Member {
            path: path.join(&rel),
            rel,
        })
        .collect())
}

fn checked_open(m: &Member) -> Result<(std::fs::File, u64), ArtifactError> {
    let f = crate::files::open_regular(&m.path)?;
    let meta = f.metadata().map_err(|source| crate::files::FileError::Io {
        path: m.path.clone(),
        source,
    })?;
    let names = std::os::unix::fs::MetadataExt::nlink(&meta);
    if names > 1 {
        return Err(ArtifactError::HardLink {
            path: m.path.clone(),
            names,
        });
    }
    if meta.len() == 0 {
        return Err(ArtifactError::Empty {
            path: m.path.clone(),
        });
    }
    Ok((f, meta.len()))
}

fn combine(format: ModelFormat, hashes: &[(String, String)]) -> String {
    use sha2::Digest;
    if !format.is_folder() {
        return hashes.first().map(|h| h.1.clone()).unwrap_or_default();
    }
    let mut h = sha2::Sha256::new();
    for (rel, sha) in hashes {
        h.update(format!("{sha}  {rel}\n").as_bytes());
    }
    hex::encode(h.finalize())
}

/// The digest of the model at `path`, each member checked and hashed through the
/// descriptor that was checked.
///
/// # Errors
/// [`ArtifactError`] naming the member.
pub fn digest(format: ModelFormat, path: &Path) -> Result<String, ArtifactError> {
    let mut hashes = Vec::new();
    for m in members(format, path)? {
        let (f, _) = checked_open(&m)?;
        let sha = crate::files::sha256_hex(f).map_err(|source| crate::files::FileError::Io {
            path: m.path.clone(),
            source,
        })?;
        hashes.push((m.rel, sha));
    }
    Ok(combine(format, &hashes))
}

/// Read the model at `path` into memory (its digest computed from the bytes read).
///
/// # Errors
/// As [`digest`].
pub fn read(format: ModelFormat, path: &Path) -> Result<Read, ArtifactError> {
    read_checked(format, path, None)
}

/// Read the model at `path` into memory and check it hashes to `expected`: the bytes
/// returned are the bytes hashed, so a file replaced in between is never run under the
/// recorded digest.
///
/// # Errors
/// [`ArtifactError::Changed`] for other bytes, otherwise as [`digest`].
pub fn read_verified(
    format: ModelFormat,
    path: &Path,
    expected: &str,
) -> Result<Read, ArtifactError> {
    read_checked(format, path, Some(expected))
}

fn read_checked(
    format: ModelFormat,
    path: &Path,
    expected: Option<&str>,
) -> Result<Read, ArtifactError> {
    let mut files = Vec::new();
    let mut hashes = Vec::new();
    for m in members(format, path)? {
        let (f, len) = checked_open(&m)?;
        if len > MAX_MODEL_BYTES {
            return Err(crate::files::FileError::TooLarge {
                path: m.path.clone(),
                size: len,
                limit: MAX_MODEL_BYTES,
            }
            .into());
        }
        drop(f);
        let bytes = crate::files::read_bounded(&m.path, MAX_MODEL_BYTES)?;
        let sha =
            crate::files::sha256_hex(&bytes[..]).map_err(|source| crate::files::FileError::Io {
                path: m.path.clone(),
                source,
            })?;
        hashes.push((m.rel.clone(), sha));
        files.push((m, bytes));
    }
    let found = combine(format, &hashes);
    if let Some(expected) = expected.filter(|&e| e != found) {
        return Err(ArtifactError::Changed {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(Read {
        path: path.to_path_buf(),
        sha256: found,
        files,
    })
}

/// Copy the model at `path` into `dest_dir` (a one-file model as `<dest_dir>/<its name>`,
/// a folder as `<dest_dir>/<its name>/` with its members only), read-only, and check the
/// copy hashes to `expected`. Returns the copy's path.
///
/// # Errors
/// [`ArtifactError::Changed`] when the copied bytes differ from those recorded,
/// [`ArtifactError::Copy`] for the destination, otherwise as [`digest`].
pub fn copy_verified(
    format: ModelFormat,
    path: &Path,
    dest_dir: &Path,
    expected: &str,
) -> Result<PathBuf, ArtifactError> {
    use sha2::Digest;
    use std::io::{Read as _, Write};
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .unwrap_or(std::ffi::OsStr::new(format.default_file()));
    let root = dest_dir.join(name);
    let copy_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ArtifactError::Copy { path: p, source }
    };
    let mut hashes = Vec::new();
    let mut dirs = Vec::new();
    for m in members(format, path)? {
        let (mut src, _) = checked_open(&m)?;
        let to = if m.rel.is_empty() {
            root.clone()
        } else {
            root.join(&m.rel)
        };
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(copy_err(parent))?;
            if parent != dest_dir {
                dirs.push(parent.to_path_buf());
            }
        }
        let mut dst = std::fs::File::create(&to).map_err(copy_err(&to))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src
                .read(&mut buf)
                .map_err(|source| crate::files::FileError::Io {
                    path: m.path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(copy_err(&to))?;
        }
        dst.sync_all().map_err(copy_err(&to))?;
        drop(dst);
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400))
            .map_err(copy_err(&to))?;
        hashes.push((m.rel, hex::encode(h.finalize())));
    }
    // Folders read-only too (deepest first), so nothing can be added to the copy.
    dirs.sort();
    dirs.dedup();
    for d in dirs.iter().rev() {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o500)).map_err(copy_err(d))?;
    }
    let found = combine(format, &hashes);
    if found != expected {
        return Err(ArtifactError::Changed {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(root)
}

/// The total size in bytes of the model's members (0 for what cannot be listed).
pub fn size(format: ModelFormat, path: &Path) -> u64 {
    members(format, path).map_or(0, |ms| {
        ms.iter()
            .filter_map(|m| std::fs::metadata(&m.path).ok())
            .map(|m| m.len())
            .sum()
    })
}

/// What a submission folder holds that evald knows, found by content when the vendor's
/// manifest names no format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// One model of a format evald runs.
    Model(ModelFormat, PathBuf),
    /// A file of a kind evald will not run (see [`Refusal`]).
    Refused(Refusal, PathBuf),
    /// Nothing that looks like a model.
    Nothing,
    /// More than one candidate: the manifest must say which.
    Ambiguous(Vec<PathBuf>),
}

/// Model files evald recognises but does not run, each with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `torch.export.save` ExportedProgram (`.pt2`): convertible to ONNX by the vendor.
    ExportedProgram,
    /// An AOTInductor package (`.pt2` holding compiled native code).
    AotInductor,
    /// A bare PyTorch checkpoint (`.pth`, `.ckpt`, `.bin`): a pickle, which evald never
    /// executes, and weights without the network that uses them.
    Checkpoint,
}

impl Refusal {
    /// What it is and why evald does not run it.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ExportedProgram => {
                "is a torch.export ExportedProgram (.pt2); evald runs ONNX, nnU-Net folders and \
                 (legacy) TorchScript"
            }
            Refusal::AotInductor => {
                "is an AOTInductor package: native code compiled for the machine it was built on \
                 (often with -march=native); evald never runs native code from a submission"
            }
            Refusal::Checkpoint => {
                "is a bare PyTorch checkpoint: a pickle (which can run code when loaded, so evald \
                 never loads one outside an nnU-Net folder's restricted reader) holding weights \
                 without the network that uses them"
            }
        }
    }

    /// What the vendor should send instead.
    pub fn fix(self) -> &'static str {
        match self {
            Refusal::ExportedProgram | Refusal::AotInductor => {
                "Export ONNX from the same program and send model.onnx: \
                 ep = torch.export.load(\"model.pt2\"); torch.onnx.export(ep, (example_input,), \
                 \"model.onnx\", dynamo=True) (or torch.onnx.export(model, (x,), \"model.onnx\", \
                 dynamo=True, dynamic_shapes=...) from the module)."
            }
            Refusal::Checkpoint => {
                "Send the nnU-Net trained-model folder as nnU-Net wrote it, or export ONNX \
                 (torch.onnx.export(model, (x,), \"model.onnx\", dynamo=True))."
            }
        }
    }
}

/// Whether a `.pt2` archive is an AOTInductor package: its zip directory names
/// `aotinductor/` entries (compiled `.so` and `.cpp` sources). Read bounded: the names are
/// in the central directory at the end, but a package is small enough to scan whole.
fn is_aot_inductor(path: &Path) -> bool {
    const SCAN: u64 = 256 << 20;
    let Ok(bytes) = crate::files::read_bounded(path, SCAN) else {
        return false;
    };
    bytes.windows(12).any(|w| w == b"aotinductor/")
}

/// Find the model in submission folder `dir` by its content: `model.pt` (TorchScript),
/// an nnU-Net trained-model folder (`dir` itself or one folder in it), `model.pt2` and
/// bare checkpoints (refused with their reason). A file format is found by its default file
/// name ([`ModelFormat::default_file`]).
pub fn detect(dir: &Path) -> Found {
    let mut found: Vec<Found> = Vec::new();
    for f in ModelFormat::ALL {
        if !f.is_folder() && dir.join(f.default_file()).exists() {
            found.push(Found::Model(f, dir.join(f.default_file())));
        }
    }
    if plans::looks_like(dir) {
        found.push(Found::Model(ModelFormat::NnUnet, dir.to_path_buf()));
    }
    let mut refused = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            let ft = std::fs::symlink_metadata(&p).map(|m| m.file_type());
            if ft.as_ref().is_ok_and(|t| t.is_dir()) {
                if plans::looks_like(&p) {
                    found.push(Found::Model(ModelFormat::NnUnet, p));
                }
                continue;
            }
            if let f @ Found::Refused(..) = detect_file(&p) {
                refused.push(f);
            }
        }
    }
    match found.len() {
        1 => found.remove(0),
        0 => refused.into_iter().next().unwrap_or(Found::Nothing),
        _ => Found::Ambiguous(
            found
                .into_iter()
                .filter_map(|f| match f {
                    Found::Model(_, p) => Some(p),
                    _ => None,
                })
                .collect(),
        ),
    }
}

/// What the file `p` is by its name, when it is a kind evald refuses
/// ([`Found::Refused`]); [`Found::Nothing`] otherwise.
pub fn detect_file(p: &Path) -> Found {
    let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
    match ext.as_deref() {
        Some("pt2") => {
            let r = if is_aot_inductor(p) {
                Refusal::AotInductor
            } else {
                Refusal::ExportedProgram
            };
            Found::Refused(r, p.to_path_buf())
        }
        Some("pth" | "ckpt" | "bin" | "pkl" | "pickle") => {
            Found::Refused(Refusal::Checkpoint, p.to_path_buf())
        }
        _ => Found::Nothing,
    }
}

/// The nnU-Net folder of a submission whose manifest says `format = "nnunet"` without
/// naming the folder: `dir` itself, or its one trained-model folder.
pub fn nnunet_folder(dir: &Path) -> Option<PathBuf> {
    match detect(dir) {
        Found::Model(ModelFormat::NnUnet, p) => Some(p),
        Found::Ambiguous(ps) => {
            let mut nn = ps.into_iter().filter(|p| plans::looks_like(p));
            match (nn.next(), nn.next()) {
                (Some(p), None) => Some(p),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tinyct() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres")
    }

    #[test]
    fn a_file_models_digest_is_the_sha256_of_its_bytes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("model.pt");
        std::fs::write(&p, b"abc").unwrap();
        // sha256("abc"), as sha256sum prints it.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(digest(ModelFormat::TorchScript, &p).unwrap(), abc);
        let r = read_verified(ModelFormat::TorchScript, &p, abc).unwrap();
        assert_eq!(r.get(""), Some(&b"abc"[..]));
        let e = read_verified(ModelFormat::TorchScript, &p, "00").unwrap_err();
        assert!(matches!(e, ArtifactError::Changed { .. }), "{e}");
    }

    #[test]
    fn a_folders_digest_covers_its_members_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("nnUNetTrainer__nnUNetPlansTiny__3d_fullres");
        std::fs::create_dir_all(d.join("fold_0")).unwrap();
        for f in [plans::PLANS_JSON, plans::DATASET_JSON] {
            std::fs::copy(tinyct().join(f), d.join(f)).unwrap();
        }
        std::fs::write(d.join("fold_0").join(plans::CHECKPOINT), b"weights").unwrap();
        let rels: Vec<String> = members(ModelFormat::NnUnet, &d)
            .unwrap()
            .into_iter()
            .map(|m| m.rel)
            .collect();
        assert_eq!(
            rels,
            ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
        );
        let a = digest(ModelFormat::NnUnet, &d).unwrap();
        // What the module doc says, computed with the shell's tools' conventions.
        let line = |rel: &str| {
            let b = std::fs::read(d.join(rel)).unwrap();
            format!("{}  {rel}\n", crate::files::sha256_hex(&b[..]).unwrap())
        };
        let listing: String = rels.iter().map(|r| line(r)).collect();
        assert_eq!(a, crate::files::sha256_hex(listing.as_bytes()).unwrap());
        // A stray file is not part of the model; a changed checkpoint is.
        std::fs::write(d.join("notes.txt"), b"hello").unwrap();
        assert_eq!(digest(ModelFormat::NnUnet, &d).unwrap(), a);
        std::fs::write(d.join("fold_0").join(plans::CHECKPOINT), b"weightz").unwrap();
        assert_ne!(digest(ModelFormat::NnUnet, &d).unwrap(), a);
        let b = digest(ModelFormat::NnUnet, &d).unwrap();
        let out = tempfile::tempdir().unwrap();
        let copy = copy_verified(ModelFormat::NnUnet, &d, out.path(), &b).unwrap();
        assert_eq!(copy.file_name(), d.file_name());
        assert!(!copy.join("notes.txt").exists());
        assert_eq!(digest(ModelFormat::NnUnet, &copy).unwrap(), b);
        let r = read_verified(ModelFormat::NnUnet, &copy, &b).unwrap();
        assert_eq!(r.get("fold_0/checkpoint_final.pth"), Some(&b"weightz"[..]));
        // Read-only: nothing can be added to the copy.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0);
        for dir in [copy.join("fold_0"), copy.clone()] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    #[test]
    fn a_hard_linked_or_empty_member_is_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("model.onnx");
        std::fs::write(&p, b"x").unwrap();
        std::fs::hard_link(&p, t.path().join("other")).unwrap();
        let e = digest(ModelFormat::TorchScript, &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hard link"), "{e}");
        let q = t.path().join("empty.pt");
        std::fs::write(&q, b"").unwrap();
        let e = digest(ModelFormat::TorchScript, &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
