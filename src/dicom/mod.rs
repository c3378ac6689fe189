//! DICOM test sets: a case folder holding one CT series and its reference (DICOM SEG,
//! label-map SEG or RTSTRUCT), read exactly or refused with a reason a radiographer can act
//! on. This module owns everything that touches DICOM bytes; the rest of evald sees only
//! [`crate::volume`] types, through the NIfTI test set that [`import`] writes.
//!
//! - [`discover`]: the files of a case folder at any depth, by the `DICM` marker (others
//!   are skipped and listed);
//! - [`series`]: CT slices grouped by SeriesInstanceUID, sorted along the slice normal,
//!   checked (one series, one grid, even spacing, no tilt, lossless) and decoded in
//!   parallel to HU with the affine (LPS -> RAS);
//! - [`seg`]: DICOM SEG (binary, fractional, label map), mapped frame by frame onto the CT
//!   grid by each frame's own geometry, one mask per segment;
//! - [`rtstruct`]: RTSTRUCT contours rasterised on the CT grid (voxel centre inside,
//!   even-odd rule: nested contours are holes);
//! - [`import`]: a folder of case folders -> an nnU-Net-layout NIfTI test set plus a JSON
//!   of sources, class mapping and refusals; the content-addressed cache under the state
//!   folder (a task with `format = "dicom"` is made ready through it by
//!   the top-level `testset` module, which knows the configuration; this module does not).
//!
//! Conventions are those of the fixture set's `expected.json` (`tests/data/dicom`): voxel
//! (i, j, k) = (DICOM column, DICOM row, slice sorted by IPP . (row_dir x col_dir)), HU =
//! stored value (masked to BitsStored, sign-extended) x slope + intercept per slice in
//! float64, affine = diag(-1, -1, 1) . A_lps.
//!
//! Files are opened through [`crate::files`] (regular files only, never blocking, bounded
//! reads); sizes a header claims are checked against the bytes present before anything is
//! allocated for them.

pub mod discover;
pub mod import;
pub mod rtstruct;
pub mod seg;
pub mod series;

use std::path::PathBuf;

use dicom_core::Tag;
use dicom_object::InMemDicomObject;

/// The rule RTSTRUCT contours are rasterised with (named in `evald.conventions`).
pub const RTSTRUCT_RULE: &str = "RTSTRUCT: a voxel belongs to an ROI when its centre lies inside the ROI's contours on \
its slice by the even-odd rule (contours of one ROI on one slice are XORed: a contour inside another is a hole, one \
inside a hole an island); contours drawn from masks are ambiguous at the boundary";

/// Largest DICOM file read (a 2000-frame 512x512 uncompressed SEG is 500 MiB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Why a case cannot be read exactly. Every variant's message says what is wrong, where,
/// and what to do; [`Refusal::reason`] is the machine-readable kind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// No CT image files in the folder.
    #[error("no CT image series found ({n_dicom} DICOM file(s), none a CT image): put the CT series of the case in this folder")]
    NoCtSeries {
        /// DICOM files seen.
        n_dicom: usize,
    },
    /// Several CT series and nothing to choose one.
    #[error("the folder holds {} CT series ({}) and {}: keep only the series the reference segmentation was drawn on, or add the reference that names it", series.len(), series.join("; "), if *referenced { "the reference object matches none or several of them" } else { "no reference object says which one is meant" })]
    SeveralSeries {
        /// One line per series: UID, description, number of files.
        series: Vec<String>,
        /// Whether a SEG/RTSTRUCT was present (and matched none or several).
        referenced: bool,
    },
    /// Slices of one series differ in size, spacing, orientation or frame of reference.
    #[error("the slices do not share one grid: {what} is {first} in {first_file} but {other} in {other_file}; the series mixes reconstructions: export one reconstruction only")]
    MixedGrid {
        /// Which attribute differs.
        what: &'static str,
        /// Its value in the first slice.
        first: String,
        /// A different value.
        other: String,
        /// File of the first slice.
        first_file: PathBuf,
        /// File with the other value.
        other_file: PathBuf,
    },
    /// Two slices at one position.
    #[error("two slices lie at the same position ({position_mm:.3} mm along the slice normal): {} and {} (AcquisitionNumber {} and {}); the folder holds several acquisitions, phases or a repeated slice: export one acquisition only", a.display(), b.display(), acq_a.as_deref().unwrap_or("-"), acq_b.as_deref().unwrap_or("-"))]
    DuplicatePosition {
        /// Position along the normal, mm (LPS).
        position_mm: f64,
        /// One file.
        a: PathBuf,
        /// The other.
        b: PathBuf,
        /// AcquisitionNumber of `a`.
        acq_a: Option<String>,
        /// AcquisitionNumber of `b`.
        acq_b: Option<String>,
    },
    /// Steps between slices differ by more than 1 %.
    #[error("the slices are not evenly spaced: steps {} mm along the slice normal ({}); evald does not resample: export the complete series again (or resample it to even spacing) and replace the folder", steps_mm.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(", "), if let Some((a, b)) = gap_mm { format!("a slice is missing between {a:.3} mm and {b:.3} mm") } else { "variable-spacing reconstruction".to_string() })]
    UnevenSpacing {
        /// Every step, in slice order.
        steps_mm: Vec<f64>,
        /// The largest gap, when it is about a multiple of the usual step.
        gap_mm: Option<(f64, f64)>,
    },
    /// Sheared stack (gantry tilt).
    #[error("the series is acquired with a gantry tilt of {angle_deg:.2} degrees (GantryDetectorTilt {}; slice positions shift {drift_mm:.3} mm within the slice plane over the stack): its voxels are not a rectangular grid. Reconstruct or resample it without tilt and replace the folder", header_tilt_deg.map_or("not set".to_string(), |t| format!("{t}")))]
    GantryTilt {
        /// Shear angle from the positions, degrees.
        angle_deg: f64,
        /// In-plane drift over the stack, mm.
        drift_mm: f64,
        /// GantryDetectorTilt as written.
        header_tilt_deg: Option<f64>,
    },
    /// Lossy compression (by policy).
    #[error("{} is lossy-compressed ({why}): evald scores only original (lossless) pixel data. Export the series from the PACS uncompressed or losslessly compressed", file.display())]
    Lossy {
        /// A file concerned.
        file: PathBuf,
        /// Transfer syntax or LossyImageCompression, in words.
        why: String,
    },
    /// A transfer syntax evald cannot decode.
    #[error("{} uses the transfer syntax {uid} ({name}), which evald cannot decode: export it uncompressed (Explicit VR Little Endian) or as JPEG 2000 / JPEG-LS / JPEG lossless / RLE", file.display())]
    UnsupportedTransferSyntax {
        /// A file concerned.
        file: PathBuf,
        /// Its transfer syntax UID.
        uid: String,
        /// Its name.
        name: String,
    },
    /// Something else evald does not read (multi-frame CT, colour, ...).
    #[error("{}: {what}", file.display())]
    Unsupported {
        /// The file.
        file: PathBuf,
        /// What, and what to do.
        what: String,
    },
    /// A file with the DICOM marker that cannot be parsed or decoded, or lacks an attribute.
    #[error("{}: {detail}; replace the file with a good export", file.display())]
    Damaged {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// More than one SEG/RTSTRUCT.
    #[error("the folder holds {} reference objects ({}): keep exactly one SEG or RTSTRUCT per case", files.len(), files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))]
    SeveralReferences {
        /// The reference files.
        files: Vec<PathBuf>,
    },
    /// No SEG/RTSTRUCT in a case that needs one.
    #[error("no reference segmentation (DICOM SEG or RTSTRUCT) in the folder: add the reference of this case")]
    NoReference,
    /// The reference is drawn on another frame of reference.
    #[error("{} refers to the frame of reference {theirs}, the CT series has {ours}: it was drawn on another scan; put the matching CT series in the folder", file.display())]
    FrameOfReference {
        /// The reference file.
        file: PathBuf,
        /// Its FrameOfReferenceUID.
        theirs: String,
        /// The CT's.
        ours: String,
    },
    /// A SEG frame does not fall exactly on the CT grid.
    #[error("{}: frame {frame} (segment {segment}) does not lie exactly on the CT grid: {detail}. evald does not resample references: export the SEG on the CT's own grid", file.display())]
    SegOffGrid {
        /// The SEG file.
        file: PathBuf,
        /// Frame number (1-based, as in DICOM).
        frame: usize,
        /// Segment number.
        segment: u16,
        /// What does not match.
        detail: String,
    },
    /// A contour is not on a CT slice plane.
    #[error("{}: a contour of ROI '{roi}' lies {detail}; evald rasterises contours only on the CT's slice planes: export the structure set on this CT series", file.display())]
    ContourOffSlice {
        /// The RTSTRUCT file.
        file: PathBuf,
        /// ROI name.
        roi: String,
        /// Where it lies.
        detail: String,
    },
    /// A contour that is not a closed polygon.
    #[error("{}: ROI '{roi}' has a contour of type {kind} ({points} point(s)); only closed planar contours enclose a volume: close the contour or remove the ROI", file.display())]
    ContourNotClosed {
        /// The RTSTRUCT file.
        file: PathBuf,
        /// ROI name.
        roi: String,
        /// ContourGeometricType as written.
        kind: String,
        /// Number of points.
        points: usize,
    },
    /// Segments mapped to different classes overlap.
    #[error("segments '{a}' and '{b}' overlap in {voxels} voxel(s) but map to different classes: evald does not merge overlapping segments silently. Map them to one class, or fix the reference so they do not overlap")]
    OverlappingSegments {
        /// One segment / ROI.
        a: String,
        /// The other.
        b: String,
        /// Voxels in both.
        voxels: u64,
    },
    /// Segments / ROIs the task's class mapping does not name.
    #[error("the reference has segment(s)/ROI(s) that the task's class mapping does not name: {}; add them to the task's dicom_classes (a class label, or \"ignore\")", names.join(", "))]
    Unmapped {
        /// Label / name (code) of each.
        names: Vec<String>,
    },
    /// The folder itself cannot be read.
    #[error("{}: cannot read: {detail}", dir.display())]
    Unreadable {
        /// The folder or file.
        dir: PathBuf,
        /// The OS error.
        detail: String,
    },
}

/// The kind of a [`Refusal`], for tests, JSON and counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// [`Refusal::NoCtSeries`].
    NoCtSeries,
    /// [`Refusal::SeveralSeries`].
    SeveralSeries,
    /// [`Refusal::MixedGrid`].
    MixedGrid,
    /// [`Refusal::DuplicatePosition`].
    DuplicatePosition,
    /// [`Refusal::UnevenSpacing`].
    UnevenSpacing,
    /// [`Refusal::GantryTilt`].
    GantryTilt,
    /// [`Refusal::Lossy`].
    Lossy,
    /// [`Refusal::UnsupportedTransferSyntax`].
    UnsupportedTransferSyntax,
    /// [`Refusal::Unsupported`].
    Unsupported,
    /// [`Refusal::Damaged`].
    Damaged,
    /// [`Refusal::SeveralReferences`].
    SeveralReferences,
    /// [`Refusal::NoReference`].
    NoReference,
    /// [`Refusal::FrameOfReference`].
    FrameOfReference,
    /// [`Refusal::SegOffGrid`].
    SegOffGrid,
    /// [`Refusal::ContourOffSlice`].
    ContourOffSlice,
    /// [`Refusal::ContourNotClosed`].
    ContourNotClosed,
    /// [`Refusal::OverlappingSegments`].
    OverlappingSegments,
    /// [`Refusal::Unmapped`].
    Unmapped,
    /// [`Refusal::Unreadable`].
    Unreadable,
}

impl Refusal {
    /// The kind of refusal.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::NoCtSeries { .. } => Reason::NoCtSeries,
            Refusal::SeveralSeries { .. } => Reason::SeveralSeries,
            Refusal::MixedGrid { .. } => Reason::MixedGrid,
            Refusal::DuplicatePosition { .. } => Reason::DuplicatePosition,
            Refusal::UnevenSpacing { .. } => Reason::UnevenSpacing,
            Refusal::GantryTilt { .. } => Reason::GantryTilt,
            Refusal::Lossy { .. } => Reason::Lossy,
            Refusal::UnsupportedTransferSyntax { .. } => Reason::UnsupportedTransferSyntax,
            Refusal::Unsupported { .. } => Reason::Unsupported,
            Refusal::Damaged { .. } => Reason::Damaged,
            Refusal::SeveralReferences { .. } => Reason::SeveralReferences,
            Refusal::NoReference => Reason::NoReference,
            Refusal::FrameOfReference { .. } => Reason::FrameOfReference,
            Refusal::SegOffGrid { .. } => Reason::SegOffGrid,
            Refusal::ContourOffSlice { .. } => Reason::ContourOffSlice,
            Refusal::ContourNotClosed { .. } => Reason::ContourNotClosed,
            Refusal::OverlappingSegments { .. } => Reason::OverlappingSegments,
            Refusal::Unmapped { .. } => Reason::Unmapped,
            Refusal::Unreadable { .. } => Reason::Unreadable,
        }
    }
}

/// A case that was refused: which folder, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("case {case} ({}): {refusal}", dir.display())]
pub struct CaseError {
    /// Case id (the folder's name).
    pub case: String,
    /// The case folder.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub refusal: Refusal,
}

// --- attribute access (values as written, trimmed of DICOM padding) ---

/// A string attribute, trimmed of the space/NUL padding; `None` when absent or empty.
pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

/// A multi-valued number (DS, FD, IS, US ...); `None` when absent, empty or unparsable.
pub(crate) fn numbers(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let v = obj.get(tag)?.to_multi_float64().ok()?;
    (!v.is_empty() && v.iter().all(|x| x.is_finite())).then_some(v)
}

/// A single number.
pub(crate) fn number(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    numbers(obj, tag).and_then(|v| v.first().copied())
}

/// The items of a sequence (empty when absent).
pub(crate) fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

/// Cross product.
pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Dot product.
pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Transfer syntaxes evald decodes, and whether each is lossless: `Some(true)` lossless,
/// `Some(false)` lossy (refused by policy), `None` not decodable here.
pub(crate) fn transfer_syntax(uid: &str) -> (&'static str, Option<bool>) {
    match uid {
        "1.2.840.10008.1.2" => ("Implicit VR Little Endian", Some(true)),
        "1.2.840.10008.1.2.1" => ("Explicit VR Little Endian", Some(true)),
        // Retired, and dicom-pixeldata hands its samples over in file order: not read.
        "1.2.840.10008.1.2.2" => ("Explicit VR Big Endian (retired)", None),
        "1.2.840.10008.1.2.1.99" => ("Deflated Explicit VR Little Endian", Some(true)),
        "1.2.840.10008.1.2.5" => ("RLE Lossless", Some(true)),
        "1.2.840.10008.1.2.4.57" => ("JPEG Lossless (Process 14)", Some(true)),
        "1.2.840.10008.1.2.4.70" => ("JPEG Lossless SV1", Some(true)),
        "1.2.840.10008.1.2.4.80" => ("JPEG-LS Lossless", Some(true)),
        "1.2.840.10008.1.2.4.90" => ("JPEG 2000 Lossless", Some(true)),
        "1.2.840.10008.1.2.4.50" => ("JPEG Baseline 8 bit, lossy", Some(false)),
        "1.2.840.10008.1.2.4.51" => ("JPEG Extended 12 bit, lossy", Some(false)),
        "1.2.840.10008.1.2.4.81" => ("JPEG-LS near-lossless, lossy", Some(false)),
        "1.2.840.10008.1.2.4.91" => ("JPEG 2000 (lossy allowed)", Some(false)),
        "1.2.840.10008.1.2.4.100"
        | "1.2.840.10008.1.2.4.101"
        | "1.2.840.10008.1.2.4.102"
        | "1.2.840.10008.1.2.4.103"
        | "1.2.840.10008.1.2.4.104"
        | "1.2.840.10008.1.2.4.105"
        | "1.2.840.10008.1.2.4.106"
        | "1.2.840.10008.1.2.4.107"
        | "1.2.840.10008.1.2.4.108" => ("MPEG / HEVC video, lossy", Some(false)),
        "1.2.840.10008.1.2.4.201" => ("High-Throughput JPEG 2000 Lossless", None),
        "1.2.840.10008.1.2.4.202" => ("High-Throughput JPEG 2000 RPCL Lossless", None),
        "1.2.840.10008.1.2.4.203" => ("High-Throughput JPEG 2000 (lossy allowed)", Some(false)),
        "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" => ("JPEG XL", None),
        "1.2.840.10008.1.2.4.112" => ("JPEG XL (lossy allowed)", Some(false)),
        _ => ("not a transfer syntax evald knows", None),
    }
}

/// SOP classes evald tells apart.
pub(crate) mod sop {
    /// CT Image Storage.
    pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    /// Enhanced CT Image Storage (multi-frame).
    pub const ENHANCED_CT: &str = "1.2.840.10008.5.1.4.1.1.2.1";
    /// Segmentation Storage (binary, fractional).
    pub const SEG: &str = "1.2.840.10008.5.1.4.1.1.66.4";
    /// Label Map Segmentation Storage (Sup 243).
    pub const SEG_LABELMAP: &str = "1.2.840.10008.5.1.4.1.1.66.7";
    /// RT Structure Set Storage.
    pub const RTSTRUCT: &str = "1.2.840.10008.5.1.4.1.1.481.3";
}

#[cfg(test)]
pub(crate) mod testdata {
    //! The fixture set (`tests/data/dicom`) and its truth (`expected.json`).
    use std::path::{Path, PathBuf};

    /// `tests/data/dicom`.
    pub fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom")
    }

    /// `expected.json`, parsed.
    pub fn expected() -> serde_json::Value {
        let text = std::fs::read_to_string(root().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// sha256 of a volume as little-endian int16, i fastest (expected.json's layout).
    pub fn sha_i16(v: &[i16]) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut buf = Vec::with_capacity(v.len() * 2);
        for x in v {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        h.update(&buf);
        hex::encode(h.finalize())
    }
}
