"""nnUNetPredictor (nnunetv2 2.8.1) on a test set, timed per stage, for scripts/bench-nnunet.sh.

Stages as evald times them, image already read: preprocessing (DefaultPreprocessor.run_case_npy:
crop, normalise, resample), network (predict_logits_from_preprocessed_data: sliding window, mirroring,
fold ensemble), export (convert_predicted_logits_to_segmentation_with_correct_shape). Prints one JSON
line per case, then one with the totals.

usage: nnunet_stages.py MODEL_FOLDER IMAGES_DIR THREADS DEVICE
"""
import glob
import json
import os
import sys
import time

import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def main():
    folder, images, threads, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(threads)
    dev = torch.device(device)
    folds = tuple(
        sorted(int(d.split("_")[1]) for d in os.listdir(folder) if d.startswith("fold_"))
    )
    p = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=dev.type == "cuda",
        device=dev,
        verbose=False,
        allow_tqdm=False,
    )
    t = time.perf_counter()
    p.initialize_from_trained_model_folder(folder, use_folds=folds, checkpoint_name="checkpoint_final.pth")
    load = time.perf_counter() - t
    pre_p = p.configuration_manager.preprocessor_class(verbose=False)
    totals = {"pre": 0.0, "network": 0.0, "export": 0.0}
    for img in sorted(glob.glob(os.path.join(images, "*_0000.nii.gz"))):
        data, props = SimpleITKIO().read_images([img])
        t0 = time.perf_counter()
        x, _, props = pre_p.run_case_npy(data, None, props, p.plans_manager, p.configuration_manager, p.dataset_json)
        t1 = time.perf_counter()
        logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(x)).cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, props, return_probabilities=False
        )
        t3 = time.perf_counter()
        case = {"case": os.path.basename(img), "pre": t1 - t0, "network": t2 - t1, "export": t3 - t2}
        for k in totals:
            totals[k] += case[k]
        print(json.dumps(case))
    print(json.dumps({"total": totals, "load": load}))


if __name__ == "__main__":
    main()
