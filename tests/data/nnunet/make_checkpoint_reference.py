#!/usr/bin/env python3
"""Independent reference for evald's torch.save reader (src/infer/nnunet/checkpoint.rs).

torch reads the fixture's checkpoints itself (torch.load(weights_only=True), with only the
numpy globals this file holds allowed), and this writes what it read, per fold, to
tinyct/checkpoint_reference.json: trainer_name, init_args.configuration,
inference_allowed_mirroring_axes, and for every network_weights tensor its shape, the
sha256 of its values as contiguous little-endian float32, and its first and last values
(as float64 repr, exact for float32).

It also writes two tiny torch.save files of its own to checkpoints/: strided.pth, whose
weights are views (storage offsets, transposed and stepped strides, a storage shared by
two names, a scalar) with their values as torch reads them in strided.json, and half.pth,
whose one weight is float16 (evald refuses it by name).

Run from the repository root with torch 2.11.0 and numpy:
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.11.0 numpy
    /tmp/torchenv/bin/python tests/data/nnunet/make_checkpoint_reference.py
"""
import hashlib
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "tinyct", "model", "nnUNetTrainer__nnUNetPlansTiny__3d_fullres")
OUT = os.path.join(HERE, "tinyct", "checkpoint_reference.json")
SMALL = os.path.join(HERE, "checkpoints")


def small_files():
    os.makedirs(SMALL, exist_ok=True)
    base = torch.arange(40, dtype=torch.float32) * 0.25 - 3.0
    m = base[4:].reshape(6, 6)
    weights = {
        "contiguous": base[8:20].reshape(3, 4),
        "offset_transposed": m[1:, ::2].t(),
        "stepped": base[3::7],
        "alias_of_contiguous": base[8:20].reshape(3, 4),
        "scalar": base[5],
        "empty": base[0:0].reshape(0, 3),
    }
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": None}, os.path.join(SMALL, "strided.pth"))
    back = torch.load(os.path.join(SMALL, "strided.pth"), weights_only=True)["network_weights"]
    ref = {k: {"shape": list(t.shape), "values": t.reshape(-1).tolist()} for k, t in back.items()}
    with open(os.path.join(SMALL, "strided.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")
    torch.save({"network_weights": {"w": torch.ones(2, dtype=torch.float16)},
                "trainer_name": "nnUNetTrainer"}, os.path.join(SMALL, "half.pth"))


def main():
    safe = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float32DType]
    out = {"torch": torch.__version__, "folds": {}}
    for fold in sorted(d for d in os.listdir(MODEL) if d.startswith("fold_")):
        path = os.path.join(MODEL, fold, "checkpoint_final.pth")
        with torch.serialization.safe_globals(safe):
            ck = torch.load(path, map_location="cpu", weights_only=True)
        axes = ck.get("inference_allowed_mirroring_axes")
        weights = {}
        for name, t in ck["network_weights"].items():
            assert t.dtype == torch.float32, (name, t.dtype)
            a = t.detach().contiguous().numpy().astype("<f4")
            flat = a.reshape(-1)
            weights[name] = {
                "shape": list(a.shape),
                "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
                "first": float(flat[0]) if flat.size else None,
                "last": float(flat[-1]) if flat.size else None,
            }
        out["folds"][fold] = {
            "trainer_name": ck["trainer_name"],
            "configuration": ck["init_args"]["configuration"],
            "inference_allowed_mirroring_axes": None if axes is None else [int(x) for x in axes],
            "network_weights": weights,
        }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(OUT, {k: len(v["network_weights"]) for k, v in out["folds"].items()})
    small_files()


if __name__ == "__main__":
    main()
