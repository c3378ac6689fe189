//! evald's native nnU-Net runtime on a test set, timed per stage, for
//! `scripts/bench-nnunet.sh` (side by side with nnUNetPredictor, `bench/nnunet_stages.py`).
//!
//! Stages, image already read: network (the sliding window over the folds) and the rest
//! of the case (preprocessing + export). One JSON line per case, then the totals.
//!
//! usage: `nnunet_stages MODEL_FOLDER IMAGES_DIR THREADS DEVICE`

use std::path::PathBuf;
use std::time::Instant;

use evald::infer::{InferSpec, InputKind, Model, ModelFormat, OutputKind, Window};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [folder, images, threads, device] = &args[..] else {
        anyhow::bail!("usage: nnunet_stages MODEL_FOLDER IMAGES_DIR THREADS DEVICE");
    };
    tch::set_num_threads(threads.parse()?);
    if device.starts_with("cuda") {
        evald::infer::device::cuda_devices().map_err(anyhow::Error::msg)?;
    }
    // nnU-Net's plans decide everything; the spec is what a task would pass.
    let spec = InferSpec {
        input: InputKind::Volume3d,
        output: OutputKind::Logits,
        window: Window {
            level: 40.0,
            width: 400.0,
        },
        batch_size: 1,
        patch_size: [32, 64, 64],
        overlap: 0.5,
        pad_multiple: 1,
        num_classes: 2,
    };
    let t = Instant::now();
    let model = Model::load_as(ModelFormat::NnUnet, &PathBuf::from(folder), device, spec)?;
    let load = t.elapsed().as_secs_f64();
    let mut files: Vec<PathBuf> = std::fs::read_dir(images)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("_0000.nii.gz"))
        .collect();
    files.sort();
    let (mut network, mut rest) = (0.0, 0.0);
    for f in files {
        let image = evald::volume::read_image(&f)?;
        let (_, stats) = model.predict(&image)?;
        let other = stats.total_secs - stats.forward_secs;
        network += stats.forward_secs;
        rest += other;
        println!(
            "{}",
            serde_json::json!({
                "case": f.file_name().map(|n| n.to_string_lossy().into_owned()),
                "network": stats.forward_secs,
                "pre_export": other,
            })
        );
    }
    println!(
        "{}",
        serde_json::json!({"total": {"network": network, "pre_export": rest}, "load": load})
    );
    Ok(())
}
