//! evald's integration tests: one binary, one module per area. They run the real `evald`
//! binary or the library on real data copied into `tests/data` (see its PROVENANCE.md).

mod cli;
mod compare;
mod conformance;
mod daemon;
mod dicom;
mod hostile;
mod infer;
mod infer_peer;
mod lesion;
mod mail;
mod nnunet;
mod onnx_e2e;
mod onnx_peer;
mod pool;
mod report;
mod surface;
mod util;
mod volume_limits;
