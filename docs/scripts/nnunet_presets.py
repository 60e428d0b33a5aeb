"""docs/guide/nnunet.md: nnU-Net's own plans (default, ResEnc M/L/XL, and ResEnc-L's plan for a 48 GB GPU) for an abdominal CT
fingerprint, the predicted peak of one nnUNetTrainer step of each (bf16 autocast, nnU-Net's deep-supervision DC+CE
loss, SGD with momentum, fake tensors: nothing allocated) without checkpointing and with our policies, the fastest
policy under 10 GiB for ResEnc-L's 24 GB plan and under 21.6 GiB (a 24 GB GPU less headroom) for its 48 GB plan, what
``python -m monai_ckpt.nnunet plan`` chooses for 12, 16 and 24 GiB GPUs from ResEnc-L's plans, and CPU step-time
ratios of the default network and both ResEnc-L plans (interleaved, one process, user CPU time, fp32) at a small
patch.

    python docs/scripts/nnunet_presets.py WORKDIR [--times SIZE] [--times-large SIZE] [--amp]

Needs ``pip install monai-ckpt[nnunet]``. The fingerprint (100 CT volumes, 512x512 in-plane at 0.6-1.0 mm, slices
of 0.7-5 mm) is made up, not measured: it writes a dataset.json, a dataset_fingerprint.json and one 8^3 image (nnU-Net
reads one to choose its image reader) under WORKDIR, then runs nnU-Net's planners as ``nnUNetv2_plan_experiment``
does. Run from the repository root.
"""

import argparse
import json
import os
import sys

import numpy as np

GiB = 2**30
NAME = "Dataset501_AbdomenCT"


def make_dataset(root: str) -> None:
    raw, pre = os.path.join(root, "raw", NAME), os.path.join(root, "preprocessed", NAME)
    for folder in (os.path.join(raw, "imagesTr"), os.path.join(raw, "labelsTr"), pre):
        os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    n = 100
    slices = rng.choice([0.7, 0.8, 1.0, 1.0, 1.0, 1.25, 1.5, 2.5, 5.0], n)
    spacings = [[float(z), float(s), float(s)] for z, s in zip(slices, rng.uniform(0.6, 1.0, n))]
    shapes = [[int(round(350 / sp[0] * rng.uniform(0.8, 1.2))), 512, 512] for sp in spacings]
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                   "numTraining": n, "file_ending": ".nii.gz"}, f)
    intensities = {"max": 1500.0, "mean": 100.0, "median": 100.0, "min": -1000.0, "percentile_00_5": -100.0,
                   "percentile_99_5": 300.0, "std": 50.0}
    with open(os.path.join(pre, "dataset_fingerprint.json"), "w") as f:
        json.dump({"foreground_intensity_properties_per_channel": {"0": intensities},
                   "median_relative_size_after_cropping": 1.0, "shapes_after_crop": shapes, "spacings": spacings}, f)
    import nibabel as nib

    for folder, name, dtype in (("imagesTr", "case_0000_0000", np.float32), ("labelsTr", "case_0000", np.uint8)):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype), np.eye(4)), os.path.join(raw, folder, f"{name}.nii.gz"))


def nnunet_plans(root: str) -> dict:
    """{label: 3d_fullres configuration} from nnU-Net's planners, as nnUNetv2_plan_experiment runs them."""
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"),
                      nnUNet_results=os.path.join(root, "results"))
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncL, nnUNetPlannerResEncM, nnUNetPlannerResEncXL,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    planners = {"default (nnUNetPlans, 8 GB)": (ExperimentPlanner, {}),
                "ResEnc M (9-11 GB)": (nnUNetPlannerResEncM, {}),
                "ResEnc L (24 GB)": (nnUNetPlannerResEncL, {}),
                "ResEnc XL (40 GB)": (nnUNetPlannerResEncXL, {}),
                "ResEnc L for 48 GB": (nnUNetPlannerResEncL, dict(gpu_memory_target_in_gb=48,
                                                                 plans_name="nnUNetResEncUNetL48Plans"))}
    out = {}
    for label, (cls, kwargs) in planners.items():
        planner = cls(501, **kwargs)
        planner.plan_experiment()
        configuration = PlansManager(planner.plans).get_configuration("3d_fullres").configuration
        out[label] = (configuration, planner.plans_identifier)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--times", type=int, default=64, help="patch edge for the CPU step-time ratios (0: none)")
    parser.add_argument("--amp", action="store_true", help="time under bf16 autocast (as nnU-Net trains on a GPU)")
    parser.add_argument("--times-large", type=int, default=0,
                        help="also time ResEnc L's 24 GB plan at this edge (3 steps after 1 warm-up; 0: no)")
    args = parser.parse_args()
    make_dataset(args.workdir)
    configs = nnunet_plans(args.workdir)
    import torch

    from monai_ckpt.nnunet.plans import _network_factory, fastest_policy, plan_configuration, predicted_step_peak
    from monai_ckpt.profiling import step_time_ratios

    print(f"torch {torch.__version__}; CPU: {_cpu()}; threads {torch.get_num_threads()}")
    print("\n| plans | patch | batch | stages | params | plain | \"cheap\" | \"all\" |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (c, _) in configs.items():
        arch = c["architecture"]
        peaks = {p: predicted_step_peak(arch, c["patch_size"], c["batch_size"], 1, 3, p)
                 for p in ("none", "cheap", "all")}
        with torch.device("meta"):
            params = sum(p.numel() for p in _network_factory(arch, 1, 3, "none")().parameters())
        plain = peaks["none"]
        print(f"| {label} | {'x'.join(map(str, c['patch_size']))} | {c['batch_size']} | "
              f"{arch['arch_kwargs']['n_stages']} | {params / 1e6:.0f}M | {plain / GiB:.2f} GiB | "
              f"{peaks['cheap'] / GiB:.2f} GiB ({peaks['cheap'] / plain:.0%}) | {peaks['all'] / GiB:.2f} GiB "
              f"({peaks['all'] / plain:.0%}) |", flush=True)
    print("\nThe issue's targets: the fastest policy monai_ckpt.plan finds for the step under each budget (fastest_policy),"
          " its predicted peak and modelled step time:")
    print("| plans | patch | budget | predicted peak | modelled step time | policy |")
    print("|---|---|---|---|---|---|")
    targets = {"ResEnc L (24 GB)": 10.0, "ResEnc L for 48 GB": 21.6}
    planned = {}
    for label, budget_gib in targets.items():
        c = configs[label][0]
        arch, patch, batch = c["architecture"], c["patch_size"], c["batch_size"]
        policy, peak, ratio = fastest_policy(arch, patch, batch, 1, 3, int(budget_gib * GiB),
                                             batch_dice=c["batch_dice"])
        planned[label] = policy
        print(f"| {label} | {'x'.join(map(str, patch))} | {budget_gib} GiB | {peak / GiB:.2f} GiB | {ratio:.2f}x | "
              f"{json.dumps(policy)} |", flush=True)
    source, _ = configs["ResEnc L (24 GB)"]
    print("\nplan_configuration from ResEnc L's 3d_fullres (headroom 10%):")
    print("| GPU | patch | voxels vs ResEnc L's | predicted peak | modelled step time | without checkpointing | "
          "policy |")
    print("|---|---|---|---|---|---|---|")
    for gpu, keep in ((12, True), (12, False), (16, False), (24, False)):
        p = plan_configuration(source, gpu, 1, 3, keep_patch=keep)
        plain = "" if p.plain_peak_bytes is None else f"{p.plain_peak_bytes / GiB:.2f} GiB"
        ratio = "" if p.predicted_time_ratio is None else f"{p.predicted_time_ratio:.2f}x"
        print(f"| {gpu} GiB{' (--keep-patch)' if keep else ''} | {'x'.join(map(str, p.patch_size))} | "
              f"{np.prod(p.patch_size) / np.prod(source['patch_size']):.2f}x | "
              f"{p.predicted_peak_bytes / GiB:.2f} GiB of {p.budget_bytes / GiB:.2f} | {ratio} | {plain} | "
              f"{json.dumps(p.checkpoint_policy)} |", flush=True)
    def ratios(label: str, edge: int, steps: int = 5) -> list[float]:
        """Step-time ratios of "cheap", "all" and (where planned) the planned policy to none, interleaved."""
        policies = ["none", "cheap", "all"] + ([planned[label]] if label in planned else [])
        factories = [_network_factory(configs[label][0]["architecture"], 1, 3, p) for p in policies]
        torch.manual_seed(0)
        return step_time_ratios(factories, (2, 1, edge, edge, edge), steps=steps, optimizer="sgd", clock="user",
                                amp=args.amp)[1][1:]

    if args.times:
        precision = "bf16 autocast" if args.amp else "fp32 (nnU-Net trains without autocast on the CPU)"
        print(f"\nCPU step-time ratio to the plain network, {(2, 1, *[args.times] * 3)}, {precision}, SGD, 5 "
              "interleaved steps after 1 warm-up (user CPU time); \"planned\": the policy above:")
        print("| network | \"cheap\" | \"all\" | planned |")
        print("|---|---|---|---|")
        for label in ("default (nnUNetPlans, 8 GB)", *targets):
            cells = [f"{r:.2f}x" for r in ratios(label, args.times)]
            print(f"| {label} | {' | '.join(cells + [''] * (3 - len(cells)))} |", flush=True)
    if args.times_large:
        label = "ResEnc L (24 GB)"
        cheap, all_, mixed = ratios(label, args.times_large, steps=3)
        print(f"\n{label} at {(2, 1, *[args.times_large] * 3)}, 3 interleaved steps after 1 warm-up: \"cheap\" "
              f"{cheap:.2f}x, \"all\" {all_:.2f}x, planned {mixed:.2f}x", flush=True)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
