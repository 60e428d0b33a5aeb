"""docs/benchmarks/unet.md, "The least memory under the drop-in contract": every way to cut the benchmark UNet's
level-0 and level-1 blocks (encoder0-1, decoder1-0: 10 blocks) into consecutive full-recompute groups, with the
deeper levels (encoder2 .. decoder2) as one unit that joins a neighbouring group or stands alone, as one group
or one group per segment: 1280 policies, each block recomputed at most once. Fake-tensor peak of one training
step at 256^3 batch 2, as % of the plain peak. Prints the ten smallest. Two worker processes, about 10 minutes.
Full recomputation is enough: for the same groups, "cheap" keeps more (the convolution outputs) and a block that
is not checkpointed keeps all it saves."""
import itertools
import json
import multiprocessing

import torch

from monai_ckpt.networks.presets import network_factory
from monai_ckpt.profiling import measure_step_memory

SHAPE = (2, 1, 256, 256, 256)
DEEP = ("encoder2", "encoder3", "bottleneck", "decoder3", "decoder2")


def units():
    net = network_factory("unet", 3, 1)()
    blocks = {s.name: list(s.blocks) for s in net.checkpoint_segments()}
    top = [[b] for n in ("encoder0", "encoder1") for b in blocks[n]]
    tail = [[b] for n in ("decoder1", "decoder0") for b in blocks[n]]
    return top + ["deep"] + tail, [blocks[n] for n in DEEP]


def policies():
    unit_list, deep = units()
    deep_blocks = [b for seg in deep for b in seg]
    for cuts in itertools.product((False, True), repeat=len(unit_list) - 1):
        groups, current = [], [unit_list[0]]
        for unit, cut in zip(unit_list[1:], cuts):
            if cut:
                groups.append(current)
                current = []
            current.append(unit)
        groups.append(current)
        for split_deep in (False, True) if ["deep"] in groups else (False,):
            policy = []
            for group in groups:
                if group == ["deep"] and split_deep:
                    policy += [list(seg) for seg in deep]
                else:
                    policy.append([b for u in group for b in (deep_blocks if u == "deep" else u)])
            yield policy


def peak(policy):
    torch.set_num_threads(1)
    return measure_step_memory(network_factory("unet", 3, 1, policy), SHAPE, estimate=True).peak, policy


if __name__ == "__main__":
    plain = measure_step_memory(network_factory("unet", 3, 1, "none"), SHAPE, estimate=True).peak
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = sorted(pool.imap_unordered(peak, policies(), chunksize=8), key=lambda r: r[0])
    print(f"{len(results)} policies; plain {plain / 2**20:.0f} MiB")
    for nbytes, policy in results[:10]:
        print(f"{100 * nbytes / plain:.2f}% {nbytes / 2**20:.0f} MiB {json.dumps(policy)}")
