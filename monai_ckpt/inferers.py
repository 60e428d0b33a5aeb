"""``PlannedSlidingWindowInferer``: MONAI's ``SlidingWindowInferer`` that, given a memory budget, plans its
settings (`monai_ckpt.planner.plan_inference`) on the first image of each shape and keeps the plan; bundle configs
name it ``monai_ckpt.inferers.PlannedSlidingWindowInferer``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from torch import nn

from .planner import InferencePlan, plan_inference
from .profiling.step import parameter_device

__all__ = ["PlannedSlidingWindowInferer"]

_log = logging.getLogger(__name__)


class PlannedSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` with a memory budget: on the first image of each shape it plans ``sw_batch_size``,
    where the output is stitched (``device``) and ``buffer_steps``/``buffer_dim`` so that the whole call fits
    ``budget_gb`` on the device where the windows run, in the least time (`plan_inference`), and reuses the plan
    for every image of that shape. The windows, overlap and blending are the ones given, so the results are
    ``SlidingWindowInferer``'s (to float rounding); autocast is used only when ``amp=True`` allows it.

    Without ``budget_gb`` (the default) it is ``SlidingWindowInferer``, argument for argument.

    Args:
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device, progress,
            cache_roi_weight_map, cpu_thresh, buffer_steps, buffer_dim, with_coord: ``SlidingWindowInferer``'s.
            With ``budget_gb`` the plan sets ``sw_batch_size``, ``device``, ``buffer_steps`` and ``buffer_dim``
            (the values given are what runs without a budget); the windows run where the network is.
        budget_gb: memory for one call on the device where the windows run (GiB), or None.
        host_budget_gb: memory on the host for an output stitched there (GiB); default no limit.
        headroom_gb: what of ``budget_gb`` the device needs beyond live tensors (default: on CUDA 10%, at least
            0.25 GiB).
        amp: allow the plan to run the call under ``torch.autocast`` (changes results slightly; see
            docs/guide/inference.md). Under an evaluator's own autocast the plan counts it either way.

    Raises:
        ValueError: at the first image, when nothing fits (with the smallest peak reachable), for a roi larger than
            the image, or an image whose channels are not the network's.

    Example::

        inferer = PlannedSlidingWindowInferer(roi_size=(96, 96, 96), overlap=0.5, mode="gaussian", budget_gb=8)
        pred = inferer(image.cuda(), net.cuda())   # plans on this shape, then runs
        print(inferer.plans[tuple(image.shape)])
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.25,
        mode: str = "constant",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        cache_roi_weight_map: bool = False,
        cpu_thresh: int | None = None,
        buffer_steps: int | None = None,
        buffer_dim: int = -1,
        with_coord: bool = False,
        *,
        budget_gb: float | None = None,
        host_budget_gb: float | None = None,
        headroom_gb: float | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device,
                         progress, cache_roi_weight_map, cpu_thresh, buffer_steps, buffer_dim, with_coord)
        if budget_gb is not None and (isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float))
                                      or not budget_gb > 0):
            raise ValueError(f"budget_gb must be a positive number of GiB or None, got {budget_gb!r}.")
        if budget_gb is not None and with_coord:
            raise ValueError("with_coord=True passes the windows' coordinates to the network, which the planner does "
                             "not measure: leave budget_gb out, or with_coord False.")
        self.budget_gb, self.host_budget_gb, self.headroom_gb, self.amp = budget_gb, host_budget_gb, headroom_gb, amp
        self.plans: dict[tuple, InferencePlan] = {}

    def plan_for(self, inputs: torch.Tensor, network: nn.Module) -> InferencePlan:
        """The plan for ``inputs`` (planned on the first image of its shape, dtype, device and autocast state)."""
        if not isinstance(network, nn.Module):
            raise TypeError(f"with budget_gb the inferer plans the network's memory: give an nn.Module, got "
                            f"{type(network).__name__}.")
        windows = parameter_device(network, inputs.device)
        autocast = torch.is_autocast_enabled(windows.type)
        key = (tuple(inputs.shape), inputs.dtype, str(inputs.device), str(windows), autocast)
        if key not in self.plans:
            plan = plan_inference(
                network, tuple(inputs.shape), self.roi_size, self.budget_gb, overlap=self.overlap,
                mode=self.mode.value if hasattr(self.mode, "value") else self.mode, sigma_scale=self.sigma_scale,
                padding_mode=self.padding_mode, cval=self.cval, amp="always" if autocast else self.amp,
                device=windows, image_device=inputs.device, host_budget_gb=self.host_budget_gb,
                headroom_gb=self.headroom_gb, image_dtype=inputs.dtype)
            _log.info("sliding-window inference of %s planned into %s GiB:\n%s", key[0], self.budget_gb, plan)
            self.plans[key] = plan
        return self.plans[key]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.budget_gb is None:
            return super().__call__(inputs, network, *args, **kwargs)
        condition = kwargs.get("condition", None)
        if condition is not None and condition.shape != inputs.shape:
            raise ValueError(f"`condition` must match shape of `inputs` ({inputs.shape}), but got {condition.shape}")
        plan = self.plan_for(inputs, network)
        for name in ("device", "buffer_steps", "buffer_dim"):  # the plan's, not a call's override
            kwargs.pop(name, None)
        settings = plan.sliding_window_kwargs()
        windows = torch.device(settings["sw_device"])
        with torch.autocast(windows.type, enabled=True) if plan.amp and not torch.is_autocast_enabled(
                windows.type) else contextlib.nullcontext():
            return sliding_window_inference(
                inputs, self.roi_size, settings["sw_batch_size"], network, self.overlap, self.mode, self.sigma_scale,
                self.padding_mode, self.cval, settings["sw_device"], settings["device"], self.progress,
                self.roi_weight_map, None, settings["buffer_steps"], settings["buffer_dim"], self.with_coord,
                *args, **kwargs)
