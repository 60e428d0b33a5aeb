"""torch.compile (inductor, CPU) against eager, for our checkpoint policies and for compile's own min-cut
activation budget (``torch._functorch.config.activation_memory_budget``), on one network, in one process.

Memory: the bytes of the distinct storages the training step saves for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` around the (compiled) forward: the activations held from forward to
backward, which is what checkpointing and the compiler's budget trade against recomputation. MemTracker cannot be
used here: it measures the compiled module to the byte as it measures the eager one (it runs under a dispatch
mode, and the allocations inside inductor's generated code do not go through the dispatcher), so it does not see
what compile changes. Time: step-time ratios to the eager plain network, interleaved, this process's CPU time
(monai_ckpt.profiling.step_time_ratios); the first (warm-up) step of each variant compiles it.

    python docs/scripts/compile_benchmark.py --network unet --shape 64 64 64            # the table
    python docs/scripts/compile_benchmark.py --parity vnet                              # VNet under inductor

Run from the repository root.
"""
import argparse
import functools
import json

import torch
from torch import nn

from monai_ckpt.networks.presets import network_factory


class Compiled(nn.Module):
    """``torch.compile(net)`` with compile's activation budget set while it compiles (and runs)."""

    def __init__(self, net: nn.Module, budget: float | None = None, fullgraph: bool = False) -> None:
        super().__init__()
        self.net = net
        self.budget = budget
        self.compiled = torch.compile(net, fullgraph=fullgraph)

    def forward(self, x):  # noqa: ANN001, ANN201
        if self.budget is None:
            return self.compiled(x)
        with torch._functorch.config.patch(activation_memory_budget=self.budget):
            return self.compiled(x)


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):  # noqa: ANN001, ANN202
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().square().mean().backward()
    return sum(storages.values())


def table(network: str, shape: tuple[int, ...], steps: int) -> None:
    from monai_ckpt.profiling import step_time_ratios

    x_shape = (1, 1, *shape)
    variants = {  # name -> factory
        "eager, plain": network_factory(network, len(shape), 1, "none"),
        "eager, `\"all\"`": network_factory(network, len(shape), 1, "all"),
        "eager, `\"cheap\"`": network_factory(network, len(shape), 1, "cheap"),
        "compiled, plain": lambda: Compiled(network_factory(network, len(shape), 1, "none")()),
        "compiled, `\"all\"`": lambda: Compiled(network_factory(network, len(shape), 1, "all")()),
        "compiled, `\"cheap\"`": lambda: Compiled(network_factory(network, len(shape), 1, "cheap")()),
        "compiled, `\"sqrt\"`": lambda: Compiled(network_factory(network, len(shape), 1, "sqrt")()),
        "compiled, `\"all\"`, fullgraph": lambda: Compiled(network_factory(network, len(shape), 1, "all")(),
                                                          fullgraph=True),
    }
    for budget in (0.5, 0.2, 0.0):
        variants[f"compiled, plain, activation_memory_budget={budget}"] = functools.partial(
            lambda b: Compiled(network_factory(network, len(shape), 1, "none")(), budget=b), budget)
    models = {}

    def keep(name, factory):  # noqa: ANN001, ANN202
        def make():  # noqa: ANN202
            models[name] = factory()
            return models[name]
        return make

    _, ratios = step_time_ratios([keep(n, f) for n, f in variants.items()], x_shape, steps=steps, warmup=1)
    x = torch.randn(*x_shape)
    saved = {name: saved_for_backward(models[name], x) for name in variants}
    plain = saved["eager, plain"]
    print(f"{network}, input {x_shape}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | saved for backward MiB | % of eager plain | step time x eager plain |")
    print("|---|---:|---:|---:|")
    for (name, ratio) in zip(variants, ratios):
        print(f"| {name} | {saved[name] / 2**20:.1f} | {100 * saved[name] / plain:.0f}% | {ratio:.2f} |")


def parity(network: str) -> None:
    """Two SGD steps with dropout, compiled with fullgraph (inductor, policy "cheap") against the eager parent."""
    from monai.networks.nets import VNet

    from monai_ckpt import CheckpointVNet

    torch._inductor.config.fallback_random = True
    kw = dict(spatial_dims=2, in_channels=1, out_channels=2, dropout_prob_down=0.2, dropout_prob_up=(0.2, 0.2),
              dropout_dim=2)
    torch.manual_seed(0)
    parent = VNet(**kw).train()
    child = CheckpointVNet(**kw, checkpoint_policy="cheap").train()
    child.load_state_dict(parent.state_dict())
    compiled = torch.compile(child, fullgraph=True)
    diffs = []
    for model in (parent, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        outs = []
        for step in range(2):
            torch.manual_seed(100 + step)
            x = torch.randn(2, 1, 16, 16)
            torch.manual_seed(1000 + step)
            out = model(x)
            out.square().mean().backward()
            outs.append(out.detach())
            opt.step()
            opt.zero_grad(set_to_none=False)
        diffs.append(outs)
    out_diff = max((a - b).abs().max().item() for a, b in zip(*diffs))
    par_diff = max((p - c).abs().max().item() for p, c in zip(parent.parameters(), child.parameters()))
    buf_diff = max((p.float() - c.float()).abs().max().item() for p, c in zip(parent.buffers(), child.buffers()))
    tracked = sorted({int(b) for n, b in child.named_buffers() if n.endswith("num_batches_tracked")})
    print(json.dumps(dict(network="vnet2d", policy="cheap", fullgraph=True, max_output_diff=out_diff,
                          max_weight_diff=par_diff, max_buffer_diff=buf_diff, num_batches_tracked=tracked)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="unet")
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--parity", choices=["vnet"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.parity:
        parity(args.parity)
    else:
        table(args.network, tuple(args.shape), args.steps)
