"""docs/benchmarks/planner.md, "Accuracy under the user's loss": plans made with the user's loss (and, for comparison, with the
default mean(out**2)) at budgets 90% and 60% of the way from the least peak ("all") to the plain peak, each run
for real on the CPU with the user's loss (MemTracker, exact live-tensor bytes, real tensors, Adam). The 104-class
rows are estimate mode (fake tensors, the loss replayed from its small-size measurement: no real run).
Run from the repository root; about 10 minutes on 2 shared cores."""
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, plan
from monai_ckpt.planner.step import make_step, measured_peak
from monai_ckpt.networks.presets import NETWORKS
from monai_ckpt.profiling import measure_step_memory, replica

MiB = 2**20
UNET = dict(spatial_dims=3, in_channels=1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def deep_supervision(out, y, ds=DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))):
    return ds(list(torch.unbind(out, 1)), y)


CASES = [  # name, network, spatial, loss, label, real run
    ("UNet 14 classes, DiceLoss", lambda: CheckpointUNet(**UNET, out_channels=14), (96, 96, 96),
     DiceLoss(to_onehot_y=True, softmax=True), "index", True),
    ("UNet 14 classes, DiceCELoss", lambda: CheckpointUNet(**UNET, out_channels=14), (96, 96, 96),
     DiceCELoss(to_onehot_y=True, softmax=True), "index", True),
    ("UNet 14 classes, DiceFocalLoss", lambda: CheckpointUNet(**UNET, out_channels=14), (96, 96, 96),
     DiceFocalLoss(to_onehot_y=True, softmax=True), "index", True),
    ("UNet 14 classes, DiceLoss(sigmoid)", lambda: CheckpointUNet(**UNET, out_channels=14), (96, 96, 96),
     DiceLoss(sigmoid=True), "channels", True),
    ("DynUNet (preset, deep supervision), DeepSupervisionLoss(DiceCE)",
     lambda: CheckpointDynUNet(**NETWORKS["dynunet"][2](3, 1)), (64, 64, 64), deep_supervision, "index", True),
    ("UNet 104 classes, DiceCELoss (estimate)", lambda: CheckpointUNet(**UNET, out_channels=104), (128, 128, 128),
     DiceCELoss(to_onehot_y=True, softmax=True), "index", False),
]

if __name__ == "__main__":
    torch.set_num_threads(2)
    print("| network, loss | input | budget MiB | plan with the loss: predicted | measured | error | fits | "
          "plan with mean(out**2): measured with the loss | fits |")
    print("|---|---|---:|---:|---:|---:|---|---:|---|")
    worst = 0.0
    for name, make, spatial, loss, label, real in CASES:
        net = make()
        shape = (1, 1, *spatial)
        step = make_step(net, shape, False, loss, label)
        if real:
            measure = lambda p: measure_step_memory(lambda: replica(net, p), shape, loss=loss,  # noqa: E731
                                                    label=step.label).peak
        else:
            measure = lambda p: measured_peak(net, p, shape, False, "adam", step)  # noqa: E731
        plain, least = measure("none"), measure("all")
        for fraction in (0.9, 0.6):
            budget = least + fraction * (plain - least)
            p = plan(net, spatial, budget / 2**30, loss=loss, label=label)
            m = measure(p.policy)
            d = measure(plan(net, spatial, budget / 2**30).policy)
            error = (p.predicted_peak_bytes - m) / m
            worst = max(worst, abs(error))
            print(f"| {name} | {'x'.join(map(str, spatial))} | {budget / MiB:.1f} | {p.predicted_peak_bytes / MiB:.1f} | "
                  f"{m / MiB:.1f}{'' if real else ' (estimate)'} | {error:+.2%} | {'yes' if m <= budget else 'NO'} | "
                  f"{d / MiB:.1f} | {'yes' if d <= budget else 'NO'} |", flush=True)
    print(f"worst |error|: {worst:.2%}")
