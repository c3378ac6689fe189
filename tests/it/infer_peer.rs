//! evald's inference against its peers on the same TorchScript model and the same stored CT
//! (tests/data/infer, made once by `make_infer_reference.py` beside the data; see
//! tests/data/PROVENANCE.md): PyTorch's own forward for `slices2d` and for `volume3d` with
//! one window (whole volume, and a volume smaller than the patch), MONAI's
//! `sliding_window_inference` for the Gaussian blending of many windows.
//!
//! evald exposes label maps only (no logits or probabilities), so the comparison is voxel by
//! voxel on labels: a voxel may differ only where the peer's two best scores are within
//! [`TIE`] of each other (a float tie that either argmax may break), and such voxels are
//! counted and reported.

use evald::infer::{InferSpec, InputKind, Model, OutputKind, Window};
use evald::volume;

use crate::util::{data, read_json};

/// Scores closer than this may break the argmax either way.
const TIE: f32 = 1e-5;

struct Reference {
    json: serde_json::Value,
}

impl Reference {
    fn load() -> Self {
        Reference {
            json: read_json(&data("infer/reference.json")),
        }
    }

    fn spec(&self, input: InputKind, patch: &str, classes: usize) -> InferSpec {
        let s = &self.json["spec"];
        let p: Vec<usize> = s[patch]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect())
            .unwrap_or_else(|| vec![1, 1, 1]);
        InferSpec {
            input,
            output: OutputKind::Logits,
            window: Window {
                level: s["window"]["level"].as_f64().unwrap() as f32,
                width: s["window"]["width"].as_f64().unwrap() as f32,
            },
            batch_size: s["batch_size"].as_u64().unwrap() as usize,
            patch_size: [p[0], p[1], p[2]],
            overlap: s["overlap"].as_f64().unwrap(),
            pad_multiple: s["pad_multiple"].as_u64().unwrap() as usize,
            num_classes: classes,
        }
    }

    /// A peer's labels and top-2 score gaps, `[z, y, x]` = evald's NIfTI data order.
    fn peer(&self, name: &str) -> (Vec<u8>, Vec<f32>) {
        let a = &self.json["arrays"][name];
        let labels = std::fs::read(data(&format!("infer/{}", a["labels"].as_str().unwrap())))
            .expect("stored labels");
        let raw = std::fs::read(data(&format!("infer/{}", a["gap"].as_str().unwrap())))
            .expect("stored gaps");
        let gaps: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let n: u64 = a["shape_zyx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .product();
        assert_eq!((labels.len() as u64, gaps.len() as u64), (n, n), "{name}");
        // The reference is not trivial: at least two classes occur (a constant label map
        // would make the comparison true by construction).
        let present = a["label_counts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.as_u64().unwrap() > 0)
            .count();
        assert!(present >= 2, "{name}: {}", a["label_counts"]);
        (labels, gaps)
    }
}

/// Voxels where evald and the peer differ: (all, of which near-ties). Panics on a
/// difference where the peer's decision is clear.
fn compare(what: &str, ours: &[u8], theirs: &[u8], gaps: &[f32], dims: [usize; 3]) -> usize {
    assert_eq!(ours.len(), theirs.len(), "{what}: voxel count");
    let [nx, ny, _] = dims;
    let mut ties = 0;
    let mut clear = Vec::new();
    for (i, ((&o, &t), &g)) in ours.iter().zip(theirs).zip(gaps).enumerate() {
        if o != t {
            if g < TIE {
                ties += 1;
            } else {
                clear.push((i % nx, (i / nx) % ny, i / (nx * ny), o, t, g));
            }
        }
    }
    assert!(
        clear.is_empty(),
        "{what}: {} voxels differ where the peer's top-2 gap is >= {TIE} (x, y, z, evald, peer, gap), first: {:?}",
        clear.len(),
        &clear[..clear.len().min(8)]
    );
    eprintln!(
        "{what}: {} voxels, labels equal except {ties} near-tie voxels",
        ours.len()
    );
    ties
}

fn predict(model: &str, spec: InferSpec) -> (Vec<u8>, evald::infer::PredictStats, [usize; 3]) {
    let img = volume::read_image(&data("infer/ct.nii.gz")).unwrap();
    let dims = img.geom.dims;
    let m = Model::load(&data(model), "cpu", spec).unwrap();
    let (labels, stats) = m.predict(&img).unwrap();
    assert_eq!(labels.geom, img.geom);
    (labels.data, stats, dims)
}

/// `slices2d`: models/unet2d.pt over the 6 axial slices (batches of 4 and 2, H 36 and W 44
/// padded to multiples of 8) gives PyTorch's labels voxel for voxel.
#[test]
fn slices2d_labels_equal_pytorch_on_the_same_ct() {
    let r = Reference::load();
    let (ours, stats, dims) = predict("models/unet2d.pt", r.spec(InputKind::Slices2d, "none", 3));
    assert_eq!(dims, [44, 36, 6]);
    let (theirs, gaps) = r.peer("torch2d");
    compare("slices2d vs PyTorch", &ours, &theirs, &gaps, dims);
    assert_eq!(stats.forward_calls, 2, "6 slices in batches of 4");
}

/// `volume3d` with the patch equal to the volume: one window, so evald's labels are the
/// argmax of PyTorch's own forward on the whole windowed volume (HU window, [D, H, W] axis
/// order, [1, 1, D, H, W] layout).
#[test]
fn volume3d_one_window_labels_equal_pytorch() {
    let r = Reference::load();
    let (ours, stats, dims) = predict(
        "infer/seg3d.pt",
        r.spec(InputKind::Volume3d, "patch_whole", 3),
    );
    let (theirs, gaps) = r.peer("torch3d_whole");
    compare(
        "volume3d one window vs PyTorch",
        &ours,
        &theirs,
        &gaps,
        dims,
    );
    assert_eq!(stats.forward_calls, 1);
}

/// A volume smaller than the patch along D and H is padded with 0 (after the window) at the
/// end of each axis and cropped back: PyTorch on the end-padded volume. (MONAI pads
/// symmetrically instead; on this volume that changes the labels of
/// `stats.monai_symmetric_pad_vs_end_pad_label_diffs` voxels.)
#[test]
fn volume3d_smaller_than_the_patch_is_end_padded_like_pytorch() {
    let r = Reference::load();
    let (ours, stats, dims) = predict(
        "infer/seg3d.pt",
        r.spec(InputKind::Volume3d, "patch_padded", 3),
    );
    let (theirs, gaps) = r.peer("torch3d_padded");
    compare("volume3d padded vs PyTorch", &ours, &theirs, &gaps, dims);
    assert_eq!(stats.forward_calls, 1);
}

/// Many overlapping windows (patch 4 x 16 x 16, overlap 0.5: 2 x 4 x 5 = 40 windows in
/// batches of 4) blended with evald's Gaussian importance map give MONAI's
/// `sliding_window_inference` labels when MONAI is handed that same map (`roi_weight_map`):
/// window positions, batch order and `sum(w * y) / sum(w)` are MONAI's.
#[test]
fn volume3d_gaussian_blending_equals_monai_with_the_same_importance_map() {
    let r = Reference::load();
    let (ours, stats, dims) = predict(
        "infer/seg3d.pt",
        r.spec(InputKind::Volume3d, "patch_sliding", 3),
    );
    let (theirs, gaps) = r.peer("monai_evald_map");
    compare(
        "volume3d sliding vs MONAI (evald's map)",
        &ours,
        &theirs,
        &gaps,
        dims,
    );
    assert_eq!(stats.forward_calls, 10, "40 windows in batches of 4");
    // The blending matters here: one forward over the whole volume labels other voxels.
    let (whole, _) = r.peer("torch3d_whole");
    let changed = ours.iter().zip(&whole).filter(|(a, b)| a != b).count();
    assert!(
        changed > 0,
        "sliding window = whole-volume labels: a weak case"
    );
}

/// The documented difference from MONAI's default Gaussian map: MONAI clamps it at
/// max(min, 1e-3), evald floors it at its smallest positive value (nnU-Net's rule, keeping
/// the tiny corner weights). evald's labels differ from MONAI's default exactly where
/// MONAI's own result changes when it is given evald's map instead (and nowhere else).
#[test]
fn volume3d_blending_differs_from_monai_default_only_by_the_importance_floor() {
    let r = Reference::load();
    let (ours, _, dims) = predict(
        "infer/seg3d.pt",
        r.spec(InputKind::Volume3d, "patch_sliding", 3),
    );
    let (default, dgaps) = r.peer("monai_default");
    let (same_map, sgaps) = r.peer("monai_evald_map");
    let expected = r.json["stats"]["monai_default_vs_evald_map_label_diffs"]
        .as_u64()
        .unwrap() as usize;
    assert!(expected > 0, "the floor makes no difference on this volume");
    let mut unexplained = Vec::new();
    let mut differ = 0;
    for i in 0..ours.len() {
        if ours[i] != default[i] {
            differ += 1;
            let explained = same_map[i] != default[i] || dgaps[i] < TIE || sgaps[i] < TIE;
            if !explained {
                unexplained.push((
                    i % dims[0],
                    (i / dims[0]) % dims[1],
                    i / (dims[0] * dims[1]),
                ));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "{} voxels differ from MONAI's default for another reason than the floor, first (x, y, z): {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(8)]
    );
    eprintln!(
        "evald vs MONAI default map: {differ} of {} voxels differ (script: {expected})",
        ours.len()
    );
    assert_eq!(differ, expected);
}
