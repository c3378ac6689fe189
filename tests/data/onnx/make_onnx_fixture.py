#!/usr/bin/env python3
"""ONNX fixtures and PyTorch references for evald's ONNX runtime (tests/it/onnx_peer.rs).

Run once, in a throwaway venv, and commit what it writes next to this file; the tests read
the stored files and need neither Python nor ../shared:

    python3 -m venv /tmp/onnxfix
    /tmp/onnxfix/bin/pip install torch==2.11.0 onnx onnxscript numpy nibabel monai==1.6.1 onnxruntime==1.32.0
    /tmp/onnxfix/bin/python tests/data/onnx/make_onnx_fixture.py

The models are exported the way a vendor is told to (README, "ONNX"):
`torch.onnx.export(model, (x,), "model.onnx", dynamo=True, dynamic_shapes=...)`, from the
same PyTorch modules the TorchScript tests use, so "the torch model it was exported from"
is a model whose outputs the repository already checks:

- unet2d.onnx: the trained 2D U-Net of tests/data/models/unet2d.pt (3 poolings: H and W
  multiples of 8), rebuilt as an nn.Module from the TorchScript file's own weights (this
  script asserts both compute the same logits); dynamic batch, H = 8h, W = 8w.
- seg3d.onnx: Seg3d of tests/data/infer/make_infer_reference.py (the module whose
  TorchScript is tests/data/infer/seg3d.pt; asserted equal); dynamic batch, D, H, W.
- seg3d_labels.onnx: the same, returning argmax labels (int64, [B, D, H, W]).
- seg3d_fixed.onnx: Seg3d exported WITHOUT dynamic shapes: input fixed to [1, 1, 4, 16, 16]
  (evald must refuse it at load for another batch or patch).
- tiny2d_fixed.onnx: a one-convolution 2D model fixed to [2, 1, 40, 48] (the test CT's 36 x 44
  slices padded to multiples of 8): runs with batch 2 and pad_multiple 8, any other slice
  frame is one clear error.
- hostile models (tiny, 2D, dynamic): two_inputs.onnx, two_outputs.onnx, nan.onnx (NaN
  where the input is above 0.5), shrink.onnx (output at half the input's H and W).

References (PyTorch's own outputs, little-endian float32 / uint8, C order, described in
reference.json):

- torch2d.logits.f32 [6, 3, 40, 48]: tests/data/models/unet2d.pt (the TorchScript file
  itself) on the 6 axial slices of tests/data/infer/ct.nii.gz, windowed L40/W400 and padded
  at the bottom/right to 40 x 48 as evald's slices2d does, in one forward.
- torch3d_whole.logits.f32 [1, 3, 6, 36, 44]: tests/data/infer/seg3d.pt on the whole windowed
  volume (evald's volume3d with patch = the volume: one window).
- e2e/labels/ct.nii.gz: the labels of torch2d (argmax, cropped to 36 x 44) as a NIfTI label
  map on the CT's grid: the reference of the end-to-end test, where the ONNX submission must
  score Dice 1 against its own torch model.

Label references for the sliding window are the ones tests/data/infer already holds
(torch3d_whole, monai_evald_map), made by PyTorch/MONAI from seg3d.pt.
"""
import importlib.util
import json
import os
import platform
import sys

import nibabel as nib
import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..")
SEED = 20261201

# The conventions and Seg3d come from the script that made tests/data/infer, so both sets
# of references agree by construction.
_spec = importlib.util.spec_from_file_location("ref", os.path.join(DATA, "infer", "make_infer_reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def block(cin, cout):
    return torch.nn.Sequential(
        torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(cout),
        torch.nn.ReLU(),
        torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(cout),
        torch.nn.ReLU(),
    )


class UNet2D(torch.nn.Module):
    """The architecture of tests/data/models/unet2d.pt, read off its TorchScript code
    (`model.code`): base 8, 3 max-poolings, transposed-convolution upsampling, concat skips."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.e0, self.e1, self.e2 = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.bott = block(4 * c, 8 * c)
        self.u2 = torch.nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.d2 = block(8 * c, 4 * c)
        self.u1 = torch.nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.d1 = block(4 * c, 2 * c)
        self.u0 = torch.nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.d0 = block(2 * c, c)
        self.head = torch.nn.Conv2d(c, classes, 1)

    def forward(self, x):
        p = torch.nn.functional.max_pool2d
        e0 = self.e0(x)
        e1 = self.e1(p(e0, 2))
        e2 = self.e2(p(e1, 2))
        b = self.bott(p(e2, 2))
        d2 = self.d2(torch.cat([self.u2(b), e2], 1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
        d0 = self.d0(torch.cat([self.u0(d1), e0], 1))
        return self.head(d0)


class Labels(torch.nn.Module):
    """A model that returns labels: argmax over the classes of `inner`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.argmax(self.inner(x), 1)


class Tiny2d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return torch.cat([x, y, x - y], 1)


class TwoOutputs(Tiny2d):
    def forward(self, x):
        y = self.conv(x)
        return y, y[:, :1]


class NanOut(Tiny2d):
    def forward(self, x):
        y = self.conv(x)
        # NaN where the windowed input is bright: a broken model, not a broken file.
        return torch.where(x > 0.5, torch.full_like(y, float("nan")), y)


class Shrink(Tiny2d):
    def forward(self, x):
        return torch.nn.functional.max_pool2d(self.conv(x), 2)


def export(model, example, name, dynamic_shapes=None):
    path = os.path.join(HERE, name)
    names = [f"x{i}" if len(example) > 1 else "image" for i in range(len(example))]
    prog = torch.onnx.export(
        model,
        example,
        path,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=names,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    assert prog is not None
    m = onnx.load(path)
    onnx.checker.check_model(m)
    # Weights inside the file (one file per submission), nothing beside it.
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    shapes = []
    for i in m.graph.input:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        shapes.append({"name": i.name, "dims": dims, "elem_type": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)})
    outs = []
    for o in m.graph.output:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in o.type.tensor_type.shape.dim]
        outs.append({"name": o.name, "dims": dims, "elem_type": onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type)})
    return {"file": name, "bytes": os.path.getsize(path), "opset": m.opset_import[0].version, "inputs": shapes, "outputs": outs}


def ort_run(name, x):
    """Python's onnxruntime on the exported file: a sanity check of the export here (the
    tests check evald's runtime against PyTorch, not against this)."""
    s = onnxruntime.InferenceSession(os.path.join(HERE, name), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def store(name, arr, meta, note):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    arr.tofile(os.path.join(HERE, name))
    meta[name] = {"shape": list(arr.shape), "note": note}


def write_labels_nifti(path, labels_zyx, like):
    """evald's NIfTI data order is [x, y, z] with x fastest, i.e. C-order [z, y, x]."""
    img = nib.Nifti1Image(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)).astype(np.uint8), like.affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.set_qform(like.affine, code=1)
    img.set_sform(like.affine, code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import gzip

    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
        g.write(img.to_bytes())


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ct = nib.load(os.path.join(DATA, "infer", "ct.nii.gz"))
    vol_zyx = ref.window(np.ascontiguousarray(np.asarray(ct.dataobj).transpose(2, 1, 0)))
    nz, ny, nx = vol_zyx.shape
    assert (nx, ny, nz) == (44, 36, 6), vol_zyx.shape
    models, arrays, stats = {}, {}, {}

    # --- 2D: the trained U-Net, rebuilt from the TorchScript file's weights.
    ts2d = torch.jit.load(os.path.join(DATA, "models", "unet2d.pt")).eval()
    u2 = UNet2D().eval()
    u2.load_state_dict(ts2d.state_dict(), strict=True)
    ph, pw = -(-ny // 8) * 8, -(-nx // 8) * 8
    x2 = np.zeros((nz, 1, ph, pw), np.float32)
    x2[:, 0, :ny, :nx] = vol_zyx
    with torch.no_grad():
        y_ts = ts2d(torch.from_numpy(x2)).numpy()
        y_nn = u2(torch.from_numpy(x2)).numpy()
    stats["unet2d_nn_vs_torchscript_max_abs"] = float(np.abs(y_ts - y_nn).max())
    assert stats["unet2d_nn_vs_torchscript_max_abs"] < 1e-6, stats
    b = torch.export.Dim("batch", min=1, max=4096)
    h8, w8 = torch.export.Dim("h8", min=1, max=128), torch.export.Dim("w8", min=1, max=128)
    models["unet2d"] = export(u2, (torch.from_numpy(x2[:4]),), "unet2d.onnx", {"x": {0: b, 2: 8 * h8, 3: 8 * w8}})
    store("torch2d.logits.f32", y_ts, arrays, "models/unet2d.pt (TorchScript) on the 6 windowed slices padded to 40 x 48, one forward")
    stats["unet2d_ort_python_vs_torch_max_abs"] = float(np.abs(ort_run("unet2d.onnx", x2) - y_ts).max())
    lab2 = np.argmax(y_ts[:, :, :ny, :nx], 1).astype(np.uint8)  # [z, y, x]
    # Same labels as the stored peer of tests/data/infer (same model, same input).
    peer = np.fromfile(os.path.join(DATA, "infer", "torch2d.labels.u8"), np.uint8).reshape(lab2.shape)
    assert (peer == lab2).all()
    s = np.sort(y_ts[:, :, :ny, :nx], 1)
    stats["torch2d_min_top2_gap"] = float((s[:, -1] - s[:, -2]).min())
    stats["torch2d_label_counts"] = np.bincount(lab2.ravel(), minlength=3).tolist()
    write_labels_nifti(os.path.join(HERE, "e2e", "labels", "ct.nii.gz"), lab2, ct)

    # --- 3D: Seg3d, the module behind tests/data/infer/seg3d.pt.
    seg = ref.Seg3d().eval()
    ts3d = torch.jit.load(os.path.join(DATA, "infer", "seg3d.pt")).eval()
    whole = torch.from_numpy(np.ascontiguousarray(vol_zyx))[None, None]
    with torch.no_grad():
        y3_ts = ts3d(whole).numpy()
        y3_nn = seg(whole).numpy()
    assert np.array_equal(y3_ts, y3_nn), "Seg3d differs from seg3d.pt"
    d3 = {"x": {0: b, 2: torch.export.Dim("d", min=1, max=1024), 3: torch.export.Dim("h", min=1, max=1024), 4: torch.export.Dim("w", min=1, max=1024)}}
    example3 = (torch.rand(2, 1, 4, 16, 16),)
    models["seg3d"] = export(seg, example3, "seg3d.onnx", d3)
    models["seg3d_labels"] = export(Labels(seg).eval(), example3, "seg3d_labels.onnx", d3)
    models["seg3d_fixed"] = export(seg, (torch.rand(1, 1, 4, 16, 16),), "seg3d_fixed.onnx", None)
    store("torch3d_whole.logits.f32", y3_ts, arrays, "tests/data/infer/seg3d.pt (TorchScript) on the whole windowed volume [1, 1, 6, 36, 44], one forward")
    stats["seg3d_ort_python_vs_torch_max_abs"] = float(np.abs(ort_run("seg3d.onnx", whole.numpy()) - y3_ts).max())

    # --- Small models for the refusals and the broken outputs.
    d2 = {"x": {0: b, 2: torch.export.Dim("h", min=1, max=4096), 3: torch.export.Dim("w", min=1, max=4096)}}
    ex2 = (torch.rand(2, 1, 40, 48),)
    models["tiny2d_fixed"] = export(Tiny2d().eval(), ex2, "tiny2d_fixed.onnx", None)
    models["two_inputs"] = export(TwoInputs().eval(), (ex2[0], ex2[0]), "two_inputs.onnx", {"x": d2["x"], "y": d2["x"]})
    models["two_outputs"] = export(TwoOutputs().eval(), ex2, "two_outputs.onnx", d2)
    models["nan"] = export(NanOut().eval(), ex2, "nan.onnx", d2)
    models["shrink"] = export(Shrink().eval(), ex2, "shrink.onnx", {"x": {0: b, 2: 2 * torch.export.Dim("h2", min=1, max=2048), 3: 2 * torch.export.Dim("w2", min=1, max=2048)}})
    assert np.isnan(ort_run("nan.onnx", x2[:2])).any()

    reference = {
        "made_by": "tests/data/onnx/make_onnx_fixture.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime_python_check": onnxruntime.__version__,
            "numpy": np.__version__,
            "nibabel": nib.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "image": "tests/data/infer/ct.nii.gz",
        "window": {"level": float(ref.LEVEL), "width": float(ref.WIDTH)},
        "models": models,
        "arrays": arrays,
        "stats": stats,
    }
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(reference, indent=1, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
