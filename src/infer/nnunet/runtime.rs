//! The nnU-Net runtime: a trained-model folder loaded from its verified bytes, and one
//! case through nnU-Net's pipeline — [`preprocess`](super::preprocess) (crop,
//! normalise, resample), [`predict`](super::predict) (sliding window, mirroring, fp16
//! accumulation, fold ensemble), [`export`](super::export) (back onto the image's grid).

use std::time::Instant;

use super::plans::{self, ModelFolder};
use super::{checkpoint, export, predict, preprocess};
use crate::infer::{artifact, device, InferError, ModelFormat, PredictStats, Runtime};
use crate::volume::{ImageVolume, LabelVolume};

/// A loaded nnU-Net v2 trained-model folder on one device.
#[derive(Debug)]
pub struct NnUnet {
    folder: ModelFolder,
    // libtorch tensors are Send but not Sync; a runtime is shared (`Runtime: Sync`) but a
    // worker predicts one case at a time, so the lock is never contended.
    predictor: std::sync::Mutex<predict::Predictor>,
}

fn load_error(read: &artifact::Read, device: &str, message: String) -> InferError {
    InferError::Load {
        path: read.path.clone(),
        format: ModelFormat::NnUnet,
        device: device.to_string(),
        message,
    }
}

impl NnUnet {
    /// Build the runtime from a model read (and hash-checked) by the caller: the folder's
    /// plans are checked, every fold's checkpoint is parsed from the bytes that were
    /// hashed (never unpickled: [`checkpoint`]) and its network built on `device_name`.
    ///
    /// # Errors
    /// [`InferError::Device`] for an unusable device, [`InferError::Load`] for a folder or
    /// checkpoint that cannot be run, naming the file.
    pub fn load(read: &artifact::Read, device_name: &str) -> Result<Self, InferError> {
        let device = device::parse(device_name)?;
        let folder = ModelFolder::open(&read.path, None)
            .map_err(|e| load_error(read, device_name, e.to_string()))?;
        let mut cks = Vec::with_capacity(folder.folds.len());
        for (k, path) in &folder.folds {
            let rel = format!("fold_{k}/{}", plans::CHECKPOINT);
            let bytes = read.get(&rel).ok_or_else(|| {
                load_error(
                    read,
                    device_name,
                    format!("{rel} appeared after the model was checked"),
                )
            })?;
            let ck = checkpoint::from_bytes(bytes, path)
                .map_err(|e| load_error(read, device_name, e.to_string()))?;
            cks.push((path.clone(), ck));
        }
        let predictor = predict::Predictor::from_checkpoints(&folder, &cks, device)
            .map_err(|e| load_error(read, device_name, e.to_string()))?;
        Ok(NnUnet {
            folder,
            predictor: std::sync::Mutex::new(predictor),
        })
    }

    /// The folder's description.
    pub fn folder(&self) -> &ModelFolder {
        &self.folder
    }
}

impl Runtime for NnUnet {
    fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError> {
        let t0 = Instant::now();
        let pre = preprocess::preprocess(image, &self.folder)
            .map_err(|e| InferError::Input(e.to_string()))?;
        let [z, y, x] = pre.shape;
        let dims = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let input = tch::Tensor::from_slice(&pre.data).reshape([1, dims(z), dims(y), dims(x)]);
        let tf = Instant::now();
        // A panic while holding it poisons nothing that matters: the predictor is read-only.
        let predictor = self
            .predictor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let logits = predictor.logits(&input)?;
        let forward_secs = tf.elapsed().as_secs_f64();
        let values = Vec::<half::f16>::try_from(&logits.flatten(0, -1))
            .map_err(|e| InferError::Torch(e.to_string()))?;
        let data = export::labels(&values, pre.shape, &pre.props, &self.folder)
            .map_err(|e| InferError::BadOutput(format!("nnU-Net export: {e}")))?;
        let stats = PredictStats {
            forward_secs,
            total_secs: t0.elapsed().as_secs_f64(),
            batch_used: 1,
            forward_calls: predictor.folds(),
        };
        Ok((
            LabelVolume {
                geom: image.geom.clone(),
                data,
            },
            stats,
        ))
    }
}
