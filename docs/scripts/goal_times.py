"""docs/benchmarks/goal.md, "The newer networks against the goal": for each network, the peak of one training step at its
clinical size (estimate: exact live-tensor bytes on fake tensors, Adam, mean(out**2)) and the step time at 64^3
batch 1 (measured on the CPU, interleaved in one process: the median of 3 runs, each the median of 5 steps after a
warm-up; by the process's CPU time, and by its user time alone, which leaves out the kernel's page faults) of the
plain parent, "all", "blocks", "cheap", checkpointing the parent's natural blocks by hand, MONAI's
own switch where there is one, and the planner's policy for 60% of the plain peak at the clinical size.

    python docs/scripts/goal_times.py [--plan-only] [network ...]

--plan-only: the plain parent and the planner's policy only (SwinUNETR's seven rows at 64^3 take over 20 minutes
on 2 cores).

Run from the repository root, on an otherwise idle machine (time ratios are this process's CPU time, both clocks).
The ratios depend on the processor (AttentionUnet's plan: 1.22x on one 2-core host, 1.13x on another): the first
line printed names it."""
import json
import platform
import sys

import torch

from monai_ckpt.benchmark import _factories
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

# network: (clinical input shape, the planner's policy for 60% of its plain peak there, the command that chose it)
PLANS = {
    "segresnet": ((1, 4, 224, 224, 144), [
        {"names": ["encoder0.2", "encoder1", "encoder2.4", "bottleneck.4", "bottleneck.8", "decoder2.2", "decoder1"]},
        {"names": [["encoder0.0", "encoder0.1"], ["encoder2.0", "encoder2.1", "encoder2.2", "encoder2.3"],
                   ["bottleneck.0", "bottleneck.1", "bottleneck.2", "bottleneck.3"],
                   ["bottleneck.5", "bottleneck.6", "bottleneck.7"], ["decoder2.0", "decoder2.1"],
                   ["decoder0.0", "decoder0.1"]], "mode": "cheap"}],
        "python -m monai_ckpt.plan --network segresnet --shape 224 224 144 --in-channels 4 --budget-gb 4.68"),
    "attentionunet": ((1, 1, 128, 128, 128), [
        {"names": ["encoder0", ["decoder0.0", "decoder0.1"]]},
        {"names": ["encoder1", "encoder2", "encoder3", "bottleneck", "decoder3", "decoder2", "decoder1"],
         "mode": "cheap"}],
        "python -m monai_ckpt.plan --network attentionunet --shape 128 128 128 --budget-gb 1.45"),
    "swinunetr": ((1, 1, 128, 128, 128), [
        {"names": ["encoder1", "encoder2.0", "encoder3.0", "encoder4.0", "bottleneck", "decoder4", "decoder2", "skip1",
                   "decoder1", "skip0"]},
        {"names": ["skip3", "decoder3", "skip2"], "mode": "cheap"}],
        "python -m monai_ckpt.plan --network swinunetr --shape 128 128 128 --budget-gb 8.16"),
    "basicunet": ((2, 1, 128, 128, 128), [
        {"names": ["bottleneck.0"]},
        {"names": ["encoder0", "encoder1", "encoder2", "encoder3", "bottleneck.1", "decoder3", "decoder2", "decoder1.1"],
         "mode": "cheap"}],
        "python -m monai_ckpt.plan --network basicunet --shape 128 128 128 --batch 2 --budget-gb 5.24"),
    "basicunetplusplus": ((2, 1, 128, 128, 128), [
        {"names": ["encoder3.0", "bottleneck"]},
        {"names": ["encoder0", "encoder1.1", "decoder0_1", "encoder2", "decoder1_1", "decoder0_2", "encoder3.1",
                   "decoder2_1", "decoder1_2.1", "decoder0_3", "decoder3_1", "decoder2_2", "decoder1_3.1"],
         "mode": "cheap"}],
        "python -m monai_ckpt.plan --network basicunetplusplus --shape 128 128 128 --batch 2 --budget-gb 15.0"),
    "segresnetds": ((2, 1, 128, 128, 128), [
        {"names": ["encoder0", "encoder1.4", "encoder2.4", "encoder3.8", "bottleneck.8", "decoder2.1", "decoder2.2",
                   "decoder1.1", "decoder1.2", ["decoder0.0", "decoder0.1"]]},
        {"names": [["encoder1.0", "encoder1.1", "encoder1.2", "encoder1.3"], ["encoder2.0", "encoder2.1", "encoder2.2",
                                                                             "encoder2.3"],
                   ["encoder3.0", "encoder3.1", "encoder3.2", "encoder3.3", "encoder3.4", "encoder3.5", "encoder3.6",
                    "encoder3.7"],
                   ["bottleneck.0", "bottleneck.1", "bottleneck.2", "bottleneck.3", "bottleneck.4", "bottleneck.5",
                    "bottleneck.6", "bottleneck.7"], ["decoder3.1", "decoder3.2"]], "mode": "cheap"}],
        "python -m monai_ckpt.plan --network segresnetds --shape 128 128 128 --batch 2 --budget-gb 6.25"),
}
TIME_SHAPE = (64, 64, 64)


def rows(network, plan_only=False):
    shape, planned, _ = PLANS[network]
    in_channels = shape[1]
    named = _factories(network, 3, in_channels, ["all", "blocks", "cheap"], with_monai=True)
    named = named[:1] if plan_only else named
    return named + [("the planner's policy for 60%", network_factory(network, 3, in_channels, planned))]


def measure(network, runs=3, steps=5, plan_only=False):
    shape, planned, command = PLANS[network]
    named = rows(network, plan_only)
    peaks = [measure_step_memory(f, shape, estimate=True).peak for _, f in named]
    clocks = ("process", "user")
    times = {clock: [] for clock in clocks}
    for _ in range(runs):
        for clock in clocks:
            times[clock].append(step_time_ratios([f for _, f in named], (1, shape[1], *TIME_SHAPE), steps=steps,
                                                 warmup=1, clock=clock)[1])
    print(f"\n{network}: peak at {shape} (estimate), time at {(1, shape[1], *TIME_SHAPE)} (median of {runs} runs)")
    print(f"plan: {command}\n  {json.dumps(planned)}")
    print("| policy | peak MiB | vs plain | time x, CPU (range) | time x, user (range) |\n|---|---:|---:|---:|---:|")
    for i, (name, _) in enumerate(named):
        cells = []
        for clock in clocks:
            ratios = sorted(t[i] for t in times[clock])
            cells.append(f"{ratios[len(ratios) // 2]:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
        print(f"| {name} | {peaks[i] / 2**20:.0f} | {100 * peaks[i] / peaks[0]:.1f}% | {' | '.join(cells)} |",
              flush=True)


def processor() -> str:
    """The CPU as /proc/cpuinfo names it (its first processor), where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown"
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    vector = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return f"{info.get('model name')} (family {info.get('cpu family')}, model {info.get('model')}, {vector})"


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"CPU: {processor()}, {torch.get_num_threads()} threads")
    args = sys.argv[1:]
    plan_only = "--plan-only" in args
    for network in [a for a in args if a != "--plan-only"] or list(PLANS):
        measure(network, plan_only=plan_only)
