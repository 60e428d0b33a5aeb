"""docs/benchmarks/planner.md, "Planning time at clinical sizes": how long ``plan()`` takes for every network
preset at its clinical patch, for a budget it plans (60% of the plain peak) and one nothing fits (25%: the error
names the least peak the search reaches, nested policies included), each question in a fresh process, as a user
waits for it.

    python docs/scripts/planner_clinical_times.py                       # every preset, both budgets
    python docs/scripts/planner_clinical_times.py --networks swinunetr --fractions 0.6

Each row: wall-clock seconds and this process's CPU seconds of the ``plan()`` call (block timing included; the
plain peak that sets the budget is measured before the clock starts). On a shared host the CPU time is the fairer
figure: other processes stretch the wall time, not the CPU time. ``resencl`` (nnU-Net's ResEnc-L at its
160x224x192 patch, batch 2, 16 GiB as asked in issue #34) needs ``monai_ckpt.nnunet`` and
``dynamic_network_architectures``; it is skipped without them. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# network -> (spatial shape, input channels, batch, extra budgets in GiB asked besides the fractions)
CLINICAL = {
    "unet": ((256, 256, 256), 1, 2, ()),
    "vnet": ((128, 128, 128), 1, 1, ()),
    "dynunet": ((128, 128, 128), 1, 2, ()),
    "segresnet": ((224, 224, 144), 4, 1, ()),
    "swinunetr": ((96, 96, 96), 1, 4, (6.6,)),  # the BTCV bundle: 4 crops of 96^3 per step
    "attentionunet": ((128, 128, 128), 1, 1, ()),
    "basicunet": ((128, 128, 128), 1, 2, ()),
    "basicunetplusplus": ((128, 128, 128), 1, 2, ()),
    "segresnetds": ((128, 128, 128), 1, 2, ()),
    "resencl": ((160, 224, 192), 1, 2, (16.0,)),
}


def build(name: str, in_channels: int):  # noqa: ANN201
    if name == "resencl":
        from torch import nn

        from monai_ckpt.nnunet import CheckpointResidualEncoderUNet

        return CheckpointResidualEncoderUNet(
            in_channels, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2, (1, 2, 2)), (1, 3, 4, 6, 6, 6),
            3, (1, 1, 1, 1, 1), conv_bias=True, norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True, checkpoint_policy="none")
    from monai_ckpt.networks.presets import network_factory

    return network_factory(name, 3, in_channels)()


def one(name: str, budget: str) -> dict:
    """In this process: the plain peak, then one timed ``plan()``."""
    import torch

    from monai_ckpt.planner import plan
    from monai_ckpt.profiling import measure_step_memory, replica

    shape, channels, batch, _ = CLINICAL[name]
    net = build(name, channels)
    plain = measure_step_memory(lambda: replica(net, "none"), (batch, channels, *shape), estimate=True).peak
    gib = float(budget[:-1]) / 100 * plain / 2**30 if budget.endswith("%") else float(budget)
    start = time.time()

    def progress(message: str) -> None:
        print(f"  [{time.time() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        p = plan(net, shape, gib, batch_size=batch, progress=progress)
        result = f"plan: {p.predicted_peak_bytes / 2**30:.2f} GiB, x{p.predicted_time_ratio:.2f}"
        policy = p.policy
    except ValueError as error:
        text = str(error)
        result = "nothing fits: least " + text.split("smallest peak reachable is ")[1].split(",")[0]
        policy = None
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(network=name, shape=shape, batch=batch, plain_gib=plain / 2**30, budget_gib=gib, result=result,
                policy=policy, wall_s=wall, cpu_s=cpu, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(CLINICAL))
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.6, 0.25],
                        help="budgets as fractions of the plain peak (none given: only the network's GiB budgets)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per question")
    parser.add_argument("--json", help="append each row to this file (JSON lines)")
    parser.add_argument("--one", nargs=2, metavar=("NETWORK", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print("| network | input | plain GiB | budget GiB | result | wall s | CPU s |\n|---|---|---:|---:|---|---:|---:|",
          flush=True)
    for name in args.networks:
        shape, channels, batch, extra = CLINICAL[name]
        for budget in [f"{100 * f:g}%" for f in args.fractions] + [str(b) for b in extra]:
            print(f"{name} {budget}:", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", name, budget], stdout=subprocess.PIPE,
                                      text=True, timeout=args.timeout, env=os.environ)
            except subprocess.TimeoutExpired:
                print(f"| {name} | {batch}x{channels}x{'x'.join(map(str, shape))} | | {budget} | did not finish | "
                      f"> {args.timeout:.0f} | |", flush=True)
                continue
            if proc.returncode != 0:
                print(f"| {name} | | | {budget} | failed (rc {proc.returncode}: see stderr) | | |", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {name} | {batch}x{channels}x{'x'.join(map(str, shape))} | {row['plain_gib']:.2f} | "
                  f"{row['budget_gib']:.2f} | {row['result']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
