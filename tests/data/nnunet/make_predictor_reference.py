#!/usr/bin/env python3
"""nnU-Net's own sliding-window logits for cases the tinyct fixture does not cover: a
ResidualEncoderUNet ensemble of 2 folds (3D, case smaller than the patch along x, several
tiles along z and y, mirroring over 3 axes) and a 2D PlainConvUNet run slice by slice
over a 3D case (the x axis padded, mirroring over 2 axes).

The networks are those of make_network_reference.py (networks/<name>/checkpoint.pth);
the second ResEnc fold's weights are the first's, perturbed with a seeded noise, saved as
networks/resenc3d/checkpoint_fold1.pth. nnunetv2 2.8.1's nnUNetPredictor (CPU,
tile_step_size 0.5, Gaussian, mirroring) predicts a seeded input with
predict_logits_from_preprocessed_data, and this writes networks/<name>/sw_input_f32.npy and
sw_logits_f16.npy.

Run from the repository root, after make_network_reference.py, with nnunetv2 installed:
    /tmp/torchenv/bin/pip install nnunetv2==2.8.1
    /tmp/torchenv/bin/python tests/data/nnunet/make_predictor_reference.py
"""
import json
import os

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import make_network_reference as nets

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "networks")

CASES = {
    # name: (patch, input shape [C, z, y, x], mirroring axes, folds)
    "resenc3d": ([8, 16, 16], [1, 11, 37, 13], (0, 1, 2), 2),
    "plain2d": ([20, 12], [1, 3, 45, 10], (0, 1), 1),
}


def main():
    for seed, (name, (patch, shape, axes, folds)) in enumerate(CASES.items()):
        d = os.path.join(OUT, name)
        with open(os.path.join(d, "arch.json")) as f:
            a = json.load(f)
        net = nets.build(a)
        ck = torch.load(os.path.join(d, "checkpoint.pth"), weights_only=True)
        params = [ck["network_weights"]]
        if folds == 2:
            g = torch.Generator().manual_seed(100 + seed)
            second = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params[0].items()}
            # Alias names share storage in a real state dict: keep them equal here too.
            net.load_state_dict(second)
            # (state_dict() returns the live parameters: detach copies, or loading fold 0
            # below would overwrite them.)
            second = {k: v.detach().clone() for k, v in net.state_dict().items()}
            torch.save({"network_weights": second, "trainer_name": "nnUNetTrainer",
                        "init_args": {"configuration": "3d_fullres"},
                        "inference_allowed_mirroring_axes": axes},
                       os.path.join(d, "checkpoint_fold1.pth"))
            params.append(second)
        net.load_state_dict(params[0])
        cfg = "3d_fullres" if len(patch) == 3 else "2d"
        arch = {"network_class_name": "dynamic_network_architectures.architectures.unet." + a["kind"],
                "arch_kwargs": {}, "_kw_requires_import": []}
        plans = {"plans_name": "ref",
                 "configurations": {cfg: {"patch_size": patch, "architecture": arch}}}
        pm = PlansManager(plans)
        labels = {"background": 0, **{f"c{i}": i for i in range(1, a["num_classes"])}}
        dataset_json = {"labels": labels, "channel_names": {"0": "CT"}}
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, allow_tqdm=False)
        predictor.manual_initialization(net, pm, pm.get_configuration(cfg), params, dataset_json,
                                        "nnUNetTrainer", axes)
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
        logits = predictor.predict_logits_from_preprocessed_data(x).cpu().numpy()
        assert logits.dtype == np.float16
        np.save(os.path.join(d, "sw_input_f32.npy"), x.numpy())
        np.save(os.path.join(d, "sw_logits_f16.npy"), logits)
        print(name, logits.shape, float(np.abs(logits.astype(np.float32)).max()))


if __name__ == "__main__":
    main()
