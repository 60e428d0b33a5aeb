"""docs/benchmarks/compile.md, "The planner for the compiled step", on a GPU (prepared; not run yet: no GPU was lent to the
session that wrote it). The CPU table's comparison with what a GPU reports: for the benchmark UNet and the DynUNet
preset, at the memory points 50%, 30% and 15% of what the compiled plain step keeps for backward, compile's own
``activation_memory_budget`` against the planner's compiled plan (``plan(..., compiled=True)`` for the whole-step
peak that budget reaches); each variant compiled with inductor and run for real: ``torch.cuda.max_memory_allocated``
of a steady-state training step (Adam, after a compiling warm-up step) next to the plan's predicted peak, and step
times with CUDA events, interleaved (A B C, B C A, ...), median after warm-up.

    python docs/scripts/compile_benchmark_gpu.py                          # both networks, about 10 minutes
    python docs/scripts/compile_benchmark_gpu.py --networks unet --shape 2 1 128 128 128 --steps 10

Run from the repository root on a machine with CUDA; writes the table to stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.planner.search import Planner, spec_text
from monai_ckpt.profiling import make_optimizer, training_step

GiB = 2**30
SHAPES = {"unet": (2, 1, 128, 128, 128), "dynunet": (2, 1, 128, 128, 128)}


def inductor(budget: float):  # noqa: ANN201
    """inductor with compile's budget set while it partitions (a backend object per variant: no shared graphs)."""

    def backend(gm, example_inputs):  # noqa: ANN001, ANN202
        from torch._inductor.compile_fx import compile_fx

        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return backend


def variants(network: str, shape: tuple[int, ...]) -> tuple[list[tuple[str, object, float, int | None]], dict]:
    """(name, policy, compile budget, predicted peak) of every variant, planned on fake CUDA-less tensors."""
    net = network_factory(network, len(shape) - 2, shape[1], "none")().cuda()
    planner = Planner(net, shape, False, "adam", device=torch.device("cuda"))
    step = planner.compiled_step
    plain = step.measure("none", 1.0, spec_text("none"))
    grid = [round(1.0 - 0.05 * i, 2) for i in range(21)]
    rows = [("compiled, plain", "none", 1.0, plain.peak)]
    for fraction in (0.5, 0.3, 0.15):
        own = next(b for b in grid if step.measure("none", b, spec_text("none")).saved_bytes <= fraction * plain.saved_bytes)
        mine = step.measure("none", own, spec_text("none"))
        p = planner.plan_compiled(mine.peak)
        rows += [(f"{100 * fraction:g}%: compile's budget {own:g}", "none", own, mine.peak),
                 (f"{100 * fraction:g}%: plan {json.dumps(p.policy)} + budget {p.compile_memory_budget:g}", p.policy,
                  p.compile_memory_budget, p.predicted_peak_bytes)]
    return rows, {"plain_saved": plain.saved_bytes}


def measure(network: str, shape: tuple[int, ...], rows: list, steps: int) -> list[dict]:
    device = torch.device("cuda")
    models, opts = [], []
    for _, policy, budget, _ in rows:
        model = network_factory(network, len(shape) - 2, shape[1], policy)().to(device).train()
        models.append(torch.compile(model, backend=inductor(budget)))
        opts.append(make_optimizer(model))
    x = torch.randn(*shape, device=device)
    peaks, times = [0] * len(rows), [[] for _ in rows]
    for round_ in range(2 + steps):
        for i in [(round_ + k) % len(rows) for k in range(len(rows))]:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            training_step(models[i], x, opts[i])
            end.record()
            end.synchronize()
            if round_ >= 1:  # the first round compiles and makes the optimizer state
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated())
            if round_ >= 2:
                times[i].append(start.elapsed_time(end))
    base = statistics.median(times[0])
    return [dict(variant=name, predicted_gib=(pred or 0) / GiB, cuda_max_allocated_gib=peak / GiB,
                 time_x_compiled_plain=statistics.median(t) / base)
            for (name, _, _, pred), peak, t in zip(rows, peaks, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(SHAPES))
    parser.add_argument("--shape", type=int, nargs="+", help="B C D H W (default: 2 1 128 128 128)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this script measures a GPU: torch.cuda.is_available() is False here")
    results = {}
    for network in args.networks:
        shape = tuple(args.shape) if args.shape else SHAPES[network]
        rows, extra = variants(network, shape)
        table = measure(network, shape, rows, args.steps)
        results[network] = dict(shape=shape, device=torch.cuda.get_device_name(), rows=table, **extra)
        print(f"\n{network} {shape}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("| variant | predicted peak GiB | max_memory_allocated GiB | time x compiled plain |\n|---|---:|---:|---:|")
        for r in table:
            print(f"| {r['variant']} | {r['predicted_gib']:.2f} | {r['cuda_max_allocated_gib']:.2f} | "
                  f"{r['time_x_compiled_plain']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
