//! Inference: Python-exported and Rust-traced TorchScript both run; bad models and bad
//! volumes give clear errors, never panics.

use std::io::Write;

use evald::infer::{InferError, InferSpec, InputKind, Model, OutputKind, Window};
use evald::volume::{self, Geometry, Volume, VolumeError};
use tch::{Kind, Tensor};

use crate::util::data;

fn spec(input: InputKind, output: OutputKind) -> InferSpec {
    InferSpec {
        input,
        output,
        window: Window {
            level: 40.0,
            width: 400.0,
        },
        batch_size: 4,
        patch_size: [16, 32, 32],
        overlap: 0.5,
        pad_multiple: 1,
        num_classes: 3,
    }
}

/// The Python-traced 3D U-Net gives the output statistics Python torch 2.11 gave for the
/// same deterministic input (the numbers and the script that made the model:
/// tests/data/PROVENANCE.md, `models/unet3d_random.pt`).
#[test]
fn python_traced_unet3d_matches_python_numbers() {
    let m = tch::CModule::load(data("models/unet3d_random.pt")).unwrap();
    let n = 64 * 128 * 128;
    let x =
        Tensor::linspace(0.0, 1.0, n, (Kind::Float, tch::Device::Cpu)).view([1, 1, 64, 128, 128]);
    let y = tch::no_grad(|| m.forward_ts(&[x])).unwrap();
    assert_eq!(y.size(), [1, 2, 64, 128, 128]);
    let mean = y.mean(Kind::Double).double_value(&[]);
    let absmean = y.abs().mean(Kind::Double).double_value(&[]);
    assert!((mean - -1.414956897e-01).abs() < 1e-5, "mean {mean}");
    assert!(
        (absmean - 1.601084620e-01).abs() < 1e-5,
        "absmean {absmean}"
    );
}

/// The demo model traced in Rust segments the phantoms well (it is the demo's vendor).
#[test]
fn rust_traced_demo_model_segments_phantoms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    evald::phantom::write_demo_model(&path).unwrap();
    let (img, lab, _) = evald::phantom::render([96, 96, 24], [0.8, 0.8, 2.5], 7, 1);
    let img = Volume {
        geom: img.geom,
        data: img.data.iter().map(|&v| f32::from(v)).collect(),
    };
    let m = Model::load(&path, "cpu", spec(InputKind::Slices2d, OutputKind::Logits)).unwrap();
    let (pred, _) = m.predict(&img).unwrap();
    let spec = evald::metrics::EvalSpec::for_classes(&[(1, "thyroid")]);
    let r =
        evald::metrics::evaluate_case("c", &lab, "r".as_ref(), pred, "p".as_ref(), &spec).unwrap();
    let dice = r.classes[0].counts.dice();
    assert!(dice > 0.8, "thyroid Dice {dice}");
}

fn traced(
    dir: &std::path::Path,
    name: &str,
    f: &mut dyn FnMut(&Tensor) -> Tensor,
) -> std::path::PathBuf {
    let path = dir.join(name);
    let example = Tensor::zeros([2, 1, 8, 8], (Kind::Float, tch::Device::Cpu));
    let m = tch::CModule::create_by_tracing("m", "forward", &[example], &mut |xs: &[Tensor]| {
        vec![f(&xs[0])]
    })
    .unwrap();
    m.save(&path).unwrap();
    path
}

fn small_image() -> Volume<f32> {
    Volume {
        geom: Geometry::axis_aligned([8, 8, 3], [1.0; 3], [0.0; 3]),
        data: vec![0.0; 192],
    }
}

#[test]
fn a_model_returning_the_wrong_shape_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = traced(dir.path(), "half.pt", &mut |x| {
        x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
            .repeat([1, 3, 1, 1])
    });
    let m = Model::load(&p, "cpu", spec(InputKind::Slices2d, OutputKind::Logits)).unwrap();
    let e = m.predict(&small_image()).unwrap_err();
    assert!(matches!(e, InferError::BadOutput(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("[3, 3, 4, 4]") && msg.contains("expected"),
        "{msg}"
    );
}

#[test]
fn a_model_returning_nan_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = traced(dir.path(), "nan.pt", &mut |x| {
        x.repeat([1, 2, 1, 1]) * f64::NAN
    });
    let m = Model::load(&p, "cpu", spec(InputKind::Slices2d, OutputKind::Logits)).unwrap();
    let e = m.predict(&small_image()).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

#[test]
fn a_file_that_is_not_torchscript_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.pt");
    std::fs::write(&p, b"this is a pickle, honest").unwrap();
    let e = Model::load(&p, "cpu", spec(InputKind::Slices2d, OutputKind::Logits)).unwrap_err();
    assert!(matches!(e, InferError::Load { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.pt") && msg.contains("torch.jit"),
        "{msg}"
    );
}

#[test]
fn cuda_on_a_machine_without_it_is_a_clear_error() {
    if evald::infer::device::cuda_devices().is_ok() {
        return; // a GPU machine: nothing to refuse
    }
    let e = Model::load(
        &data("models/unet2d.pt"),
        "cuda:0",
        spec(InputKind::Slices2d, OutputKind::Logits),
    )
    .unwrap_err();
    assert!(e.to_string().contains("CUDA is not available"), "{e}");
}

fn write_labels(path: &std::path::Path) {
    let g = Geometry::axis_aligned([20, 20, 10], [1.0; 3], [0.0; 3]);
    volume::write_volume(
        path,
        &Volume {
            geom: g,
            data: (0..4000).map(|i| (i % 3) as u8).collect(),
        },
    )
    .unwrap();
}

#[test]
fn truncated_gzip_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.nii.gz");
    write_labels(&p);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = volume::read_labels(&p).unwrap_err();
    assert!(
        matches!(e, VolumeError::Data { .. } | VolumeError::Format { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("t.nii.gz"));
}

/// Recompress `raw` (an uncompressed .nii) after patching it.
fn gz(path: &std::path::Path, raw: &[u8]) {
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(raw).unwrap();
    e.finish().unwrap();
}

#[test]
fn a_header_that_lies_about_the_size_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("r.nii");
    write_labels(&raw_path);
    let mut raw = std::fs::read(&raw_path).unwrap();
    // dim[1..=3] at byte 42: claim 30000^3 voxels.
    for (i, d) in [30000u16, 30000, 30000].iter().enumerate() {
        raw[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    let p = dir.path().join("big.nii.gz");
    gz(&p, &raw);
    let e = volume::read_labels(&p).unwrap_err();
    assert!(matches!(e, VolumeError::Header { .. }), "{e}");
    assert!(e.to_string().contains("exceeds the limit"), "{e}");

    // Claims fewer voxels than the stream holds: more output than declared = refused.
    let mut raw = std::fs::read(&raw_path).unwrap();
    raw[46..48].copy_from_slice(&5u16.to_le_bytes()); // nz 10 -> 5
    let p = dir.path().join("small.nii.gz");
    gz(&p, &raw);
    let e = volume::read_labels(&p).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
}

#[test]
fn a_gzip_bomb_is_stopped_at_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("r.nii");
    write_labels(&raw_path);
    let mut raw = std::fs::read(&raw_path).unwrap();
    raw.extend(std::iter::repeat_n(0u8, 200 << 20)); // 200 MB of zeros after the data
    let p = dir.path().join("bomb.nii.gz");
    gz(&p, &raw);
    let size = std::fs::metadata(&p).unwrap().len();
    assert!(size < 4 << 20, "compressed bomb is {size} bytes");
    let e = volume::read_labels(&p).unwrap_err();
    assert!(matches!(e, VolumeError::Data { .. }), "{e}");
}

#[test]
fn fractional_label_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.nii.gz");
    let g = Geometry::axis_aligned([4, 4, 2], [1.0; 3], [0.0; 3]);
    let mut d = vec![0f32; 32];
    d[5] = 0.5;
    volume::write_volume(&p, &Volume { geom: g, data: d }).unwrap();
    let e = volume::read_labels(&p).unwrap_err();
    assert!(matches!(e, VolumeError::NotLabels { .. }), "{e}");
    assert!(e.to_string().contains("(1, 1, 0)"), "{e}");
}
