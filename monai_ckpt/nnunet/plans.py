"""Plans that fit a GPU with checkpointing: a configuration added to an nnU-Net plans file, which nnU-Net reads as
it is.

nnU-Net's planners size the patch for a GPU with a proxy (the sum of the network's feature-map sizes against a
reference). With checkpointing a larger patch fits the same GPU. `plan_configuration` walks nnU-Net's own sequence of
patches for a configuration, largest first: nnU-Net's initial patch (the spacing's aspect ratio at 256^3 voxels in
3D, 2048^2 in 2D, clipped to the median image), each next one made by cutting the axis that is largest against the
median image, with the topology (stages, strides, kernels) from nnU-Net's ``get_pool_and_conv_props``. For each it
predicts the peak of one training step as nnU-Net runs it: the checkpoint-aware network at that patch and batch,
nnU-Net's loss (Dice + cross-entropy over the deep-supervision heads, weighted as nnUNetTrainer weights them, the
targets at each scale in int16 as its data loader gives them), autocast, SGD with momentum (`predicted_step_peak`:
`monai_ckpt.profiling.measure_step_memory` on fake tensors, exact for live tensors, plus the momentum buffers). The
largest patch whose step fits the budget with ``"all"`` wins, with the fastest policy that fits there: the one
`monai_ckpt.plan` finds for that step (`fastest_policy`).

The result is written as a new configuration (``"inherits_from"`` the source configuration, so it uses the same
preprocessed data) with ``"checkpoint_policy"``, which ``nnUNetTrainerCkpt`` reads::

    python -m monai_ckpt.nnunet plan -d 3 -p nnUNetResEncUNetLPlans -c 3d_fullres --gpu-memory-gb 24
    nnUNetv2_train 3 3d_fullres_ckpt24gb 0 -tr nnUNetTrainerCkpt -p nnUNetResEncUNetLPlans
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pydoc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_path
from ..planner.device import CUDA_HEADROOM_FRACTION, CUDA_HEADROOM_MIN_GB
from ..policies import PolicySpec, validate_policy
from ..profiling import LabelBatch, measure_step_memory
from .networks import checkpoint_class_for, nnunet_network_classes

__all__ = ["ConfigurationPlan", "NnUNetStepLoss", "add_plan_arguments", "architecture_for", "candidate_patches",
           "fastest_policy", "plan_configuration", "predicted_step_peak", "run_plan", "write_configuration"]

GiB = 2**30
_MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net's planners' UNet_max_features_2d / _3d
_INITIAL_VOXELS = {2: 2048**2, 3: 256**3}  # nnU-Net's initial patch volume
_MIN_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


def _ds_weights(n_heads: int) -> list[float]:
    """nnUNetTrainer's deep-supervision weights: 1/2^i, the lowest resolution's 0, normalised."""
    weights = np.array([1 / (2**i) for i in range(n_heads)])
    weights[-1] = 0
    return list(weights / weights.sum())


class NnUNetStepLoss:
    """nnUNetTrainer's training loss (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, wrapped in
    ``DeepSupervisionWrapper``) called as ``loss(outputs, label)`` with the full-resolution label batch: the targets of
    the lower heads (int16, as nnU-Net's data loader makes them) are made on the first call and kept alive, as the
    trainer's batch keeps them.

    Args:
        strides: the configuration's ``pool_op_kernel_sizes`` (one per stage).
        batch_dice: the configuration's ``batch_dice``.
        deep_supervision: whether the network returns one output per decoder stage.
    """

    def __init__(self, strides: Sequence[Sequence[int]], batch_dice: bool, deep_supervision: bool = True) -> None:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
        self.scales = [tuple(int(s) for s in scale) for scale in np.cumprod(np.vstack(strides), axis=0)[:-1]]
        self.loss = DeepSupervisionWrapper(loss, _ds_weights(len(self.scales))) if deep_supervision else loss
        self.deep_supervision = deep_supervision
        self._targets: list[torch.Tensor] = []

    def __call__(self, outputs: Any, label: torch.Tensor) -> torch.Tensor:
        if not self.deep_supervision:
            return self.loss(outputs, label)
        if not self._targets or self._targets[0] is not label:  # a new batch (the planner calls it at two sizes)
            spatial = label.shape[2:]
            self._targets = [label] + [torch.zeros((*label.shape[:2], *[n // s for n, s in zip(spatial, scale)]),
                                                   dtype=label.dtype, device=label.device) for scale in self.scales[1:]]
        return self.loss(outputs, self._targets)


def architecture_for(source: dict, dims: int, strides: Sequence[Sequence[int]],
                     kernels: Sequence[Sequence[int]]) -> dict:
    """The source configuration's ``"architecture"`` for another topology, as nnU-Net's planners write it: as many
    stages as ``strides``, features doubling from the first stage's up to nnU-Net's maximum, blocks (or convolutions)
    per stage and per decoder stage as the source has them, its last value repeated for extra stages."""
    arch = copy.deepcopy(source)
    kw = arch["arch_kwargs"]
    n = len(strides)
    features = list(kw["features_per_stage"])
    saturated = len(features) > 1 and features[-1] == features[-2]
    top = features[-1] if saturated else max(features[-1], _MAX_FEATURES[dims])
    per_stage = "n_blocks_per_stage" if "n_blocks_per_stage" in kw else "n_conv_per_stage"

    def fit(values: Sequence[int], length: int) -> list[int]:
        values = list(values)
        return (values + [values[-1]] * length)[:length]

    kw.update(n_stages=n, features_per_stage=[min(top, features[0] * 2**i) for i in range(n)],
              kernel_sizes=[list(map(int, k)) for k in kernels], strides=[list(map(int, s)) for s in strides])
    kw[per_stage] = fit(kw[per_stage], n)
    kw["n_conv_per_stage_decoder"] = fit(kw["n_conv_per_stage_decoder"], n - 1)
    return arch


def _topology(spacing: Sequence[float], patch: Sequence[int]) -> tuple[list, list, list[int], list[int]]:
    """nnU-Net's ``get_pool_and_conv_props``: (strides, kernels, patch made divisible, divisor per axis)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, patch, divisible_by = get_pool_and_conv_props(spacing, patch, _MIN_EDGE, 999999)
    return strides, kernels, [int(p) for p in patch], [int(d) for d in divisible_by]


def candidate_patches(spacing: Sequence[float], median_shape: Sequence[float]) -> Iterator[tuple[list[int], list,
                                                                                                    list]]:
    """nnU-Net's patches for a configuration, largest first, each with its topology ``(patch, strides, kernels)``:
    the planners' initial patch, then each next one with the axis that is largest against the median image cut by
    what that axis must be divisible by (recomputed after the cut, as nnU-Net does), down to the last patch whose
    network has two deep-supervision heads (nnU-Net weights the lowest 0)."""
    dims = len(spacing)
    inverse = 1 / np.array(spacing, dtype=float)
    initial = [round(i) for i in inverse * (_INITIAL_VOXELS[dims] / np.prod(inverse)) ** (1 / dims)]
    patch = [min(i, int(m)) for i, m in zip(initial, median_shape)]
    strides, kernels, patch, divisible_by = _topology(spacing, patch)
    seen = set()
    while tuple(patch) not in seen and len(strides) > 2:  # deep supervision needs two heads, one weighted
        seen.add(tuple(patch))
        yield patch, strides, kernels
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])
        cut = list(patch)
        cut[axis] -= divisible_by[axis]
        if cut[axis] < 1:
            return
        _, _, _, divisible_by = _topology(spacing, cut)
        patch = list(patch)
        patch[axis] -= divisible_by[axis]
        if patch[axis] < 1:
            return
        strides, kernels, patch, divisible_by = _topology(spacing, patch)


def _network_factory(architecture: dict, in_channels: int, num_classes: int, policy: PolicySpec,
                     deep_supervision: bool = True) -> Callable[[], nn.Module]:
    ours = checkpoint_class_for(architecture["network_class_name"])
    if ours is None:
        raise ValueError(f"the plans name the network {architecture['network_class_name']!r}; the planner knows "
                         f"{sorted(nnunet_network_classes())}.")
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    kwargs["deep_supervision"] = deep_supervision

    def factory() -> nn.Module:
        return ours(input_channels=in_channels, num_classes=num_classes, **kwargs, checkpoint_policy=policy)

    return factory


def predicted_step_peak(architecture: dict, patch: Sequence[int], batch_size: int, in_channels: int,
                        num_classes: int, policy: PolicySpec, *, batch_dice: bool = True, amp: bool = True,
                        estimate: bool = True) -> int:
    """The peak bytes of live tensors in one nnUNetTrainer step (forward and loss under autocast, backward, SGD with
    momentum) of the checkpoint-aware network for ``architecture`` at ``patch`` and ``batch_size`` with ``policy``:
    `monai_ckpt.profiling.measure_step_memory` with `NnUNetStepLoss` and an int16 label batch (fake tensors when
    ``estimate``, else a real step on the CPU), plus the momentum buffers (one per parameter, alive all the time),
    which its ``"sgd"`` does not keep."""
    factory = _network_factory(architecture, in_channels, num_classes, policy)
    measured = measure_step_memory(factory, (batch_size, in_channels, *patch), estimate=estimate, amp=amp,
                                   **_step_arguments(architecture, patch, batch_size, batch_dice))
    return measured.peak + _parameter_bytes(architecture, in_channels, num_classes)


def _step_arguments(architecture: dict, patch: Sequence[int], batch_size: int, batch_dice: bool) -> dict:
    """nnUNetTrainer's step as `measure_step_memory` and `monai_ckpt.plan` take it: SGD (its momentum buffers are
    added by the callers), nnU-Net's loss and an int16 label batch."""
    return {"optimizer": "sgd", "loss": NnUNetStepLoss(architecture["arch_kwargs"]["strides"], batch_dice),
            "label": LabelBatch((batch_size, 1, *patch), torch.int16)}


def _parameter_bytes(architecture: dict, in_channels: int, num_classes: int) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        network = _network_factory(architecture, in_channels, num_classes, "none")()
        return sum(p.numel() * p.element_size() for p in network.parameters())


@dataclass
class ConfigurationPlan:
    """What `plan_configuration` chose, and what it measured on the way.

    Attributes:
        patch_size, batch_size, architecture, checkpoint_policy: the configuration to train.
        predicted_peak_bytes: the predicted step peak with that policy; ``budget_bytes``: what it had to fit
            (the GPU's memory less the headroom).
        plain_peak_bytes: the same configuration without checkpointing.
        predicted_time_ratio: the step time with that policy against none, as `monai_ckpt.plan` models it from
            block times (None where the policy came from ``policies``).
        measured: every (patch, policy, peak bytes) measured, in order.
    """

    patch_size: list[int]
    batch_size: int
    architecture: dict
    checkpoint_policy: PolicySpec
    predicted_peak_bytes: int
    budget_bytes: int
    plain_peak_bytes: int | None
    measured: list[tuple[tuple[int, ...], str, int]] = field(default_factory=list)
    predicted_time_ratio: float | None = None


def _headroom_bytes(gpu_memory_gb: float, headroom_gb: float | None) -> int:
    """As `monai_ckpt.planner.plan` on CUDA (`planner.device`: 10% of the GPU and at least 0.25 GiB), unless given."""
    if headroom_gb is None:
        return int(max(CUDA_HEADROOM_FRACTION * gpu_memory_gb, CUDA_HEADROOM_MIN_GB) * GiB)
    if headroom_gb < 0 or headroom_gb >= gpu_memory_gb:
        raise ValueError(f"headroom_gb must be at least 0 and below the GPU's {gpu_memory_gb} GiB, got {headroom_gb}.")
    return int(headroom_gb * GiB)


def fastest_policy(architecture: dict, patch: Sequence[int], batch_size: int, in_channels: int, num_classes: int,
                   budget_bytes: int, *, batch_dice: bool = True,
                   progress: Callable[[str], None] | None = None) -> tuple[PolicySpec, int, float]:
    """The fastest policy whose nnUNetTrainer step fits ``budget_bytes``, its peak (as `predicted_step_peak` gives
    it, measured by the planner) and its modelled step-time ratio: `monai_ckpt.plan` (segments and blocks, each fully
    or cheaply recomputed, from block times measured on this CPU at a small size) for the step `predicted_step_peak`
    describes, the momentum buffers taken off the budget.

    Raises:
        ValueError: when nothing fits (`monai_ckpt.plan`'s message).
    """
    from ..planner import plan
    from ..planner.search import forget_planners

    network = _network_factory(architecture, in_channels, num_classes, "none")()
    momentum = sum(p.numel() * p.element_size() for p in network.parameters())
    try:
        result = plan(network, patch, (budget_bytes - momentum) / GiB, batch_size=batch_size, amp=True,
                      progress=progress or False, **_step_arguments(architecture, patch, batch_size, batch_dice))
    finally:
        forget_planners(network)
    return result.policy, result.predicted_peak_bytes + momentum, result.predicted_time_ratio


def plan_configuration(configuration: dict, gpu_memory_gb: float, in_channels: int, num_classes: int, *,
                       policies: Sequence[PolicySpec] | None = None, headroom_gb: float | None = None,
                       batch_size: int | None = None, keep_patch: bool = False,
                       progress: Callable[[str], None] | None = None) -> ConfigurationPlan:
    """The largest of nnU-Net's patches for ``configuration`` (a resolved plans configuration: spacing, median image,
    architecture, batch size) whose nnUNetTrainer step fits ``gpu_memory_gb`` less headroom, and the fastest policy
    that fits there; with ``keep_patch``, the fastest policy with which the configuration's own patch fits.

    The patch is the largest that fits with the least-memory policy (``"all"``, or the last of ``policies``). The
    policy: ``"none"`` if that fits, else the fastest `monai_ckpt.plan` finds (`fastest_policy`: some segments
    recomputed in full, some cheaply, some not at all), or with ``policies`` the first of them that fits.

    Args:
        configuration: the source configuration, e.g. ``PlansManager(plans).get_configuration("3d_fullres")
            .configuration``.
        gpu_memory_gb: the GPU's memory in GiB.
        in_channels, num_classes: the dataset's input channels and segmentation heads.
        policies: checkpoint policies to choose from instead of the planner's, fastest first; the last should need
            the least memory.
        headroom_gb: what of the GPU the step needs beyond live tensors (default 10%, at least 0.25 GiB).
        batch_size: patches per step (default: the configuration's).
        keep_patch: keep the configuration's patch and network (e.g. ResEnc-L's plans on a 12 GB GPU): only the
            policy is chosen.
        progress: called with a line for each measurement.

    Raises:
        ValueError: when not even nnU-Net's smallest patch fits (with ``keep_patch``: the configuration's patch),
            for an unknown network or bad arguments.
    """
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be positive, got {gpu_memory_gb!r}.")
    if policies is not None and not policies:
        raise ValueError("policies must name at least one policy (or be None: the planner's).")
    for policy in policies or ():
        validate_policy(policy)
    budget = int(gpu_memory_gb * GiB) - _headroom_bytes(gpu_memory_gb, headroom_gb)
    batch = int(batch_size or configuration["batch_size"])
    spacing, median = configuration["spacing"], configuration["median_image_size_in_voxels"]
    dims = len(spacing)
    source = configuration["architecture"]
    if keep_patch:
        kwargs = source["arch_kwargs"]
        candidates = [(list(configuration["patch_size"]), kwargs["strides"], kwargs["kernel_sizes"])]
    else:
        candidates = list(candidate_patches(spacing, median))

    def architecture(i: int) -> dict:
        return source if keep_patch else architecture_for(source, dims, candidates[i][1], candidates[i][2])

    batch_dice = configuration.get("batch_dice", True)
    measured: list[tuple[tuple[int, ...], str, int]] = []
    say = progress or (lambda line: None)

    def peak(i: int, policy: PolicySpec) -> int:
        patch = candidates[i][0]
        value = predicted_step_peak(architecture(i), patch, batch, in_channels, num_classes, policy, batch_dice=batch_dice)
        measured.append((tuple(patch), json.dumps(policy), value))
        say(f"patch {'x'.join(map(str, patch))}, batch {batch}, {json.dumps(policy)}: {value / GiB:.2f} GiB "
            f"(fits {budget / GiB:.2f}: {'yes' if value <= budget else 'no'})")
        return value

    least = policies[-1] if policies else "all"
    lo, hi = 0, len(candidates) - 1  # candidates[hi] must fit; find the first (largest) that fits
    if peak(0, least) <= budget:  # the largest fits (a large GPU, a small image): nothing to search
        hi = 0
    elif keep_patch:
        raise ValueError(f"the configuration's patch {candidates[0][0]} (batch {batch}) does not fit "
                         f"{budget / GiB:.2f} GiB with {least!r}: {measured[-1][2] / GiB:.2f} GiB. Leave out "
                         "keep_patch (--keep-patch) for the largest patch that fits, or lower the batch size.")
    elif peak(hi, least) > budget:
        raise ValueError(f"not even nnU-Net's smallest patch {candidates[hi][0]} (batch {batch}) fits "
                         f"{budget / GiB:.2f} GiB with {least!r}: {measured[-1][2] / GiB:.2f} GiB.")
    while lo < hi:  # the peak grows with the patch: bisect on the least-memory policy
        mid = (lo + hi) // 2
        if peak(mid, least) <= budget:
            hi = mid
        else:
            lo = mid + 1
    patch, arch = candidates[hi][0], architecture(hi)
    chosen, chosen_peak = least, next(v for p, s, v in measured if p == tuple(patch) and s == json.dumps(least))
    time_ratio = None
    plain = peak(hi, "none") if policies is None or "none" in policies else None
    if plain is not None and plain <= budget:
        chosen, chosen_peak = "none", plain
    elif policies is None:
        say(f"patch {'x'.join(map(str, patch))}: searching the fastest policy under {budget / GiB:.2f} GiB")
        policy, value, ratio = fastest_policy(arch, patch, batch, in_channels, num_classes, budget,
                                              batch_dice=batch_dice, progress=say)
        measured.append((tuple(patch), json.dumps(policy), value))  # the planner measured this step's peak
        if value <= budget:
            chosen, chosen_peak, time_ratio = policy, value, ratio
    else:
        for policy in policies[:-1]:
            if policy == "none":
                continue
            value = peak(hi, policy)
            if value <= budget:
                chosen, chosen_peak = policy, value
                break
    return ConfigurationPlan(list(patch), batch, arch, chosen, chosen_peak, budget, plain, measured, time_ratio)


def write_configuration(plans_file: str | os.PathLike, name: str, source: str, plan: ConfigurationPlan,
                        gpu_memory_gb: float, command: str = "") -> None:
    """Add configuration ``name`` to ``plans_file``: ``inherits_from`` ``source`` (its preprocessed data), with the
    plan's patch, batch size, architecture and ``checkpoint_policy``, and a ``"monai_ckpt"`` note of what was
    predicted. The file is rewritten whole or not at all.

    Raises:
        ValueError: when ``name`` exists and was not written by this planner (nnU-Net's own configurations are never
            replaced), or ``source`` does not exist.
    """
    path = Path(plans_file)
    plans = json.loads(path.read_text())
    configurations = plans["configurations"]
    if source not in configurations:
        raise ValueError(f"{path} has no configuration {source!r}; it has {sorted(configurations)}.")
    if name in configurations and "monai_ckpt" not in configurations[name]:
        raise ValueError(f"{path} already has a configuration {name!r} that monai_ckpt did not write: give another "
                         "name (--name).")
    configurations[name] = {
        "inherits_from": source,
        "patch_size": plan.patch_size,
        "batch_size": plan.batch_size,
        "architecture": plan.architecture,
        "checkpoint_policy": plan.checkpoint_policy,
        "monai_ckpt": {
            "gpu_memory_gb": gpu_memory_gb,
            "budget_gib": round(plan.budget_bytes / GiB, 3),
            "predicted_peak_gib": round(plan.predicted_peak_bytes / GiB, 3),
            "plain_peak_gib": None if plan.plain_peak_bytes is None else round(plan.plain_peak_bytes / GiB, 3),
            "predicted_time_ratio": (None if plan.predicted_time_ratio is None
                                     else round(plan.predicted_time_ratio, 3)),
            "trainer": "nnUNetTrainerCkpt",
            "command": command,
        },
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plans, indent=4, sort_keys=False) + "\n")


def _plans_file(args: argparse.Namespace) -> Path:
    if args.plans_file:
        return Path(args.plans_file)
    if args.dataset is None:
        raise ValueError("give the dataset (-d ID or name) or the plans file (--plans-file).")
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise ValueError("nnUNet_preprocessed is not set: set it, or give --plans-file.")
    return Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(args.dataset) / f"{args.plans}.json"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", help="nnU-Net dataset ID or name (plans under $nnUNet_preprocessed)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--plans-file", help="the plans JSON itself (instead of -d/-p)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="source configuration (3d_fullres)")
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="the GPU's memory, GiB")
    parser.add_argument("--headroom-gb", type=float, help="beyond live tensors (default 10%%, >= 0.25)")
    parser.add_argument("--policies", help='JSON list of checkpoint policies to choose from, fastest first, e.g. '
                        '\'["none", "cheap", "all"]\' (default: the fastest monai_ckpt.plan finds)')
    parser.add_argument("--batch-size", type=int, help="patches per step (default: the source configuration's)")
    parser.add_argument("--keep-patch", action="store_true",
                        help="keep the source configuration's patch and network; choose only the policy")
    parser.add_argument("--name", help="the new configuration (default SOURCE_ckptXgb)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")


def run_plan(args: argparse.Namespace) -> int:
    """``python -m monai_ckpt.nnunet plan``: plan, print, and add the configuration to the plans file."""
    import sys

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        path = _plans_file(args)
        if not path.is_file():
            raise ValueError(f"no plans file {path}: run nnUNetv2_plan_and_preprocess (or nnUNetv2_plan_experiment) "
                             "first, or give --plans-file.")
        plans = json.loads(path.read_text())
        dataset_json = path.parent / "dataset.json"
        if not dataset_json.is_file():
            raise ValueError(f"no {dataset_json} beside the plans: nnU-Net's preprocessing writes it.")
        dataset = json.loads(dataset_json.read_text())
        manager = PlansManager(plans)
        labels = manager.get_label_manager(dataset)
        if labels.has_regions:
            raise ValueError("region-based labels (DC_and_BCE_loss) are not planned yet: plan a dataset with classes.")
        configuration = manager.get_configuration(args.configuration).configuration
        policies = None if args.policies is None else json.loads(args.policies)
        if policies is not None and (not isinstance(policies, list) or not policies):
            raise ValueError(f"--policies must be a JSON list of policies, got {args.policies!r}.")
        channels = len(dataset.get("channel_names", dataset.get("modality", {})))
        plan = plan_configuration(configuration, args.gpu_memory_gb, channels, labels.num_segmentation_heads,
                                  policies=policies, headroom_gb=args.headroom_gb, batch_size=args.batch_size,
                                  keep_patch=args.keep_patch,
                                  progress=lambda line: print(line, file=sys.stderr))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.name or f"{args.configuration}_ckpt{args.gpu_memory_gb:g}gb"
    source_patch = configuration["patch_size"]
    print(f"{name}: patch {'x'.join(map(str, plan.patch_size))} (the source's {'x'.join(map(str, source_patch))}: "
          f"{math.prod(plan.patch_size) / math.prod(source_patch):.2f}x the voxels), batch {plan.batch_size}, "
          f"{plan.architecture['arch_kwargs']['n_stages']} stages, checkpoint_policy "
          f"{json.dumps(plan.checkpoint_policy)}: predicted peak {plan.predicted_peak_bytes / GiB:.2f} GiB of "
          f"{plan.budget_bytes / GiB:.2f} GiB"
          + ("" if plan.predicted_time_ratio is None else f", step time x{plan.predicted_time_ratio:.2f} (modelled)")
          + ("" if plan.plain_peak_bytes is None
             else f" (without checkpointing {plan.plain_peak_bytes / GiB:.2f} GiB)"))
    if args.dry_run:
        return 0
    command = ""
    if sys.argv[0].endswith("__main__.py"):
        command = " ".join(["python -m monai_ckpt.nnunet", *sys.argv[1:]])
    try:
        write_configuration(path, name, args.configuration, plan, args.gpu_memory_gb, command)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dataset_arg = args.dataset or plans.get("dataset_name", "DATASET")
    print(f"added {name!r} to {path}; train it with\n"
          f"  export nnUNet_extTrainer=$(python -m monai_ckpt.nnunet trainers-path)\n"
          f"  nnUNetv2_train {dataset_arg} {name} FOLD -tr nnUNetTrainerCkpt -p {path.stem}\n"
          f"(it uses {args.configuration}'s preprocessed data: nnUNetv2_preprocess -c {args.configuration} if "
          "not done)")
    return 0
