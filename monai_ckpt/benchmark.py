"""Benchmark CLI: peak training memory and step-time ratio of each checkpoint policy vs the plain network.

    python -m monai_ckpt.benchmark --network unet --shape 96 96 96 --batch 1 --policies none all cheap sqrt
    python -m monai_ckpt.benchmark --shape 256 256 256 --batch 2 --estimate      # FakeTensorMode, seconds
    python -m monai_ckpt.benchmark --scenarios --network dynunet                  # clinical presets, estimate
    python -m monai_ckpt.benchmark --shape 64 64 64 --plot unet64.png             # trade-off, timeline, segments

Memory is the exact live-tensor peak of one training step (``monai_ckpt.profiling``), with its breakdown at the
peak (activations, temporaries, parameters, gradients, optimizer state, input); when activations are too small a
share of the plain network's peak for checkpointing to lower it, the table says so. Time is the median, over
interleaved rounds, of each step's time relative to the plain MONAI network's step in the same round (process CPU
time on the CPU; skipped with ``--estimate``), with its interquartile range and the noise band of the run (the
spread of the plain computation, ``"none"``, timed against the plain network): ratios within it, or whose
interquartile range holds 1, are marked ``~``.
voxels/s uses the median wall time. A row for MONAI's own ``CheckpointUNet`` is added when MONAI has it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .arguments import DefaultsHelpFormatter, output_file, positive_int
from .networks.presets import (
    NATURAL_BLOCKS,
    NETWORKS,
    PARENT_OWN_CHECKPOINT,
    network_factory,
    padded_shape,
    shape_error,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BenchmarkRow", "MIN_TIMED_STEPS", "NETWORKS", "network_factory", "run_benchmark", "main"]

MiB = 2**20
MIN_TIMED_STEPS = 3  # a median and a spread need three rounds
# below this share of the plain peak, activations are too small for checkpointing to lower the peak visibly
SMALL_ACTIVATIONS = 0.10
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
    """One network / policy of the benchmark.

    Attributes:
        name: the network and policy.
        peak_mib: peak live-tensor memory of one training step, MiB.
        peak_vs_plain: ``peak_mib`` over the plain network's.
        time_ratio: median over the rounds of this step's time over the plain network's in the same round (None in
            estimate mode).
        voxels_per_s: input voxels per second of median wall time (None in estimate mode).
        by_category_mib: MiB per category at the peak (params, buffers, grads, activations, temporaries, optimizer,
            other: the input batch).
        time_iqr: interquartile range (25th, 75th percentile) of the per-round ratios.
        time_noise: the run's noise band: the largest distance from 1 of a round's ratio of the plain computation
            (``"none"``) to the plain network; ratios closer to 1 than this are not measured differences.
    """

    name: str
    peak_mib: float
    peak_vs_plain: float
    time_ratio: float | None
    voxels_per_s: float | None
    by_category_mib: dict[str, float]
    time_iqr: tuple[float, float] | None = None
    time_noise: float | None = None

    @property
    def within_noise(self) -> bool:
        """Whether this run cannot tell the time ratio from 1: it is within the run's noise band, or its
        interquartile range holds 1."""
        if self.time_ratio is None or self.time_noise is None:
            return False
        return abs(self.time_ratio - 1) <= self.time_noise or (
            self.time_iqr is not None and self.time_iqr[0] <= 1 <= self.time_iqr[1])


def _factories(network: str, spatial_dims: int, in_channels: int, policies: Sequence, with_monai: bool):
    import monai.networks.nets

    from .checkpoint import checkpoint_submodules

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
            checkpoint_submodules(net)  # its natural blocks: `blocks`, tests/test_enable_checkpointing.py checks
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


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def run_benchmark(
    network: str = "unet",
    shape: Sequence[int] = (96, 96, 96),
    batch: int = 1,
    in_channels: int = 1,
    policies: Sequence = DEFAULT_POLICIES,
    estimate: bool = False,
    amp: bool = False,
    steps: int = MIN_TIMED_STEPS,
    with_monai: bool = True,
    progress: bool = True,
) -> list[BenchmarkRow]:
    """Measure every policy; the first row is the plain MONAI network all ratios refer to.

    Memory: the exact peak of one training step and its breakdown (estimated on fake tensors with ``estimate``).
    Time (not with ``estimate``): ``steps`` interleaved rounds after one warm-up round; each row's ratio is the
    median of its per-round ratios to the plain network, with their interquartile range, and every row carries the
    run's noise band, the spread of the plain computation (``"none"``, timed even when not among ``policies``)
    against the plain network.

    Raises:
        ValueError: for an unknown network, a bad shape or policy, or fewer than `MIN_TIMED_STEPS` timed steps.
    """
    from tqdm.auto import tqdm

    from .policies import validate_policy
    from .profiling import measure_step_memory
    from .profiling.timing import interleaved_step_times

    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; valid: {', '.join(NETWORKS)}.")
    if len(shape) not in (2, 3) or any(int(s) < 1 for s in shape):
        raise ValueError(f"--shape takes 2 or 3 positive sizes (H W or D H W), got {list(shape)}.")
    if not estimate and steps < MIN_TIMED_STEPS:
        raise ValueError(f"steps={steps}: time ratios need at least {MIN_TIMED_STEPS} timed steps (a median and a "
                         "spread); on a shared machine more are better.")
    policies = [validate_policy(p) for p in policies]
    named = _factories(network, len(shape), in_channels, policies, with_monai)
    input_shape = (batch, in_channels, *shape)
    bar = tqdm(total=len(named) + (0 if estimate else 1), desc="benchmark", disable=not progress, file=sys.stderr)
    peaks = []
    for name, factory in named:
        bar.set_postfix_str(f"memory: {name}")
        peaks.append(measure_step_memory(factory, input_shape, estimate=estimate, amp=amp))
        bar.update()
    timed: list[dict[str, Any]] = [{} for _ in named]
    noise = None
    if not estimate:
        bar.set_postfix_str("step time (interleaved)")
        factories = [f for _, f in named]
        probe = "none" not in policies  # the plain computation, timed for the noise band only
        if probe:
            factories.append(network_factory(network, len(shape), in_channels, "none"))
        cpu, wall = interleaved_step_times(factories, input_shape, steps=steps, amp=amp)
        ratios = [[t / base for t, base in zip(times, cpu[0])] for times in cpu]
        plain_again = ratios[-1] if probe else ratios[1 + policies.index("none")]
        noise = max(abs(r - 1) for r in plain_again)
        n_vox = batch * math.prod(shape)
        timed = [dict(time_ratio=statistics.median(r), time_iqr=_quartiles(r), time_noise=noise,
                      voxels_per_s=n_vox / statistics.median(w)) for r, w in zip(ratios, wall)]
        timed[0]["time_iqr"] = None  # the reference itself: 1.0 in every round
        bar.update()
    bar.close()
    base = peaks[0].peak
    return [
        BenchmarkRow(name, p.peak / MiB, p.peak / base, t.get("time_ratio"), t.get("voxels_per_s"),
                     {k: round(b / MiB, 1) for k, b in p.by_category.items()}, t.get("time_iqr"), t.get("time_noise"))
        for (name, _), p, t in zip(named, peaks, timed)
    ]


def run_scenarios(network: str, policies: Sequence, progress: bool = True) -> list[tuple[str, tuple, int, list]]:
    """Estimated peak memory of each policy for each clinical preset in `SCENARIOS`."""
    from tqdm.auto import tqdm

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


# the breakdown at the peak: (column, categories of `monai_ckpt.profiling.measure_step_memory` it sums)
BREAKDOWN = (("activations", ("activations",)), ("temporaries", ("temporaries",)),
             ("params", ("params", "buffers")), ("grads", ("grads",)), ("optimizer", ("optimizer",)),
             ("input", ("other",)))


def _breakdown(row: BenchmarkRow) -> dict[str, float]:
    return {column: sum(row.by_category_mib.get(c, 0.0) for c in cats) for column, cats in BREAKDOWN}


def _time_cell(row: BenchmarkRow) -> str:
    if row.time_ratio is None:
        return "-"
    spread = f" ({row.time_iqr[0]:.2f}-{row.time_iqr[1]:.2f})" if row.time_iqr else ""
    return f"{row.time_ratio:.2f}{' ~' if row.within_noise and row.time_iqr else ''}{spread}"


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """The benchmark's table: peak, saving and step time per row; the memory at each peak by category; and notes
    that say when activations are too small a share of the plain peak for checkpointing to matter, and what the
    time column's noise band is."""
    width = max([44] + [len(r.name) for r in rows])
    timed = any(r.time_ratio is not None for r in rows)
    lines = [f"{'network / policy':<{width}} {'peak MiB':>9} {'vs plain':>9} {'saved':>7}"
             + (f"  {'time x (IQR)':<20} {'Mvox/s':>7}" if timed else "")]
    for r in rows:
        line = f"{r.name:<{width}} {r.peak_mib:>9.1f} {r.peak_vs_plain:>9.1%} {1 - r.peak_vs_plain:>7.1%}"
        if timed:
            line += f"  {_time_cell(r):<20} {r.voxels_per_s / 1e6 if r.voxels_per_s else 0:>7.3g}"
        lines.append(line)
    columns = [c for c, _ in BREAKDOWN]
    lines += ["", f"{'memory at the peak, MiB':<{width}} " + " ".join(f"{c:>11}" for c in columns)]
    lines += [f"{r.name:<{width}} " + " ".join(f"{v:>11.1f}" for v in _breakdown(r).values()) for r in rows]
    notes = [textwrap.fill(note, 110, subsequent_indent="  ") for note in _notes(rows)]
    return "\n".join(lines + ([""] + notes if notes else []))


def _notes(rows: Sequence[BenchmarkRow]) -> list[str]:
    """What a reader needs to trust the table: when checkpointing cannot matter here, and the time ratios' noise."""
    notes = []
    plain = rows[0]
    parts = _breakdown(plain)
    if parts["activations"] < SMALL_ACTIVATIONS * plain.peak_mib:
        rest = ", ".join(f"{name} {mib:.1f}" for name, mib in sorted(parts.items(), key=lambda kv: -kv[1])
                         if name != "activations" and mib >= 0.05 * plain.peak_mib)
        notes.append(
            f"note: activations are {parts['activations']:.1f} MiB ({parts['activations'] / plain.peak_mib:.1%}) of "
            f"the plain network's peak of {plain.peak_mib:.1f} MiB; the rest is {rest} MiB. Checkpointing trades "
            "activations for recomputation, so it cannot lower this peak: the savings above say nothing about "
            "larger inputs. Measure a larger --shape or --batch, or estimate clinical sizes with --estimate.")
    timed = [r for r in rows if r.time_ratio is not None]
    if timed and timed[0].time_noise is not None:
        noise = timed[0].time_noise
        notes.append(
            f"time x: median over the interleaved rounds of each step's process CPU time over the plain network's "
            f"in the same round (and the interquartile range of those ratios). Noise band of this run: +-{noise:.2f} (the largest "
            f"distance from 1.00 of a round of the plain computation, \"none\", against the plain network); "
            f"~ marks the ratios within it or whose interquartile range holds 1.00: this run cannot tell them from "
            f"1.00.")
        if noise > 0.25:
            notes.append(f"warning: the noise band is +-{noise:.2f}: this machine was too busy for step times; rerun "
                         "with more --steps, on a quieter machine, or trust only the memory columns.")
    return notes


def _policy_arg(text: str) -> Any:
    """An argparse type: a policy name, or a dict/list policy as JSON (an error that quotes the text otherwise)."""
    if text[:1] not in "[{":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid JSON ({error.msg} at character {error.pos}); give a dict or list policy as one "
            """shell word in single quotes, e.g. --policies '{"every": 2}'""") from None


def _timed_steps(text: str) -> int:
    """An argparse type: at least `MIN_TIMED_STEPS` timed steps."""
    steps = positive_int(text)
    if steps < MIN_TIMED_STEPS:
        raise argparse.ArgumentTypeError(f"at least {MIN_TIMED_STEPS} timed steps are needed for a median and its "
                                         f"spread, got {steps}")
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--network", default="unet", choices=sorted(NETWORKS), metavar="NAME",
                        help=f"the network, as monai_ckpt.networks.presets configures it: {', '.join(NETWORKS)}")
    parser.add_argument("--shape", type=int, nargs="+", default=[96, 96, 96], help="spatial size, D H W (or H W)")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size")
    parser.add_argument("--in-channels", type=positive_int, default=1, help="input channels")
    parser.add_argument("--policies", type=_policy_arg, nargs="+", default=DEFAULT_POLICIES,
                        help='policy specs; JSON for dicts/lists, e.g. \'{"every": 2}\'')
    parser.add_argument("--estimate", action="store_true", help="FakeTensorMode: memory only, any size, seconds")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--steps", type=_timed_steps, default=5,
                        help=f"timed rounds (one step of every network each) after one warm-up round; at least "
                             f"{MIN_TIMED_STEPS}")
    parser.add_argument("--no-monai", action="store_true", help="skip the rows of MONAI's own checkpointing")
    parser.add_argument("--json", metavar="FILE", type=output_file(), help="also write the rows as JSON")
    parser.add_argument("--plot", metavar="FILE.png", type=output_file((".png", ".svg", ".pdf")),
                        help="write the trade-off, memory timeline and per-segment plots to this PNG")
    parser.add_argument("--peak-tensors", action="store_true",
                        help="also list, per policy, the tensors alive at its peak and the operators that made them")
    parser.add_argument("--scenarios", action="store_true",
                        help="estimate every policy on the clinical presets (brain MRI 256^3, BraTS, cardiac, "
                             "prostate, liver CT, chest CT 512x512x400)")
    args = parser.parse_args(argv)
    from .policies import validate_policy

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
    mode = "estimate (FakeTensorMode)" if args.estimate else (
        f"measured (MemTracker, CPU); time: {args.steps} interleaved rounds, {_threads()} thread(s)")
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


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print_peak_tensors(args: argparse.Namespace) -> None:
    from .policies import validate_policy
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
    from .policies import validate_policy
    from .profiling import block_costs, memory_timeline

    spatial, input_shape = len(args.shape), (args.batch, args.in_channels, *args.shape)
    policies = [validate_policy(p) for p in args.policies]
    shown = ["none"] + [p for p in policies if p != "none"][:2]
    timelines = {json.dumps(p): memory_timeline(network_factory(args.network, spatial, args.in_channels, p),
                                                input_shape, estimate=True, amp=args.amp) for p in shown}
    # the heatmap shows bytes only, which fake tensors give exactly: no block is run (or timed) for real
    blocks = block_costs(network_factory(args.network, spatial, args.in_channels), input_shape, estimate=True)
    mode = "estimate" if args.estimate else "CPU"
    title = f"{args.network} {'x'.join(map(str, args.shape))} batch {args.batch} ({mode})"
    plot_benchmark(args.plot, rows, timelines, blocks, title)


if __name__ == "__main__":
    raise SystemExit(main())
