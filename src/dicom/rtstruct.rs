//! RTSTRUCT on a CT series: each ROI's closed planar contours rasterised on the CT grid.
//!
//! The rule ([`super::RTSTRUCT_RULE`]): a voxel is in the ROI when its centre is inside the
//! ROI's contours on its slice by the even-odd rule. All contours of one ROI on one slice
//! are filled together, so a contour inside another is a hole and one inside that hole an
//! island (the XOR plastimatch's `--xor-contours` computes). Vertices are mapped to voxel
//! coordinates in float64; a contour must lie on one of the CT's slice planes (within
//! [`PLANE_TOLERANCE_MM`]) and be closed (CLOSED_PLANAR, at least 3 points), else the case
//! is refused. ROIs the class mapping ignores are not checked.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use std::collections::BTreeMap;

use super::discover::DicomFile;
use super::seg::{code_of, Mask, Region};
use super::series::{sop_class, CtSeries};
use super::{items, number, numbers, sop, text, Refusal};

/// Largest distance of a contour from a slice plane (mm): contour coordinates are decimal
/// strings, commonly with 2-4 decimals.
pub const PLANE_TOLERANCE_MM: f64 = 0.01;

const RT_ROI_OBSERVATIONS_SEQUENCE: Tag = Tag(0x3006, 0x0080);

/// Whether a file is an RTSTRUCT.
pub fn is_rtstruct(f: &DicomFile) -> bool {
    sop_class(f) == sop::RTSTRUCT
}

/// One ROI as written: number, name, code, contours (LPS points).
#[derive(Debug, Clone)]
pub struct Roi {
    /// ROINumber.
    pub number: u32,
    /// ROIName.
    pub name: String,
    /// RTROIIdentificationCodeSequence, if any.
    pub code: Option<Code>,
    /// (ContourGeometricType, points).
    pub contours: Vec<(String, Vec<[f64; 3]>)>,
}

pub use super::seg::Code;

/// The ROIs of an RTSTRUCT (without rasterising them).
///
/// # Errors
/// [`Refusal::FrameOfReference`] when an ROI is drawn on another frame of reference,
/// [`Refusal::Damaged`] for malformed contour data.
pub fn rois(f: &DicomFile, ct: &CtSeries) -> Result<Vec<Roi>, Refusal> {
    let o = &f.obj;
    let damaged = |detail: String| Refusal::Damaged {
        file: f.rel.clone(),
        detail,
    };
    let mut by_number: BTreeMap<u32, Roi> = BTreeMap::new();
    for it in items(o, tags::STRUCTURE_SET_ROI_SEQUENCE) {
        let n = number(it, tags::ROI_NUMBER)
            .ok_or_else(|| damaged("an ROI lacks ROINumber".into()))? as u32;
        if let (Some(theirs), Some(ours)) = (
            text(it, tags::REFERENCED_FRAME_OF_REFERENCE_UID),
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
        by_number.insert(
            n,
            Roi {
                number: n,
                name: text(it, tags::ROI_NAME).unwrap_or_else(|| format!("ROI {n}")),
                code: None,
                contours: Vec::new(),
            },
        );
    }
    for it in items(o, RT_ROI_OBSERVATIONS_SEQUENCE) {
        if let Some(n) = number(it, tags::REFERENCED_ROI_NUMBER) {
            if let Some(r) = by_number.get_mut(&(n as u32)) {
                r.code = code_of(it, tags::RTROI_IDENTIFICATION_CODE_SEQUENCE);
            }
        }
    }
    for it in items(o, tags::ROI_CONTOUR_SEQUENCE) {
        let n = number(it, tags::REFERENCED_ROI_NUMBER)
            .ok_or_else(|| damaged("an ROIContourSequence item lacks ReferencedROINumber".into()))?
            as u32;
        let Some(roi) = by_number.get_mut(&n) else {
            return Err(damaged(format!(
                "contours for ROI {n}, which the StructureSetROISequence does not describe"
            )));
        };
        for c in items(it, tags::CONTOUR_SEQUENCE) {
            let kind = text(c, tags::CONTOUR_GEOMETRIC_TYPE).unwrap_or_else(|| "(no type)".into());
            let data = numbers(c, tags::CONTOUR_DATA).unwrap_or_default();
            if !data.len().is_multiple_of(3) {
                return Err(damaged(format!(
                    "ROI '{}': ContourData has {} numbers, not x/y/z triples",
                    roi.name,
                    data.len()
                )));
            }
            let pts = data.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
            roi.contours.push((kind, pts));
        }
    }
    Ok(by_number.into_values().collect())
}

/// Rasterise one ROI on the CT grid.
///
/// # Errors
/// [`Refusal::ContourNotClosed`], [`Refusal::ContourOffSlice`].
pub fn rasterise(file: &std::path::Path, roi: &Roi, ct: &CtSeries) -> Result<Region, Refusal> {
    let [nx, ny, nz] = ct.geom.dims;
    // Edges per slice, in voxel coordinates (i, j).
    let mut edges: BTreeMap<usize, Vec<[f64; 4]>> = BTreeMap::new();
    for (kind, pts) in &roi.contours {
        if kind != "CLOSED_PLANAR" || pts.len() < 3 {
            return Err(Refusal::ContourNotClosed {
                file: file.to_path_buf(),
                roi: roi.name.clone(),
                kind: kind.clone(),
                points: pts.len(),
            });
        }
        let ijk: Vec<[f64; 3]> = pts.iter().map(|&p| ct.to_ijk(p)).collect();
        let k0 = ijk[0][2].round();
        let dz = ct.geom.spacing[2];
        for (p, q) in ijk.iter().zip(pts) {
            let off_mm = (p[2] - k0).abs() * dz;
            if off_mm > PLANE_TOLERANCE_MM || k0 < 0.0 || k0 >= nz as f64 {
                let pos = super::dot(*q, ct.normal);
                return Err(Refusal::ContourOffSlice {
                    file: file.to_path_buf(),
                    roi: roi.name.clone(),
                    detail: if k0 < 0.0 || k0 >= nz as f64 {
                        format!(
                            "at {pos:.3} mm along the slice normal, outside the CT's {nz} slices"
                        )
                    } else {
                        format!(
                            "at {pos:.3} mm along the slice normal, {off_mm:.3} mm from the nearest slice plane (slice {k0})"
                        )
                    },
                });
            }
        }
        let e = edges.entry(k0 as usize).or_default();
        for w in 0..ijk.len() {
            let (a, b) = (ijk[w], ijk[(w + 1) % ijk.len()]);
            e.push([a[0], a[1], b[0], b[1]]);
        }
    }
    let mut mask = Mask::new(ct.geom.len());
    let mut xs: Vec<f64> = Vec::new();
    for (k, es) in &edges {
        for j in 0..ny {
            let y = j as f64;
            xs.clear();
            for &[x0, y0, x1, y1] in es {
                // Half-open in y: a vertex on the scan line is counted once.
                if (y0 <= y) != (y1 <= y) {
                    xs.push(x0 + (y - y0) * (x1 - x0) / (y1 - y0));
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks_exact(2) {
                // Centres strictly inside (x_a, x_b).
                let lo = (pair[0].floor() + 1.0).max(0.0);
                let hi = (pair[1].ceil() - 1.0).min(nx as f64 - 1.0);
                if lo > hi {
                    continue;
                }
                for i in lo as usize..=hi as usize {
                    mask.toggle(i + nx * (j + ny * k));
                }
            }
        }
    }
    Ok(Region {
        number: roi.number,
        label: roi.name.clone(),
        code: roi.code.clone(),
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{expected, root};
    use super::super::{discover, series, Reason};
    use super::*;

    fn load() -> (CtSeries, Vec<Roi>) {
        let ct_scan = discover::scan(&root().join("rtstruct/ct")).unwrap();
        let ct = series::read(&ct_scan, &series::Referenced::default()).unwrap();
        let scan = discover::scan(&root().join("rtstruct")).unwrap();
        let f = scan.dicom.iter().find(|f| is_rtstruct(f)).unwrap();
        let rois = rois(f, &ct).unwrap();
        (ct, rois)
    }

    #[test]
    fn every_roi_matches_its_truth_mask_voxel_for_voxel() {
        let (ct, rois) = load();
        let exp = expected();
        let want = exp["cases"]["rtstruct/rt_analytic"]["rois"]
            .as_array()
            .unwrap();
        assert_eq!(rois.len(), want.len());
        for (roi, w) in rois.iter().zip(want) {
            assert_eq!(roi.name, w["roi_name"].as_str().unwrap());
            let r = rasterise(Path::new("rt_analytic.dcm"), roi, &ct).unwrap();
            assert_eq!(
                r.mask.count(),
                w["voxels"].as_u64().unwrap(),
                "{}",
                roi.name
            );
            let truth = crate::volume::read_labels(
                &root().join(format!("rtstruct/truth/{}.nii.gz", roi.name)),
            )
            .unwrap();
            assert_eq!(truth.geom.dims, ct.geom.dims);
            let differ = (0..truth.data.len())
                .filter(|&v| r.mask.get(v) != (truth.data[v] != 0))
                .count();
            assert_eq!(differ, 0, "{}: voxels differ from the truth", roi.name);
        }
    }

    use std::path::Path;

    #[test]
    fn an_open_contour_is_refused() {
        let (ct, rois) = load();
        let mut roi = rois[0].clone();
        roi.contours[0].0 = "OPEN_PLANAR".into();
        let r = rasterise(Path::new("rt.dcm"), &roi, &ct).unwrap_err();
        assert_eq!(r.reason(), Reason::ContourNotClosed);
        assert!(r.to_string().contains("OPEN_PLANAR"), "{r}");
    }

    #[test]
    fn a_contour_between_slices_is_refused() {
        let (ct, rois) = load();
        let mut roi = rois[0].clone();
        for p in &mut roi.contours[0].1 {
            p[2] += 0.5; // half-way to the next 2 mm slice... a quarter of it
        }
        let r = rasterise(Path::new("rt.dcm"), &roi, &ct).unwrap_err();
        assert_eq!(r.reason(), Reason::ContourOffSlice);
        assert!(
            r.to_string()
                .contains("0.500 mm from the nearest slice plane"),
            "{r}"
        );
    }
}
