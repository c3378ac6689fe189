//! A DICOM test set (one folder per case: a CT series and its SEG or RTSTRUCT) as the NIfTI
//! test set evald scores: nnU-Net layout, `imagesTs/<case>_0000.nii.gz` (int16 HU, float32
//! when the rescale gives fractions), `labelsTs/<case>.nii.gz` (uint8 classes), and
//! [`IMPORT_JSON`] naming each case's DICOM source, the class of each segment and every
//! refusal with its reason.
//!
//! Where segments overlap, one mask per segment is written (`segmentsTs/<case>/`) and no
//! label map: overlapping segments are never merged silently. With a task's class mapping,
//! segments of *one* class may overlap (their union is the class); segments of different
//! classes that overlap refuse the case.
//!
//! [`import_cached`] is what the daemon and `evald run` use: each case is decoded once into
//! a content-addressed cache (key: sha256 of the case folder's file names and bytes, the
//! class mapping and this reader's version; never mtimes), and the task's NIfTI folders are
//! hard links into it, so the hot path and the workers' sandbox see a NIfTI test set as
//! before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::Digest;

use super::discover::{self, Skipped};
use super::seg::{self, Mask, Region};
use super::series::{self, CtSeries, Referenced};
use super::{rtstruct, CaseError, Reason, Refusal, RTSTRUCT_RULE};
use crate::volume::{write_volume, Volume};

/// Name of the JSON written beside `imagesTs` / `labelsTs`.
pub const IMPORT_JSON: &str = "dicom-import.json";

/// Bump when what a cached case holds changes (invalidates every cache entry).
const CACHE_VERSION: &str = "evald dicom cache v1";

/// What a segment / ROI becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Target {
    /// This class label.
    Class(u8),
    /// Not scored (e.g. BODY, couch).
    Ignore,
}

/// A task's mapping from SEG segment labels / RTSTRUCT ROI names / codes to classes.
/// Keys are matched case-insensitively; a code key is `SCHEME:VALUE` (e.g.
/// `SCT:10200004`) and is tried before the name.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ClassMap {
    /// Key (lower case) -> target.
    pub entries: BTreeMap<String, Target>,
}

impl ClassMap {
    /// Add an entry.
    pub fn insert(&mut self, key: &str, t: Target) {
        self.entries.insert(key.trim().to_lowercase(), t);
    }

    /// What `label` (with `code`) maps to.
    pub fn lookup(&self, label: &str, code: Option<&seg::Code>) -> Option<Target> {
        code.and_then(|c| self.entries.get(&c.key().to_lowercase()))
            .or_else(|| self.entries.get(&label.trim().to_lowercase()))
            .copied()
    }

    fn digest(&self) -> String {
        serde_json::to_string(&self.entries).unwrap_or_default()
    }
}

/// The reference of a case, read onto the CT grid.
#[derive(Debug, Clone)]
pub struct Reference {
    /// File, relative to the case folder.
    pub file: PathBuf,
    /// `SEG BINARY`, `SEG LABELMAP`, `RTSTRUCT` ...
    pub kind: String,
    /// Segments / ROIs (ROIs the mapping ignores are left out).
    pub regions: Vec<Region>,
    /// ROIs the mapping ignores (not rasterised).
    pub ignored: Vec<String>,
}

/// A case read exactly.
#[derive(Debug, Clone)]
pub struct Case {
    /// Case id (the folder name).
    pub id: String,
    /// The case folder.
    pub dir: PathBuf,
    /// Its CT.
    pub ct: CtSeries,
    /// Its reference (`None` only when none was required).
    pub reference: Option<Reference>,
    /// Non-DICOM files skipped.
    pub skipped: Vec<Skipped>,
    /// DICOM files that are neither the CT nor the reference.
    pub other_dicom: Vec<PathBuf>,
    /// CT series in the folder.
    pub n_series: usize,
}

/// Read one case folder. With a class mapping, ROIs it ignores are not rasterised and an
/// unmapped segment / ROI refuses the case.
///
/// # Errors
/// A [`Refusal`] saying why the case cannot be read exactly.
pub fn read_case(
    dir: &Path,
    map: Option<&ClassMap>,
    need_reference: bool,
) -> Result<Case, Refusal> {
    let scan = discover::scan(dir)?;
    let refs: Vec<&discover::DicomFile> = scan
        .dicom
        .iter()
        .filter(|f| seg::is_seg(f) || rtstruct::is_rtstruct(f))
        .collect();
    if refs.len() > 1 {
        return Err(Refusal::SeveralReferences {
            files: refs.iter().map(|f| f.rel.clone()).collect(),
        });
    }
    if refs.is_empty() && need_reference {
        // The CT is still checked first: its problem is the one to fix first.
        series::read(&scan, &Referenced::default())?;
        return Err(Refusal::NoReference);
    }
    let mut named = Referenced::default();
    if let Some(r) = refs.first() {
        named.add(&r.obj);
    }
    let ct = series::read(&scan, &named)?;
    let n_series = series::count_series(&scan);
    let mut reference = None;
    if let Some(r) = refs.first() {
        let (kind, regions, ignored) = if seg::is_seg(r) {
            let s = seg::read(r, &ct)?;
            (
                format!("SEG {:?}", s.kind).to_uppercase(),
                s.segments,
                Vec::new(),
            )
        } else {
            let rois = rtstruct::rois(r, &ct)?;
            let mut regions = Vec::new();
            let mut ignored = Vec::new();
            let mut unmapped = Vec::new();
            for roi in &rois {
                match map.map(|m| m.lookup(&roi.name, roi.code.as_ref())) {
                    Some(Some(Target::Ignore)) => ignored.push(roi.name.clone()),
                    Some(None) => unmapped.push(name_of(&roi.name, roi.code.as_ref())),
                    _ => regions.push(rtstruct::rasterise(&r.rel, roi, &ct)?),
                }
            }
            if !unmapped.is_empty() {
                return Err(Refusal::Unmapped { names: unmapped });
            }
            ("RTSTRUCT".to_string(), regions, ignored)
        };
        if let Some(m) = map {
            let unmapped: Vec<String> = regions
                .iter()
                .filter(|g| m.lookup(&g.label, g.code.as_ref()).is_none())
                .map(|g| name_of(&g.label, g.code.as_ref()))
                .collect();
            if !unmapped.is_empty() {
                return Err(Refusal::Unmapped { names: unmapped });
            }
        }
        reference = Some(Reference {
            file: r.rel.clone(),
            kind,
            regions,
            ignored,
        });
    }
    let ct_files: std::collections::BTreeSet<&PathBuf> =
        ct.slices.iter().map(|s| &s.file).collect();
    let other_dicom = scan
        .dicom
        .iter()
        .filter(|f| {
            !ct_files.contains(&f.rel) && reference.as_ref().is_none_or(|r| r.file != f.rel)
        })
        .map(|f| f.rel.clone())
        .collect();
    Ok(Case {
        id: case_id(dir),
        dir: dir.to_path_buf(),
        ct,
        reference,
        skipped: scan.skipped,
        other_dicom,
        n_series,
    })
}

fn name_of(label: &str, code: Option<&seg::Code>) -> String {
    match code {
        Some(c) => format!("'{label}' ({} \"{}\")", c.key(), c.meaning),
        None => format!("'{label}'"),
    }
}

fn case_id(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(|| "case".into(), |n| n.to_string_lossy().into_owned())
}

/// The label map of a case: with a mapping, each region's class (regions of one class may
/// overlap; of different classes may not); without, each region's own number, and `None`
/// when regions overlap (then only per-segment masks describe the case).
///
/// # Errors
/// [`Refusal::OverlappingSegments`] (with a mapping), [`Refusal::Unsupported`] for a
/// region number above 255 without one.
pub fn label_map(case: &Case, map: Option<&ClassMap>) -> Result<Option<Vec<u8>>, Refusal> {
    let len = case.ct.geom.len();
    let Some(r) = &case.reference else {
        return Ok(Some(vec![0; len]));
    };
    let value = |g: &Region| -> Result<Option<u8>, Refusal> {
        match map {
            Some(m) => Ok(match m.lookup(&g.label, g.code.as_ref()) {
                Some(Target::Class(c)) => Some(c),
                _ => None,
            }),
            None => u8::try_from(g.number)
                .map(Some)
                .map_err(|_| Refusal::Unsupported {
                    file: r.file.clone(),
                    what: format!(
                        "segment number {} does not fit a uint8 label map; use a class mapping",
                        g.number
                    ),
                }),
        }
    };
    let vals: Vec<Option<u8>> = r.regions.iter().map(value).collect::<Result<_, _>>()?;
    for a in 0..r.regions.len() {
        for b in a + 1..r.regions.len() {
            if vals[a].is_none() || vals[b].is_none() || (map.is_some() && vals[a] == vals[b]) {
                continue;
            }
            let n = r.regions[a].mask.overlap(&r.regions[b].mask);
            if n > 0 {
                if map.is_none() {
                    return Ok(None);
                }
                return Err(Refusal::OverlappingSegments {
                    a: r.regions[a].label.clone(),
                    b: r.regions[b].label.clone(),
                    voxels: n,
                });
            }
        }
    }
    let mut out = vec![0u8; len];
    for (g, v) in r.regions.iter().zip(&vals) {
        let Some(v) = *v else { continue };
        for (i, o) in out.iter_mut().enumerate() {
            if g.mask.get(i) {
                *o = v;
            }
        }
    }
    Ok(Some(out))
}

/// What went wrong writing an imported test set (not a refusal: evald's own side).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file or folder could not be written or listed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A NIfTI could not be written.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The case folders of a DICOM test set (its sub-folders, sorted; hidden ones skipped).
///
/// # Errors
/// [`ImportError::Io`] when the folder cannot be listed.
pub fn case_dirs(set: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(set).map_err(io(set))? {
        let e = e.map_err(io(set))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if e.file_type().map_err(io(set))?.is_dir() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Write one read case into `dir` as `image.nii.gz`, `label.nii.gz` (or per-segment masks
/// under `segments/`), and return its JSON description.
fn write_case(
    case: &Case,
    map: Option<&ClassMap>,
    dir: &Path,
) -> Result<Result<Value, Refusal>, ImportError> {
    let labels = match label_map(case, map) {
        Ok(l) => l,
        Err(r) => return Ok(Err(r)),
    };
    let geom = case.ct.geom.clone();
    let image = dir.join("image.nii.gz");
    let hu = match case.ct.hu_i16() {
        Some(v) => {
            write_volume(
                &image,
                &Volume {
                    geom: geom.clone(),
                    data: v,
                },
            )?;
            "int16"
        }
        None => {
            write_volume(
                &image,
                &Volume {
                    geom: geom.clone(),
                    data: case.ct.hu.clone(),
                },
            )?;
            "float32"
        }
    };
    let mut segment_masks = Vec::new();
    if let Some(l) = &labels {
        write_volume(
            &dir.join("label.nii.gz"),
            &Volume {
                geom: geom.clone(),
                data: l.clone(),
            },
        )?;
    } else if let Some(r) = &case.reference {
        let seg_dir = dir.join("segments");
        std::fs::create_dir_all(&seg_dir).map_err(io(&seg_dir))?;
        for g in &r.regions {
            let name = format!("{}.nii.gz", g.number);
            write_volume(
                &seg_dir.join(&name),
                &Volume {
                    geom: geom.clone(),
                    data: g.mask.to_u8(),
                },
            )?;
            segment_masks.push(name);
        }
    }
    Ok(Ok(describe(
        case,
        map,
        hu,
        labels.is_some(),
        &segment_masks,
    )))
}

fn describe(
    case: &Case,
    map: Option<&ClassMap>,
    hu: &str,
    label_map: bool,
    masks: &[String],
) -> Value {
    let ct = &case.ct;
    let reference = case.reference.as_ref().map(|r| {
        json!({
            "file": r.file,
            "kind": r.kind,
            "segments": r.regions.iter().map(|g| json!({
                "number": g.number,
                "label": g.label,
                "code": g.code,
                "voxels": g.mask.count(),
                "class": match map.and_then(|m| m.lookup(&g.label, g.code.as_ref())) {
                    Some(Target::Class(c)) => json!(c),
                    Some(Target::Ignore) => json!("ignore"),
                    None => json!(g.number),
                },
            })).collect::<Vec<_>>(),
            "ignored": r.ignored,
            "rule": (r.kind == "RTSTRUCT").then_some(RTSTRUCT_RULE),
        })
    });
    json!({
        "source": case.dir,
        "ct": {
            "series_instance_uid": ct.series_uid,
            "series_description": ct.description,
            "frame_of_reference_uid": ct.frame_of_reference,
            "slices": ct.slices.len(),
            "files": ct.slices.iter().map(|s| &s.file).collect::<Vec<_>>(),
            "transfer_syntaxes": ct.transfer_syntaxes,
            "shape_xyz": ct.geom.dims,
            "spacing_mm": ct.geom.spacing,
            "affine_ras": ct.geom.affine,
            "hu_datatype": hu,
            "localizers_left_out": ct.localizers,
            "series_in_folder": case.n_series,
        },
        "reference": reference,
        "label_map": label_map,
        "segment_masks": masks,
        "skipped_files": case.skipped,
        "other_dicom_files": case.other_dicom,
    })
}

/// A case an import refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefusedCase {
    /// Case id.
    pub case: String,
    /// The case folder.
    pub source: PathBuf,
    /// The kind of refusal.
    pub reason: Reason,
    /// The message (what, where, what to do).
    pub message: String,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Imported {
    /// Cases written.
    pub cases: Vec<String>,
    /// Cases refused.
    pub refused: Vec<RefusedCase>,
    /// Cases that came from the cache (not decoded again).
    pub reused: usize,
    /// The JSON written.
    pub json: PathBuf,
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), ImportError> {
    if to.exists() {
        std::fs::remove_file(to).map_err(io(to))?;
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(io(to))?;
    }
    Ok(())
}

/// sha256 of a case folder's content: every file's relative path and bytes (sorted by
/// path), the class mapping and the reader's version. Not mtimes: a touched folder is the
/// same case, one changed byte is another.
///
/// # Errors
/// [`ImportError::Io`] for a file that cannot be read.
pub fn case_key(dir: &Path, map: Option<&ClassMap>) -> Result<String, ImportError> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>, depth: usize) -> std::io::Result<()> {
        for e in std::fs::read_dir(d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                if depth < 16 {
                    walk(&e.path(), out, depth + 1)?;
                }
            } else {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files, 0).map_err(io(dir))?;
    files.sort();
    let mut h = sha2::Sha256::new();
    h.update(CACHE_VERSION);
    h.update(b"\n");
    h.update(map.map(ClassMap::digest).unwrap_or_default());
    h.update(b"\n");
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        let digest = match crate::files::open_regular(&f) {
            Ok(file) => crate::files::sha256_hex(file).map_err(io(&f))?,
            // A FIFO or device is skipped by the reader too; its name still counts.
            Err(crate::files::FileError::NotRegular { kind, .. }) => kind.to_string(),
            Err(e) => {
                return Err(ImportError::Io {
                    path: f.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        };
        h.update(format!("{}\t{digest}\n", rel.display()));
    }
    Ok(hex::encode(h.finalize()))
}

/// Read a case and write it into `into`: its description, or the refusal as JSON
/// (`{"refused": {"reason", "message"}}`, the form the cache keeps).
fn read_and_write(
    case_dir: &Path,
    map: Option<&ClassMap>,
    need_reference: bool,
    into: &Path,
) -> Result<Value, ImportError> {
    let r = match read_case(case_dir, map, need_reference) {
        Ok(case) => write_case(&case, map, into)?,
        Err(r) => Err(r),
    };
    Ok(match r {
        Ok(v) => v,
        Err(r) => json!({"refused": {"reason": r.reason(), "message": r.to_string()}}),
    })
}

/// The cached entry of a case (decoding and storing it when absent).
fn cached(
    cache: &Path,
    dir: &Path,
    map: Option<&ClassMap>,
    need_reference: bool,
) -> Result<(PathBuf, Value, bool), ImportError> {
    let entry = cache.join(case_key(dir, map)?);
    let meta = entry.join("case.json");
    if let Ok(text) = std::fs::read_to_string(&meta) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            return Ok((entry, v, true));
        }
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    // Written into a temp folder, renamed into place whole: a reader never sees half a case.
    let tmp = tempfile::tempdir_in(cache).map_err(io(cache))?;
    let v = read_and_write(dir, map, need_reference, tmp.path())?;
    let tmp_meta = tmp.path().join("case.json");
    std::fs::write(&tmp_meta, serde_json::to_vec_pretty(&v).unwrap_or_default())
        .map_err(io(&tmp_meta))?;
    let kept = tmp.keep();
    if entry.exists() {
        // A damaged entry (no readable case.json): replace it.
        std::fs::remove_dir_all(&entry).map_err(io(&entry))?;
    }
    if std::fs::rename(&kept, &entry).is_err() {
        // Another process stored the same key meanwhile: same content, keep theirs.
        let _ = std::fs::remove_dir_all(&kept);
    }
    Ok((entry, v, false))
}

fn place(entry: &Path, id: &str, out: &Path, desc: &Value) -> Result<(), ImportError> {
    let images = out.join("imagesTs");
    let labels = out.join("labelsTs");
    link_or_copy(
        &entry.join("image.nii.gz"),
        &images.join(format!("{id}_0000.nii.gz")),
    )?;
    if desc["label_map"].as_bool() == Some(true) {
        link_or_copy(
            &entry.join("label.nii.gz"),
            &labels.join(format!("{id}.nii.gz")),
        )?;
    } else {
        let seg_out = out.join("segmentsTs").join(id);
        std::fs::create_dir_all(&seg_out).map_err(io(&seg_out))?;
        for m in desc["segment_masks"].as_array().into_iter().flatten() {
            let name = m.as_str().unwrap_or_default();
            link_or_copy(&entry.join("segments").join(name), &seg_out.join(name))?;
        }
    }
    Ok(())
}

fn clear_dir(d: &Path) -> Result<(), ImportError> {
    if d.exists() {
        std::fs::remove_dir_all(d).map_err(io(d))?;
    }
    std::fs::create_dir_all(d).map_err(io(d))
}

/// Import a DICOM test set into `out` (nnU-Net layout + [`IMPORT_JSON`]). With `cache`,
/// each case is taken from / stored in the content-addressed cache folder; without, every
/// case is decoded. `out`'s `imagesTs`, `labelsTs` and `segmentsTs` are rebuilt. With a
/// class mapping every case needs a reference.
///
/// # Errors
/// [`ImportError`] for evald's own I/O; cases that cannot be read are refusals in
/// [`Imported::refused`] and in the JSON, not errors.
pub fn import(
    set: &Path,
    out: &Path,
    map: Option<&ClassMap>,
    cache: Option<&Path>,
) -> Result<Imported, ImportError> {
    let need_reference = map.is_some();
    std::fs::create_dir_all(out).map_err(io(out))?;
    for d in ["imagesTs", "labelsTs", "segmentsTs"] {
        clear_dir(&out.join(d))?;
    }
    let mut done = Imported::default();
    let mut cases = serde_json::Map::new();
    let mut refused = serde_json::Map::new();
    let scratch = tempfile::tempdir_in(out).map_err(io(out))?;
    for dir in case_dirs(set)? {
        let id = case_id(&dir);
        let (entry, result) = match cache {
            Some(cache) => {
                let (entry, v, reused) = cached(cache, &dir, map, need_reference)?;
                done.reused += usize::from(reused);
                (entry, v)
            }
            None => {
                let into = scratch.path().join(&id);
                std::fs::create_dir_all(&into).map_err(io(&into))?;
                let v = read_and_write(&dir, map, need_reference, &into)?;
                (into, v)
            }
        };
        if let Some(r) = result.get("refused") {
            let rc = RefusedCase {
                case: id.clone(),
                source: dir.clone(),
                reason: serde_json::from_value(r["reason"].clone()).unwrap_or(Reason::Damaged),
                message: r["message"].as_str().unwrap_or_default().to_string(),
            };
            refused.insert(id, serde_json::to_value(&rc).unwrap_or_default());
            done.refused.push(rc);
            continue;
        }
        place(&entry, &id, out, &result)?;
        let mut v = result;
        v["source"] = json!(dir);
        v["image"] = json!(format!("imagesTs/{id}_0000.nii.gz"));
        if v["label_map"].as_bool() == Some(true) {
            v["label"] = json!(format!("labelsTs/{id}.nii.gz"));
        } else {
            v["segment_masks_dir"] = json!(format!("segmentsTs/{id}"));
        }
        cases.insert(id.clone(), v);
        done.cases.push(id);
    }
    let classes: Option<BTreeMap<String, Value>> = map.map(|m| {
        m.entries
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    match t {
                        Target::Class(c) => json!(c),
                        Target::Ignore => json!("ignore"),
                    },
                )
            })
            .collect()
    });
    let doc = json!({
        "evald_dicom_import": 1,
        "source": set,
        "conventions": {
            "voxel_index": "(i, j, k) = (DICOM column, DICOM row, slice sorted by ImagePositionPatient . (row_dir x col_dir))",
            "affine": "RAS = diag(-1, -1, 1) . LPS",
            "hu": "stored value (masked to BitsStored, sign-extended) x RescaleSlope + RescaleIntercept, per slice, float64; written int16 when every value is an integer",
            "seg": "frames placed by their own geometry; fractional segments from half the maximum fractional value",
            "rtstruct_rule": RTSTRUCT_RULE,
        },
        "class_mapping": classes,
        "cases": cases,
        "refused": refused,
    });
    let json_path = out.join(IMPORT_JSON);
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&doc).unwrap_or_default(),
    )
    .map_err(io(&json_path))?;
    done.json = json_path;
    Ok(done)
}

/// What `check-config` says about a DICOM test set.
#[derive(Debug, Default)]
pub struct Inspection {
    /// Case folders.
    pub cases: usize,
    /// Cases read exactly.
    pub accepted: usize,
    /// CT series seen (over all cases).
    pub series: usize,
    /// Refused cases.
    pub refused: Vec<CaseError>,
}

/// Read every case of a DICOM test set (decoding it, writing nothing) and count cases,
/// series and refusals.
///
/// # Errors
/// [`ImportError::Io`] when the set cannot be listed.
pub fn inspect(set: &Path, map: Option<&ClassMap>) -> Result<Inspection, ImportError> {
    let mut ins = Inspection::default();
    for dir in case_dirs(set)? {
        ins.cases += 1;
        if let Ok(scan) = discover::scan(&dir) {
            ins.series += series::count_series(&scan);
        }
        match read_case(&dir, map, map.is_some()).and_then(|c| label_map(&c, map).map(|_| c)) {
            Ok(_) => ins.accepted += 1,
            Err(refusal) => ins.refused.push(CaseError {
                case: case_id(&dir),
                dir,
                refusal,
            }),
        }
    }
    Ok(ins)
}

/// A mask on the CT grid as a 0/1 volume (for callers writing their own files).
pub fn mask_volume(ct: &CtSeries, m: &Mask) -> Volume<u8> {
    Volume {
        geom: ct.geom.clone(),
        data: m.to_u8(),
    }
}
