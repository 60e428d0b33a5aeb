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
from typing import TYPE_CHECKING, Any

from .arguments import DefaultsHelpFormatter, output_file, positive_float, positive_int
from .networks import presets
from .networks.presets import NETWORKS, shape_error

if TYPE_CHECKING:
    from .planner import capacity_table, format_capacity_table, max_batch_size, max_patch_edge, plan

# the planner's functions this command line calls: imported when it runs, not for --help (torch and MONAI take
# seconds to import); `_import_planner` binds them here, leaving any that a test has replaced
_PLANNER_NAMES = ("DEFAULT_BUDGETS_GB", "capacity_table", "format_capacity_table", "max_batch_size", "max_patch_edge",
                  "plan")
# planner.DEFAULT_BUDGETS_GB, for --help without importing the planner (tests/test_cli_help.py checks they agree)
_TABLE_BUDGETS_GB = (8, 10, 12, 16, 24, 32, 40, 48, 80)


def _import_planner() -> None:
    from . import planner

    for name in _PLANNER_NAMES:
        globals().setdefault(name, getattr(planner, name))


def __getattr__(name: str) -> Any:
    if name in _PLANNER_NAMES:
        _import_planner()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LOSSES = ("mean-square", "dice", "dicece", "dicefocal")


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
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--network", default="unet", choices=sorted(NETWORKS), metavar="NAME",
                        help=f"the benchmark's configuration of that network: {', '.join(NETWORKS)}")
    parser.add_argument("--budget-gb", type=positive_float, help="memory for one training step, GiB")
    parser.add_argument("--shape", type=int, nargs="+", help="patch, D H W (or H W)")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size")
    parser.add_argument("--in-channels", type=positive_int, default=1, help="input channels")
    parser.add_argument("--out-channels", type=positive_int, help="classes (default: the preset's 2)")
    parser.add_argument("--loss", default="mean-square", choices=LOSSES,
                        help="the step's loss: MONAI's Dice/DiceCE/DiceFocal on an integer label map, or mean(out**2)")
    parser.add_argument("--headroom-gb", type=positive_float,
                        help="of the budget, what the device needs beyond tensors (default: none on the CPU)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="without --shape: 2 or 3 (default 3)")
    parser.add_argument("--amp", action="store_true", help="autocast in the forward (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "none"),
                        help="whose state the step keeps")
    parser.add_argument("--table", action="store_true", help="largest cubic patch per budget, without and with "
                        "checkpointing and AMP")
    parser.add_argument("--budgets", type=positive_float, nargs="+", default=list(_TABLE_BUDGETS_GB),
                        help="budgets of --table, GiB")
    parser.add_argument("--json", metavar="FILE", type=output_file(), help="also write the result as JSON")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    if args.inference:
        return inference_main(parser, args)
    if args.shape and args.spatial_dims and len(args.shape) != args.spatial_dims:
        parser.error(f"--spatial-dims {args.spatial_dims} contradicts --shape {' '.join(map(str, args.shape))} "
                     f"({len(args.shape)} sizes): give one of them")
    if args.shape and (why := shape_error(args.network, args.shape, args.in_channels)):
        parser.error(why)
    if not args.shape and (args.loss != "mean-square" or args.headroom_gb):
        parser.error("--loss and --headroom-gb plan one patch: give --shape (the capacity searches of --table and "
                     "of --budget-gb alone use the default step, mean(out**2), without headroom)")
    if not args.table and args.budget_gb is None:
        parser.error("give --budget-gb (or --table)")
    if args.headroom_gb and args.headroom_gb >= args.budget_gb:
        parser.error(f"--headroom-gb {args.headroom_gb} leaves nothing of --budget-gb {args.budget_gb} for tensors")
    _import_planner()
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
                     **step)
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


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "inference", "--inference plans MONAI's sliding_window_inference of a whole image into --budget-gb (or each "
        "of --budgets with --table): sw_batch_size, where the output is stitched, buffers, autocast (with --amp)")
    group.add_argument("--inference", action="store_true", help="plan sliding-window inference, not a training step")
    group.add_argument("--image-shape", type=positive_int, nargs="+", metavar="SIZE",
                       help="the image, D H W (or H W); --in-channels and --batch give its other sizes")
    group.add_argument("--roi", type=positive_int, nargs="+", metavar="SIZE", help="the window, D H W (or H W)")
    group.add_argument("--overlap", type=float, default=0.25, help="MONAI's overlap of the windows")
    group.add_argument("--mode", default="constant", choices=("constant", "gaussian"), help="MONAI's blending")
    group.add_argument("--device", help="where the windows run: default where the network is (the CPU); 'cuda' "
                       "plans for a GPU (from a machine without one: peaks exact, nothing timed)")
    group.add_argument("--host-budget-gb", type=positive_float,
                       help="host memory for an output stitched there (default: no limit, its peak is reported)")


def inference_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--inference``: one plan for ``--budget-gb``, or with ``--table`` MONAI's defaults against the plan for each
    of ``--budgets``."""
    from .planner import plan_inference
    from .planner.result import format_size

    if not args.image_shape or not args.roi:
        parser.error("--inference needs --image-shape D H W and --roi D H W")
    if len(args.roi) != len(args.image_shape):
        parser.error(f"--roi has {len(args.roi)} sizes but --image-shape has {len(args.image_shape)}: give one per "
                     "spatial dimension")
    if args.shape or args.loss != "mean-square" or args.optimizer != "adam":
        parser.error("--shape, --loss and --optimizer plan a training step; --inference takes --image-shape and --roi")
    if not args.table and args.budget_gb is None:
        parser.error("give --budget-gb (or --table)")
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if (why := shape_error(args.network, args.roi, args.in_channels)):
        parser.error(why.replace("--shape", "--roi"))
    net = network_factory(args.network, len(args.roi), args.in_channels, args.out_channels)()
    image = (args.batch, args.in_channels, *args.image_shape)
    kw = dict(overlap=args.overlap, mode=args.mode, amp=args.amp, device=args.device,
              host_budget_gb=args.host_budget_gb, headroom_gb=args.headroom_gb, progress=_progress)
    budgets = args.budgets if args.table else [args.budget_gb]
    rows = []
    for budget in budgets:
        try:
            p = plan_inference(net, image, args.roi, budget, **kw)
        except ValueError as error:
            if not args.table:
                print(f"error: {error}", file=sys.stderr)
                return 2
            rows.append({"budget_gb": budget, "error": str(error)})
            continue
        if not args.table:
            print(p)
        rows.append({"budget_gb": budget, **{k: v for k, v in asdict(p).items() if k != "considered"}})
    if args.table:
        def size(nbytes: int | None) -> str:
            return format_size(nbytes) if nbytes else "-"

        print(f"{args.network}, {args.out_channels or 2} classes, image {image}, roi {tuple(args.roi)}, overlap "
              f"{args.overlap}, {args.mode}")
        print("| budget | MONAI's defaults: peak (fits?) | plan | plan: peak on the device | on the host |")
        print("|---:|---|---|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['budget_gb']:g} GiB | | nothing fits: {r['error'].split(': ', 1)[1].split(' (')[0]} "
                      "least | | |")
                continue
            tensors = r["budget_bytes"] - r["headroom_bytes"]
            fits = "fits" if r["default_peak_bytes"] <= tensors else "does not fit"
            where = "on the device" if r["device"] == r["sw_device"] else "on the host"
            buffers = f", buffer_steps={r['buffer_steps']}, buffer_dim={r['buffer_dim']}" if r["buffer_steps"] else ""
            print(f"| {r['budget_gb']:g} GiB | {size(r['default_peak_bytes'])} ({fits}) | sw_batch_size="
                  f"{r['sw_batch_size']}, output {where}{buffers}{', autocast' if r['amp'] else ''} | "
                  f"{size(r['peak_bytes'])} | {size(r['host_peak_bytes'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if args.table else rows[0], f, indent=2, default=str)
    return 0


class _PlanModule(types.ModuleType):
    """Importing this module (``python -m monai_ckpt.plan``, ``from monai_ckpt.plan import main``) makes Python bind
    it as ``monai_ckpt.plan``, over the function of that name: calling it still plans."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - plan()'s own signature
        from .planner import plan

        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _PlanModule

if __name__ == "__main__":
    sys.exit(main())
