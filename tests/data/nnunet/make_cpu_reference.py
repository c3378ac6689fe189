"""nnUNetPredictor's logits of the tinyct fixture cases on *this* machine's CPU.

libtorch's convolution kernels depend on the CPU's instruction set: nnU-Net itself, with the
same libtorch, gives a few logits 1 fp16 ulp apart on another CPU. This writes
reference/<run>/intermediates/<case>_logits_f16.<tag>.npy.gz wherever nnU-Net's own logits
here differ from the stored ones; predict.rs's parity test requires evald to equal one
stored reference bit for bit.

Run (nnunetv2 2.8.1 in the bench venv, on the torch package evald links):
  OMP_NUM_THREADS=2 PYTHONPATH=$PWD/.libtorch/site .bench/nnunet-venv/bin/python \
    tests/data/nnunet/make_cpu_reference.py tests/data/nnunet/tinyct <cpu-tag>
"""
import gzip, io, sys, numpy as np, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
torch.set_num_threads(2)
root = sys.argv[1]; tag = sys.argv[2]
for run, folds in (("fold0", (0,)), ("folds01", (0, 1))):
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(f"{root}/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres", use_folds=folds, checkpoint_name="checkpoint_final.pth")
    for case in ("TinyCT_006", "TinyCT_007"):
        x = np.load(io.BytesIO(gzip.open(f"{root}/reference/{case}_preprocessed_f32.npy.gz").read()))
        want = np.load(io.BytesIO(gzip.open(f"{root}/reference/{run}/intermediates/{case}_logits_f16.npy.gz").read()))
        y = p.predict_logits_from_preprocessed_data(torch.from_numpy(x)).cpu().numpy()
        d = int((y.view(np.uint16) != want.astype(np.float16).view(np.uint16)).sum())
        print(run, case, "differ from stored:", d, flush=True)
        if d:
            buf = io.BytesIO(); np.save(buf, y)
            with open(f"{root}/reference/{run}/intermediates/{case}_logits_f16.{tag}.npy.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(buf.getvalue())
