# Copied verbatim (below this header) from the project's shared bench folder
# (shared/bench/python_pipeline.py, 2026-11-27): the original-style Python pipeline evald
# replaces, used by scripts/bench-pipeline.sh as the baseline. Do not "improve" it: it is
# the reference being measured.
#!/usr/bin/env python3
"""Original-style Python evaluation pipeline (the system evald replaces), streaming per patient, on a GPU (or CPU).

The way the original system describes itself: a multiprocessing Pool(4); each worker owns the
TorchScript model on its device and processes whole patients: SimpleITK read, HU window
(level 40 / width 400 -> [0,1]), axial slices in batches through the model, argmax, empty the
CUDA cache; then Dice + IoU per patient and per slice and a voxel confusion matrix; the parent
collects and writes an Excel workbook with pandas/openpyxl.

Timings: total wall, and inside the workers the sum of pure model-forward seconds (synchronised),
so total / (forward_sum / workers) says how far the pipeline is from the forward-time floor.
"""
import argparse
import json
import os
import time
from multiprocessing import get_context

import numpy as np

LEVEL, WIDTH = 40.0, 400.0
_M = None
_DEV = None


def _init(model_path, device, threads):
    global _M, _DEV
    import torch
    if threads:
        torch.set_num_threads(threads)
    _DEV = torch.device(device)
    _M = torch.jit.load(model_path, map_location=_DEV).eval()


def _read(path):
    try:
        import SimpleITK as sitk
        im = sitk.ReadImage(path)
        return sitk.GetArrayFromImage(im)  # z, y, x
    except ImportError:
        import nibabel as nib
        return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


def _overlap(r, p):
    a, b = int(r.sum()), int(p.sum())
    i = int(np.logical_and(r, p).sum())
    if a == 0 and b == 0:
        return float("nan"), float("nan")
    return 2.0 * i / (a + b), i / (a + b - i)


def _case(args):
    import torch
    data, case, labels, batch = args
    t0 = time.perf_counter()
    img = _read(os.path.join(data, "imagesTs", case + "_0000.nii.gz"))
    t_read = time.perf_counter() - t0
    lo = LEVEL - WIDTH / 2
    v = np.clip((img.astype(np.float32) - lo) / WIDTH, 0.0, 1.0)[:, None]
    x = torch.from_numpy(np.ascontiguousarray(v))
    out = np.empty((v.shape[0],) + v.shape[2:], dtype=np.uint8)
    fwd = 0.0
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(_DEV, non_blocking=True)
            if _DEV.type == "cuda":
                torch.cuda.synchronize()
            tf = time.perf_counter()
            y = _M(xb).argmax(1).to(torch.uint8)
            if _DEV.type == "cuda":
                torch.cuda.synchronize()
            fwd += time.perf_counter() - tf
            out[i:i + batch] = y.cpu().numpy()
            del xb, y
    if _DEV.type == "cuda":
        torch.cuda.empty_cache()
    t1 = time.perf_counter()
    ref = _read(os.path.join(data, "labelsTs", case + ".nii.gz"))
    per_case, per_slice = [], []
    for l in labels:
        r, p = ref == l, out == l
        d, j = _overlap(r, p)
        per_case.append({"case": case, "label": l, "dice": d, "iou": j})
        for k in range(r.shape[0]):
            d, j = _overlap(r[k], p[k])
            per_slice.append({"case": case, "slice": k, "label": l, "dice": d, "iou": j})
    n = len(labels) + 1
    cm = np.bincount(ref.astype(np.int64).ravel() * n + out.astype(np.int64).ravel(), minlength=n * n).reshape(n, n)
    return case, per_case, per_slice, cm, {"read_s": t_read, "forward_s": fwd, "metrics_s": time.perf_counter() - t1,
                                           "total_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--labels", default="1,2")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    labels = [int(s) for s in a.labels.split(",")]
    os.makedirs(a.out, exist_ok=True)
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(os.path.join(a.data, "imagesTs"))
                   if f.endswith("_0000.nii.gz"))
    t0 = time.perf_counter()
    per_case, per_slice, stage = [], [], {}
    cm = None
    ctx = get_context("spawn")
    with ctx.Pool(a.workers, initializer=_init, initargs=(a.model, a.device, a.threads)) as pool:
        for case, pc, ps, c, st in pool.imap_unordered(_case, [(a.data, c, labels, a.batch) for c in cases]):
            per_case += pc
            per_slice += ps
            cm = c if cm is None else cm + c
            stage[case] = st
    t_pool = time.perf_counter() - t0
    t1 = time.perf_counter()
    if not a.no_report:
        import pandas as pd
        with pd.ExcelWriter(os.path.join(a.out, "report.xlsx"), engine="openpyxl") as xw:
            pd.DataFrame(per_case).to_excel(xw, sheet_name="Summary", index=False)
            pd.DataFrame(per_slice).to_excel(xw, sheet_name="Per_Slice", index=False)
            pd.DataFrame(cm).to_excel(xw, sheet_name="Confusion_Matrix")
    t_rep = time.perf_counter() - t1
    total = time.perf_counter() - t0
    fwd = sum(s["forward_s"] for s in stage.values())
    res = {"cases": len(cases), "workers": a.workers, "device": a.device, "batch": a.batch,
           "total_s": round(total, 2), "pool_s": round(t_pool, 2), "report_s": round(t_rep, 2),
           "sum_read_s": round(sum(s["read_s"] for s in stage.values()), 2),
           "sum_forward_s": round(fwd, 2),
           "sum_metrics_s": round(sum(s["metrics_s"] for s in stage.values()), 2),
           "total_over_forward_floor": round(total / (fwd / a.workers), 2) if fwd else None,
           "mean_dice": {str(l): float(np.nanmean([r["dice"] for r in per_case if r["label"] == l])) for l in labels}}
    with open(os.path.join(a.out, "timings.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
