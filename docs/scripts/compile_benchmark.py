"""torch.compile (inductor, CPU) against eager, for our checkpoint policies and for compile's own min-cut
activation budget (``torch._functorch.config.activation_memory_budget``), on one network, in one process.

Memory: the bytes of the distinct storages the training step saves for backward, parameters excluded, counted
with ``torch.autograd.graph.saved_tensors_hooks`` around the (compiled) forward: the activations held from
forward to backward, which is what checkpointing and the compiler's budget trade against recomputation. An eager
checkpoint keeps its tensors through saved-tensor hooks of its own, which the outer hooks do not see: the eager
checkpointed rows give MemTracker's live activations at the end of the forward instead (for the eager plain
network both are printed and agree to within the output tensor). MemTracker cannot be used here: it
measured the compiled module to the byte as it measured the eager one, so it does not see what compile changes.
Time: step-time ratios to the eager plain network, interleaved, this process's CPU time
(monai_ckpt.profiling.step_time_ratios); the first (warm-up) step of each variant compiles it.

    OMP_NUM_THREADS=1 python docs/scripts/compile_benchmark.py --network unet --shape 48 48 48 --steps 7 --threads 1

``--planner`` (docs/benchmarks/compile.md, "The planner for the compiled step"): at the planned size ``--plan-shape``
(fake tensors: `monai_ckpt.planner.compiled`), the memory points 50%, 30% and 15% of what the compiled plain step
keeps for backward; at each, compile's own budget (the largest ``activation_memory_budget`` on a 0.05 grid whose
step keeps at most that) and the planner's compiled plan for the whole-step peak that budget reaches
(``plan(..., compiled=True)``); then the step times of all of them at ``--shape``, interleaved, as above:

    OMP_NUM_THREADS=1 python docs/scripts/compile_benchmark.py --planner --network unet --plan-shape 2 1 256 256 256 \
        --shape 48 48 48 --steps 7 --threads 1
    OMP_NUM_THREADS=1 python docs/scripts/compile_benchmark.py --planner --network dynunet \
        --plan-shape 2 1 128 128 128 --shape 64 64 64 --steps 5 --threads 1

Run from the repository root.
"""
import argparse

import torch
from torch import nn

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import saved_for_backward


def inductor(budget: float | None = None):  # noqa: ANN201
    """inductor, with compile's activation budget set while it partitions. A backend object of its own per variant:
    Dynamo does not reuse a graph compiled by another backend, so every variant is compiled for itself (with one
    shared backend, a network of the same structure would reuse the first variant's graph)."""

    def backend(gm, example_inputs):  # noqa: ANN001, ANN202
        from torch._inductor.compile_fx import compile_fx

        if budget is None:
            return compile_fx(gm, example_inputs)
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return backend


def compiled(network: str, dims: int, policy, budget: float | None = None, fullgraph: bool = False):  # noqa: ANN001, ANN201
    return lambda: torch.compile(network_factory(network, dims, 1, policy)(), backend=inductor(budget),
                                 fullgraph=fullgraph)


def planner_table(network: str, plan_shape: tuple[int, ...], shape: tuple[int, ...], steps: int) -> None:
    """The memory points at ``plan_shape`` (fake tensors), then the times of their variants at ``shape``."""
    import json
    import platform

    from monai_ckpt.planner.search import Planner, spec_text
    from monai_ckpt.profiling import step_time_ratios

    d = len(shape)
    net = network_factory(network, d, 1, "none")()
    planner = Planner(net, plan_shape, False, "adam", progress=lambda m: print("  [plan]", m, flush=True))
    step = planner.compiled_step
    plain = step.measure("none", 1.0, spec_text("none"))
    grid = [round(1.0 - 0.05 * i, 2) for i in range(21)]
    rows = []
    for fraction in (0.5, 0.3, 0.15):
        own = next(b for b in grid
                   if step.measure("none", b, spec_text("none")).saved_bytes <= fraction * plain.saved_bytes)
        mine = step.measure("none", own, spec_text("none"))
        p = planner.plan_compiled(mine.peak)
        rows.append((fraction, own, mine, p))
    gib = 2**30
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{network}, planned at {plan_shape} (fake tensors), timed at (1, 1, {', '.join(map(str, shape))}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu}")
    print(f"compiled plain step: keeps {plain.saved_bytes / gib:.2f} GiB for backward, whole-step peak "
          f"{plain.peak / gib:.2f} GiB")
    variants = {"eager, plain": network_factory(network, d, 1, "none"), "compiled, plain": compiled(network, d, "none")}
    for fraction, own, mine, p in rows:
        variants[f"compile's budget {own:g}"] = compiled(network, d, "none", own)
        key = f"plan: {json.dumps(p.policy)} + budget {p.compile_memory_budget:g}"
        variants[key] = compiled(network, d, p.policy, p.compile_memory_budget)
    names = list(dict.fromkeys(variants))
    _, ratios = step_time_ratios([variants[n] for n in names], (1, 1, *shape), steps=steps, warmup=1)
    ratio = dict(zip(names, ratios))
    print("| memory point (of compiled plain's saved) | variant | keeps for backward (GiB) | whole-step peak (GiB) | "
          "time x eager plain | time x compiled plain |\n|---|---|---:|---:|---:|---:|")
    print(f"| 100% | compiled, plain | {plain.saved_bytes / gib:.2f} | {plain.peak / gib:.2f} | "
          f"{ratio['compiled, plain']:.3f} | 1.000 |")
    for fraction, own, mine, p in rows:
        key = f"plan: {json.dumps(p.policy)} + budget {p.compile_memory_budget:g}"
        for name, saved, peak in ((f"compile's budget {own:g}", mine.saved_bytes, mine.peak),
                                  (key, p.saved_bytes, p.predicted_peak_bytes)):
            print(f"| {100 * fraction:g}% | {name} | {saved / gib:.2f} | {peak / gib:.2f} | {ratio[name]:.3f} | "
                  f"{ratio[name] / ratio['compiled, plain']:.3f} |")
        print(f"|  | (plan's modelled time x compiled plain: {p.predicted_time_ratio:.3f}) | | | | |")


def activations_after_forward(model: nn.Module, x: torch.Tensor) -> int:
    """Eager only: live activation bytes (MemTracker's ACT) at the end of the forward."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, x)
    with tracker:
        out = model(x)
        snapshot = tracker.get_tracker_snapshot("current")[x.device]
        out.float().square().mean().backward()
    return next(v for k, v in snapshot.items() if str(k).endswith("ACT"))


def table(network: str, shape: tuple[int, ...], steps: int) -> None:
    from monai_ckpt.profiling import step_time_ratios

    x_shape = (1, 1, *shape)
    d = len(shape)
    variants = {  # name -> factory
        "eager, plain": network_factory(network, d, 1, "none"),
        "eager, `\"all\"`": network_factory(network, d, 1, "all"),
        "eager, `\"cheap\"`": network_factory(network, d, 1, "cheap"),
        "compiled, plain": compiled(network, d, "none"),
        "compiled, `\"all\"`": compiled(network, d, "all"),
        "compiled, `\"all\"`, fullgraph": compiled(network, d, "all", fullgraph=True),
        "compiled, `\"cheap\"`": compiled(network, d, "cheap"),
        "compiled, `\"sqrt\"`": compiled(network, d, "sqrt"),
    }
    for budget in (0.5, 0.2, 0.0):
        variants[f"compiled, plain, activation_memory_budget={budget}"] = compiled(network, d, "none", budget)
    models = {}

    def keep(name, factory):  # noqa: ANN001, ANN202
        def make():  # noqa: ANN202
            models[name] = factory()
            return models[name]
        return make

    _, ratios = step_time_ratios([keep(n, f) for n, f in variants.items()], x_shape, steps=steps, warmup=1)
    x = torch.randn(*x_shape)
    saved = {name: saved_for_backward(models[name], x)[0] for name in variants}
    plain = saved["eager, plain"]
    print(f"{network}, input {x_shape}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | saved for backward MiB | % of eager plain | step time x eager plain |")
    print("|---|---:|---:|---:|")
    for (name, ratio) in zip(variants, ratios):
        mark = ""
        if name.startswith("eager, `"):  # an eager checkpoint saves through hooks of its own, unseen from outside
            saved[name], mark = activations_after_forward(models[name], x), " *"
        print(f"| {name} | {saved[name] / 2**20:.1f}{mark} | {100 * saved[name] / plain:.0f}% | {ratio:.2f} |")
    print(f"\n* MemTracker's live activations at the end of the eager forward (eager plain: "
          f"{activations_after_forward(models['eager, plain'], x) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="unet")
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--planner", action="store_true", help="the planner's compiled plans against compile's budget")
    parser.add_argument("--plan-shape", type=int, nargs="+", default=[2, 1, 256, 256, 256], help="B C D H W planned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per variant, all of the same forward
    if args.planner:
        planner_table(args.network, tuple(args.plan_shape), tuple(args.shape), args.steps)
    else:
        table(args.network, tuple(args.shape), args.steps)
