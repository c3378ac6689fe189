//! nnU-Net v2 trained-model folders, run natively (no Python): nnU-Net's inference
//! pipeline reproduced step by step, as nnunetv2 2.8.1 does it on CPU.
//!
//! - [`plans`]: the folder's name, `plans.json`, `dataset.json` and folds, checked and
//!   typed; what is not stock is refused here by name;
//! - [`pickle`]: a restricted unpickler (allowlisted opcodes and globals into inert data);
//! - [`checkpoint`]: a fold's `checkpoint_final.pth` (torch.save zip) read through it: the
//!   trainer, configuration, mirroring axes and float32 weights;
//! - [`network`]: PlainConvUNet and ResidualEncoderUNet in libtorch, from the plans'
//!   architecture and those weights (every name checked);
//! - [`preprocess`]: a case as the network gets it (transpose, crop, normalise, resample)
//!   and the properties export needs;
//! - [`resample`]: nnU-Net's resampling, numerically as scipy and scikit-image do it;
//! - [`predict`]: nnU-Net's sliding window, mirroring, fp16 accumulation and fold
//!   ensemble over those networks: a preprocessed case's logits, nnU-Net's bit for bit;
//! - [`export`]: logits back to labels on the input grid;
//! - [`NnUnet`] (runtime): the folder loaded from its verified bytes, one case through all
//!   of the above;
//! - `npy` (tests only): NumPy arrays nnU-Net wrote, the references of the parity tests.

pub mod checkpoint;
pub mod export;
pub mod network;
#[cfg(test)]
pub(crate) mod npy;
pub mod pickle;
pub mod plans;
pub mod predict;
pub mod preprocess;
pub mod resample;
mod runtime;

pub use runtime::NnUnet;

/// The nnunetv2 release whose inference evald reproduces.
pub const NNUNET_VERSION: &str = "2.8.1";

/// What runs nnU-Net folders, for the report's provenance (its version is libtorch's).
pub const RUNTIME_NAME: &str =
    "nnU-Net v2 inference of nnunetv2 2.8.1, reproduced natively by evald, on libtorch";

#[cfg(test)]
mod tests {
    #[test]
    fn the_runtime_name_names_the_release_reproduced() {
        assert!(super::RUNTIME_NAME.contains(&format!("nnunetv2 {}", super::NNUNET_VERSION)));
    }
}
