"""Benchmark CLI: peak training memory and step-time ratio of each checkpoint policy vs the plain network.

    python -m monai_ckpt.benchmark --network unet --shape 96 96 96 --batch 1 --policies none all cheap sqrt
    python -m monai_ckpt.benchmark --shape 256 256 256 --batch 2 --estimate      # FakeTensorMode, seconds
    python -m monai_ckpt.benchmark --scenarios --network dynunet                  # clinical presets, estimate
    python -m monai_ckpt.benchmark --shape 64 64 64 --plot unet64.png             # trade-off, timeline, segments

Memory is the exact live-tensor peak of one training step (``monai_ckpt.profiling``); time is the median
step time relative to the plain MONAI network, interleaved in one process (process CPU time on the CPU;
skipped with ``--estimate``); voxels/s uses that same clock.
A row for MONAI's own ``CheckpointUNet`` is added when MONAI has it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn
from tqdm.auto import tqdm

from .checkpoint import checkpoint_submodules
from .networks.presets import (
    NATURAL_BLOCKS,
    NETWORKS,
    PARENT_OWN_CHECKPOINT,
    network_factory,
    padded_shape,
    positive_int,
    shape_error,
)
from .policies import validate_policy
from .profiling import MiB, measure_step_memory, step_time_ratios

__all__ = ["BenchmarkRow", "NETWORKS", "network_factory", "run_benchmark", "main"]

DEFAULT_POLICIES = ["none", "all", "cheap", "sqrt", "encoder", "decoder"]


# Clinical presets: (name, spatial size, input channels, batch). Sizes are padded up to what the network
# takes (a multiple of its strides), as a DivisiblePad or sliding-window roi would.
SCENARIOS: list[tuple[str, tuple[int, int, int], int, int]] = [
    ("brain MRI", (256, 256, 256), 1, 1),
    ("BraTS (4 modalities)", (240, 240, 155), 4, 1),
    ("cardiac MRI", (256, 256, 40), 1, 1),
    ("prostate MRI", (256, 256, 32), 1, 1),
    ("liver CT", (512, 512, 64), 1, 1),
    ("chest CT", (512, 512, 400), 1, 1),
]


@dataclass
class BenchmarkRow:
    name: str
    peak_mib: float
    peak_vs_plain: float
    time_ratio: float | None
    voxels_per_s: float | None
    by_category_mib: dict[str, float]


def _factories(network: str, spatial_dims: int, in_channels: int, policies: Sequence, with_monai: bool):
    import monai.networks.nets

    parent_name, child_name, make_kwargs = NETWORKS[network]
    parent = getattr(monai.networks.nets, parent_name)
    kwargs = make_kwargs(spatial_dims, in_channels)
    out: list[tuple[str, Callable[[], nn.Module]]] = [(f"MONAI {parent_name} (plain)", lambda: parent(**kwargs))]
    for policy in policies:
        out.append((f"{child_name} {json.dumps(policy)}", network_factory(network, spatial_dims, in_channels, policy)))
    if with_monai and network in PARENT_OWN_CHECKPOINT:
        own = PARENT_OWN_CHECKPOINT[network]
        label = ", ".join(f"{k}={v}" for k, v in own.items())
        out.append((f"MONAI {parent_name} {label}", lambda: parent(**kwargs, **own)))
    if with_monai and network in NATURAL_BLOCKS:
        blocks = NATURAL_BLOCKS[network]

        def by_hand() -> nn.Module:
            net = parent(**kwargs)
            checkpoint_submodules(net, predicate=lambda name, m: type(m).__name__ in blocks)
            return net

        out.append((f"MONAI {parent_name} + checkpoint_submodules({'/'.join(blocks)})", by_hand))
    if with_monai and network == "unet":
        try:
            from monai.networks.nets.unet import CheckpointUNet as MonaiCheckpointUNet
        except ImportError:
            pass
        else:
            out.append(("MONAI CheckpointUNet (nested)", lambda: MonaiCheckpointUNet(**kwargs)))
    return out


def run_benchmark(
    network: str = "unet",
    shape: Sequence[int] = (96, 96, 96),
    batch: int = 1,
    in_channels: int = 1,
    policies: Sequence = DEFAULT_POLICIES,
    estimate: bool = False,
    amp: bool = False,
    steps: int = 3,
    with_monai: bool = True,
    progress: bool = True,
) -> list[BenchmarkRow]:
    """Measure every policy; the first row is the plain MONAI network all ratios refer to."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; valid: {', '.join(NETWORKS)}.")
    if len(shape) not in (2, 3) or any(int(s) < 1 for s in shape):
        raise ValueError(f"--shape takes 2 or 3 positive sizes (H W or D H W), got {list(shape)}.")
    policies = [validate_policy(p) for p in policies]
    named = _factories(network, len(shape), in_channels, policies, with_monai)
    input_shape = (batch, in_channels, *shape)
    bar = tqdm(total=len(named) + (0 if estimate else 1), desc="benchmark", disable=not progress, file=sys.stderr)
    peaks = []
    for name, factory in named:
        bar.set_postfix_str(f"memory: {name}")
        peaks.append(measure_step_memory(factory, input_shape, estimate=estimate, amp=amp))
        bar.update()
    ratios: list[float | None] = [None] * len(named)
    voxels: list[float | None] = [None] * len(named)
    if not estimate:
        bar.set_postfix_str("step time (interleaved)")
        medians, ratios = step_time_ratios([f for _, f in named], input_shape, steps=steps, amp=amp)
        n_vox = batch * math.prod(shape)
        voxels = [n_vox / m for m in medians]
        bar.update()
    bar.close()
    base = peaks[0].peak
    return [
        BenchmarkRow(name, p.peak / MiB, p.peak / base, r, v, {k: round(b / MiB, 1) for k, b in p.by_category.items()})
        for (name, _), p, r, v in zip(named, peaks, ratios, voxels)
    ]


def run_scenarios(network: str, policies: Sequence, progress: bool = True) -> list[tuple[str, tuple, int, list]]:
    """Estimated peak memory of each policy for each clinical preset in `SCENARIOS`."""
    out = []
    for name, shape, channels, batch in tqdm(SCENARIOS, desc="scenarios", disable=not progress, file=sys.stderr):
        padded = padded_shape(network, shape, channels)
        rows = run_benchmark(network, padded, batch, channels, policies, estimate=True, progress=False,
                             with_monai=False)
        out.append((name, padded, channels, rows))
    return out


def format_scenarios(results: Sequence[tuple[str, tuple, int, list]]) -> str:
    names = [r.name.split(" ", 1)[1] if " " in r.name else r.name for r in results[0][3]]
    names[0] = "plain"
    head = f"{'scenario':<22} {'input (padded)':<22} " + " ".join(f"{n[:16]:>16}" for n in names)
    lines = [head]
    for name, shape, channels, rows in results:
        cells = [f"{r.peak_mib / 1024:>7.1f} GiB" + (f" {r.peak_vs_plain:>4.0%}" if i else " " * 5)
                 for i, r in enumerate(rows)]
        lines.append(f"{name:<22} {str(channels) + 'x' + 'x'.join(map(str, shape)):<22} " + " ".join(cells))
    return "\n".join(lines)


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    width = max([44] + [len(r.name) for r in rows])
    lines = [f"{'network / policy':<{width}} {'peak MiB':>10} {'vs plain':>9} {'saved':>7} {'time x':>7} {'Mvox/s':>8}"]
    for r in rows:
        t = f"{r.time_ratio:.2f}" if r.time_ratio is not None else "-"
        v = f"{r.voxels_per_s / 1e6:.2f}" if r.voxels_per_s is not None else "-"
        lines.append(f"{r.name:<{width}} {r.peak_mib:>10.1f} {r.peak_vs_plain:>8.1%} {1 - r.peak_vs_plain:>7.1%} {t:>7} {v:>8}")
    return "\n".join(lines)


def _policy_arg(text: str):
    return json.loads(text) if text[:1] in "[{" else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="unet", choices=sorted(NETWORKS))
    parser.add_argument("--shape", type=int, nargs="+", default=[96, 96, 96], help="spatial size, D H W (or H W)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--in-channels", type=positive_int, default=1)
    parser.add_argument("--policies", type=_policy_arg, nargs="+", default=DEFAULT_POLICIES,
                        help='policy specs; JSON for dicts/lists, e.g. \'{"every": 2}\'')
    parser.add_argument("--estimate", action="store_true", help="FakeTensorMode: memory only, any size, seconds")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per network after one warm-up step")
    parser.add_argument("--no-monai", action="store_true", help="skip MONAI's own CheckpointUNet row")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="write the trade-off, memory timeline and per-segment plots to this PNG")
    parser.add_argument("--peak-tensors", action="store_true",
                        help="also list, per policy, the tensors alive at its peak and the operators that made them")
    parser.add_argument("--scenarios", action="store_true",
                        help="estimate every policy on the clinical presets (brain MRI 256^3, BraTS, cardiac, "
                             "prostate, liver CT, chest CT 512x512x400)")
    args = parser.parse_args(argv)
    if not args.scenarios and (why := shape_error(args.network, args.shape, args.in_channels)):
        parser.error(why)
    for policy in args.policies:
        try:
            validate_policy(policy)
        except ValueError as error:
            parser.error(str(error))
    if args.scenarios:
        try:
            results = run_scenarios(args.network, [validate_policy(p) for p in args.policies])
        except ValueError as e:
            parser.error(str(e))
        print(f"{args.network}: estimated peak memory of one training step (FakeTensorMode), batch 1, "
              "% of the plain network")
        print(format_scenarios(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{"scenario": n, "shape": s, "channels": c, "rows": [asdict(r) for r in rows]}
                           for n, s, c, rows in results], f, indent=2)
        return 0
    try:
        rows = run_benchmark(args.network, args.shape, args.batch, args.in_channels, args.policies, args.estimate,
                             args.amp, args.steps, not args.no_monai)
    except ValueError as e:
        parser.error(str(e))
    mode = "estimate (FakeTensorMode)" if args.estimate else "measured (MemTracker, CPU)"
    print(f"{args.network} {'x'.join(map(str, args.shape))} batch {args.batch}{' amp' if args.amp else ''}: "
          f"peak memory of one training step, {mode}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    if args.peak_tensors:
        _print_peak_tensors(args)
    if args.plot:
        _write_plot(args, rows)
        print(f"plots written to {args.plot}")
    return 0


def _print_peak_tensors(args: argparse.Namespace) -> None:
    from .profiling import peak_tensors

    input_shape = (args.batch, args.in_channels, *args.shape)
    for policy in ["none"] + [p for p in (validate_policy(p) for p in args.policies) if p != "none"]:
        live = peak_tensors(network_factory(args.network, len(args.shape), args.in_channels, policy), input_shape,
                            estimate=args.estimate, amp=args.amp)
        print(f"\n{json.dumps(policy)}: tensors alive at the peak (module: innermost one running when the tensor "
              "was made; in backward, after a recomputation, the last one recomputed)")
        print(live.format(min_bytes=max(2**20, live.peak // 100)))


def _write_plot(args: argparse.Namespace, rows: Sequence[BenchmarkRow]) -> None:
    from .plots import plot_benchmark
    from .profiling import block_costs, memory_timeline

    spatial, input_shape = len(args.shape), (args.batch, args.in_channels, *args.shape)
    policies = [validate_policy(p) for p in args.policies]
    shown = ["none"] + [p for p in policies if p != "none"][:2]
    timelines = {json.dumps(p): memory_timeline(network_factory(args.network, spatial, args.in_channels, p),
                                                input_shape, estimate=True, amp=args.amp) for p in shown}
    blocks = block_costs(network_factory(args.network, spatial, args.in_channels), input_shape,
                         estimate=args.estimate, repeats=1)
    mode = "estimate" if args.estimate else "CPU"
    title = f"{args.network} {'x'.join(map(str, args.shape))} batch {args.batch} ({mode})"
    plot_benchmark(args.plot, rows, timelines, blocks, title)


if __name__ == "__main__":
    raise SystemExit(main())
