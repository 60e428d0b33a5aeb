"""The step ``torch.compile`` runs: for a checkpoint policy and compile's own ``activation_memory_budget``, what the
compiled step keeps for backward, the peak of the whole step and a model of its time, on fake tensors at the
planned size (`CompiledStep`); the planner chooses among them (`search.Planner.plan_compiled`).

How it is measured: the network (a fake replica, the question's `FakeStep`) is traced by Dynamo as
``torch.compile(net, fullgraph=True)`` traces it, and handed to inductor's own ``compile_fx`` with its code
generation replaced by running the partitioned graphs as they are. So the joint graph, inductor's decompositions and
joint-graph passes, and the min-cut partition (with the budget, as `region_activation_memory_budget` sets it for the
network's graph) are inductor's; what the forward graph returns for the backward is what the compiled step keeps.
Running those graphs on the fakes under the step tracker gives the live-tensor peak of the step they describe (one
buffer per graph node, freed after its last use): inductor fuses pointwise operators into kernels, which only
removes such buffers, so this is an upper bound of the compiled step's peak, and what it keeps for backward is exact
(checked against a real inductor step, `tests/test_compile_planner.py`).

The time model counts, over the forward and backward graphs (recomputation included), the floating-point operations
(``torch.utils.flop_counter``'s formulas, as compile's own budget solver counts them) and the bytes that operators
which inductor does not fuse (convolutions, matrix products, reductions, concatenations) read and write, weighted by
a device balance (`BALANCE`); pointwise operators are taken as fused, free. Its ratio to the compiled plain step is
the plan's time ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..policies import PolicySpec
from ..profiling import training_step
from ..profiling.step import autocast_dtype
from ..profiling.tracker import step_tracker
from .step import FakeStep

__all__ = ["BALANCE", "COMPILE_BUDGETS", "FINE_COMPILE_BUDGETS", "CompiledCost", "CompiledStep", "compile_budgets"]

# floating-point operations one byte moved to or from memory is worth, by device type: a CPU core does ~50 GFLOP/s of
# convolution from ~6 GB/s (fitted to the compiled steps of docs/benchmarks/compile.md); a GPU's tensor
# cores ~20x its memory bandwidth in bytes/s (an assumption, not measured here)
BALANCE = {"cpu": 8.0, "cuda": 20.0}
# the activation_memory_budget values the planner tries, largest (least recomputation) first
COMPILE_BUDGETS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
# compile's budget alone on a 0.05 grid, tried when nothing on `COMPILE_BUDGETS` fits
FINE_COMPILE_BUDGETS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))


def compile_budgets(network: torch.nn.Module) -> tuple[float, ...]:
    """The ``activation_memory_budget`` values a plan may set for ``network``'s graph: `COMPILE_BUDGETS`, or only
    compile's default 1.0 for a network that

    - updates buffers in training (BatchNorm's running statistics): the budget reaches the compiler as a region
      around the network's forward (`region_activation_memory_budget`), and torch 2.13's partitioner refuses a
      region when the graph also copies updated buffers back into the module, which happens outside any region
      ("must cover the entire forward of a graph ... Unannotated ops: ['copy_', ...]");
    - draws random numbers in training (dropout, stochastic depth) while inductor is told to draw them as eager
      does (``torch._inductor.config.fallback_random``, which makes the compiled step equal the eager one): below
      1.0 the partitioner then recomputes a random operator in the backward without replaying its draw (torch 2.13,
      measured: UNet with dropout 0.2 at budget 0.3, gradients off by 0.19 against eager). With inductor's own
      random numbers (its default) the recomputation replays them (the same outputs and gradients at 0.3 as at 1.0).
    """
    random = torch._inductor.config.fallback_random
    for m in network.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return (1.0,)
        draws = (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0) or getattr(m, "drop_prob", 0) > 0
        if random and draws:
            return (1.0,)
    return COMPILE_BUDGETS


@dataclass(frozen=True)
class CompiledCost:
    """One compiled step: what it keeps for backward (distinct storages the forward graph hands to the backward,
    parameters and buffers excluded), its live-tensor peak (the optimizer phase included) and its modelled time
    (units of `BALANCE`'s floating-point operations)."""

    saved_bytes: int
    peak: int
    cost: float


class _Cost(TorchDispatchMode):
    """Floating-point operations of every operator, and bytes read and written by those inductor does not fuse."""

    supports_higher_order_operators = True  # the partition's RNG replay (run_and_save_rng_state) passes through

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.flops, self.bytes = flop_registry, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(func, torch._ops.HigherOrderOperator):
            return out
        packet = func._overloadpacket
        if packet in self.registry:
            self.flops += self.registry[packet](*args, **kwargs, out_val=out)
        if not func.is_view and torch.Tag.pointwise not in func.tags:
            tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


class CompiledStep:
    """The question's compiled step on fake tensors, for any policy and ``activation_memory_budget``
    (`measure`, each answer kept)."""

    def __init__(self, fake_step: FakeStep, device_type: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> None:
        self.fake = fake_step
        self.balance = BALANCE.get(device_type, BALANCE["cuda"])
        self.progress = progress or (lambda message: None)
        self._graphs: dict[str, tuple[Any, list, Any, list[int]]] = {}
        self._costs: dict[tuple[str, float], CompiledCost] = {}
        self._policies: dict[str, PolicySpec] = {}

    def measured(self) -> list[tuple[str, PolicySpec, CompiledCost, float]]:
        """Every compiled step measured so far: (policy text, policy, its figures, compile's budget)."""
        return [(key, self._policies[key], cost, budget) for (key, budget), cost in self._costs.items()]

    def measure(self, policy: PolicySpec, budget: float, key: str) -> CompiledCost:
        """The compiled step with ``policy`` (its JSON text ``key``) and ``activation_memory_budget=budget``."""
        if (key, budget) not in self._costs:
            self.progress(f"compiled step: partitioning {key} at activation_memory_budget={budget:g}")
            self._costs[key, budget] = self._measure(policy, budget, key)
            self._policies[key] = policy
        return self._costs[key, budget]

    def _trace(self, policy: PolicySpec, key: str, chain: bool = False) -> tuple[Any, list, Any, list[int]]:
        """Dynamo's graph of the network's training forward with ``policy``, its example inputs (the fakes), and how
        the network's output is made of the graph's outputs (a pytree spec and, per leaf, the graph output's index).

        Traced through a function made for this call: Dynamo keeps compiled code on the code object it compiles, so
        nothing of this trace is kept with the network's own ``forward`` (a user's compiled network keeps its cache
        and its recompilation count). The graph runs once, unpartitioned, on the fakes, to see which of its outputs
        the network returns (the others are side effects, such as DynUNet's heads kept on the module).

        ``chain``: the network runs its chain of blocks without checkpoints, as a ``{"budget_gb": X}`` network does
        under compile's budget alone (its forward is then the region of that budget), rather than the parent's
        forward (what it runs for ``"none"``)."""
        key = key + " (chain)" if chain else key
        if key not in self._graphs:
            from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

            fake = self.fake
            model, x = fake.model, fake.x
            model.checkpoint_policy = policy
            box: dict[str, Any] = {}

            def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
                def run(*args: Any) -> Any:
                    if any(mode is fake.mode for mode in _get_current_dispatch_mode_stack()):
                        outs = gm(*args)
                    else:
                        with fake.mode:
                            outs = gm(*args)
                    box["outs"] = outs
                    return outs

                box["graph"] = (gm, list(example_inputs))
                return run

            namespace: dict[str, Any] = {}
            exec(compile("def run(model, x):\n    return model(x)\n", f"<monai_ckpt compiled plan {len(self._graphs)}>",
                         "exec"), namespace)
            amp_dtype = autocast_dtype(x.device)
            if chain:
                model._checkpointing = lambda x: True
            try:  # floats (dropout's p) as constants: a float made a graph input would be read from a fake tensor
                with torch.autocast(x.device.type, dtype=amp_dtype, enabled=fake.amp), \
                        torch._dynamo.config.patch(specialize_float=True):
                    out = torch.compile(namespace["run"], backend=backend, fullgraph=True)(model, x)
            finally:
                model.__dict__.pop("_checkpointing", None)
            if "graph" not in box:
                raise RuntimeError(f"torch.compile made no graph of {type(model).__name__}'s training forward")
            leaves, spec = pytree.tree_flatten(out)
            outs = list(box["outs"])
            index = [next(i for i, o in enumerate(outs) if o is leaf) for leaf in leaves]
            self._graphs[key] = (*box["graph"], spec, index)
        return self._graphs[key]

    def _measure(self, policy: PolicySpec, budget: float, key: str) -> CompiledCost:
        from torch._functorch._aot_autograd.utils import make_boxed_func
        from torch._inductor.compile_fx import compile_fx
        from torch.multiprocessing.reductions import StorageWeakRef

        gm, inputs, spec, index = self._trace(policy, key, chain=policy == "none" and budget < 1.0)

        def run_graph(graph: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
            return make_boxed_func(graph.forward)  # inductor's partition, the graph run as it is

        with torch._functorch.config.patch(activation_memory_budget=float(budget)):
            compiled = compile_fx(gm, inputs, inner_compile=run_graph)
        fake, model = self.fake, self.fake.model
        own = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
        saved: dict[Any, int] = {}
        side: list = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in own:
                saved[ref] = t.untyped_storage().nbytes()
            return t

        class _Compiled(torch.nn.Module):  # the compiled graph in place of the network's forward, for the step
            def forward(self, x: torch.Tensor) -> Any:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    outs = list(compiled(*inputs))
                side.append(outs)  # what the graph returns besides the output stays alive, as on the module
                return pytree.tree_unflatten([outs[i] for i in index], spec)

        hooks = {id(t): dict(t._backward_hooks or {}) for t in model.parameters()}
        cost = _Cost()
        tracker = step_tracker()()
        tracker.track_external(model, *(() if fake.opt is None else (fake.opt,)), fake.x,
                               *(() if fake.y is None else (fake.y,)))
        with fake.mode, tracker, cost:
            training_step(_Compiled(), fake.x, None, fake.amp, loss=fake.loss, label=fake.y)
            model.zero_grad(set_to_none=True)
            side.clear()
        for t in model.parameters():  # the tracker's module hooks saw the parameters among a graph's inputs or
            # outputs and hooked them (tensor hooks outlive the step): off again, or they would hold gradients later
            for handle in set(t._backward_hooks or {}) - set(hooks[id(t)]):
                del t._backward_hooks[handle]
        peak = int(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])
        return CompiledCost(sum(saved.values()), max(peak, fake.optimizer_peak),
                            float(cost.flops + self.balance * cost.bytes))
