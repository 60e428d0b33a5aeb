"""Device rules: the budget in bytes, the device a network plans for (where its parameters are), and the headroom a
CUDA budget keeps for what the device adds beyond live tensors."""

from __future__ import annotations

import torch
from torch import nn

from .result import GiB
from .step import parameter_device

__all__ = ["CUDA_HEADROOM_FRACTION", "CUDA_HEADROOM_MIN_GB", "budget_bytes", "device_of", "headroom_bytes"]

CUDA_HEADROOM_FRACTION = 0.10  # default CUDA headroom: this fraction of the budget (caching-allocator
CUDA_HEADROOM_MIN_GB = 0.25  # rounding and fragmentation) and at least this much (cuDNN workspaces); see docs


def budget_bytes(budget_gb: float) -> int:
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not budget_gb > 0:
        raise ValueError(f"budget_gb must be a positive number of GiB, got {budget_gb!r}.")
    return int(budget_gb * GiB)


def device_of(network: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device the network's parameters are on; ``device``, when given, must be that one."""
    on = parameter_device(network)
    if device is None:
        return on
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:0'): {error}") from None
    if wanted.type != on.type or (wanted.index is not None and on.index is not None and wanted.index != on.index):
        raise ValueError(f"the network's parameters are on {on}, not {wanted}: plan where it trains (move it first, "
                         f"network.to({str(wanted)!r})), or leave device out to plan for {on}.")
    return on


def headroom_bytes(headroom_gb: float | None, budget: int, device: torch.device) -> int:
    """What the budget keeps back beyond live tensors: ``headroom_gb``, else the device's default (CUDA:
    CUDA_HEADROOM_FRACTION of the budget, at least CUDA_HEADROOM_MIN_GB; CPU: none)."""
    if headroom_gb is None:
        if device.type != "cuda":
            return 0
        return int(max(CUDA_HEADROOM_FRACTION * budget, CUDA_HEADROOM_MIN_GB * GiB))
    if isinstance(headroom_gb, bool) or not isinstance(headroom_gb, (int, float)) or not headroom_gb > 0:
        raise ValueError(f"headroom_gb must be a positive number of GiB (what the device needs beyond live tensors: "
                         f"allocator rounding, cuDNN workspaces), got {headroom_gb!r}; leave it out for the default "
                         f"(CUDA: {CUDA_HEADROOM_FRACTION:.0%} of the budget, at least {CUDA_HEADROOM_MIN_GB} GiB; "
                         "CPU: none).")
    headroom = int(headroom_gb * GiB)
    if headroom >= budget:
        raise ValueError(f"headroom_gb={headroom_gb} leaves nothing of the {budget / GiB:.4g} GiB budget for tensors; "
                         "give a headroom below the budget.")
    return headroom
