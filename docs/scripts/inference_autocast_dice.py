"""docs/guide/inference.md: what autocast (the plan's one opt-in that changes values) does to a segmentation, and that the
plan's other settings do not change it.

The brain-tissue bundle's inference (its preprocessing, its UNet with the weights given, its inferer's 48^3
windows at overlap 0.5, gaussian blending, softmax, argmax) on every volume of its embedded dataset (6 labelled,
2 test), run three ways on the CPU: MONAI's defaults in fp32 (``sw_batch_size=1``), other settings a plan can
choose in fp32 (``sw_batch_size=4`` through buffers of one row, ``sw_batch_size=12``), and MONAI's defaults under
``torch.autocast`` (bf16 on the CPU). Per volume: the largest difference of the class probabilities from the fp32
defaults, the voxels whose label changes, the Dice of each tissue class (1 CSF, 2 grey matter, 3 white matter)
between the two label maps, and, where a label exists, each run's mean Dice against it.

    python docs/scripts/inference_autocast_dice.py --weights models/model.pt
"""
import argparse
import json

import torch
from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist
from monai.inferers import sliding_window_inference
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation, Spacing

parser = argparse.ArgumentParser()
parser.add_argument("--weights", required=True)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--json", default="inference_autocast_dice.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)

B = "bundles/brain_tissue_segmentation"
config = ConfigParser()
config.read_config(f"{B}/configs/inference.json")
config["bundle_root"] = B
preprocessing = config.get_parsed_content("preprocessing")
net = config.get_parsed_content("network_def").eval()
net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
inferer = config.get_parsed_content("inferer")
roi, overlap, mode = tuple(inferer.roi_size), inferer.overlap, str(inferer.mode.value)
data_dir = config.get_parsed_content("dataset_dir")
items = (load_decathlon_datalist(f"{data_dir}/dataset.json", True, "training", data_dir)
         + [{"image": d["image"]} for d in config.get_parsed_content("datalist")])
label_pipe = [LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS"),
              Spacing(config["spacing"], mode="nearest")]


def labels(path):
    x = path
    for t in label_pipe:
        x = t(x)
    return x.as_tensor().long()


def dice(a, b, c):
    a, b = a == c, b == c
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


runs = {"fp32 defaults": dict(sw_batch_size=1), "fp32 sw_batch_size=4, buffers of 1 row": dict(
    sw_batch_size=4, buffer_steps=1, buffer_dim=0), "fp32 sw_batch_size=12": dict(sw_batch_size=12),
    "bf16 autocast defaults": dict(sw_batch_size=1)}
rows = []
with torch.no_grad():
    for item in items:
        image = preprocessing({"image": item["image"]})["image"][None].as_tensor()
        probs = {}
        for name, kw in runs.items():
            with torch.autocast("cpu", enabled=name.startswith("bf16")):
                probs[name] = sliding_window_inference(image, roi, predictor=net, overlap=overlap, mode=mode,
                                                       **kw).float().softmax(1)
        ref = probs["fp32 defaults"].argmax(1)
        row = {"image": item["image"].split("/")[-1], "shape": tuple(image.shape[2:])}
        for name, p in probs.items():
            seg = p.argmax(1)
            row[name] = {"max_prob_diff": float((p - probs["fp32 defaults"]).abs().max()),
                         "voxels_changed": int((seg != ref).sum()),
                         "dice_vs_fp32": [dice(seg, ref, c) for c in (1, 2, 3)]}
            if "label" in item:
                gt = labels(item["label"])[0]
                if gt.shape == seg[0].shape:
                    row[name]["mean_dice_vs_label"] = sum(dice(seg[0], gt, c) for c in (1, 2, 3)) / 3
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows, open(args.json, "w"), indent=1)
voxels = sum(int(torch.tensor(r["shape"]).prod()) for r in rows)
print(f"\n{len(rows)} volumes, {voxels} voxels")
print("| run | max probability difference from fp32 defaults | voxels whose label changes | Dice vs fp32 defaults "
      "(CSF, GM, WM; lowest over volumes) | mean Dice vs label (6 labelled volumes) |")
print("|---|---:|---:|---|---:|")
for name in runs:
    worst = [min(r[name]["dice_vs_fp32"][c] for r in rows) for c in range(3)]
    with_label = [r[name]["mean_dice_vs_label"] for r in rows if "mean_dice_vs_label" in r[name]]
    mean_label = f"{sum(with_label) / len(with_label):.4f}" if with_label else "-"
    print(f"| {name} | {max(r[name]['max_prob_diff'] for r in rows):.2e} | "
          f"{sum(r[name]['voxels_changed'] for r in rows)} of {voxels} | {', '.join(f'{d:.4f}' for d in worst)} | "
          f"{mean_label} |")
