"""Validate the planner on a GPU: plan UNet, VNet and DynUNet (the benchmark presets, DiceCE loss on an integer
label map) at two sizes and three budgets each, run every plan for real, and print predicted vs measured memory
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) and time ratios (CUDA events, interleaved with the
plain network, median after warm-up). Budgets are 90%, 75% and 60% of the way from the least peak ("all") to
the plain peak, plus the planner's default CUDA headroom on top, so each row asks: does the plan's reserved
memory stay within the budget?

    python docs/scripts/planner_validate_on_device.py            # CUDA: about 5 minutes on one GPU
    python docs/scripts/planner_validate_on_device.py --quick    # one small size per network
    python docs/scripts/planner_validate_on_device.py --device cpu --quick --networks unet   # a dry run:
                                                                  # MemTracker peaks, process-time ratios

Rows are printed as they finish (markdown); the script stops starting new networks after ``--deadline-s``
(default 450 s), so that it ends within 8 minutes. Run from the repository root.
"""
import argparse
import statistics
import sys
import time

import torch
from monai.losses import DiceCELoss

from monai_ckpt import planner
from monai_ckpt.planner.device import headroom_bytes
from monai_ckpt.planner.step import make_step, measured_peak
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import LabelBatch, make_optimizer, measure_step_memory, replica, training_step

SIZES = {"unet": ((96, 96, 96), (128, 128, 128)), "vnet": ((64, 64, 64), (96, 96, 96)),
         "dynunet": ((64, 64, 64), (96, 96, 96))}
QUICK = {"unet": ((64, 64, 64),), "vnet": ((32, 32, 32),), "dynunet": ((64, 64, 64),)}
FRACTIONS = (0.9, 0.75, 0.6)
MiB = 2**20


def run_step_memory(net, policy, shape, label, loss, device):
    """(max allocated, max reserved) of one steady-state training step on CUDA; on the CPU the MemTracker peak."""
    if device.type != "cuda":
        peak = measure_step_memory(lambda: replica(net, policy), shape, loss=loss, label=label).peak
        return peak, peak
    model = replica(net, policy).to(device).train()
    opt = make_optimizer(model, "adam")
    x, y = torch.randn(shape, device=device), label.make(device)
    training_step(model, x, opt, loss=loss, label=y)  # warm-up: optimizer state, cuDNN autotuning
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training_step(model, x, opt, loss=loss, label=y)
    torch.cuda.synchronize(device)
    result = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    del model, opt, x, y
    torch.cuda.empty_cache()
    return result


def time_ratio(net, policy, shape, label, loss, device, steps=5):
    """Step time of ``policy`` over the plain network's, interleaved, median after one warm-up round."""
    models = [replica(net, p).to(device).train() for p in ("none", policy)]
    opts = [make_optimizer(m, "adam") for m in models]
    x, y = torch.randn(shape, device=device), label.make(device)
    times = [[], []]
    for round_ in range(1 + steps):
        for i in (0, 1) if round_ % 2 else (1, 0):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                training_step(models[i], x, opts[i], loss=loss, label=y)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.process_time()
                training_step(models[i], x, opts[i], loss=loss, label=y)
                seconds = time.process_time() - t0
            if round_:
                times[i].append(seconds)
    del models, opts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[1]) / statistics.median(times[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--deadline-s", type=float, default=450)
    parser.add_argument("--networks", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or --device cpu for a dry run", file=sys.stderr)
        return 2
    start = time.time()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    print("| network | input | budget MiB | headroom MiB | plan | predicted MiB | max allocated MiB | error | "
          "max reserved MiB | reserved - allocated | fits | time x predicted | time x measured |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    worst = 0.0
    for name, sizes in (QUICK if args.quick else SIZES).items():
        if name not in args.networks:
            continue
        if time.time() - start > args.deadline_s:
            print(f"(stopped before {name}: past the {args.deadline_s:.0f} s deadline)")
            break
        net = network_factory(name, 3, 1)().to(device)
        for spatial in sizes:
            shape = (1, 1, *spatial)
            label = LabelBatch((1, 1, *spatial), torch.int64)
            step = make_step(net, shape, False, loss, "index")
            peak = lambda p: measured_peak(net, p, shape, False, "adam", step)  # noqa: E731
            plain, least = peak("none"), peak("all")
            for fraction in FRACTIONS:
                tensors = least + fraction * (plain - least)
                headroom = headroom_bytes(None, int(tensors / (1 - planner.CUDA_HEADROOM_FRACTION)), device)
                budget = int(tensors) + headroom
                p = planner.plan(net, spatial, budget / 2**30, loss=loss)
                allocated, reserved = run_step_memory(net, p.policy, shape, label, loss, device)
                error = (p.predicted_peak_bytes - allocated) / allocated
                worst = max(worst, abs(error))
                ratio = time_ratio(net, p.policy, shape, label, loss, device)
                policy = "`none`" if p.policy == "none" else f"{len(p.checkpointed)} groups"
                print(f"| {name} | {'x'.join(map(str, spatial))} | {budget / MiB:.0f} | {p.headroom_bytes / MiB:.0f} | "
                      f"{policy} | {p.predicted_peak_bytes / MiB:.1f} | {allocated / MiB:.1f} | {error:+.1%} | "
                      f"{reserved / MiB:.1f} | {(reserved - allocated) / MiB:.1f} | "
                      f"{'yes' if reserved <= budget else 'NO'} | {p.predicted_time_ratio:.2f} | {ratio:.2f} |",
                      flush=True)
    print(f"worst |predicted - allocated| / allocated: {worst:.1%}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
