//! evald's ONNX runtime against PyTorch on the models the ONNX files were exported from
//! (tests/data/onnx, made once by `make_onnx_fixture.py` beside the data; see
//! tests/data/PROVENANCE.md), on the stored CT of tests/data/infer:
//!
//! - the raw forward (evald's HU window and layout, ORT's kernels) against PyTorch's own
//!   logits of the TorchScript files, within 1e-5 of the logits' range
//!   (`|a - b| <= 1e-5 max(1, max |b|)`): float32 kernels that sum in another order differ
//!   by a few ulps of the intermediate sums, not of each output. The trained 2D U-Net's
//!   logits reach 11.2 and differ by up to 2e-5 (Python's onnxruntime measures the same, with
//!   ORT's graph optimisations on or off); the 3D model's stay within 1e-5 absolute;
//! - label maps through the whole runtime (2D batches, the 3D sliding window) against the
//!   PyTorch and MONAI labels of tests/data/infer, voxel for voxel except where the peer's
//!   two best scores are within [`TIE`] (none on these data);
//! - graphs evald must refuse, each with one clear message and no panic: bytes that are no
//!   ONNX model, a truncated file, two inputs, two outputs, a fixed shape that disagrees
//!   with what evald feeds, the wrong rank, integer "logits", NaN outputs, outputs of the
//!   wrong size.

use evald::infer::onnx::Onnx;
use evald::infer::{tiling, InferError, InferSpec, InputKind, Model, ModelFormat, OutputKind};
use evald::volume::{self, ImageVolume};

use crate::util::{data, read_json};

/// Scores closer than this may break the argmax either way.
const TIE: f32 = 1e-5;

fn ct() -> ImageVolume {
    volume::read_image(&data("infer/ct.nii.gz")).unwrap()
}

fn reference() -> serde_json::Value {
    read_json(&data("onnx/reference.json"))
}

fn spec(input: InputKind, output: OutputKind, batch: usize, patch: [usize; 3]) -> InferSpec {
    let w = &reference()["window"];
    InferSpec {
        input,
        output,
        window: evald::infer::Window {
            level: w["level"].as_f64().unwrap() as f32,
            width: w["width"].as_f64().unwrap() as f32,
        },
        batch_size: batch,
        patch_size: patch,
        overlap: 0.5,
        pad_multiple: 8,
        num_classes: 3,
    }
}

fn slices2d(batch: usize) -> InferSpec {
    spec(InputKind::Slices2d, OutputKind::Logits, batch, [1, 1, 1])
}

fn volume3d(batch: usize, patch: [usize; 3]) -> InferSpec {
    spec(InputKind::Volume3d, OutputKind::Logits, batch, patch)
}

fn load(name: &str, spec: InferSpec) -> Result<Onnx, InferError> {
    Onnx::load(&data(&format!("onnx/{name}")), "cpu", spec)
}

fn f32s(rel: &str) -> Vec<f32> {
    std::fs::read(data(rel))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn shape_of(name: &str) -> Vec<usize> {
    reference()["arrays"][name]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

/// `|ours - torch| <= 1e-5 max(1, max |torch|)` everywhere; returns the largest difference.
fn assert_close(what: &str, ours: &[f32], torch: &[f32]) -> f32 {
    assert_eq!(ours.len(), torch.len(), "{what}: value count");
    let range = torch.iter().fold(1f32, |m, v| m.max(v.abs()));
    let tol = 1e-5 * range;
    let mut worst = 0f32;
    let mut bad = Vec::new();
    for (i, (&a, &b)) in ours.iter().zip(torch).enumerate() {
        let d = (a - b).abs();
        worst = worst.max(d);
        if d.is_nan() || d > tol {
            bad.push((i, a, b));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ from PyTorch by more than {tol:e} (1e-5 of the range {range}), first (index, evald, torch): {:?}",
        bad.len(),
        ours.len(),
        &bad[..bad.len().min(8)]
    );
    eprintln!(
        "{what}: {} values, largest |evald - torch| = {worst:e} (range {range})",
        ours.len()
    );
    worst
}

/// Argmax and top-2 gap over the channels of `[B, C, S]` scores.
fn argmax_and_gap(scores: &[f32], b: usize, c: usize) -> (Vec<u8>, Vec<f32>) {
    let s = scores.len() / (b * c);
    let mut labels = vec![0u8; b * s];
    let mut gaps = vec![0f32; b * s];
    for i in 0..b {
        for v in 0..s {
            let mut vals: Vec<(f32, usize)> =
                (0..c).map(|k| (scores[(i * c + k) * s + v], k)).collect();
            // Stable: among equal scores the first channel stays first (torch.argmax).
            vals.sort_by(|x, y| y.0.total_cmp(&x.0));
            labels[i * s + v] = vals[0].1 as u8;
            gaps[i * s + v] = vals[0].0 - vals[1].0;
        }
    }
    (labels, gaps)
}

/// Voxels where evald and the peer differ only at near-ties (returned), never where the
/// peer's decision is clear.
fn compare(what: &str, ours: &[u8], theirs: &[u8], gaps: &[f32]) -> usize {
    assert_eq!(ours.len(), theirs.len(), "{what}: voxel count");
    let clear: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i] != theirs[i] && gaps[i] >= TIE)
        .collect();
    assert!(
        clear.is_empty(),
        "{what}: {} voxels differ where the peer's top-2 gap is >= {TIE}, first indices {:?}",
        clear.len(),
        &clear[..clear.len().min(8)]
    );
    let ties = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    // The comparison is not trivial: the peer's labels hold more than one class.
    let mut classes = theirs.to_vec();
    classes.sort_unstable();
    classes.dedup();
    assert!(classes.len() >= 2, "{what}: one class only");
    eprintln!(
        "{what}: {} voxels, labels equal except {ties} near-tie voxels",
        ours.len()
    );
    ties
}

/// A peer label map and its top-2 gaps from tests/data/infer (`[z, y, x]`).
fn infer_peer(name: &str) -> (Vec<u8>, Vec<f32>) {
    (
        std::fs::read(data(&format!("infer/{name}.labels.u8"))).unwrap(),
        f32s(&format!("infer/{name}.gap.f32")),
    )
}

fn predict(model: &str, spec: InferSpec) -> (Vec<u8>, evald::infer::PredictStats) {
    let img = ct();
    let m = Model::load_as(
        ModelFormat::Onnx,
        &data(&format!("onnx/{model}")),
        "cpu",
        spec,
    )
    .unwrap();
    let (labels, stats) = m.predict(&img).unwrap();
    assert_eq!(labels.geom, img.geom);
    (labels.data, stats)
}

fn load_error(name: &str, spec: InferSpec) -> String {
    match load(name, spec) {
        Err(e @ InferError::Load { .. }) => e.to_string(),
        other => panic!("{name}: expected a load error, got {other:?}"),
    }
}

/// The 2D U-Net's raw forward on evald's windowed, padded slices equals PyTorch's logits
/// of the TorchScript file (unet2d.pt) on its own windowing of the same CT.
#[test]
fn unet2d_forward_equals_pytorch_logits() {
    let img = ct();
    let m = load("unet2d.onnx", slices2d(6)).unwrap();
    let shape = shape_of("torch2d.logits.f32");
    assert_eq!(shape, [6, 3, 40, 48]);
    let x = tiling::windowed_slices(&img, m.spec().window, 0, 6, 40, 48);
    let (yshape, y) = m.forward(&x, &[6, 1, 40, 48]).unwrap();
    assert_eq!(yshape, shape);
    let torch = f32s("onnx/torch2d.logits.f32");
    assert_close("unet2d forward vs PyTorch", &y, &torch);
    let (ours, _) = argmax_and_gap(&y, 6, 3);
    let (theirs, gaps) = argmax_and_gap(&torch, 6, 3);
    assert_eq!(
        compare("unet2d labels of the logits", &ours, &theirs, &gaps),
        0
    );
}

/// `slices2d` through the runtime: batches of 4 and 2, H and W padded to multiples of 8,
/// cropped back: PyTorch's labels of unet2d.pt (tests/data/infer's torch2d) voxel for voxel.
#[test]
fn slices2d_labels_equal_pytorch() {
    let (ours, stats) = predict("unet2d.onnx", slices2d(4));
    let (theirs, gaps) = infer_peer("torch2d");
    assert_eq!(
        compare("slices2d ONNX vs PyTorch", &ours, &theirs, &gaps),
        0
    );
    assert_eq!(stats.forward_calls, 2, "6 slices in batches of 4");
    assert_eq!(stats.batch_used, 4);
}

/// The 3D model's raw forward on evald's windowed volume equals PyTorch's (seg3d.pt).
#[test]
fn seg3d_forward_equals_pytorch_logits() {
    let img = ct();
    let m = load("seg3d.onnx", volume3d(1, [6, 36, 44])).unwrap();
    let x = tiling::windowed_padded(&img, m.spec().window, [6, 36, 44]);
    let (yshape, y) = m.forward(&x, &[1, 1, 6, 36, 44]).unwrap();
    assert_eq!(yshape, shape_of("torch3d_whole.logits.f32"));
    let worst = assert_close(
        "seg3d forward vs PyTorch",
        &y,
        &f32s("onnx/torch3d_whole.logits.f32"),
    );
    assert!(worst <= 1e-5, "{worst}");
}

/// `volume3d`, one window (patch = the volume) and a patch larger than the volume
/// (end-padded, cropped back): PyTorch's labels of seg3d.pt.
#[test]
fn volume3d_one_window_and_padded_labels_equal_pytorch() {
    let (ours, stats) = predict("seg3d.onnx", volume3d(1, [6, 36, 44]));
    let (theirs, gaps) = infer_peer("torch3d_whole");
    assert_eq!(
        compare("volume3d whole ONNX vs PyTorch", &ours, &theirs, &gaps),
        0
    );
    assert_eq!(stats.forward_calls, 1);
    let (ours, _) = predict("seg3d.onnx", volume3d(1, [8, 40, 44]));
    let (theirs, gaps) = infer_peer("torch3d_padded");
    assert_eq!(
        compare("volume3d padded ONNX vs PyTorch", &ours, &theirs, &gaps),
        0
    );
}

/// Many overlapping windows (4 x 16 x 16, overlap 0.5: 40 windows in batches of 4) blended
/// with the Gaussian map: MONAI's `sliding_window_inference` labels given that map, as for
/// TorchScript (tiling is shared).
#[test]
fn volume3d_sliding_window_labels_equal_monai() {
    let (ours, stats) = predict("seg3d.onnx", volume3d(4, [4, 16, 16]));
    let (theirs, gaps) = infer_peer("monai_evald_map");
    assert_eq!(
        compare("volume3d sliding ONNX vs MONAI", &ours, &theirs, &gaps),
        0
    );
    assert_eq!(stats.forward_calls, 10, "40 windows in batches of 4");
}

/// A graph that returns labels (int64 argmax) is read as labels: one window gives
/// PyTorch's labels.
#[test]
fn a_labels_output_is_read_as_labels() {
    let mut s = volume3d(1, [6, 36, 44]);
    s.output = OutputKind::Labels;
    let (ours, _) = predict("seg3d_labels.onnx", s);
    let (theirs, gaps) = infer_peer("torch3d_whole");
    assert_eq!(
        compare("volume3d labels output vs PyTorch", &ours, &theirs, &gaps),
        0
    );
    // Declared as logits, its int64 output is refused at load, saying what to declare.
    let e = load_error("seg3d_labels.onnx", volume3d(1, [6, 36, 44]));
    assert!(e.contains("declare output = \"labels\""), "{e}");
}

/// A graph exported without dynamic shapes runs when evald feeds exactly its shape, and
/// is refused at load otherwise, the message naming the model's shape and what evald feeds.
#[test]
fn a_fixed_shape_model_runs_at_its_shape_and_is_refused_at_another() {
    // seg3d_fixed.onnx is [1, 1, 4, 16, 16]: the sliding window with batch 1 is MONAI's.
    let (ours, stats) = predict("seg3d_fixed.onnx", volume3d(1, [4, 16, 16]));
    let (theirs, gaps) = infer_peer("monai_evald_map");
    compare("fixed-shape sliding vs MONAI", &ours, &theirs, &gaps);
    assert_eq!(stats.forward_calls, 40);
    let e = load_error("seg3d_fixed.onnx", volume3d(1, [6, 36, 44]));
    assert!(
        e.contains("[1, 1, 4, 16, 16]") && e.contains("[6, 36, 44]") && e.contains("patch_size"),
        "{e}"
    );
    let e = load_error("seg3d_fixed.onnx", volume3d(4, [4, 16, 16]));
    assert!(e.contains("batch 1") && e.contains("batches of 4"), "{e}");
    assert!(e.contains("torch.onnx.export"), "the export hint: {e}");

    // tiny2d_fixed.onnx is [2, 1, 40, 48]: the CT's 36 x 44 slices padded to multiples of 8.
    let (_, stats) = predict("tiny2d_fixed.onnx", slices2d(2));
    assert_eq!(stats.forward_calls, 3);
    let e = load_error("tiny2d_fixed.onnx", slices2d(4));
    assert!(e.contains("[2, 1, 40, 48]") && e.contains("batch 2"), "{e}");
    // H and W are only known per case: one clear error before the forward call.
    let mut s = slices2d(2);
    s.pad_multiple = 16;
    let m = load("tiny2d_fixed.onnx", s).unwrap();
    let e = evald::infer::Runtime::predict(&m, &ct()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, InferError::Forward { .. }), "{e:?}");
    assert!(
        msg.contains("[2, 1, 40, 48]") && msg.contains("36 x 44") && msg.contains("48 x 48"),
        "{msg}"
    );
}

/// A graph fixed to a batch gets every batch padded to it (the last of 5 slices in batches
/// of 2 is padded with a zero slice): the labels are those of unpadded batches.
#[test]
fn a_fixed_batch_is_padded_and_its_extra_outputs_dropped() {
    let img = ct();
    let mut five = img.clone();
    let [nx, ny, _] = img.geom.dims;
    five.geom.dims[2] = 5;
    five.data.truncate(nx * ny * 5);
    let m = Model::load_as(
        ModelFormat::Onnx,
        &data("onnx/tiny2d_fixed.onnx"),
        "cpu",
        slices2d(2),
    )
    .unwrap();
    let (all, _) = m.predict(&img).unwrap();
    let (part, stats) = m.predict(&five).unwrap();
    assert_eq!(stats.forward_calls, 3, "2 + 2 + 1 padded to 2");
    assert_eq!(part.data[..], all.data[..nx * ny * 5]);
}

/// Files and graphs evald cannot run: one error each, never a panic.
#[test]
fn unusable_models_are_one_clear_error_each() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"this is not a protobuf \x00\xff\xfe").unwrap();
    let e = Onnx::load(&junk, "cpu", slices2d(4)).unwrap_err();
    assert!(matches!(e, InferError::Load { .. }), "{e:?}");
    eprintln!("junk: {e}");
    let whole = std::fs::read(data("onnx/unet2d.onnx")).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = Onnx::load(&cut, "cpu", slices2d(4)).unwrap_err();
    assert!(matches!(e, InferError::Load { .. }), "{e:?}");
    eprintln!("truncated: {e}");

    let e = load_error("two_inputs.onnx", slices2d(4));
    assert!(e.contains("has 2 inputs"), "{e}");
    let e = load_error("two_outputs.onnx", slices2d(4));
    assert!(e.contains("has 2 outputs"), "{e}");
    let e = load_error("unet2d.onnx", volume3d(1, [6, 36, 44]));
    assert!(e.contains("rank 4") && e.contains("volume3d"), "{e}");
    let e = load_error("seg3d.onnx", slices2d(4));
    assert!(e.contains("rank 5") && e.contains("slices2d"), "{e}");

    let img = ct();
    let m = load("nan.onnx", slices2d(4)).unwrap();
    let e = evald::infer::Runtime::predict(&m, &img).unwrap_err();
    assert!(
        matches!(&e, InferError::BadOutput(m) if m.contains("NaN")),
        "{e:?}"
    );
    let m = load("shrink.onnx", slices2d(4)).unwrap();
    let e = evald::infer::Runtime::predict(&m, &img).unwrap_err();
    assert!(
        matches!(&e, InferError::BadOutput(m) if m.contains("[4, 3, 20, 24]")),
        "{e:?}"
    );
    // A device that is no device, and a GPU through an ONNX Runtime without CUDA.
    let e = Onnx::load(&data("onnx/unet2d.onnx"), "gpu", slices2d(4)).unwrap_err();
    assert!(matches!(e, InferError::Device(_)), "{e:?}");
    let e = Onnx::load(&data("onnx/unet2d.onnx"), "cuda:0", slices2d(4)).unwrap_err();
    assert!(matches!(e, InferError::Device(_)), "{e:?}");
    eprintln!("cuda:0 here: {e}");
}

/// The hash-checked path the workers use loads the very bytes it hashed.
#[test]
fn the_verified_load_checks_the_hash_of_the_onnx_bytes() {
    let path = data("onnx/unet2d.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let sha = evald::files::sha256_hex(&bytes[..]).unwrap();
    let m = Model::load_verified_as(ModelFormat::Onnx, &path, &sha, "cpu", slices2d(4)).unwrap();
    assert_eq!(m.format(), ModelFormat::Onnx);
    let e = Model::load_verified_as(
        ModelFormat::Onnx,
        &path,
        &"0".repeat(64),
        "cpu",
        slices2d(4),
    )
    .unwrap_err();
    assert!(matches!(e, InferError::Changed { .. }), "{e:?}");
    // The report names what ran it.
    let v = ModelFormat::Onnx.runtime_version();
    assert!(v.starts_with("1."), "ONNX Runtime version: {v}");
}
