//! nnU-Net v2 trained-model folders, run natively (no Python): nnU-Net's inference
//! pipeline reproduced step by step, as nnunetv2 2.8.1 does it on CPU.
//!
//! - [`plans`]: the folder's name, `plans.json`, `dataset.json` and folds, checked and
//!   typed; what is not stock is refused here by name;
//! - [`preprocess`]: a case as the network gets it (transpose, crop, normalise, resample)
//!   and the properties export needs;
//! - [`resample`]: nnU-Net's resampling, numerically as scipy and scikit-image do it;
//! - [`export`]: logits back to labels on the input grid;
//! - `npy` (tests only): NumPy arrays nnU-Net wrote, the references of the parity tests.

pub mod export;
#[cfg(test)]
pub(crate) mod npy;
pub mod plans;
pub mod preprocess;
pub mod resample;
