"""docs/benchmarks/unet.md, "Nested recomputation (opt-in)": least peaks with and without the nested mode.

    python docs/scripts/nested_policies.py unet     # benchmark UNet 256^3 b2: fp32, bf16, DiceCE (fake tensors)
    python docs/scripts/nested_policies.py time     # its step time at 96^3 b1 on the CPU (interleaved, median of 7)
    python docs/scripts/nested_policies.py others [vnet|dynunet]   # VNet(3, 1, 2) 128^3 b1, the DynUNet preset 192^3 b2
    python docs/scripts/nested_policies.py search [amp]   # the local search that found the nested UNet policies

Peaks are exact live-tensor bytes (MemTracker on fake tensors), Adam, as % of the fp32 plain peak. Run from the
repository root."""
import json
import sys

import torch
from monai.losses import DiceCELoss

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.planner.search import get_planner
from monai_ckpt.profiling import measure_step_memory, step_time_ratios

SHAPE = (2, 1, 256, 256, 256)
DEEP = ["encoder2.0", "encoder2.1", "encoder3.0", "encoder3.1", "bottleneck.0", "bottleneck.1", "decoder3.0",
        "decoder3.1", "decoder3.2", "decoder2.0", "decoder2.1", "decoder2.2"]
# the least without nesting (fp32; 41.1% before the merge kept its parts instead of the concatenation, now 39.2%)
MEMORY = ["encoder0", "encoder1", ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2"],
          ["decoder1.0", "decoder1.1"], "decoder1.2", "decoder0.0", ["decoder0.1", "decoder0.2"]]
NESTED_FP32 = [{"names": ["decoder0.0", ["decoder0.1", "decoder0.2"]]},
               {"names": [[["encoder0.0"], ["encoder0.1"], ["encoder1.0", "encoder1.1"]],
                          [DEEP, ["decoder1.0", "decoder1.1"], ["decoder1.2"]]], "mode": "nested"}]
NESTED_FP32_PLANNER = [{"names": [["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2"], "decoder0"]},
                       {"names": [[["encoder0.0"], ["encoder0.1"], ["encoder1.0", "encoder1.1"]],
                                  [["decoder1.0", "decoder1.1"], ["decoder1.2"]]], "mode": "nested"}]  # smallest(nested)
BF16 = [["encoder0", "encoder1"], ["encoder2", "encoder3", "bottleneck", "decoder3", "decoder2", "decoder1"],
        "decoder0"]  # the least without nesting under bf16 (the local search of "The least memory...")
NESTED_BF16 = {"names": [[["encoder0"], ["encoder1.0", "encoder1.1", *DEEP], ["decoder1.0", "decoder1.1"],
                          ["decoder1.2"], ["decoder0"]]], "mode": "nested"}  # found by the search (bf16)


def peak(policy, amp=False, network="unet", shape=SHAPE):
    return measure_step_memory(network_factory(network, 3, 1, policy), shape, estimate=True, amp=amp).peak


def unet():
    plain = peak("none")
    rows = [("plain", "none", False), ("`\"all\"`", "all", False), ("least without nesting (fp32)", MEMORY, False),
            ("**nested** (fp32)", NESTED_FP32, False), ("nested, the planner's (fp32)", NESTED_FP32_PLANNER, False),
            ("plain, bf16", "none", True),
            ("least without nesting (bf16)", BF16, True), ("**nested** (bf16)", NESTED_BF16, True)]
    print("| policy | precision | peak MiB | % of fp32 plain |\n|---|---|---:|---:|")
    for name, policy, amp in rows:
        p = peak(policy, amp)
        precision = "bf16" if amp else "fp32"
        print(f"| {name}: `{json.dumps(policy)}` | {precision} | {p / 2**20:.0f} | {100 * p / plain:.1f}% |")
    # the same network under a user's loss: DiceCE on an integer label map (B, 1, ...), as the planner measures it
    net = network_factory("unet", 3, 1, "none")()
    pl = get_planner(net, SHAPE, False, "adam", DiceCELoss(to_onehot_y=True, softmax=True), "index", torch.device("cpu"),
                  timing=False)
    dice_plain = pl.peak("none")
    print("\nDiceCELoss(to_onehot_y=True, softmax=True), label (2, 1, 256, 256, 256) int64:")
    for name, policy in [("plain", "none"), ("all", "all"), ("least without nesting (fp32, mean(out**2))", MEMORY),
                         ("nested (fp32, mean(out**2))", NESTED_FP32)]:
        p = pl.peak(policy)
        print(f"| {name} | {p / 2**20:.0f} | {100 * p / dice_plain:.1f}% of the DiceCE plain | "
              f"{100 * p / plain:.1f}% of "
              "the mean(out**2) plain |")
    for nested in (False, True):
        policy, p = pl.smallest(nested=nested)
        print(f"| planner smallest(nested={nested}) with DiceCE: `{json.dumps(policy)}` | {p / 2**20:.0f} | "
              f"{100 * p / dice_plain:.1f}% of the DiceCE plain |")


def time(repeats=3):
    torch.set_num_threads(2)
    policies = {"plain": "none", "all": "all", "least without nesting": MEMORY, "nested (fp32)": NESTED_FP32,
                "nested (fp32, the planner's)": NESTED_FP32_PLANNER}
    runs = [step_time_ratios([network_factory("unet", 3, 1, p) for p in policies.values()], (1, 1, 96, 96, 96),
                             steps=7, warmup=1)[1] for _ in range(repeats)]
    print(f"| policy | time x: median of {repeats} runs | range |\n|---|---:|---:|")
    for i, name in enumerate(policies):
        ratios = sorted(r[i] for r in runs)
        print(f"| {name} | {ratios[len(ratios) // 2]:.3f} | {ratios[0]:.3f}-{ratios[-1]:.3f} |", flush=True)


def others():
    for network, shape in [("vnet", (1, 1, 128, 128, 128)), ("dynunet", (2, 1, 192, 192, 192))]:
        if sys.argv[2:] and network not in sys.argv[2:]:
            continue
        net = network_factory(network, 3, 1, "none")()
        pl = get_planner(net, shape, False, "adam", None, "index", torch.device("cpu"), timing=False,
                      progress=lambda m: print("  ", m, file=sys.stderr))
        plain = pl.peak("none")
        flat, flat_peak = pl.smallest()
        nested, nested_peak = pl.smallest(nested=True)
        print(f"| {network} {shape} | {plain / 2**20:.0f} | {flat_peak / 2**20:.0f} ({100 * flat_peak / plain:.1f}%) | "
              f"{nested_peak / 2**20:.0f} ({100 * nested_peak / plain:.1f}%) |")
        print(f"  without nesting: {json.dumps(flat)}\n  nested: {json.dumps(nested)}")


def search(amp=False):
    """Greedy local search over two-level cuts of the UNet's 22 blocks: each boundary between two blocks is no cut,
    an inner cut (a new inner run) or an outer cut (a new group); each move changes one boundary or swaps two
    neighbouring ones, the move that lowers the measured peak most is taken, until none does."""
    blocks = [b for s in network_factory("unet", 3, 1, "none")().checkpoint_segments() for b in s.blocks]

    def spec(cuts):
        outer, runs, run = [], [], [blocks[0]]
        for b, c in zip(blocks[1:], cuts):
            if c >= 1:
                runs, run = runs + [run], []
            if c == 2:
                outer, runs = outer + [runs], []
            run.append(b)
        outer.append(runs + [run])
        full, nested = [sum(o, []) for o in outer if len(o) == 1], [o for o in outer if len(o) > 1]
        return ([{"names": full}] if full else []) + ([{"names": nested, "mode": "nested"}] if nested else [])

    seen = {}

    def measured(cuts):
        if tuple(cuts) not in seen:
            seen[tuple(cuts)] = peak(spec(cuts), amp)
        return seen[tuple(cuts)]

    cuts = [0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 2, 2, 0]  # the least without nesting (fp32)
    if len(sys.argv) > 3:  # a start of one's own, as 21 boundary values
        cuts = json.loads(sys.argv[3])
    best, plain = measured(cuts), peak("none")
    while True:
        moves = [cuts[:i] + [v] + cuts[i + 1:] for i in range(len(cuts)) for v in (0, 1, 2) if v != cuts[i]]
        moves += [cuts[:i] + [cuts[i + 1], cuts[i]] + cuts[i + 2:] for i in range(len(cuts) - 1)
                  if cuts[i] != cuts[i + 1]]
        p, move = min((measured(m), m) for m in moves)
        if p >= best:
            break
        best, cuts = p, move
        print(f"{100 * best / plain:.2f}%: {json.dumps(spec(cuts))}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "unet"
    {"unet": unet, "time": time, "others": others, "search": lambda: search("amp" in sys.argv)}[what]()
