#!/usr/bin/env python3
"""Peer references for evald's inference tests (tests/it/infer_peer.rs).

Run once, in a throwaway venv, and commit what it writes next to this file; the tests read
the stored files and need neither Python nor ../shared:

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install torch==2.11.0 monai==1.6.1 nibabel numpy
    /tmp/peer/bin/python tests/data/infer/make_infer_reference.py

What it writes (all arrays little-endian float32, C order, described in reference.json):

- ct.nii.gz: a small deterministic CT-like volume, 24 x 20 x 12 voxels (x, y, z), int16 HU,
  spacing 1 x 1 x 2 mm: air, a body ellipse with a fat rim, soft tissue, a bright
  "thyroid" ellipsoid with a hypodense "nodule" inside, and a bone disk, plus seeded noise.
- torch2d_logits.f32 [Z, 3, Y, X]: PyTorch's own output of models/unet2d.pt on the axial
  slices, preprocessed as evald does for `slices2d`.
- torch3d_whole_logits.f32 [2, Z, Y, X]: models/unet3d_random.pt on the whole volume in one
  forward (evald's `volume3d` with patch = the volume: one window, so the blending cannot
  change the argmax).
- torch3d_padded_logits.f32 [2, Z, Y, X]: the same model with a patch larger than the volume:
  the windowed volume padded with 0 at the END of each axis (evald's convention), one
  forward, cropped back.
- torch3d_sliding.f32 [2, Z, Y, X]: evald's sliding-window algorithm re-implemented here in
  plain PyTorch (window starts, batch order, Gaussian importance map, sum(w*y)/sum(w)).
- monai_evald_map.f32 [2, Z, Y, X]: MONAI's sliding_window_inference on the same input, same
  roi size / overlap / sw_batch_size, given evald's importance map as roi_weight_map.
- monai_default.f32 [2, Z, Y, X]: MONAI's sliding_window_inference(mode="gaussian",
  sigma_scale=0.125) with its own importance map.

evald's conventions, reproduced from src/infer/mod.rs and src/infer/sliding.rs (now src/infer/tiling.rs):

- HU window: v -> clip((v - (level - width/2)) / width, 0, 1), in float32, level 40, width 400.
- NIfTI data [x, y, z] (x fastest) is a C-order [z, y, x] array: a 2D slice is [H=Y, W=X],
  the volume [D=Z, H=Y, W=X].
- slices2d: batches of `batch_size` consecutive z slices, [B, 1, H, W], H and W padded with 0
  (after windowing) at the bottom/right up to a multiple of `pad_multiple`, output cropped.
- volume3d: volume padded with 0 at the end to at least one patch per axis; window starts
  0, s, 2s, ... with s = max(1, floor(patch * (1 - overlap))), the last moved back to end at
  the border; windows ordered D, H, W (W fastest), `batch_size` windows per forward
  [n, 1, D, H, W]; importance map = separable Gaussian with sigma = patch / 8 centred at
  (patch - 1) / 2, computed in float64, normalised to max 1, floored at its smallest positive
  value, cast to float32; blended as sum(w * y) (evald skips the division by sum(w), which
  does not change the argmax; the stored arrays here are divided).

Known differences from MONAI by design (documented in tests/data/PROVENANCE.md):

- MONAI clamps its Gaussian importance map at max(min(map), 1e-3); evald floors at the map's
  smallest positive value (nnU-Net's rule), i.e. keeps the tiny corner weights. So evald is
  compared with MONAI given evald's map (roi_weight_map), and its difference from MONAI's
  default map is counted (reference.json `monai_default_vs_evald_map_label_diffs`).
- A volume smaller than the patch: MONAI pads symmetrically, evald at the end of each axis.
  MONAI cannot be configured otherwise, so the padded case is compared with plain PyTorch on
  the end-padded volume; MONAI's symmetric result differs (`monai_symmetric_pad_label_diffs`).
"""
import gzip
import json
import os
import platform

import nibabel as nib
import numpy as np
import torch

import monai
from monai.inferers import sliding_window_inference

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")

DIMS = (44, 36, 6)  # x, y, z
SPACING = (0.7, 0.7, 1.5)
SEED = 20261201
LEVEL, WIDTH = np.float32(40.0), np.float32(400.0)
BATCH = 4
PAD_MULTIPLE = 8
OVERLAP = 0.5
PATCH_SLIDING = (4, 16, 16)  # D, H, W
PATCH_WHOLE = (6, 36, 44)
PATCH_PADDED = (8, 40, 44)


def make_ct():
    """A crop of a neck-like slab: soft tissue, an air trachea, a bright thyroid lobe with a
    hypodense nodule (both changing along z), bone, an air margin, seeded noise."""
    nx, ny, nz = DIMS
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    x, y, z = (a.astype(np.float64) for a in (x, y, z))

    def e(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    hu = np.full(DIMS, 40.0)
    hu[x >= nx - 3] = -1000.0  # air beside the body
    hu[(x >= nx - 6) & (x < nx - 3)] = -100.0  # fat rim
    hu[e(7.0, 12.0, 7.0, 8.0)] = -1000.0  # trachea
    grow = 1.0 + 0.08 * (z - 2.5)  # the lobe grows along z
    hu[((x - 27.0) / (11.0 * grow)) ** 2 + ((y - 18.0) / (13.0 * grow)) ** 2 <= 1.0] = 120.0
    hu[((x - 29.0 - 0.5 * z) / 4.0) ** 2 + ((y - 20.0) / 4.0) ** 2 + ((z - 3.0) / 2.5) ** 2 <= 1.0] = -20.0
    hu[e(9.0, 32.0, 6.0, 4.0)] = 900.0  # vertebra
    rng = np.random.default_rng(SEED)
    sigma = np.where(hu > -950.0, 12.0, 4.0)
    hu = hu + rng.normal(0.0, 1.0, DIMS) * sigma
    return np.round(hu).astype(np.int16)


class Seg3d(torch.nn.Module):
    """A small 3D "vendor model" (3 classes) whose labels follow the intensities, with
    zero-padded convolutions so that a voxel's scores depend on where its window lies."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.conv1 = torch.nn.Conv3d(1, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=True)
        t = 1.0 - ((s - 0.7) / 0.1125) ** 2
        n = 1.0 - ((s - 0.35) / 0.07) ** 2
        prior = torch.cat([torch.zeros_like(s), t, n], 1)
        return prior + 0.5 * self.conv2(torch.relu(self.conv1(x)))


def write_nifti(path, data_xyz):
    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])
    img = nib.Nifti1Image(data_xyz, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    # mtime=0: the same bytes on every run.
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
        g.write(raw)


def window(v):
    v = v.astype(np.float32)
    return np.clip((v - (LEVEL - WIDTH / np.float32(2.0))) / WIDTH, np.float32(0.0), np.float32(1.0))


def infer_2d(model, vol_zyx):
    nz, ny, nx = vol_zyx.shape
    m = PAD_MULTIPLE
    ph, pw = -(-ny // m) * m, -(-nx // m) * m
    out = []
    for z0 in range(0, nz, BATCH):
        b = min(BATCH, nz - z0)
        buf = np.zeros((b, 1, ph, pw), np.float32)
        buf[:, 0, :ny, :nx] = vol_zyx[z0 : z0 + b]
        with torch.no_grad():
            y = model(torch.from_numpy(buf))
        out.append(y[:, :, :ny, :nx].numpy())
    return np.concatenate(out, 0)  # [Z, C, Y, X]


def starts(size, patch, overlap):
    if size <= patch:
        return [0]
    step = max(1, int(np.floor(patch * (1.0 - overlap))))
    out = []
    s = 0
    while s + patch < size:
        out.append(s)
        s += step
    out.append(size - patch)
    return sorted(set(out))


def evald_gaussian(patch):
    def axis(n):
        sigma = n / 8.0
        c = (n - 1.0) / 2.0
        i = np.arange(n, dtype=np.float64)
        return np.exp(-((i - c) ** 2) / (2.0 * sigma * sigma))

    a, b, c = (axis(n) for n in patch)
    w = a[:, None, None] * b[None, :, None] * c[None, None, :]
    min_pos = w[w > 0].min()
    return (np.maximum(w, min_pos) / w.max()).astype(np.float32)


def pad_end(vol_zyx, patch):
    size = vol_zyx.shape
    padded = tuple(max(s, p) for s, p in zip(size, patch))
    full = np.zeros(padded, np.float32)
    full[: size[0], : size[1], : size[2]] = vol_zyx
    return full


def infer_3d_evald(model, vol_zyx, patch):
    """evald's sliding window in plain PyTorch: returns sum(w*y)/sum(w) on the image grid."""
    size = vol_zyx.shape
    full = torch.from_numpy(pad_end(vol_zyx, patch))
    padded = full.shape
    w = torch.from_numpy(evald_gaussian(patch))
    wins = [
        (a, b, c)
        for a in starts(padded[0], patch[0], OVERLAP)
        for b in starts(padded[1], patch[1], OVERLAP)
        for c in starts(padded[2], patch[2], OVERLAP)
    ]
    acc = None
    cnt = torch.zeros(padded)
    for i in range(0, len(wins), BATCH):
        chunk = wins[i : i + BATCH]
        x = torch.stack(
            [full[a : a + patch[0], b : b + patch[1], c : c + patch[2]] for a, b, c in chunk], 0
        ).unsqueeze(1)
        with torch.no_grad():
            y = model(x).float()
        if acc is None:
            acc = torch.zeros((y.shape[1],) + tuple(padded))
        for j, (a, b, c) in enumerate(chunk):
            acc[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] += y[j] * w
            cnt[a : a + patch[0], b : b + patch[1], c : c + patch[2]] += w
    out = (acc / cnt)[:, : size[0], : size[1], : size[2]]
    return out.numpy(), len(wins)


def forward_whole(model, vol_zyx, patch):
    size = vol_zyx.shape
    x = torch.from_numpy(pad_end(vol_zyx, patch))[None, None]
    with torch.no_grad():
        y = model(x)[0]
    return y[:, : size[0], : size[1], : size[2]].numpy()


def monai_sw(model, vol_zyx, patch, weight_map=None, mode="gaussian"):
    x = torch.from_numpy(np.ascontiguousarray(vol_zyx))[None, None]
    kw = {}
    if weight_map is not None:
        kw["roi_weight_map"] = torch.from_numpy(weight_map)
    with torch.no_grad():
        y = sliding_window_inference(
            x,
            roi_size=patch,
            sw_batch_size=BATCH,
            predictor=model,
            overlap=OVERLAP,
            mode=mode,
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
            **kw,
        )
    return y[0].numpy()


def labels_of(scores, axis):
    return np.argmax(scores, axis=axis).astype(np.uint8)


def top2_gap(scores, axis):
    s = np.sort(scores, axis=axis)
    return np.take(s, -1, axis=axis) - np.take(s, -2, axis=axis)


def save(name, scores, axis, meta, note):
    """Store PyTorch's/MONAI's argmax labels (u8) and top-2 score gap (f32) on the
    [Z, Y, X] image grid: what evald's label maps are compared with."""
    lab = labels_of(scores, axis)
    gap = np.ascontiguousarray(top2_gap(scores, axis), dtype="<f4")
    assert lab.shape == DIMS[::-1], lab.shape
    lab.tofile(os.path.join(HERE, name + ".labels.u8"))
    gap.tofile(os.path.join(HERE, name + ".gap.f32"))
    meta[name] = {
        "labels": name + ".labels.u8",
        "gap": name + ".gap.f32",
        "shape_zyx": list(lab.shape),
        "classes": int(scores.shape[axis]),
        "label_counts": np.bincount(lab.ravel(), minlength=int(scores.shape[axis])).tolist(),
        "min_gap": float(gap.min()),
        "voxels_gap_below_1e-5": int((gap < 1e-5).sum()),
        "note": note,
    }
    return lab


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ct_xyz = make_ct()
    write_nifti(os.path.join(HERE, "ct.nii.gz"), ct_xyz)
    # Read it back as evald will, so the reference is computed from the stored file.
    back = np.asarray(nib.load(os.path.join(HERE, "ct.nii.gz")).dataobj)
    assert back.dtype == np.int16 and (back == ct_xyz).all()
    vol_zyx = window(np.ascontiguousarray(back.transpose(2, 1, 0)))

    m2 = torch.jit.load(os.path.join(MODELS, "unet2d.pt")).eval()
    # torch.jit.save writes a random serialization id, so a saved model's bytes change on
    # every run: keep the committed seg3d.pt when it computes what Seg3d computes.
    seg3d = torch.jit.script(Seg3d().eval())
    path3 = os.path.join(HERE, "seg3d.pt")
    if os.path.exists(path3):
        probe = torch.from_numpy(vol_zyx)[None, None]
        with torch.no_grad():
            same = torch.equal(torch.jit.load(path3)(probe), seg3d(probe))
        assert same, "seg3d.pt differs from Seg3d: delete it to write a new one"
    else:
        seg3d.save(path3)
    m3 = torch.jit.load(path3).eval()
    # The random 3D U-Net of models/ is useless for label comparisons: for any input its
    # channel-1 minus channel-0 logit stays within about [-0.34, -0.31], so every label is 0.
    u3 = torch.jit.load(os.path.join(MODELS, "unet3d_random.pt")).eval()
    with torch.no_grad():
        d = u3(torch.from_numpy(pad_end(vol_zyx, (8, 40, 48)))[None, None])
    unet3d_fg = int((d[0, 1] > d[0, 0]).sum())

    arrays = {}
    stats = {"unet3d_random_foreground_voxels": unet3d_fg}
    l2 = infer_2d(m2, vol_zyx)
    save("torch2d", l2, 1, arrays, "models/unet2d.pt, slices2d, batch 4, pad_multiple 8, plain PyTorch")
    whole = forward_whole(m3, vol_zyx, PATCH_WHOLE)
    save("torch3d_whole", whole, 0, arrays, f"seg3d.pt, volume3d with patch {PATCH_WHOLE} = the volume: one forward, plain PyTorch")
    padded = forward_whole(m3, vol_zyx, PATCH_PADDED)
    lp = save("torch3d_padded", padded, 0, arrays, f"seg3d.pt, patch {PATCH_PADDED}: end-padded with 0, one forward, cropped, plain PyTorch")
    own, n_win = infer_3d_evald(m3, vol_zyx, PATCH_SLIDING)
    emap = evald_gaussian(PATCH_SLIDING)
    mon = monai_sw(m3, vol_zyx, PATCH_SLIDING, weight_map=emap)
    lm = save("monai_evald_map", mon, 0, arrays, f"seg3d.pt, MONAI sliding_window_inference, roi {PATCH_SLIDING}, overlap {OVERLAP}, sw_batch_size {BATCH}, roi_weight_map = evald's importance map")
    mdef = monai_sw(m3, vol_zyx, PATCH_SLIDING)
    ld = save("monai_default", mdef, 0, arrays, f"seg3d.pt, MONAI sliding_window_inference(mode='gaussian', sigma_scale=0.125), roi {PATCH_SLIDING}, overlap {OVERLAP}: MONAI's own map, clamped at 1e-3")
    mconst = monai_sw(m3, vol_zyx, PATCH_SLIDING, mode="constant")
    msym = monai_sw(m3, vol_zyx, PATCH_PADDED)

    stats["windows_sliding"] = n_win
    stats["evald_map_min"] = float(emap.min())
    stats["own_torch_vs_monai_evald_map_label_diffs"] = int((labels_of(own, 0) != lm).sum())
    stats["own_torch_vs_monai_evald_map_max_abs"] = float(np.abs(own - mon).max())
    stats["monai_default_vs_evald_map_label_diffs"] = int((ld != lm).sum())
    stats["monai_default_vs_evald_map_max_abs"] = float(np.abs(mdef - mon).max())
    stats["monai_constant_vs_evald_map_label_diffs"] = int((labels_of(mconst, 0) != lm).sum())
    stats["monai_symmetric_pad_vs_end_pad_label_diffs"] = int((labels_of(msym, 0) != lp).sum())
    stats["whole_vs_sliding_label_diffs"] = int((labels_of(whole, 0) != lm).sum())

    ref = {
        "made_by": "tests/data/infer/make_infer_reference.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            "nibabel": nib.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "image": {"file": "ct.nii.gz", "dims_xyz": list(DIMS), "spacing_mm": list(SPACING), "seed": SEED},
        "spec": {
            "window": {"level": float(LEVEL), "width": float(WIDTH)},
            "batch_size": BATCH,
            "pad_multiple": PAD_MULTIPLE,
            "overlap": OVERLAP,
            "patch_sliding": list(PATCH_SLIDING),
            "patch_whole": list(PATCH_WHOLE),
            "patch_padded": list(PATCH_PADDED),
        },
        "arrays": arrays,
        "stats": stats,
    }
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(ref, indent=1, sort_keys=True))
    assert stats["own_torch_vs_monai_evald_map_label_diffs"] == 0, stats


if __name__ == "__main__":
    main()
