#!/usr/bin/env python3
"""Make the small nnU-Net parity fixtures under tests/data/nnunet/cases/ and tables/.

Everything written here comes out of stock nnunetv2 2.8.1 code (and the numpy / scipy /
scikit-image / torch it runs on); nothing is computed by evald. Run from anywhere:

    python3 -m venv /tmp/nnenv && /tmp/nnenv/bin/pip install nnunetv2==2.8.1
    /tmp/nnenv/bin/python tests/data/nnunet/make_fixtures.py

Per case (cases/<name>/):
  image.nii.gz          int16 image written with SimpleITK (spacing, origin, direction)
  model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres/{plans.json,dataset.json}
                        the tinyct plans with the case's settings (transpose, target spacing,
                        normalisation, resampling kwargs, labels or regions)
  preprocessed_f32.npy.gz  DefaultPreprocessor.run_case_npy(...) data, [1, z', y', x'] float32,
                        on the image as nnU-Net's SimpleITKIO.read_images returns it
  properties.json       the case properties run_case_npy left (spacing, bbox, shapes)
  logits_f16.npy.gz     synthetic float16 logits on the preprocessed grid (seeded; with exact
                        ties between channels 0 and 1 in a block, exact zeros, fp16 subnormals)
  seg_u8.npy.gz         convert_predicted_logits_to_segmentation_with_correct_shape(logits)
                        on the input grid, [z, y, x] uint8

tables/:
  f64_values.npy.gz, f64_to_f16.npy.gz   numpy's float64 -> float16 casts (round to nearest
                        even, directly from float64) of float16 values, the midpoints to their
                        upper neighbours and one float64 ulp either side (subnormals, around
                        0.125 and below the overflow at 65520, and random ones), and random values
  sigmoid_gt_half_u8.npy.gz   for every float16 bit pattern b: torch.sigmoid(half(b).float()) > 0.5
  numpy_view_stats.json       numpy's float32 sum, mean and std (as float32 bits) of transposed,
                        cropped views of formula-made arrays (see tables())
"""

import copy
import gzip
import json
import os
import shutil
import sys

import numpy as np
import SimpleITK as sitk
import torch

import nnunetv2
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tinyct", "model", "nnUNetTrainer__nnUNetPlansTiny__3d_fullres")
CASES = os.path.join(HERE, "cases")
TABLES = os.path.join(HERE, "tables")
FOLDER = "nnUNetTrainer__nnUNetPlansTiny__{}"


def save_npy_gz(path, arr):
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        np.save(f, np.ascontiguousarray(arr))


def body(shape, rng, border, holes=True):
    """A CT-like int16 image: air, a soft-tissue ellipsoid with an organ and a bright spot,
    a zero border of `border` = ((z0, z1), (y0, y1), (x0, x1)) voxels, and exact zeros inside
    (an enclosed hole, which binary_fill_holes fills, and a few scattered zero voxels)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    img = np.full(shape, -900.0)
    img[r < 0.95] = 40.0
    img[(z - 0.2) ** 2 + (y + 0.1) ** 2 + (x - 0.3) ** 2 < 0.12] = 150.0
    img[(z + 0.3) ** 2 + (y - 0.3) ** 2 + (x + 0.2) ** 2 < 0.02] = 260.0
    img += rng.normal(0, 25, shape)
    img = np.round(img)
    if holes:
        c = [s // 2 for s in shape]
        img[c[0], c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = 0  # enclosed: filled by fill_holes
        idx = rng.integers(0, np.array(shape)[:, None], size=(3, 6))
        img[tuple(idx)] = 0
    (z0, z1), (y0, y1), (x0, x1) = border
    img[:z0] = 0
    img[shape[0] - z1:] = 0
    img[:, :y0] = 0
    img[:, shape[1] - y1:] = 0
    img[:, :, :x0] = 0
    img[:, :, shape[2] - x1:] = 0
    return img.astype(np.int16)


def logits_for(shape, k, rng, regions):
    """Smooth random fields plus noise, as float16; channels 0 and 1 equal in one block (exact
    ties for argmax's first-max rule), some exact zeros and float16 subnormals."""
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    out = []
    for c in range(k):
        a, b, d = rng.uniform(1, 4, 3)
        f = np.sin(a * 3 * grids[0] + c) * np.cos(b * 3 * grids[1] - c) + np.sin(d * 3 * grids[2])
        f = f * (3 if regions else 4) + rng.normal(0, 0.3, shape) - (0.5 if regions else 0.0)
        out.append(f)
    lg = np.stack(out).astype(np.float16)
    s = [slice(0, max(1, n // 2)) for n in shape]
    lg[(1, *s)] = lg[(0, *s)]
    flat = lg.reshape(k, -1)
    n = flat.shape[1]
    pick = rng.choice(n, size=min(n, 40), replace=False)
    tiny = np.array([0.0, -0.0, 6e-8, -6e-8, 1.2e-7, 2.4e-7, 1e-5, -1e-5], dtype=np.float16)
    for i, p in enumerate(pick):
        flat[i % k, p] = tiny[i % len(tiny)]
    return lg


def tiny_plans():
    with open(os.path.join(TINY, "plans.json")) as f:
        return json.load(f)


def tiny_dataset():
    with open(os.path.join(TINY, "dataset.json")) as f:
        return json.load(f)


def make_case(name, shape, spacing_zyx, direction, target, transpose=(0, 1, 2), norm="CTNormalization",
              mask=False, data_kw=None, prob_kw=None, regions=None, border=((0, 0),) * 3, holes=True,
              zero=False, seed=0, config="3d_fullres"):
    rng = np.random.default_rng(seed)
    d = os.path.join(CASES, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    mdir = os.path.join(d, "model", FOLDER.format(config))
    os.makedirs(mdir)

    img = np.zeros(shape, np.int16) if zero else body(shape, rng, border, holes)
    im = sitk.GetImageFromArray(img)
    im.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    im.SetOrigin((-12.5, 30.25, 7.0))
    im.SetDirection([float(v) for v in np.array(direction).ravel()])
    path = os.path.join(d, "image.nii.gz")
    sitk.WriteImage(im, path)

    plans = tiny_plans()
    plans["transpose_forward"] = list(transpose)
    plans["transpose_backward"] = [int(i) for i in np.argsort(transpose)]
    c = plans["configurations"][config]
    c["spacing"] = list(target)
    c["normalization_schemes"] = [norm]
    c["use_mask_for_norm"] = [mask]
    if data_kw:
        c["resampling_fn_data_kwargs"].update(data_kw)
    if prob_kw:
        c["resampling_fn_probabilities_kwargs"].update(prob_kw)
    for other in [k for k in plans["configurations"] if k != config]:
        del plans["configurations"][other]
    ds = tiny_dataset()
    if regions is not None:
        labels, order = regions
        ds["labels"] = labels
        ds["regions_class_order"] = order
    with open(os.path.join(mdir, "plans.json"), "w") as f:
        json.dump(plans, f, indent=1)
    with open(os.path.join(mdir, "dataset.json"), "w") as f:
        json.dump(ds, f, indent=1)

    pm = PlansManager(plans)
    cm = pm.get_configuration(config)
    lm = pm.get_label_manager(ds)
    data, props = SimpleITKIO().read_images([path])
    pre = DefaultPreprocessor(verbose=False)
    pdata, _, props = pre.run_case_npy(data, None, props, pm, cm, ds)
    assert pdata.dtype == np.float32, pdata.dtype
    save_npy_gz(os.path.join(d, "preprocessed_f32.npy.gz"), pdata)

    k = lm.num_segmentation_heads
    logits = logits_for(pdata.shape[1:], k, rng, regions is not None)
    save_npy_gz(os.path.join(d, "logits_f16.npy.gz"), logits)
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits.copy()), pm, cm, lm, copy.deepcopy(props), num_threads_torch=1)
    seg = np.asarray(seg)
    assert seg.dtype == np.uint8 and seg.shape == data.shape[1:], (seg.dtype, seg.shape)
    save_npy_gz(os.path.join(d, "seg_u8.npy.gz"), seg)

    keep = {k_: props[k_] for k_ in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                                      "shape_after_cropping_and_before_resampling")}
    keep = json.loads(json.dumps(keep, default=lambda o: o.tolist() if hasattr(o, "tolist") else int(o)))
    keep["preprocessed_shape"] = list(pdata.shape[1:])
    with open(os.path.join(d, "properties.json"), "w") as f:
        json.dump(keep, f, indent=1)
    print(f"{name}: {shape} -> crop {keep['shape_after_cropping_and_before_resampling']} -> "
          f"{keep['preprocessed_shape']}, labels {np.unique(seg).tolist()}")


def tables():
    os.makedirs(TABLES, exist_ok=True)
    rng = np.random.default_rng(7)
    # All float16 values and the midpoints between neighbours, nudged by one float64 ulp
    # either way (where float64 -> float32 -> float16 double rounding and truncating
    # converters go wrong), plus random values over the whole range.
    bits = np.concatenate([np.arange(0, 256), np.arange(0x3000, 0x3100), np.arange(0x7B00, 0x7C00),
                           rng.integers(0, 0x7BFF, 1500)]).astype(np.uint16)
    h = bits.view(np.float16).astype(np.float64)
    nxt = (bits + 1).view(np.float16).astype(np.float64)
    mid = (h + nxt) / 2
    vals = np.concatenate([h, mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf),
                           [65504.0, 65519.99, 65520.0, 65536.0, 1e10, np.inf, 1e-300, 5e-324, 0.0],
                           rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 5, 3000)])
    vals = np.concatenate([vals, -vals])
    save_npy_gz(os.path.join(TABLES, "f64_values.npy.gz"), vals.astype(np.float64))
    save_npy_gz(os.path.join(TABLES, "f64_to_f16.npy.gz"), vals.astype(np.float16))
    allh = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.float16).copy())
    gt = (torch.sigmoid(allh.float()) > 0.5).numpy().astype(np.uint8)
    save_npy_gz(os.path.join(TABLES, "sigmoid_gt_half_u8.npy.gz"), gt)
    # numpy's float32 sum / mean / std of transposed, cropped views (what ZScoreNormalization
    # computes without a mask), over arrays made by a formula both sides can evaluate:
    # x[i] = float32(((i * 2654435761) mod 2**32) / 2**20 - 2048), i the C-order index.
    views = []
    for shape, perm, box in [
        ((20, 30, 40), (2, 0, 1), ((1, 19), (0, 30), (2, 38))),
        ((20, 30, 40), (0, 1, 2), ((0, 20), (1, 29), (0, 40))),
        ((2, 3, 4500), (1, 2, 0), ((0, 2), (0, 3), (200, 4400))),
        ((10, 30, 40), (0, 1, 2), ((0, 10), (0, 30), (0, 40))),
        ((1, 50, 200), (2, 1, 0), ((0, 1), (3, 47), (0, 200))),
        ((30, 1, 300), (0, 2, 1), ((2, 28), (0, 1), (10, 290))),
        ((40, 50, 6), (1, 0, 2), ((0, 40), (0, 50), (1, 5))),
        ((40, 60, 50), (2, 1, 0), ((3, 37), (5, 55), (4, 46))),
        ((7, 5, 3), (0, 1, 2), ((1, 6), (0, 5), (1, 2))),
    ]:
        i = np.arange(int(np.prod(shape)), dtype=np.uint64)
        x = (((i * np.uint64(2654435761)) % np.uint64(2 ** 32)).astype(np.float64) / 2 ** 20 - 2048)
        d = x.astype(np.float32).reshape((1, *shape))
        dt = d.transpose([0, *[p + 1 for p in perm]])
        v = dt[(0, *[slice(*box[p]) for p in perm])]
        bits = lambda f: int(np.float32(f).view(np.uint32))
        views.append({"shape": list(shape), "perm": list(perm), "box": [list(b) for b in box],
                      "sum": bits(v.sum()), "mean": bits(v.mean()), "std": bits(v.std())})
    with open(os.path.join(TABLES, "numpy_view_stats.json"), "w") as f:
        json.dump(views, f, indent=1)


def main():
    print("nnunetv2", nnunetv2.__file__, "numpy", np.__version__, "torch", torch.__version__,
          "SimpleITK", sitk.Version_VersionString(), file=sys.stderr)
    torch.set_num_threads(1)
    eye = np.eye(3)
    flip = np.diag([-1.0, 1.0, -1.0])
    perm = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    # Real crop (asymmetric zero border), flipped direction, separate z (2.5 / 0.75 > 3), CT.
    make_case("crop_flip", (14, 30, 28), (2.5, 0.8, 0.75), flip, (2.0, 1.0, 0.6),
              border=((1, 2), (3, 0), (2, 4)), seed=1)
    # Near-isotropic: full 3D cubic; ZScore inside the hole-filled mask; transposed; permuted
    # direction.
    make_case("iso_zscore_mask_transposed", (16, 20, 18), (1.0, 0.9, 1.1), perm, (1.3, 0.8, 1.0),
              transpose=(2, 0, 1), norm="ZScoreNormalization", mask=True,
              border=((2, 1), (1, 3), (2, 2)), seed=2)
    # Low-resolution axis in the middle, moved first by transpose_forward; ZScore without a
    # mask; region-based labels.
    make_case("aniso_mid_regions", (20, 8, 22), (0.8, 3.5, 0.7), eye, (3.0, 0.75, 0.75),
              transpose=(1, 0, 2), norm="ZScoreNormalization",
              regions=({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3}, [1, 2, 3]),
              border=((0, 0), (1, 0), (0, 2)), seed=3)
    # Only the target spacing is anisotropic (separate axis 2, from the new spacing); z goes
    # 11 * 1.5 = 16.5 -> 16 (Python rounds half to even); CT with use_mask_for_norm (ignored).
    make_case("target_aniso_axis2", (11, 14, 10), (1.5, 1.0, 1.2), eye, (1.0, 1.1, 4.0), mask=True,
              seed=4)
    # Target spacing = image spacing: no resampling on either side, but a crop.
    make_case("same_shape", (9, 12, 11), (3.0, 1.0, 1.0), flip, (3.0, 1.0, 1.0),
              border=((1, 1), (2, 1), (0, 3)), seed=5)
    # One slice: 1 -> 2 slices (nearest along z), in-plane cubic on a 1-slice stack.
    make_case("one_slice", (1, 10, 9), (5.0, 1.0, 1.0), eye, (2.5, 1.25, 0.8), holes=False, seed=6)
    # Forced separate z with linear interpolation along z (order_z 1), linear in plane.
    make_case("forced_sep_order_z1", (10, 12, 12), (2.0, 1.0, 1.0), eye, (1.5, 0.9, 1.3),
              data_kw={"order": 1, "order_z": 1, "force_separate_z": True},
              prob_kw={"order": 1, "order_z": 1, "force_separate_z": True}, seed=7)
    # Anisotropic, but separate z forbidden: full 3D cubic and linear.
    make_case("forced_no_sep", (8, 14, 13), (3.5, 0.9, 0.9), eye, (2.5, 1.0, 0.8),
              data_kw={"force_separate_z": False}, prob_kw={"force_separate_z": False},
              norm="ZScoreNormalization", seed=8)
    # Separate z with the z spacing kept: only the in-plane resampling happens.
    make_case("same_z", (6, 16, 15), (3.0, 0.8, 0.8), flip, (3.0, 1.0, 0.7), seed=10)
    # The low-resolution axis in the middle, not transposed: separate axis 1.
    make_case("sep_axis1", (14, 6, 16), (0.8, 3.5, 0.7), eye, (0.75, 3.0, 0.75),
              border=((1, 0), (0, 1), (2, 0)), seed=11)
    # A 2d configuration: the target spacing has two entries; z keeps the image's.
    make_case("config_2d", (7, 18, 16), (2.5, 0.7, 0.9), eye, (0.8229, 0.8180), config="2d", seed=12)
    # All zero: the mask is empty (bbox = whole image, masked mean and std NaN).
    make_case("all_zero", (4, 6, 5), (1.0, 1.0, 1.0), eye, (0.8, 1.2, 1.0), norm="ZScoreNormalization",
              mask=True, zero=True, seed=9)
    tables()


if __name__ == "__main__":
    main()
