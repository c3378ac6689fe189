#!/usr/bin/env python3
"""Independent references for evald's nnU-Net networks (src/infer/nnunet/network.rs) and
for the pieces of nnU-Net's sliding window that the tinyct fixture does not vary.

For each small network below (PlainConvUNet and ResidualEncoderUNet, 3D and 2D, built by
dynamic_network_architectures exactly as nnU-Net's get_network_from_plans does, deep
supervision off), with seeded random weights (norm scales and biases too, so that every
tensor matters), this writes to networks/<name>/:
  - checkpoint.pth: torch.save of {network_weights: state_dict (with its alias names),
    trainer_name, init_args: {configuration}, inference_allowed_mirroring_axes}, as
    nnU-Net's trainer saves it;
  - arch.json: the architecture keywords;
  - input_f32.npy, output_f32.npy: a seeded input and the network's output on CPU, with
    torch.inference_mode() as nnU-Net predicts.
And networks/sliding_window.json: nnU-Net's own compute_gaussian (fp16 bits as sha256 and
a few values) and compute_steps_for_sliding_window for a few sizes.

Run from the repository root with torch 2.11.0, numpy, scipy and the two nnU-Net packages
(pure Python; their heavy dependencies are not needed for these modules):
    /tmp/torchenv/bin/pip install torch==2.11.0 numpy scipy
    /tmp/torchenv/bin/pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils
    /tmp/torchenv/bin/python tests/data/nnunet/make_network_reference.py
"""
import hashlib
import json
import os

import numpy as np
import torch
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "networks")

NETS = {
    "plain3d": dict(
        kind="PlainConvUNet", features_per_stage=[4, 8, 12],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        n_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 1], conv_bias=True,
        input_channels=1, num_classes=3, input_shape=[8, 16, 12],
    ),
    "resenc3d": dict(
        kind="ResidualEncoderUNet", features_per_stage=[4, 8, 12],
        kernel_sizes=[[3, 3, 3], [3, 3, 3], [1, 3, 3]], strides=[[1, 1, 1], [2, 2, 2], [1, 2, 2]],
        n_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1], conv_bias=False,
        input_channels=1, num_classes=2, input_shape=[8, 16, 16],
    ),
    "plain2d": dict(
        kind="PlainConvUNet", features_per_stage=[4, 8, 12],
        kernel_sizes=[[3, 3], [3, 3], [3, 3]], strides=[[1, 1], [2, 2], [2, 1]],
        n_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], conv_bias=True,
        input_channels=1, num_classes=3, input_shape=[20, 12],
    ),
    "resenc2d": dict(
        kind="ResidualEncoderUNet", features_per_stage=[4, 8, 8],
        kernel_sizes=[[3, 3], [3, 3], [3, 3]], strides=[[1, 1], [2, 2], [2, 2]],
        n_per_stage=[1, 1, 2], n_conv_per_stage_decoder=[1, 1], conv_bias=True,
        input_channels=1, num_classes=4, input_shape=[16, 16],
    ),
}


def build(a):
    dims = len(a["kernel_sizes"][0])
    common = dict(
        input_channels=a["input_channels"], n_stages=len(a["features_per_stage"]),
        features_per_stage=a["features_per_stage"], conv_op=nn.Conv3d if dims == 3 else nn.Conv2d,
        kernel_sizes=a["kernel_sizes"], strides=a["strides"], num_classes=a["num_classes"],
        n_conv_per_stage_decoder=a["n_conv_per_stage_decoder"], conv_bias=a["conv_bias"],
        norm_op=nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False,
    )
    if a["kind"] == "PlainConvUNet":
        return PlainConvUNet(n_conv_per_stage=a["n_per_stage"], **common)
    return ResidualEncoderUNet(n_blocks_per_stage=a["n_per_stage"], **common)


def save_npy(path, arr):
    np.save(path, np.ascontiguousarray(arr.astype("<f4")))


def main():
    torch.set_num_threads(1)
    for seed, (name, a) in enumerate(NETS.items()):
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        torch.manual_seed(seed)
        net = build(a)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        net.eval()
        torch.save({
            "network_weights": net.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres" if len(a["kernel_sizes"][0]) == 3 else "2d"},
            "inference_allowed_mirroring_axes": tuple(range(len(a["kernel_sizes"][0]))),
        }, os.path.join(d, "checkpoint.pth"))
        x = torch.randn([1, a["input_channels"], *a["input_shape"]])
        with torch.inference_mode():
            y = net(x)
        save_npy(os.path.join(d, "input_f32.npy"), x[0].numpy())
        save_npy(os.path.join(d, "output_f32.npy"), y[0].numpy())
        with open(os.path.join(d, "arch.json"), "w") as f:
            json.dump(a, f, indent=1)
            f.write("\n")
        print(name, sum(p.numel() for p in net.parameters()), "parameters", tuple(y.shape))

    sw = {"gaussian": [], "steps": []}
    for patch in [[32, 64, 64], [20, 12], [8, 16, 12], [5, 7, 9], [1, 2, 3]]:
        g = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10,
                             device=torch.device("cpu"))
        bits = g.numpy().view("<u2")
        sw["gaussian"].append({
            "patch": patch,
            "sha256_f16_bits": hashlib.sha256(bits.tobytes()).hexdigest(),
            "first_bits": int(bits.reshape(-1)[0]),
            "centre_bits": int(bits[tuple(i // 2 for i in patch)]),
            "min_bits": int(bits.min()),
        })
    for image, patch in [((40, 100, 64), (32, 64, 64)), ((32, 64, 64), (32, 64, 64)),
                         ((33, 129, 200), (32, 64, 64)), ((17,), (16,)), ((1000,), (96,)),
                         ((113, 7), (64, 7))]:
        sw["steps"].append({"image": list(image), "patch": list(patch),
                            "steps": compute_steps_for_sliding_window(image, patch, 0.5)})
    with open(os.path.join(OUT, "sliding_window.json"), "w") as f:
        json.dump(sw, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
