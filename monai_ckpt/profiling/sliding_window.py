"""The exact live-tensor peak, on each device, of one call of MONAI's ``sliding_window_inference``: the real call
(MONAI's window slicing, blending and stitching code) with the network in ``eval()`` under ``torch.no_grad()``,
under MemTracker, on fake tensors for clinical sizes (`sliding_window_memory`).

**Two devices on fake tensors.** A CPU build of torch cannot make fake CUDA tensors, so where the windows run
(``sw_device``) and where the output is stitched (``device``) differ, the windows run on fake tensors of the
network's own device and every tensor of the other device is a fake ``meta`` tensor: MemTracker counts each device
apart, and MONAI's ``.to(device)`` copies between them as it would between the GPU and the host.

**The shortcut, and why it is exact.** A 512x512x400 volume has hundreds of windows and a network's forward costs
up to seconds on fake tensors, so the call is measured with two exact reductions (``every_window=False``):

1. *The network's forward is replayed.* Under ``no_grad`` a forward allocates the same tensors for every input
   of one shape, whatever else is alive: its peak above what was alive before it, what it leaves behind besides
   its output (autocast's cache of cast weights, on the first call), and its output are measured once per input
   shape on their own (`network_call`), and each call inside the measured run allocates exactly that (the
   output with its storage and strides, the residue) and raises each device's peak to what was alive before the
   call plus the forward's own peak.
2. *Repeated windows are left out.* Between the first window batch (which allocates the output and the count
   map) and the last (which may be partial), every batch of MONAI's loop allocates and frees the same tensors
   (the windows' batch, the network's output, the weighted output, its copy to the output's device; the output
   and count map are written in place), so after one batch the next repeats the same live bytes. The run keeps
   the first two full batches and the last batch of the real call (of each buffer, with ``buffer_steps``: every
   position along ``buffer_dim`` is kept, so every buffer has its real extent, and the windows of the other
   dimensions are cut to the same count modulo ``sw_batch_size``). The output, the count map and the buffers keep
   their real sizes.

``tests/test_inference_planner.py`` checks both against the whole call measured window by window (fake tensors)
and against the real call on real tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from .blocks import storage_bytes, storages_of
from .step import autocast_dtype, fake_mode, parameter_device, replica
from .tracker import step_tracker

__all__ = ["CallProfile", "SlidingWindowMemory", "autocast_dtype", "network_call", "sliding_window_memory",
           "window_batches", "window_positions"]


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage_numel: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _TensorSpec:
        numel = t.untyped_storage().nbytes() // t.element_size()
        return _TensorSpec(tuple(t.shape), tuple(t.stride()), t.storage_offset(), numel, t.dtype)

    def make(self, device: torch.device) -> torch.Tensor:
        base = torch.empty(self.storage_numel, dtype=self.dtype, device=device)
        return base.as_strided(self.shape, self.stride, self.offset)


@dataclass(frozen=True)
class CallProfile:
    """One forward of the network on one input shape, under ``no_grad``: its peak above what was alive before it
    (``increment``), what it leaves alive besides its output (``residue``: autocast's cast weights on the first
    call), and its output (each tensor's shape, strides and storage; ``structure``: None for a tensor, else the
    tuple type or the dict's keys)."""

    increment: int
    residue: int
    outputs: tuple[_TensorSpec, ...]
    structure: Any = None

    def replay(self, device: torch.device) -> tuple[Any, torch.Tensor | None]:
        """(the output, made of fresh tensors; the residue, or None)."""
        made = [spec.make(device) for spec in self.outputs]
        residue = torch.empty(self.residue, dtype=torch.uint8, device=device) if self.residue else None
        if self.structure is None:
            return made[0], residue
        if isinstance(self.structure, tuple) and self.structure and self.structure[0] == "dict":
            return dict(zip(self.structure[1], made)), residue
        return self.structure(made), residue


def _flatten(out: Any) -> tuple[list[torch.Tensor], Any]:
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, dict):
        return list(out.values()), ("dict", tuple(out.keys()))
    if isinstance(out, (list, tuple)):
        return list(out), type(out)
    raise TypeError(f"the network returned {type(out).__name__}; sliding-window inference needs a tensor, a tuple or "
                    "a dict of tensors.")


def _device_totals(snapshot: dict) -> dict[torch.device, int]:
    return {torch.device(d): int(s["Total"]) for d, s in snapshot.items()}


@functools.cache
def _call_tracker() -> type:
    """A step tracker that keeps the most bytes alive after any operator since ``high`` was last set."""

    class _CallTracker(step_tracker()):
        high = 0

        def after_operator(self, func: Any, out: Any) -> None:
            self.high = max(self.high, self.live_bytes())

    return _CallTracker


def network_call(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, amp: bool) -> tuple[CallProfile,
                                                                                                  CallProfile]:
    """The (first, later) forward of ``model`` (in eval, on fake tensors, under ``no_grad``) on an input of
    ``shape``, measured with MemTracker in one run, as MONAI's loop calls it: the first call of a run fills
    autocast's cache, the later ones find it (and free what the call before them left)."""
    device = parameter_device(model)
    x = torch.empty(tuple(shape), dtype=dtype, device=device)
    tracker = _call_tracker()()
    tracker.track_external(model, x)
    calls, outs = [], []
    with tracker, torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
        for _ in range(2):
            tracker.reset_mod_stats()
            before = tracker.high = tracker.live_bytes()
            out = model(x)
            tensors, structure = _flatten(out)
            out_bytes = storage_bytes(storages_of(*tensors))
            residue = tracker.live_bytes() - before - out_bytes
            calls.append(CallProfile(tracker.high - before, max(residue, 0), tuple(_TensorSpec.of(t) for t in tensors),
                                     structure))
            outs.append(out)  # alive during the next call, as MONAI's loop keeps the last output
    return calls[0], calls[1]


@dataclass
class SlidingWindowMemory:
    """Peak memory of one ``sliding_window_inference`` call, and the shape of the work it does.

    Attributes:
        peaks: peak live-tensor bytes on each device the call uses (``str(torch.device)``): the network's
            parameters and buffers, the image, the windows, the network's activations and outputs, the stitched
            output and count map, the buffers.
        windows: windows per image.
        calls: batch size of each network call of the whole run, in order.
        slabs: with ``buffer_steps``, the spatial shape of each buffer written to the output, in order.
        output_shape: the stitched output (batch, classes, *spatial) of the first output.
        output_dtype: its dtype (the image's).
        window_output_dtype: the dtype of the network's window outputs (autocast's under ``amp``).
        measured_calls: the network calls the measured run made (fewer than ``calls`` where the shortcut left
            repeated window batches out).
    """

    peaks: dict[str, int]
    windows: int
    calls: tuple[int, ...]
    slabs: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] = ()
    output_dtype: torch.dtype = torch.float32
    window_output_dtype: torch.dtype = torch.float32
    measured_calls: int = 0
    profiles: dict = field(default_factory=dict, repr=False)


def window_batches(
    image_shape: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float], sw_batch_size: int,
    buffer_steps: int | None = None, buffer_dim: int = -1,
) -> tuple[int, tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(windows per image, the batch size of each network call, each buffer's spatial shape) of MONAI's
    ``sliding_window_inference`` on an image of ``image_shape`` (batch, channels, *spatial), from MONAI's own
    window and buffer functions."""
    from monai.inferers import utils as sw

    batch, dims = int(image_shape[0]), len(image_shape) - 2
    buffered = buffer_steps is not None and buffer_steps > 0
    image_size, slices = _window_slices(image_shape, roi_size, overlap, return_slice=not buffered)
    if not buffered:
        total = len(slices) * batch
        return len(slices), tuple(min(sw_batch_size, total - s) for s in range(0, total, sw_batch_size)), ()
    dim = buffer_dim + dims if buffer_dim < 0 else buffer_dim
    _, _, b_slices, ranges = sw._create_buffered_slices(slices, batch, sw_batch_size, dim, buffer_steps)
    ranges = list(ranges)
    calls, ends = [], [b[0] for b in b_slices]
    for start in ranges:
        stop = next(e for e in ends if e > start)
        calls.append(min(sw_batch_size, stop - start))
    slabs = tuple(tuple(int(e - s) if d == dim else image_size[d] for d in range(dims)) for _, s, e in b_slices)
    return len(slices), tuple(calls), slabs


def window_positions(image_shape: Sequence[int], roi_size: Sequence[int],
                     overlap: float | Sequence[float]) -> tuple[int, ...]:
    """How many window positions MONAI's ``sliding_window_inference`` takes along each spatial dimension."""
    _, slices = _window_slices(image_shape, roi_size, overlap, return_slice=False)
    return tuple(len({int(w[d][0]) for w in slices}) for d in range(len(image_shape) - 2))


def _window_slices(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float],
                   return_slice: bool) -> tuple[tuple[int, ...], Any]:
    """(the padded image size, MONAI's window slices), as ``sliding_window_inference`` computes them."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers import utils as sw
    from monai.utils import ensure_tuple_rep

    spatial, roi = [int(s) for s in image_shape[2:]], tuple(int(r) for r in roi_size)
    image_size = tuple(max(s, r) for s, r in zip(spatial, roi))
    interval = sw._get_scan_interval(image_size, roi, len(roi), ensure_tuple_rep(overlap, len(roi)))
    return image_size, dense_patch_slices(image_size, roi, interval, return_slice=return_slice)


def _kept_windows(slices: Any, sw_batch_size: int, buffer_dim: int | None) -> Any:
    """The windows the shortcut keeps (see the module's docstring): the same windows when they are few."""
    def keep(n: int) -> int:
        return n if n <= 3 * sw_batch_size else n % sw_batch_size + 2 * sw_batch_size

    if buffer_dim is None:
        return slices[: keep(len(slices))]
    import numpy as np

    planes = [tuple(np.delete(w[:, 0], buffer_dim)) for w in np.asarray(slices)]
    order = list(dict.fromkeys(planes))
    kept = set(order[: keep(len(order))])
    return [w for w, p in zip(slices, planes) if p in kept]


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """A window the network cannot take fails on fake tensors as on real ones (the caller says so); torch's fake
    tensor module would also log the failed operator's traceback at ERROR."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _windows_cut(sw_batch_size: int, buffer_dim: int | None) -> Iterator[None]:
    from monai.data.utils import dense_patch_slices
    from monai.inferers import utils as sw

    def cut(*args: Any, **kwargs: Any) -> Any:
        return _kept_windows(dense_patch_slices(*args, **kwargs), sw_batch_size, buffer_dim)

    with mock.patch.object(sw, "dense_patch_slices", cut):
        yield


class _Predictor:
    """The network as ``sliding_window_inference`` calls it: for real (``replay`` None), or replaying each call's
    measured memory (`CallProfile`) inside the tracked run."""

    def __init__(self, model: nn.Module, replay: Callable[[tuple, torch.dtype], tuple[CallProfile, CallProfile]] |
                 None, tracker: Any, device: torch.device) -> None:
        self.model, self.replay, self.tracker, self.device = model, replay, tracker, device
        self.calls = 0
        self.peaks: dict[torch.device, int] = {}
        self.kept: list[torch.Tensor] = []
        self.out_dtype: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> Any:
        self.calls += 1
        if self.replay is None:
            self.tracker.reset_mod_stats()  # MemTracker's per-module statistics take one call per module
            out = self.model(x)
        else:
            first, later = self.replay(tuple(x.shape), x.dtype)
            profile = first if self.calls == 1 else later
            live = _device_totals(self.tracker.get_tracker_snapshot()).get(self.device, 0)
            self.peaks[self.device] = max(self.peaks.get(self.device, 0), live + profile.increment)
            out, residue = profile.replay(self.device)
            if residue is not None:
                self.kept.append(residue)
        if self.out_dtype is None:
            self.out_dtype = _flatten(out)[0][0].dtype
        return out


def sliding_window_memory(
    network: nn.Module,
    image_shape: Sequence[int],
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 1,
    sw_device: str | torch.device | None = None,
    device: str | torch.device | None = None,
    image_device: str | torch.device | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    amp: bool = False,
    image_dtype: torch.dtype = torch.float32,
    estimate: bool = True,
    every_window: bool = False,
    profiles: dict | None = None,
) -> SlidingWindowMemory:
    """Peak memory on each device of ``sliding_window_inference(image, roi_size, sw_batch_size, network, ...)``.

    Args:
        network: any network; it runs in ``eval()`` under ``torch.no_grad()`` (and ``torch.autocast`` with
            ``amp``), as an evaluator runs it. With ``estimate`` it is not changed (a fake replica runs).
        image_shape: the image as the call takes it, (batch, channels, *spatial).
        roi_size: the window, one size per spatial dimension.
        sw_batch_size, sw_device, device, buffer_steps, buffer_dim, overlap, mode, sigma_scale, padding_mode, cval:
            MONAI's arguments. ``sw_device``: default the network's device; ``device`` (where the output is
            stitched): default the image's device, as in MONAI.
        image_device: where the image is; default ``sw_device``.
        amp: the call runs under ``torch.autocast`` (fp16 on CUDA, bf16 on the CPU).
        image_dtype: the image's dtype (MONAI stitches in it).
        estimate: fake tensors (nothing allocated, any size); else real tensors on the devices named (the network
            must be on ``sw_device``; a ``"meta"`` output device counts the host's tensors without allocating).
        every_window: with ``estimate``, run the network on every window (no shortcut): the reference the
            shortcut is checked against.
        profiles: a dict kept between calls for this network: its measured forwards by input shape (see
            `network_call`), so that each is measured once.

    Returns:
        a `SlidingWindowMemory`.

    Example::

        m = sliding_window_memory(net, (1, 1, 512, 512, 400), (96, 96, 96), sw_batch_size=4, sw_device="cuda",
                                  device="cpu")
        m.peaks  # {"cuda": ..., "cpu": ...}
    """
    from monai.data.utils import compute_importance_map
    from monai.inferers import sliding_window_inference

    on = parameter_device(network)
    sw_dev = torch.device(sw_device) if sw_device is not None else on
    image_dev = torch.device(image_device) if image_device is not None else sw_dev
    out_dev = torch.device(device) if device is not None else image_dev
    roi = tuple(int(r) for r in roi_size)
    windows, calls, slabs = window_batches(image_shape, roi, overlap, sw_batch_size, buffer_steps, buffer_dim)
    dims = len(roi)
    buffered = buffer_steps is not None and buffer_steps > 0
    profiles = {} if profiles is None else profiles

    def place(d: torch.device) -> torch.device:  # a device as the measurement makes it
        if not estimate or d == sw_dev:
            return on if estimate else d
        return d if d.type != on.type else torch.device("meta")

    names = {place(d): str(d) for d in (out_dev, image_dev, sw_dev)}
    weights = None
    if estimate:  # MONAI's importance map reads a value (.item()): made for real, alive all the call as in MONAI
        weights = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device="cpu", dtype=image_dtype)
    training = network.training
    with _quiet_fake_tensor_log(), fake_mode() if estimate else contextlib.nullcontext() as mode_:
        model = replica(network) if estimate else network
        model.eval()  # the real network's mode is restored below
        if weights is not None:
            weights = mode_.from_tensor(weights).to(place(sw_dev))
        image = torch.zeros(tuple(image_shape), dtype=image_dtype, device=place(image_dev))
        shortcut = estimate and not every_window

        def replay(shape: tuple, dtype: torch.dtype) -> tuple[CallProfile, CallProfile]:
            return profiles[(shape, dtype, amp)]

        if shortcut:
            for size in sorted(set(calls)):
                key = ((size, int(image_shape[1]), *roi), image_dtype, amp)
                if key not in profiles:
                    profiles[key] = network_call(model, key[0], image_dtype, amp)
        tracker = step_tracker()()
        tracker.track_external(model, image, *(() if weights is None else (weights,)))
        predictor = _Predictor(model, replay if shortcut else None, tracker, place(sw_dev))
        cut = _windows_cut(sw_batch_size, (buffer_dim + dims if buffer_dim < 0 else buffer_dim) if buffered else None)
        try:
            with tracker, cut if shortcut else contextlib.nullcontext(), torch.no_grad(), torch.autocast(
                    place(sw_dev).type, dtype=autocast_dtype(place(sw_dev)), enabled=amp):
                out = sliding_window_inference(
                    image, roi, sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode, cval,
                    place(sw_dev), place(out_dev), False, weights, None, buffer_steps, buffer_dim)
                peak = _device_totals(tracker.get_tracker_snapshot("peak"))
        finally:
            network.train(training)
        first = _flatten(out)[0][0]
        output_shape, output_dtype = tuple(first.shape), first.dtype
        window_dtype = predictor.out_dtype or output_dtype
        del out, first
    for d, v in predictor.peaks.items():
        peak[d] = max(peak.get(d, 0), v)
    peaks = {name: 0 for name in names.values()}
    for d, v in peak.items():
        peaks[names.get(d, str(d))] = v
    return SlidingWindowMemory(peaks, windows, calls, slabs, output_shape, output_dtype, window_dtype,
                               predictor.calls, profiles)
