"""Fit a volume into a memory budget: ``python -m monai_ckpt.plan --network unet --budget-gb 24 [--shape D H W]``.

Without ``--shape``: the largest cubic patch that fits the budget without and with checkpointing (and with
AMP), and the plan for the largest checkpointed one. With ``--shape``: the fastest checkpoint policy that fits,
and the largest batch of that patch that fits. With ``--table``: the largest cubic patch without and with
checkpointing for 8, 10, 12, 16, 24, 32, 40, 48 and 80 GiB. Peaks are exact live-tensor bytes of a whole
training step (forward, loss, backward, Adam) on fake tensors; on a GPU the plan keeps a headroom for the
allocator and cuDNN workspaces (``--headroom-gb``). ``--loss dicece --out-channels 14`` plans your loss and
classes (default: ``mean(out**2)`` on the preset's 2 classes). Progress goes to stderr.

This module is the command line; in Python use ``monai_ckpt.plan`` (the function) and ``monai_ckpt.planner``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Sequence
from dataclasses import asdict

from .networks import presets
from .networks.presets import NETWORKS, positive_int, shape_error
from .planner import (
    DEFAULT_BUDGETS_GB,
    capacity_table,
    format_capacity_table,
    max_batch_size,
    max_patch_edge,
    plan,
)


LOSSES = ("mean-square", "dice", "dicece", "dicefocal")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _loss(name: str):  # noqa: ANN202
    """The MONAI loss ``--loss`` names, on an integer label map (to_onehot_y, softmax), or None."""
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss

    return {"mean-square": None, "dice": lambda: DiceLoss(to_onehot_y=True, softmax=True),
            "dicece": lambda: DiceCELoss(to_onehot_y=True, softmax=True),
            "dicefocal": lambda: DiceFocalLoss(to_onehot_y=True, softmax=True)}[name]


def network_factory(name: str, dims: int, in_channels: int, out_channels: int | None = None):  # noqa: ANN201
    """The preset network, with ``out_channels`` classes when given."""
    if out_channels is None:
        return presets.network_factory(name, dims, in_channels)
    from . import networks

    _, child, make_kwargs = NETWORKS[name]
    return lambda: getattr(networks, child)(**{**make_kwargs(dims, in_channels), "out_channels": out_channels})


def _progress(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="unet", choices=sorted(NETWORKS),
                        help="the benchmark's configuration of that network (see docs/benchmarks.md)")
    parser.add_argument("--budget-gb", type=_positive_float, help="memory for one training step, GiB")
    parser.add_argument("--shape", type=int, nargs="+", help="patch, D H W (or H W)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--in-channels", type=positive_int, default=1)
    parser.add_argument("--out-channels", type=positive_int, help="classes (default: the preset's 2)")
    parser.add_argument("--loss", default="mean-square", choices=LOSSES,
                        help="the step's loss: MONAI's Dice/DiceCE/DiceFocal on an integer label map, or mean(out**2)")
    parser.add_argument("--headroom-gb", type=_positive_float,
                        help="of the budget, what the device needs beyond tensors (default: none on the CPU)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="without --shape: 2 or 3 (default 3)")
    parser.add_argument("--amp", action="store_true", help="autocast in the forward (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "none"))
    parser.add_argument("--compiled", action="store_true", help="plan the step torch.compile(network) runs (with "
                        "compile's activation_memory_budget among the choices; with --shape)")
    parser.add_argument("--table", action="store_true", help="largest cubic patch per budget, without and with "
                        "checkpointing and AMP")
    parser.add_argument("--budgets", type=_positive_float, nargs="+", default=list(DEFAULT_BUDGETS_GB),
                        help="budgets of --table")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.shape and args.spatial_dims and len(args.shape) != args.spatial_dims:
        parser.error(f"--spatial-dims {args.spatial_dims} contradicts --shape {' '.join(map(str, args.shape))} "
                     f"({len(args.shape)} sizes): give one of them")
    if args.shape and (why := shape_error(args.network, args.shape, args.in_channels)):
        parser.error(why)
    if args.compiled and not args.shape:
        parser.error("--compiled plans one patch: give --shape")
    if not args.shape and (args.loss != "mean-square" or args.headroom_gb):
        parser.error("--loss and --headroom-gb plan one patch: give --shape (the capacity searches of --table and "
                     "of --budget-gb alone use the default step, mean(out**2), without headroom)")
    if not args.table and args.budget_gb is None:
        parser.error("give --budget-gb (or --table)")
    if args.headroom_gb and args.headroom_gb >= args.budget_gb:
        parser.error(f"--headroom-gb {args.headroom_gb} leaves nothing of --budget-gb {args.budget_gb} for tensors")
    dims = len(args.shape) if args.shape else args.spatial_dims or 3
    net = network_factory(args.network, dims, args.in_channels, args.out_channels)()
    make_loss = _loss(args.loss)
    step = dict(loss=make_loss() if make_loss else None, headroom_gb=args.headroom_gb, progress=_progress)
    try:
        if args.table:
            rows = capacity_table(net, args.budgets, batch_size=args.batch, optimizer=args.optimizer,
                                  progress=_progress)
            print(f"{args.network}, batch {args.batch}, {args.optimizer}: largest {'cubic' if dims == 3 else 'square'} "
                  "patch whose training step fits")
            print(format_capacity_table(rows, dims))
            result: object = rows
        elif args.shape:
            p = plan(net, args.shape, args.budget_gb, batch_size=args.batch, amp=args.amp, optimizer=args.optimizer,
                     compiled=args.compiled, **step)
            _progress("the largest batch that fits (least-memory policy)")
            batch = max_batch_size(net, args.shape, args.budget_gb, amp=args.amp, optimizer=args.optimizer)
            print(p)
            print(f"largest batch of {'x'.join(map(str, args.shape))} that fits {args.budget_gb} GiB with checkpointing: "
                  f"{batch}")
            result = {**asdict(p), "max_batch_size": batch}
        else:
            kw = dict(batch_size=args.batch, optimizer=args.optimizer)
            _progress("searching the largest patch without and with checkpointing")
            edges = {
                "plain": max_patch_edge(net, args.budget_gb, checkpointing=False, amp=args.amp, **kw),
                "checkpointed": max_patch_edge(net, args.budget_gb, checkpointing=True, amp=args.amp, **kw),
            }
            print(f"{args.network}, batch {args.batch}, {args.budget_gb} GiB{' amp' if args.amp else ''}: largest "
                  f"patch without checkpointing {edges['plain']}^{dims}, with checkpointing {edges['checkpointed']}^{dims}")
            result = dict(edges)
            if edges["checkpointed"]:
                p = plan(net, (edges["checkpointed"],) * dims, args.budget_gb, amp=args.amp, **kw, **step)
                print(p)
                result["plan"] = asdict(p)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


class _PlanModule(types.ModuleType):
    """Importing this module (``python -m monai_ckpt.plan``, ``from monai_ckpt.plan import main``) makes Python bind
    it as ``monai_ckpt.plan``, over the function of that name: calling it still plans."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - plan()'s own signature
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _PlanModule

if __name__ == "__main__":
    sys.exit(main())
