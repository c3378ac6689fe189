//! One CT series: the files of a case grouped by SeriesInstanceUID (an empty UID is one
//! series of its own; SOP UIDs fall back to the file meta's MediaStorage UIDs, as real
//! anonymised exports need), checked, sorted along the slice normal and decoded to HU.
//!
//! Order is geometry only: slices are sorted by IPP . (row_dir x col_dir), never by
//! InstanceNumber or file name (both are unreliable in real exports). A series is refused
//! rather than guessed at when it mixes grids, repeats a position, is unevenly spaced
//! (> 1 %, e.g. a missing slice), is sheared (gantry tilt) or is lossy-compressed.
//! Localisers (ImageType LOCALIZER) are kept out and listed.
//!
//! Decoding runs slice by slice in parallel (rayon); each slice is rescaled with its own
//! slope and intercept in float64 (they may differ per slice).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_pixeldata::PixelDecoder;
use rayon::prelude::*;

use super::discover::{DicomFile, Scan};
use super::{cross, dot, number, numbers, sop, text, transfer_syntax, Refusal};
use crate::volume::Geometry;

/// Relative tolerance on the slice step (1 %, the threshold).
const STEP_TOLERANCE: f64 = 0.01;
/// Tolerance on direction cosines (they are decimal strings).
const IOP_TOLERANCE: f64 = 1e-4;
/// Relative tolerance on pixel spacing.
const SPACING_TOLERANCE: f64 = 1e-4;
/// Two slices closer than this along the normal are at one position (mm).
const SAME_POSITION_MM: f64 = 1e-3;
/// In-plane drift of slice positions tolerated, as a fraction of the pixel spacing
/// (decimal rounding of IPP); more is a sheared stack.
const DRIFT_TOLERANCE_PX: f64 = 0.01;

/// One slice of a read series, in slice order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Slice {
    /// File, relative to the case folder.
    pub file: PathBuf,
    /// SOPInstanceUID (from the file meta when the data set's is empty).
    pub sop_instance_uid: String,
    /// Whether the UID came from the file meta.
    pub sop_uid_from_file_meta: bool,
    /// ImagePositionPatient (LPS mm).
    pub ipp: [f64; 3],
    /// InstanceNumber as written (informative only).
    pub instance_number: Option<i64>,
    /// (RescaleSlope, RescaleIntercept).
    pub rescale: (f64, f64),
}

/// A CT series read exactly.
#[derive(Debug, Clone)]
pub struct CtSeries {
    /// SeriesInstanceUID (`None`: empty in the files).
    pub series_uid: Option<String>,
    /// SeriesDescription.
    pub description: Option<String>,
    /// FrameOfReferenceUID.
    pub frame_of_reference: Option<String>,
    /// Slices, k = 0.. in order along the normal.
    pub slices: Vec<Slice>,
    /// Transfer syntaxes of the files.
    pub transfer_syntaxes: Vec<String>,
    /// Grid (RAS affine, as NIfTI).
    pub geom: Geometry,
    /// Voxel -> LPS affine.
    pub lps: [[f64; 4]; 4],
    /// Slice normal (row_dir x col_dir), LPS.
    pub normal: [f64; 3],
    /// HU, NIfTI order (i = column fastest, then row, then slice).
    pub hu: Vec<f32>,
    /// Whether every HU value is an integer in int16 range (then [`CtSeries::hu_i16`]).
    pub integral: bool,
    /// Localisers kept out.
    pub localizers: Vec<PathBuf>,
}

impl CtSeries {
    /// HU as int16 when every value is an integer in range.
    pub fn hu_i16(&self) -> Option<Vec<i16>> {
        // Exact: the values are integers within int16 (checked while decoding).
        #[allow(clippy::cast_possible_truncation)]
        self.integral
            .then(|| self.hu.iter().map(|&v| v as i16).collect())
    }

    /// LPS position of voxel (i, j, k) (fractional indices allowed).
    pub fn to_lps(&self, ijk: [f64; 3]) -> [f64; 3] {
        let a = &self.lps;
        let mut out = [0.0; 3];
        for (r, o) in out.iter_mut().enumerate() {
            *o = a[r][0] * ijk[0] + a[r][1] * ijk[1] + a[r][2] * ijk[2] + a[r][3];
        }
        out
    }

    /// Voxel (i, j, k) of an LPS position (the inverse affine, by Cramer's rule).
    pub fn to_ijk(&self, p: [f64; 3]) -> [f64; 3] {
        let a = &self.lps;
        let col = |c: usize| [a[0][c], a[1][c], a[2][c]];
        let (c0, c1, c2) = (col(0), col(1), col(2));
        let d = [p[0] - a[0][3], p[1] - a[1][3], p[2] - a[2][3]];
        let det = dot(c0, cross(c1, c2));
        [
            dot(d, cross(c1, c2)) / det,
            dot(c0, cross(d, c2)) / det,
            dot(c0, cross(c1, d)) / det,
        ]
    }
}

/// UIDs a reference object names (series and instances), to pick its series.
#[derive(Debug, Default, Clone)]
pub struct Referenced {
    /// SeriesInstanceUIDs named anywhere inside the reference's sequences.
    pub series: BTreeSet<String>,
    /// ReferencedSOPInstanceUIDs.
    pub instances: BTreeSet<String>,
    /// Whether there was a reference at all.
    pub any: bool,
}

impl Referenced {
    /// Collect the UIDs nested anywhere in `obj`'s sequences.
    pub fn add(&mut self, obj: &InMemDicomObject) {
        self.any = true;
        fn walk(o: &InMemDicomObject, r: &mut Referenced, depth: usize) {
            for e in o.iter() {
                if let Some(items) = e.items() {
                    for it in items {
                        if let Some(s) = text(it, tags::SERIES_INSTANCE_UID) {
                            r.series.insert(s);
                        }
                        if let Some(s) = text(it, tags::REFERENCED_SOP_INSTANCE_UID) {
                            r.instances.insert(s);
                        }
                        if depth < 8 {
                            walk(it, r, depth + 1);
                        }
                    }
                }
            }
        }
        walk(obj, self, 0);
    }
}

/// SOPClassUID of a file (the data set's, else the file meta's).
pub fn sop_class(f: &DicomFile) -> String {
    text(&f.obj, tags::SOP_CLASS_UID)
        .unwrap_or_else(|| trim(f.obj.meta().media_storage_sop_class_uid()))
}

fn trim(s: &str) -> String {
    s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// SOPInstanceUID of a file and whether it came from the file meta.
pub fn sop_instance(f: &DicomFile) -> (String, bool) {
    match text(&f.obj, tags::SOP_INSTANCE_UID) {
        Some(u) => (u, false),
        None => (trim(f.obj.meta().media_storage_sop_instance_uid()), true),
    }
}

/// Whether a CT file is a localiser (scout).
fn is_localizer(obj: &InMemDicomObject) -> bool {
    obj.get(tags::IMAGE_TYPE)
        .and_then(|e| e.to_multi_str().ok())
        .is_some_and(|v| v.iter().any(|s| s.trim().eq_ignore_ascii_case("LOCALIZER")))
}

/// The CT image files of a scan, and the localisers among them.
pub fn ct_files(scan: &Scan) -> (Vec<&DicomFile>, Vec<PathBuf>) {
    let mut ct = Vec::new();
    let mut loc = Vec::new();
    for f in &scan.dicom {
        let class = sop_class(f);
        if class == sop::CT || class == sop::ENHANCED_CT {
            if is_localizer(&f.obj) {
                loc.push(f.rel.clone());
            } else {
                ct.push(f);
            }
        }
    }
    (ct, loc)
}

/// Group CT files by SeriesInstanceUID (`""` for an empty one).
fn group<'a>(files: &[&'a DicomFile]) -> BTreeMap<String, Vec<&'a DicomFile>> {
    let mut g: BTreeMap<String, Vec<&DicomFile>> = BTreeMap::new();
    for f in files {
        g.entry(text(&f.obj, tags::SERIES_INSTANCE_UID).unwrap_or_default())
            .or_default()
            .push(f);
    }
    g
}

/// Number of CT series in a scan (localisers excluded), for `check-config`.
pub fn count_series(scan: &Scan) -> usize {
    group(&ct_files(scan).0).len()
}

struct Header<'a> {
    file: &'a DicomFile,
    sop: (String, bool),
    rows: usize,
    cols: usize,
    iop: [f64; 6],
    ipp: [f64; 3],
    ps: [f64; 2],
    for_uid: Option<String>,
    slope: f64,
    intercept: f64,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    ts: String,
    tilt: Option<f64>,
    acq: Option<String>,
    instance: Option<i64>,
}

fn header(f: &DicomFile) -> Result<Header<'_>, Refusal> {
    let o = &f.obj;
    let ts = trim(o.meta().transfer_syntax());
    let (name, ok) = transfer_syntax(&ts);
    match ok {
        Some(true) => {}
        Some(false) => {
            return Err(Refusal::Lossy {
                file: f.rel.clone(),
                why: format!("transfer syntax {ts}, {name}"),
            })
        }
        _ => {
            return Err(Refusal::UnsupportedTransferSyntax {
                file: f.rel.clone(),
                uid: ts,
                name: name.to_string(),
            })
        }
    }
    if text(o, tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01") {
        return Err(Refusal::Lossy {
            file: f.rel.clone(),
            why: "LossyImageCompression = 01: the pixels were lossy-compressed before".into(),
        });
    }
    let need = |what: &str| Refusal::Damaged {
        file: f.rel.clone(),
        detail: format!("lacks {what} (or it is not a number)"),
    };
    let frames = number(o, tags::NUMBER_OF_FRAMES).unwrap_or(1.0);
    if frames != 1.0 {
        return Err(Refusal::Unsupported {
            file: f.rel.clone(),
            what: format!("a multi-frame CT image ({frames} frames, Enhanced CT): export the series as single-frame CT images"),
        });
    }
    let spp = number(o, tags::SAMPLES_PER_PIXEL).unwrap_or(1.0);
    if spp != 1.0 {
        return Err(Refusal::Unsupported {
            file: f.rel.clone(),
            what: format!("{spp} samples per pixel (colour): a CT image has one"),
        });
    }
    let dim = |tag, what| -> Result<usize, Refusal> {
        match number(o, tag) {
            Some(v) if (1.0..=65535.0).contains(&v) && v.fract() == 0.0 => Ok(v as usize),
            _ => Err(need(what)),
        }
    };
    let rows = dim(tags::ROWS, "Rows")?;
    let cols = dim(tags::COLUMNS, "Columns")?;
    let iop: [f64; 6] = numbers(o, tags::IMAGE_ORIENTATION_PATIENT)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| need("ImageOrientationPatient (6 numbers)"))?;
    let ipp: [f64; 3] = numbers(o, tags::IMAGE_POSITION_PATIENT)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| need("ImagePositionPatient (3 numbers)"))?;
    let ps: [f64; 2] = numbers(o, tags::PIXEL_SPACING)
        .and_then(|v| v.try_into().ok())
        .filter(|p: &[f64; 2]| p.iter().all(|&x| x > 0.0))
        .ok_or_else(|| need("PixelSpacing (2 positive numbers)"))?;
    let bits_allocated = number(o, tags::BITS_ALLOCATED).unwrap_or(0.0) as u16;
    let bits_stored = number(o, tags::BITS_STORED).unwrap_or(f64::from(bits_allocated)) as u16;
    if !matches!(bits_allocated, 8 | 16) || bits_stored == 0 || bits_stored > bits_allocated {
        return Err(Refusal::Unsupported {
            file: f.rel.clone(),
            what: format!("BitsAllocated {bits_allocated}, BitsStored {bits_stored}: evald reads 8- and 16-bit CT images"),
        });
    }
    if let Some(hb) = number(o, tags::HIGH_BIT) {
        if hb != f64::from(bits_stored) - 1.0 {
            return Err(Refusal::Unsupported {
                file: f.rel.clone(),
                what: format!(
                    "HighBit {hb} with BitsStored {bits_stored}: pixel values not in the low bits"
                ),
            });
        }
    }
    let unit = |v: [f64; 3]| (dot(v, v) - 1.0).abs() < 1e-3;
    let (r, c) = ([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
    if !unit(r) || !unit(c) || dot(r, c).abs() > 1e-3 {
        return Err(Refusal::Damaged {
            file: f.rel.clone(),
            detail: format!("ImageOrientationPatient {iop:?} is not two orthogonal unit vectors"),
        });
    }
    Ok(Header {
        file: f,
        sop: sop_instance(f),
        rows,
        cols,
        iop,
        ipp,
        ps,
        for_uid: text(o, tags::FRAME_OF_REFERENCE_UID),
        slope: number(o, tags::RESCALE_SLOPE).unwrap_or(1.0),
        intercept: number(o, tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        bits_allocated,
        bits_stored,
        signed: number(o, tags::PIXEL_REPRESENTATION) == Some(1.0),
        ts,
        tilt: number(o, tags::GANTRY_DETECTOR_TILT),
        acq: text(o, tags::ACQUISITION_NUMBER),
        instance: number(o, tags::INSTANCE_NUMBER).map(|v| v as i64),
    })
}

fn describe(uid: &str, files: &[&DicomFile]) -> String {
    let desc = files
        .first()
        .and_then(|f| text(&f.obj, tags::SERIES_DESCRIPTION))
        .unwrap_or_else(|| "no description".into());
    let uid = if uid.is_empty() {
        "(empty SeriesInstanceUID)"
    } else {
        uid
    };
    format!("{uid} \"{desc}\", {} file(s)", files.len())
}

/// Choose the case's CT series: the only one, or the one the reference names (by
/// SeriesInstanceUID or by the SOP instances it references).
///
/// # Errors
/// [`Refusal::NoCtSeries`], [`Refusal::SeveralSeries`].
fn choose<'a>(scan: &'a Scan, refs: &Referenced) -> Result<(String, Vec<&'a DicomFile>), Refusal> {
    let (ct, _) = ct_files(scan);
    let mut groups = group(&ct);
    if groups.is_empty() {
        return Err(Refusal::NoCtSeries {
            n_dicom: scan.dicom.len(),
        });
    }
    if groups.len() == 1 {
        return Ok(groups.pop_first().expect("one group"));
    }
    let named: Vec<&String> = groups
        .iter()
        .filter(|(uid, files)| {
            (!uid.is_empty() && refs.series.contains(*uid))
                || files
                    .iter()
                    .any(|f| refs.instances.contains(&sop_instance(f).0))
        })
        .map(|(uid, _)| uid)
        .collect();
    if let [one] = named.as_slice() {
        let one = (*one).clone();
        let files = groups.remove(&one).unwrap_or_default();
        return Ok((one, files));
    }
    Err(Refusal::SeveralSeries {
        series: groups.iter().map(|(u, f)| describe(u, f)).collect(),
        referenced: refs.any,
    })
}

fn mixed(what: &'static str, a: &Header, b: &Header, fa: String, fb: String) -> Refusal {
    Refusal::MixedGrid {
        what,
        first: fa,
        other: fb,
        first_file: a.file.rel.clone(),
        other_file: b.file.rel.clone(),
    }
}

/// Read the case's CT series: choose it, check it, decode it to HU.
///
/// # Errors
/// A [`Refusal`] saying why the series cannot be read exactly.
pub fn read(scan: &Scan, refs: &Referenced) -> Result<CtSeries, Refusal> {
    let (uid, files) = choose(scan, refs)?;
    let (_, localizers) = ct_files(scan);
    let headers: Vec<Header> = files.iter().map(|f| header(f)).collect::<Result<_, _>>()?;
    let h0 = &headers[0];
    for h in &headers[1..] {
        if (h.rows, h.cols) != (h0.rows, h0.cols) {
            return Err(mixed(
                "the image size (rows x columns)",
                h0,
                h,
                format!("{}x{}", h0.rows, h0.cols),
                format!("{}x{}", h.rows, h.cols),
            ));
        }
        if h.ps
            .iter()
            .zip(&h0.ps)
            .any(|(a, b)| (a - b).abs() > SPACING_TOLERANCE * b)
        {
            return Err(mixed(
                "PixelSpacing",
                h0,
                h,
                format!("{:?}", h0.ps),
                format!("{:?}", h.ps),
            ));
        }
        if h.iop
            .iter()
            .zip(&h0.iop)
            .any(|(a, b)| (a - b).abs() > IOP_TOLERANCE)
        {
            return Err(mixed(
                "ImageOrientationPatient",
                h0,
                h,
                format!("{:?}", h0.iop),
                format!("{:?}", h.iop),
            ));
        }
        if h.for_uid != h0.for_uid {
            return Err(mixed(
                "FrameOfReferenceUID",
                h0,
                h,
                h0.for_uid.clone().unwrap_or_default(),
                h.for_uid.clone().unwrap_or_default(),
            ));
        }
    }
    let row = [h0.iop[0], h0.iop[1], h0.iop[2]];
    let col = [h0.iop[3], h0.iop[4], h0.iop[5]];
    let normal = cross(row, col);
    let mut order: Vec<(f64, usize)> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (dot(h.ipp, normal), i))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in order.windows(2) {
        if (w[1].0 - w[0].0).abs() < SAME_POSITION_MM {
            let (a, b) = (&headers[w[0].1], &headers[w[1].1]);
            let (mut fa, mut fb) = (a.file.rel.clone(), b.file.rel.clone());
            let (mut qa, mut qb) = (a.acq.clone(), b.acq.clone());
            if fb < fa {
                std::mem::swap(&mut fa, &mut fb);
                std::mem::swap(&mut qa, &mut qb);
            }
            return Err(Refusal::DuplicatePosition {
                position_mm: w[0].0,
                a: fa,
                b: fb,
                acq_a: qa,
                acq_b: qb,
            });
        }
    }
    let sorted: Vec<&Header> = order.iter().map(|&(_, i)| &headers[i]).collect();
    let nz = sorted.len();
    let first = sorted[0];
    let last = sorted[nz - 1];
    // Shear: the positions must move along the normal only.
    if nz > 1 {
        let mut drift: f64 = 0.0;
        for h in &sorted {
            let d = [
                h.ipp[0] - first.ipp[0],
                h.ipp[1] - first.ipp[1],
                h.ipp[2] - first.ipp[2],
            ];
            let along = dot(d, normal);
            let inplane = [
                d[0] - along * normal[0],
                d[1] - along * normal[1],
                d[2] - along * normal[2],
            ];
            drift = drift.max(dot(inplane, inplane).sqrt());
        }
        let min_ps = first.ps[0].min(first.ps[1]);
        if drift > DRIFT_TOLERANCE_PX * min_ps {
            let span = order[nz - 1].0 - order[0].0;
            return Err(Refusal::GantryTilt {
                angle_deg: drift.atan2(span).to_degrees(),
                drift_mm: drift,
                header_tilt_deg: first.tilt,
            });
        }
        let steps: Vec<f64> = order.windows(2).map(|w| w[1].0 - w[0].0).collect();
        let mean = (order[nz - 1].0 - order[0].0) / (nz - 1) as f64;
        if steps
            .iter()
            .any(|s| (s - mean).abs() > STEP_TOLERANCE * mean)
        {
            let min = steps.iter().copied().fold(f64::INFINITY, f64::min);
            let (kmax, max) = steps
                .iter()
                .copied()
                .enumerate()
                .fold((0, 0.0), |a, (k, s)| if s > a.1 { (k, s) } else { a });
            let ratio = max / min;
            let gap = (ratio >= 1.9 && (ratio - ratio.round()).abs() < 0.1)
                .then(|| (order[kmax].0, order[kmax + 1].0));
            return Err(Refusal::UnevenSpacing {
                steps_mm: steps,
                gap_mm: gap,
            });
        }
    }
    let (nx, ny) = (first.cols, first.rows);
    let slice_len = nx * ny;
    let voxels = (slice_len as u64).saturating_mul(nz as u64);
    if voxels > crate::volume::DEFAULT_MAX_VOXELS {
        return Err(Refusal::Unsupported {
            file: first.file.rel.clone(),
            what: format!("{nx} x {ny} x {nz} voxels is more than evald reads in one volume"),
        });
    }
    let mut hu: Vec<f32> = Vec::new();
    hu.try_reserve_exact(voxels as usize)
        .map_err(|e| Refusal::Unsupported {
            file: first.file.rel.clone(),
            what: format!("cannot allocate {voxels} voxels: {e}"),
        })?;
    hu.resize(voxels as usize, 0.0);
    let integral: Vec<bool> = hu
        .par_chunks_mut(slice_len)
        .zip(sorted.par_iter())
        .map(|(out, h)| decode_slice(h, out))
        .collect::<Result<_, _>>()?;
    // Affine (expected.json's conventions): columns of A_lps are row_dir * dx, col_dir *
    // dy, the step between first and last slice, and the first position.
    let (dx, dy) = (first.ps[1], first.ps[0]);
    let step = if nz > 1 {
        [
            (last.ipp[0] - first.ipp[0]) / (nz - 1) as f64,
            (last.ipp[1] - first.ipp[1]) / (nz - 1) as f64,
            (last.ipp[2] - first.ipp[2]) / (nz - 1) as f64,
        ]
    } else {
        // One slice: its thickness along the normal (or 1 mm) gives the third axis.
        let t = number(&first.file.obj, tags::SPACING_BETWEEN_SLICES)
            .or_else(|| number(&first.file.obj, tags::SLICE_THICKNESS))
            .filter(|t| *t > 0.0)
            .unwrap_or(1.0);
        [normal[0] * t, normal[1] * t, normal[2] * t]
    };
    let mut lps = [[0.0; 4]; 4];
    for r in 0..3 {
        lps[r][0] = row[r] * dx;
        lps[r][1] = col[r] * dy;
        lps[r][2] = step[r];
        lps[r][3] = first.ipp[r];
    }
    lps[3][3] = 1.0;
    let mut ras = lps;
    for c in 0..4 {
        ras[0][c] = -lps[0][c];
        ras[1][c] = -lps[1][c];
    }
    let mut ts: Vec<String> = sorted.iter().map(|h| h.ts.clone()).collect();
    ts.sort();
    ts.dedup();
    Ok(CtSeries {
        series_uid: (!uid.is_empty()).then_some(uid),
        description: text(&first.file.obj, tags::SERIES_DESCRIPTION),
        frame_of_reference: first.for_uid.clone(),
        slices: sorted
            .iter()
            .map(|h| Slice {
                file: h.file.rel.clone(),
                sop_instance_uid: h.sop.0.clone(),
                sop_uid_from_file_meta: h.sop.1,
                ipp: h.ipp,
                instance_number: h.instance,
                rescale: (h.slope, h.intercept),
            })
            .collect(),
        transfer_syntaxes: ts,
        geom: Geometry {
            dims: [nx, ny, nz],
            spacing: [dx, dy, dot(step, step).sqrt()],
            affine: ras,
        },
        lps,
        normal,
        hu,
        integral: integral.iter().all(|&b| b),
        localizers,
    })
}

/// Decode one slice into `out` (row-major = i fastest), rescaled in float64. Returns
/// whether every value is an integer in int16 range.
fn decode_slice(h: &Header, out: &mut [f32]) -> Result<bool, Refusal> {
    let damaged = |detail: String| Refusal::Damaged {
        file: h.file.rel.clone(),
        detail,
    };
    let px = h
        .file
        .obj
        .decode_pixel_data()
        .map_err(|e| damaged(format!("cannot decode the pixel data ({}): {e}", h.ts)))?;
    let data = px.data();
    let n = out.len();
    let bytes = usize::from(h.bits_allocated / 8);
    if data.len() < n * bytes {
        return Err(damaged(format!(
            "pixel data holds {} bytes, {} x {} pixels of {} bits need {}",
            data.len(),
            h.cols,
            h.rows,
            h.bits_allocated,
            n * bytes
        )));
    }
    let mask: u32 = if h.bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << h.bits_stored) - 1
    };
    let sign = 1u32 << (h.bits_stored - 1);
    let mut integral = true;
    for (i, o) in out.iter_mut().enumerate() {
        let raw = if bytes == 2 {
            u32::from(u16::from_le_bytes([data[2 * i], data[2 * i + 1]]))
        } else {
            u32::from(data[i])
        } & mask;
        let v = if h.signed && raw & sign != 0 {
            f64::from(raw) - f64::from(mask) - 1.0
        } else {
            f64::from(raw)
        };
        let hu = v * h.slope + h.intercept;
        integral &= hu.fract() == 0.0 && (-32768.0..=32767.0).contains(&hu);
        *o = hu as f32;
    }
    Ok(integral)
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{expected, root, sha_i16};
    use super::super::{discover, Reason};
    use super::*;

    fn read_case(rel: &str) -> Result<(CtSeries, Scan), Refusal> {
        let scan = discover::scan(&root().join(rel))?;
        let s = read(&scan, &Referenced::default())?;
        Ok((s, scan))
    }

    fn check_accepted(key: &str) {
        let exp = expected();
        let e = &exp["cases"][key];
        let (s, scan) = read_case(key).unwrap_or_else(|r| panic!("{key}: {r}"));
        let dims: Vec<usize> = e["shape_xyz"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(s.geom.dims.to_vec(), dims, "{key}");
        for r in 0..4 {
            for c in 0..4 {
                let want = e["affine_ras"][r][c].as_f64().unwrap();
                assert!(
                    (s.geom.affine[r][c] - want).abs() < 1e-6,
                    "{key} affine[{r}][{c}] {} vs {want}",
                    s.geom.affine[r][c]
                );
            }
        }
        let hu = s.hu_i16().expect("integral HU");
        assert_eq!(
            sha_i16(&hu),
            e["hu"]["int16_le_xfastest_sha256"].as_str().unwrap(),
            "{key}"
        );
        let sum: i64 = hu.iter().map(|&v| i64::from(v)).sum();
        assert_eq!(sum, e["hu"]["sum"].as_i64().unwrap(), "{key}");
        // Slice order and UIDs as pydicom found them (file-meta fallback included).
        if let Some(slices) = e["slices"].as_array() {
            for (k, want) in slices.iter().enumerate() {
                let got = &s.slices[k];
                let file = want["file"].as_str().unwrap();
                assert!(
                    file.ends_with(&got.file.to_string_lossy().to_string()),
                    "{key} k={k}: {file} vs {:?}",
                    got.file
                );
                assert_eq!(
                    got.sop_instance_uid,
                    want["sop_instance_uid"].as_str().unwrap()
                );
                assert_eq!(
                    got.sop_uid_from_file_meta,
                    want["sop_uid_from_file_meta"].as_bool().unwrap()
                );
            }
        }
        let junk: Vec<String> = scan
            .skipped
            .iter()
            .map(|j| format!("{}/{}", key, j.file.display()))
            .collect();
        let want: Vec<String> = e["non_dicom_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(junk, want, "{key}: skipped files");
    }

    #[test]
    fn the_real_series_with_empty_uids_reads_exactly() {
        check_accepted("ts-chest/ct");
    }

    #[test]
    fn every_lossless_encoding_reads_to_the_same_exact_volume() {
        for enc in [
            "explicit_le",
            "rle",
            "jpeg_lossless_sv1",
            "jpeg_ls_lossless",
            "deflated_le",
        ] {
            check_accepted(&format!("encodings/{enc}"));
        }
    }

    #[test]
    fn the_rtstruct_ct_reads_exactly() {
        check_accepted("rtstruct/ct");
    }

    #[test]
    fn junk_files_are_skipped_and_listed() {
        check_accepted("accept/junk_files");
        let (_, scan) = read_case("accept/junk_files").unwrap();
        assert_eq!(scan.skipped.len(), 6);
        assert!(scan.skipped.iter().any(|s| s.why == "empty file"));
    }

    fn refused(key: &str) -> Refusal {
        match read_case(key) {
            Ok(_) => panic!("{key} was accepted"),
            Err(r) => r,
        }
    }

    #[test]
    fn two_series_without_a_reference_are_refused_listing_both() {
        let r = refused("refuse/two_series");
        assert_eq!(r.reason(), Reason::SeveralSeries);
        let m = r.to_string();
        assert!(
            m.contains("2.25.290482624757961295331540237105153480756"),
            "{m}"
        );
        assert!(
            m.contains("2.25.228198493646366180654065580898562778889"),
            "{m}"
        );
        assert!(m.contains("CT Body 3.0 (second series)"), "{m}");
    }

    #[test]
    fn two_series_with_a_reference_naming_one_read_that_one() {
        let scan = discover::scan(&root().join("refuse/two_series")).unwrap();
        let mut refs = Referenced {
            any: true,
            ..Default::default()
        };
        refs.series
            .insert("2.25.228198493646366180654065580898562778889".into());
        let s = read(&scan, &refs).unwrap();
        assert_eq!(s.geom.dims[2], 3);
        assert_eq!(
            s.description.as_deref(),
            Some("CT Body 3.0 (second series)")
        );
    }

    #[test]
    fn a_missing_slice_is_refused_naming_the_gap() {
        let r = refused("refuse/missing_slice");
        assert_eq!(r.reason(), Reason::UnevenSpacing);
        let Refusal::UnevenSpacing { steps_mm, gap_mm } = &r else {
            unreachable!()
        };
        let rounded: Vec<f64> = steps_mm
            .iter()
            .map(|s| (s * 1000.0).round() / 1000.0)
            .collect();
        assert_eq!(rounded, [2.0, 4.0, 2.0]);
        assert!(gap_mm.is_some());
        assert!(r.to_string().contains("a slice is missing"), "{r}");
    }

    #[test]
    fn a_gantry_tilt_is_refused_with_its_angle() {
        let r = refused("refuse/tilt15");
        let Refusal::GantryTilt {
            angle_deg,
            drift_mm,
            header_tilt_deg,
        } = &r
        else {
            panic!("{r}")
        };
        assert!((angle_deg - 15.0).abs() < 0.01, "{angle_deg}");
        assert!((drift_mm - 1.071797).abs() < 1e-3, "{drift_mm}");
        assert_eq!(*header_tilt_deg, Some(15.0));
        assert!(r.to_string().contains("15.00 degrees"), "{r}");
    }

    #[test]
    fn a_duplicate_position_is_refused_naming_both_files() {
        let r = refused("refuse/duplicate_position");
        let Refusal::DuplicatePosition {
            position_mm,
            a,
            b,
            acq_a,
            ..
        } = &r
        else {
            panic!("{r}")
        };
        assert!((position_mm - -772.5).abs() < 1e-6);
        assert_eq!(
            (a.to_str().unwrap(), b.to_str().unwrap()),
            ("IM0001.dcm", "IM0002.dcm")
        );
        assert_eq!(acq_a.as_deref(), Some("14"));
    }

    #[test]
    fn lossy_jpeg_is_refused_by_policy_naming_the_syntax() {
        for (key, uid) in [
            ("refuse/lossy_jpeg", "1.2.840.10008.1.2.4.50"),
            ("refuse/lossy_jpeg12", "1.2.840.10008.1.2.4.51"),
        ] {
            let r = refused(key);
            assert_eq!(r.reason(), Reason::Lossy, "{key}: {r}");
            assert!(r.to_string().contains(uid), "{r}");
        }
    }

    #[test]
    fn an_unsupported_transfer_syntax_is_named() {
        // A lossless syntax dicom-rs cannot decode (HTJ2K): refused before decoding.
        assert_eq!(transfer_syntax("1.2.840.10008.1.2.4.201").1, None);
        assert_eq!(transfer_syntax("1.2.840.10008.1.2.4.90").1, Some(true));
    }
}
