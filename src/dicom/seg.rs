//! DICOM SEG on a CT series: binary (1 bit), fractional (8 bit, in the segment from half
//! the maximum fractional value) and label-map (Sup 243) segmentations, one mask per
//! segment on the CT grid.
//!
//! Frames are placed by their own geometry (PlanePosition / PlaneOrientation / PixelMeasures,
//! per frame or shared), never by frame index or by assuming the CT's orientation: a frame
//! whose rows run opposite to the CT's (dcmqi writes such files) is mapped with the flip.
//! A frame that does not fall exactly on the CT grid (sub-voxel offset, other spacing,
//! oblique, outside the volume) refuses the case: evald does not resample references.

use std::path::PathBuf;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_pixeldata::PixelDecoder;

use super::discover::DicomFile;
use super::series::{sop_class, CtSeries};
use super::{dot, items, number, numbers, sop, text, Refusal};

/// Index tolerance (voxels) for a frame to be "exactly" on the CT grid. IPP are decimal
/// strings copied from the CT, so real files agree to ~1e-6 voxel.
const GRID_TOLERANCE_VOX: f64 = 1e-3;

/// A coded concept (segmented property type, ROI identification code).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Code {
    /// CodingSchemeDesignator (`SCT`).
    pub scheme: String,
    /// CodeValue.
    pub value: String,
    /// CodeMeaning.
    pub meaning: String,
}

impl Code {
    /// `SCHEME:VALUE`, the key a class mapping may use.
    pub fn key(&self) -> String {
        format!("{}:{}", self.scheme, self.value)
    }
}

pub(crate) fn code_of(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<Code> {
    let it = items(obj, tag).first()?;
    Some(Code {
        scheme: text(it, tags::CODING_SCHEME_DESIGNATOR)?,
        value: text(it, tags::CODE_VALUE)?,
        meaning: text(it, tags::CODE_MEANING).unwrap_or_default(),
    })
}

/// A set of voxels on the CT grid (NIfTI order), one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    bits: Vec<u64>,
    len: usize,
}

impl Mask {
    /// An empty mask of `len` voxels.
    pub fn new(len: usize) -> Self {
        Mask {
            bits: vec![0; len.div_ceil(64)],
            len,
        }
    }
    /// Add voxel `i`.
    pub fn set(&mut self, i: usize) {
        self.bits[i / 64] |= 1 << (i % 64);
    }
    /// Flip voxel `i` (even-odd filling).
    pub fn toggle(&mut self, i: usize) {
        self.bits[i / 64] ^= 1 << (i % 64);
    }
    /// Whether voxel `i` is in the mask.
    pub fn get(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }
    /// Voxels in the mask.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Voxels in both masks.
    pub fn overlap(&self, other: &Mask) -> u64 {
        self.bits
            .iter()
            .zip(&other.bits)
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }
    /// Number of voxels the mask is defined on.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the grid is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The mask as 0/1 bytes (NIfTI order).
    pub fn to_u8(&self) -> Vec<u8> {
        (0..self.len).map(|i| u8::from(self.get(i))).collect()
    }
}

/// One segment (or RTSTRUCT ROI) on the CT grid.
#[derive(Debug, Clone)]
pub struct Region {
    /// SegmentNumber / ROINumber.
    pub number: u32,
    /// SegmentLabel / ROIName.
    pub label: String,
    /// Segmented property type / RT ROI identification code.
    pub code: Option<Code>,
    /// Its voxels.
    pub mask: Mask,
}

/// Kinds of SEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SegKind {
    /// 1 bit per pixel, one segment per frame.
    Binary,
    /// 8 bits per pixel, probability/occupancy, one segment per frame.
    Fractional,
    /// Label Map Segmentation: pixel value = segment number.
    LabelMap,
}

/// Whether a file is a SEG.
pub fn is_seg(f: &DicomFile) -> bool {
    let c = sop_class(f);
    c == sop::SEG || c == sop::SEG_LABELMAP
}

struct FrameGeom {
    ipp: [f64; 3],
    iop: [f64; 6],
    ps: [f64; 2],
}

fn frame_geom(
    shared: Option<&InMemDicomObject>,
    per: Option<&InMemDicomObject>,
) -> Option<FrameGeom> {
    let find = |seq, tag| -> Option<Vec<f64>> {
        per.and_then(|p| items(p, seq).first())
            .and_then(|i| numbers(i, tag))
            .or_else(|| {
                shared
                    .and_then(|s| items(s, seq).first())
                    .and_then(|i| numbers(i, tag))
            })
    };
    Some(FrameGeom {
        ipp: find(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)?
            .try_into()
            .ok()?,
        iop: find(
            tags::PLANE_ORIENTATION_SEQUENCE,
            tags::IMAGE_ORIENTATION_PATIENT,
        )?
        .try_into()
        .ok()?,
        ps: find(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)?
            .try_into()
            .ok()?,
    })
}

/// Where a frame's pixels land on the CT grid: voxel of pixel (c, r) =
/// origin + c * du + r * dv (integers).
struct Placement {
    origin: [i64; 3],
    du: [i64; 3],
    dv: [i64; 3],
}

fn place(ct: &CtSeries, g: &FrameGeom, rows: usize, cols: usize) -> Result<Placement, String> {
    let row = [g.iop[0], g.iop[1], g.iop[2]];
    let col = [g.iop[3], g.iop[4], g.iop[5]];
    let o = ct.to_ijk(g.ipp);
    let step = |d: [f64; 3], s: f64| {
        let p = ct.to_ijk([
            g.ipp[0] + d[0] * s,
            g.ipp[1] + d[1] * s,
            g.ipp[2] + d[2] * s,
        ]);
        [p[0] - o[0], p[1] - o[1], p[2] - o[2]]
    };
    let (u, v) = (step(row, g.ps[1]), step(col, g.ps[0]));
    let round = |x: [f64; 3], what: &str| -> Result<[i64; 3], String> {
        let r = [x[0].round(), x[1].round(), x[2].round()];
        let off = (0..3).map(|a| (x[a] - r[a]).abs()).fold(0.0, f64::max);
        if off > GRID_TOLERANCE_VOX {
            return Err(format!(
                "{what} falls at CT voxel ({:.4}, {:.4}, {:.4}), {off:.4} voxel off the grid",
                x[0], x[1], x[2]
            ));
        }
        Ok([r[0] as i64, r[1] as i64, r[2] as i64])
    };
    let origin = round(o, "its first pixel")?;
    let du = round(u, "one pixel step along its rows")?;
    let dv = round(v, "one pixel step down its columns")?;
    let unit_inplane = |d: [i64; 3]| d[2] == 0 && d[0].abs() + d[1].abs() == 1;
    if !unit_inplane(du)
        || !unit_inplane(dv)
        || dot(
            [du[0] as f64, du[1] as f64, 0.0],
            [dv[0] as f64, dv[1] as f64, 0.0],
        ) != 0.0
    {
        return Err(format!(
            "its pixels step by {du:?} / {dv:?} CT voxels (other spacing or orientation: \
             frame PixelSpacing {:?}, ImageOrientationPatient {:?})",
            g.ps, g.iop
        ));
    }
    let [nx, ny, nz] = ct.geom.dims;
    let corner = |c: i64, r: i64| {
        [
            origin[0] + c * du[0] + r * dv[0],
            origin[1] + c * du[1] + r * dv[1],
            origin[2],
        ]
    };
    for p in [
        corner(0, 0),
        corner(cols as i64 - 1, 0),
        corner(0, rows as i64 - 1),
        corner(cols as i64 - 1, rows as i64 - 1),
    ] {
        if p[0] < 0
            || p[1] < 0
            || p[2] < 0
            || p[0] >= nx as i64
            || p[1] >= ny as i64
            || p[2] >= nz as i64
        {
            return Err(format!(
                "it reaches CT voxel {p:?}, outside the {nx} x {ny} x {nz} CT volume"
            ));
        }
    }
    Ok(Placement { origin, du, dv })
}

/// A SEG read onto the CT grid.
#[derive(Debug, Clone)]
pub struct SegRead {
    /// The SEG file (relative to the case folder).
    pub file: PathBuf,
    /// Its kind.
    pub kind: SegKind,
    /// One region per segment described in the SegmentSequence (background excluded).
    pub segments: Vec<Region>,
}

/// Read a SEG onto `ct`'s grid.
///
/// # Errors
/// [`Refusal::FrameOfReference`], [`Refusal::SegOffGrid`], [`Refusal::Damaged`],
/// [`Refusal::Unsupported`].
pub fn read(f: &DicomFile, ct: &CtSeries) -> Result<SegRead, Refusal> {
    let o: &InMemDicomObject = &f.obj;
    let damaged = |detail: String| Refusal::Damaged {
        file: f.rel.clone(),
        detail,
    };
    if let (Some(theirs), Some(ours)) = (
        text(o, tags::FRAME_OF_REFERENCE_UID),
        &ct.frame_of_reference,
    ) {
        if &theirs != ours {
            return Err(Refusal::FrameOfReference {
                file: f.rel.clone(),
                theirs,
                ours: ours.clone(),
            });
        }
    }
    let kind = if sop_class(f) == sop::SEG_LABELMAP
        || text(o, tags::SEGMENTATION_TYPE).as_deref() == Some("LABELMAP")
    {
        SegKind::LabelMap
    } else {
        match text(o, tags::SEGMENTATION_TYPE).as_deref() {
            Some("BINARY") => SegKind::Binary,
            Some("FRACTIONAL") => SegKind::Fractional,
            other => {
                return Err(damaged(format!(
                    "SegmentationType {other:?} is not BINARY, FRACTIONAL or LABELMAP"
                )))
            }
        }
    };
    let len = ct.geom.len();
    let mut segments: Vec<Region> = Vec::new();
    for it in items(o, tags::SEGMENT_SEQUENCE) {
        let Some(n) = number(it, tags::SEGMENT_NUMBER) else {
            return Err(damaged("a SegmentSequence item lacks SegmentNumber".into()));
        };
        if n == 0.0 {
            continue; // label-map background
        }
        if !(1.0..=65535.0).contains(&n) {
            return Err(damaged(format!("SegmentNumber {n} out of range")));
        }
        if segments.len() >= 1000 {
            return Err(Refusal::Unsupported {
                file: f.rel.clone(),
                what: "more than 1000 segments".into(),
            });
        }
        segments.push(Region {
            number: n as u32,
            label: text(it, tags::SEGMENT_LABEL).unwrap_or_else(|| format!("segment {n}")),
            code: code_of(it, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE),
            mask: Mask::new(0), // allocated when a frame names it
        });
    }
    let rows = number(o, tags::ROWS)
        .filter(|v| *v >= 1.0 && *v <= 65535.0)
        .ok_or_else(|| damaged("lacks Rows".into()))? as usize;
    let cols = number(o, tags::COLUMNS)
        .filter(|v| *v >= 1.0 && *v <= 65535.0)
        .ok_or_else(|| damaged("lacks Columns".into()))? as usize;
    let per = items(o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let shared = items(o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first();
    // The frame count a header claims is believed only as far as per-frame items exist
    // (parsed, so present in the file): nothing is allocated from the claim itself.
    let frames = number(o, tags::NUMBER_OF_FRAMES).unwrap_or(1.0);
    if frames < 1.0 || frames != per.len() as f64 {
        return Err(damaged(format!(
            "NumberOfFrames {frames} but {} per-frame functional group item(s)",
            per.len()
        )));
    }
    let bits = number(o, tags::BITS_ALLOCATED).unwrap_or(0.0) as u16;
    let max_frac = number(o, tags::MAXIMUM_FRACTIONAL_VALUE).unwrap_or(255.0);
    match (kind, bits) {
        (SegKind::Binary, 1) | (SegKind::Fractional, 8) | (SegKind::LabelMap, 8 | 16) => {}
        _ => {
            return Err(Refusal::Unsupported {
                file: f.rel.clone(),
                what: format!("a {kind:?} SEG with BitsAllocated {bits}"),
            })
        }
    }
    let native = o
        .get(tags::PIXEL_DATA)
        .is_some_and(|e| e.fragments().is_none());
    let native_bytes = if native {
        let b = o
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(|| damaged("lacks PixelData".into()))?;
        let need_bits = (rows * cols) as u128 * per.len() as u128 * u128::from(bits);
        if (b.len() as u128) * 8 < need_bits {
            return Err(damaged(format!(
                "PixelData holds {} bytes, {} frames of {rows} x {cols} at {bits} bit need {}",
                b.len(),
                per.len(),
                need_bits.div_ceil(8)
            )));
        }
        Some(b.into_owned())
    } else {
        None
    };
    let index_of = |n: u32, segs: &[Region]| segs.iter().position(|s| s.number == n);
    for (fi, pf) in per.iter().enumerate() {
        let off_grid = |segment: u16, detail: String| Refusal::SegOffGrid {
            file: f.rel.clone(),
            frame: fi + 1,
            segment,
            detail,
        };
        let seg_number = if kind == SegKind::LabelMap {
            0
        } else {
            items(pf, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
                .first()
                .and_then(|i| number(i, tags::REFERENCED_SEGMENT_NUMBER))
                .ok_or_else(|| damaged(format!("frame {} names no segment", fi + 1)))?
                as u32
        };
        let g = frame_geom(shared, Some(pf)).ok_or_else(|| {
            damaged(format!(
                "frame {} lacks its position, orientation or pixel spacing",
                fi + 1
            ))
        })?;
        let p = place(ct, &g, rows, cols).map_err(|d| off_grid(seg_number as u16, d))?;
        // The frame's samples (one per pixel), 0 = not in the segment.
        let samples: Vec<u16> = match (&native_bytes, bits) {
            (Some(b), 1) => {
                let start = fi * rows * cols;
                (0..rows * cols)
                    .map(|q| u16::from(b[(start + q) / 8] >> ((start + q) % 8) & 1))
                    .collect()
            }
            (Some(b), 8) => b[fi * rows * cols..(fi + 1) * rows * cols]
                .iter()
                .map(|&v| u16::from(v))
                .collect(),
            (Some(b), _) => {
                let s = fi * rows * cols * 2;
                b[s..s + rows * cols * 2]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect()
            }
            (None, _) => {
                let px = f
                    .obj
                    .decode_pixel_data_frame(fi as u32)
                    .map_err(|e| damaged(format!("cannot decode frame {}: {e}", fi + 1)))?;
                let d = px.data();
                match bits {
                    1 => {
                        if d.len() * 8 < rows * cols {
                            return Err(damaged(format!("frame {} is short", fi + 1)));
                        }
                        (0..rows * cols)
                            .map(|q| u16::from(d[q / 8] >> (q % 8) & 1))
                            .collect()
                    }
                    8 => {
                        if d.len() < rows * cols {
                            return Err(damaged(format!("frame {} is short", fi + 1)));
                        }
                        d[..rows * cols].iter().map(|&v| u16::from(v)).collect()
                    }
                    _ => {
                        if d.len() < rows * cols * 2 {
                            return Err(damaged(format!("frame {} is short", fi + 1)));
                        }
                        d[..rows * cols * 2]
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect()
                    }
                }
            }
        };
        let [nx, ny, _] = ct.geom.dims;
        for r in 0..rows {
            for c in 0..cols {
                let v = samples[r * cols + c];
                if v == 0 {
                    continue;
                }
                let target = match kind {
                    SegKind::LabelMap => u32::from(v),
                    SegKind::Fractional if f64::from(v) * 2.0 < max_frac => continue,
                    _ => seg_number,
                };
                let Some(si) = index_of(target, &segments) else {
                    return Err(damaged(format!(
                        "frame {} holds segment {target}, which the SegmentSequence does not describe",
                        fi + 1
                    )));
                };
                let (ci, ri) = (c as i64, r as i64);
                let i = (p.origin[0] + ci * p.du[0] + ri * p.dv[0]) as usize;
                let j = (p.origin[1] + ci * p.du[1] + ri * p.dv[1]) as usize;
                let k = p.origin[2] as usize;
                let m = &mut segments[si].mask;
                if m.is_empty() {
                    *m = Mask::new(len);
                }
                m.set(i + nx * (j + ny * k));
            }
        }
    }
    for s in &mut segments {
        if s.mask.is_empty() {
            s.mask = Mask::new(len);
        }
    }
    Ok(SegRead {
        file: f.rel.clone(),
        kind,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{expected, root};
    use super::super::{discover, series, Reason};
    use super::*;

    /// Read the CT of ts-chest and the SEG `name` (they live side by side in the fixture).
    fn read_seg(name: &str) -> (CtSeries, SegRead) {
        let ct_scan = discover::scan(&root().join("ts-chest/ct")).unwrap();
        let ct = series::read(&ct_scan, &series::Referenced::default()).unwrap();
        let seg_scan = discover::scan(&root().join("ts-chest")).unwrap();
        let f = seg_scan
            .dicom
            .iter()
            .find(|f| f.rel.to_str() == Some(name))
            .unwrap();
        assert!(is_seg(f));
        let s = read(f, &ct).unwrap_or_else(|r| panic!("{name}: {r}"));
        (ct, s)
    }

    fn check_against_truth(name: &str, key: &str, kind: SegKind) {
        let (ct, s) = read_seg(name);
        assert_eq!(s.kind, kind);
        let truth =
            crate::volume::read_labels(&root().join("ts-chest/seg-labelmap_truth.nii.gz")).unwrap();
        assert_eq!(truth.geom.dims, ct.geom.dims);
        let exp = expected();
        let segs = exp["cases"][key]["segments"].as_array().unwrap();
        assert_eq!(s.segments.len(), segs.len());
        for (got, want) in s.segments.iter().zip(segs) {
            assert_eq!(got.label, want["segment_label"].as_str().unwrap());
            assert_eq!(
                got.mask.count(),
                want["voxels"].as_u64().unwrap(),
                "{name} {}",
                got.label
            );
            assert_eq!(
                got.code.as_ref().unwrap().value,
                want["property_type"]["code"].as_str().unwrap()
            );
            let n = got.number as u8;
            let differ = (0..truth.data.len())
                .filter(|&v| got.mask.get(v) != (truth.data[v] == n))
                .count();
            assert_eq!(
                differ, 0,
                "{name} segment {}: voxels differ from the truth",
                got.label
            );
        }
    }

    #[test]
    fn the_label_map_seg_matches_the_truth_voxel_for_voxel() {
        check_against_truth(
            "seg-labelmap.dcm",
            "ts-chest/seg-labelmap",
            SegKind::LabelMap,
        );
    }

    #[test]
    fn the_row_flipped_binary_seg_is_mapped_by_frame_geometry() {
        check_against_truth(
            "seg-binary-deflated.dcm",
            "ts-chest/seg-binary-deflated",
            SegKind::Binary,
        );
    }

    #[test]
    fn a_ct_shifted_by_half_a_pixel_makes_the_seg_refused_off_grid() {
        let ct_scan = discover::scan(&root().join("ts-chest/ct")).unwrap();
        let mut ct = series::read(&ct_scan, &series::Referenced::default()).unwrap();
        // The same CT grid moved by half a column: no SEG frame can land on it exactly.
        ct.lps[0][3] += 0.5 * ct.geom.spacing[0];
        let seg_scan = discover::scan(&root().join("ts-chest")).unwrap();
        let f = seg_scan
            .dicom
            .iter()
            .find(|f| f.rel.to_str() == Some("seg-labelmap.dcm"))
            .unwrap();
        let r = read(f, &ct).unwrap_err();
        assert_eq!(r.reason(), Reason::SegOffGrid, "{r}");
        assert!(r.to_string().contains("0.5000 voxel off the grid"), "{r}");
    }

    #[test]
    fn a_seg_on_another_frame_of_reference_is_refused() {
        let ct_scan = discover::scan(&root().join("ts-chest/ct")).unwrap();
        let mut ct = series::read(&ct_scan, &series::Referenced::default()).unwrap();
        ct.frame_of_reference = Some("1.2.3.4".into());
        let seg_scan = discover::scan(&root().join("ts-chest")).unwrap();
        let f = seg_scan
            .dicom
            .iter()
            .find(|f| f.rel.to_str() == Some("seg-labelmap.dcm"))
            .unwrap();
        assert_eq!(read(f, &ct).unwrap_err().reason(), Reason::FrameOfReference);
    }
}
