//! The files of a case folder: every regular file at any depth whose bytes 128..132 are
//! `DICM` is parsed (in parallel); every other file is skipped and listed, never fatal.
//! File names and extensions mean nothing here (`notes.dcm` may be text, `CT.1.3...` a
//! slice).

use std::path::{Path, PathBuf};

use dicom_object::{DefaultDicomObject, OpenFileOptions};
use rayon::prelude::*;

use super::{transfer_syntax, Refusal, MAX_FILE_BYTES};

/// Deepest folder nesting followed (PACS exports nest 3-5 levels).
const MAX_DEPTH: usize = 16;
/// Most files considered in one case folder.
const MAX_FILES: usize = 100_000;

/// A parsed DICOM file.
pub struct DicomFile {
    /// Path as found.
    pub path: PathBuf,
    /// Path relative to the case folder (for messages).
    pub rel: PathBuf,
    /// The parsed object, pixel data included.
    pub obj: DefaultDicomObject,
}

impl std::fmt::Debug for DicomFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomFile").field("rel", &self.rel).finish()
    }
}

/// A file that is not DICOM.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Skipped {
    /// Path relative to the case folder.
    pub file: PathBuf,
    /// Why it was skipped.
    pub why: String,
}

/// What a case folder holds.
#[derive(Debug, Default)]
pub struct Scan {
    /// DICOM files, sorted by relative path (the order carries no meaning).
    pub dicom: Vec<DicomFile>,
    /// Non-DICOM files, skipped, sorted by path.
    pub skipped: Vec<Skipped>,
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), Refusal> {
    let rd = std::fs::read_dir(dir).map_err(|e| Refusal::Unreadable {
        dir: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    for entry in rd {
        let entry = entry.map_err(|e| Refusal::Unreadable {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        // file_type() does not follow links: a linked folder is not entered (no loops),
        // a linked file is opened (open_regular follows it and checks what it is).
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            if depth < MAX_DEPTH {
                walk(&entry.path(), depth + 1, out)?;
            }
        } else {
            out.push(entry.path());
        }
        if out.len() > MAX_FILES {
            return Err(Refusal::Unsupported {
                file: dir.to_path_buf(),
                what: format!("more than {MAX_FILES} files in one case folder: one case is one CT series and its reference"),
            });
        }
    }
    Ok(())
}

enum Found {
    // Boxed: a parsed object is ~330 bytes, a skipped file's note ~50.
    Dicom(Box<DicomFile>),
    Skipped(Skipped),
}

fn read_one(root: &Path, path: PathBuf) -> Result<Found, Refusal> {
    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
    let bytes = match crate::files::read_bounded(&path, MAX_FILE_BYTES) {
        Ok(b) => b,
        Err(crate::files::FileError::NotRegular { kind, .. }) => {
            return Ok(Found::Skipped(Skipped {
                file: rel,
                why: format!("a {kind}, not a file"),
            }))
        }
        Err(e) => {
            return Err(Refusal::Unreadable {
                dir: path,
                detail: e.to_string(),
            })
        }
    };
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        let why = if bytes.is_empty() {
            "empty file".to_string()
        } else {
            format!("no DICM marker at byte 128 ({} bytes)", bytes.len())
        };
        return Ok(Found::Skipped(Skipped { file: rel, why }));
    }
    match OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&bytes[128..])
    {
        Ok(obj) => Ok(Found::Dicom(Box::new(DicomFile { path, rel, obj }))),
        Err(e) => {
            // An unknown transfer syntax fails the parse: name it rather than "damaged".
            if let Ok(meta) = dicom_object::meta::FileMetaTable::from_reader(&bytes[128..]) {
                let uid = meta.transfer_syntax().to_string();
                let (name, decodable) = transfer_syntax(&uid);
                if decodable.is_none() || decodable == Some(false) {
                    return Err(if decodable == Some(false) {
                        Refusal::Lossy {
                            file: rel,
                            why: format!("transfer syntax {uid}, {name}"),
                        }
                    } else {
                        Refusal::UnsupportedTransferSyntax {
                            file: rel,
                            uid,
                            name: name.to_string(),
                        }
                    });
                }
            }
            Err(Refusal::Damaged {
                file: rel,
                detail: format!("has the DICOM marker but cannot be parsed ({e})"),
            })
        }
    }
}

/// Find and parse every DICOM file under `dir`.
///
/// # Errors
/// [`Refusal::Unreadable`] when the folder or a file cannot be read, [`Refusal::Damaged`]
/// for a file with the DICOM marker that does not parse, [`Refusal::Lossy`] /
/// [`Refusal::UnsupportedTransferSyntax`] for one whose transfer syntax cannot be parsed.
pub fn scan(dir: &Path) -> Result<Scan, Refusal> {
    let mut paths = Vec::new();
    walk(dir, 0, &mut paths)?;
    paths.sort();
    let found: Vec<Result<Found, Refusal>> =
        paths.into_par_iter().map(|p| read_one(dir, p)).collect();
    let mut scan = Scan::default();
    for f in found {
        match f? {
            Found::Dicom(d) => scan.dicom.push(*d),
            Found::Skipped(s) => scan.skipped.push(s),
        }
    }
    Ok(scan)
}
