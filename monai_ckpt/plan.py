"""Fit a volume into a memory budget: ``python -m monai_ckpt.plan --network unet --budget-gb 24 [--shape D H W]``.

Without ``--shape``: the largest cubic patch that fits the budget without and with checkpointing (and with
AMP), and the plan for the largest checkpointed one. With ``--shape``: the fastest checkpoint policy that fits,
and the largest batch of that patch that fits. With ``--table``: the largest cubic patch without and with
checkpointing for 8, 10, 12, 16, 24, 32, 40, 48 and 80 GiB. Peaks are exact live-tensor bytes of a whole
training step (forward, backward, Adam) on fake tensors; a GPU adds its allocator and cuDNN workspace on top.

This module is the command line; in Python use ``monai_ckpt.plan`` (the function) and ``monai_ckpt.planner``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from .networks.presets import NETWORKS, network_factory
from .planner import (
    DEFAULT_BUDGETS_GB,
    capacity_table,
    format_capacity_table,
    max_batch_size,
    max_patch_edge,
    plan,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="unet", choices=sorted(NETWORKS),
                        help="the benchmark's configuration of that network (see docs/benchmarks.md)")
    parser.add_argument("--budget-gb", type=float, help="memory for one training step, GiB")
    parser.add_argument("--shape", type=int, nargs="+", help="patch, D H W (or H W)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--amp", action="store_true", help="autocast in the forward (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "none"))
    parser.add_argument("--table", action="store_true", help="largest cubic patch per budget, without and with "
                        "checkpointing and AMP")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS_GB), help="budgets of --table")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)
    dims = len(args.shape) if args.shape else args.spatial_dims
    net = network_factory(args.network, dims, args.in_channels)()
    try:
        if args.table:
            rows = capacity_table(net, args.budgets, batch_size=args.batch, optimizer=args.optimizer)
            print(f"{args.network}, batch {args.batch}, {args.optimizer}: largest {'cubic' if dims == 3 else 'square'} "
                  "patch whose training step fits")
            print(format_capacity_table(rows, dims))
            result: object = rows
        elif args.budget_gb is None:
            parser.error("give --budget-gb (or --table)")
        elif args.shape:
            p = plan(net, args.shape, args.budget_gb, batch_size=args.batch, amp=args.amp, optimizer=args.optimizer)
            batch = max_batch_size(net, args.shape, args.budget_gb, amp=args.amp, optimizer=args.optimizer)
            print(p)
            print(f"largest batch of {'x'.join(map(str, args.shape))} that fits {args.budget_gb} GiB with checkpointing: "
                  f"{batch}")
            result = {**asdict(p), "max_batch_size": batch}
        else:
            kw = dict(batch_size=args.batch, optimizer=args.optimizer)
            edges = {
                "plain": max_patch_edge(net, args.budget_gb, checkpointing=False, amp=args.amp, **kw),
                "checkpointed": max_patch_edge(net, args.budget_gb, checkpointing=True, amp=args.amp, **kw),
            }
            print(f"{args.network}, batch {args.batch}, {args.budget_gb} GiB{' amp' if args.amp else ''}: largest "
                  f"patch without checkpointing {edges['plain']}^{dims}, with checkpointing {edges['checkpointed']}^{dims}")
            result = dict(edges)
            if edges["checkpointed"]:
                p = plan(net, (edges["checkpointed"],) * dims, args.budget_gb, amp=args.amp, **kw)
                print(p)
                result["plan"] = asdict(p)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
