"""``plan_inference()``: the settings of MONAI's ``sliding_window_inference`` with which one whole image fits a
memory budget in the least time.

MONAI's call has the knobs (``sw_batch_size``; ``sw_device``, where the windows run, and ``device``, where the
output is stitched; ``buffer_steps``/``buffer_dim``, rows of windows stitched on the windows' device before they
are added to the output), and the user guesses them. The planner measures the real call for each setting it
considers (`monai_ckpt.profiling.sliding_window_memory`: MONAI's own slicing, blending and stitching code, exact
live-tensor bytes on fake tensors, both devices) and keeps the window, overlap and blending the user gave, so
its results are MONAI's (to float rounding; autocast, opt-in, is the one setting that changes values).

How it chooses:

1. The least memory on the windows' device (one window at a time, the output stitched on the host when the
   windows run on a GPU; autocast when allowed): if even that does not fit, a ``ValueError`` gives its peak.
2. ``sw_batch_size`` 1, 2, 4, ...: each size whose least-memory setting fits is timed for real on the windows'
   device against the last size kept (a forward of that many windows, interleaved, the fastest of 3 rounds after a
   warm-up: CPU process time, or CUDA wall time); a size is kept where its time per window drops by 5% (else a
   larger batch only costs memory), and the doubling stops after two sizes in a row that do not, or where nothing
   fits. Where the windows' device is not here (planning for CUDA on a CPU machine),
   nothing is timed and ``sw_batch_size`` stays 1.
3. Every combination of those batch sizes, autocast (when allowed) and stitching (on the windows' device; on
   the host window by window; on the host through buffers of 1, 2, 4, ... rows along each dimension) gets a
   predicted time: the timed forwards of its window batches plus its stitching work (bytes written on each
   device and copied between them, at rates measured here: an in-place addition on each device, a copy to the
   host; on a device that is not here, `NOMINAL_BYTES_PER_S`). Settings are measured in order of that time and
   the first that fits both budgets is the plan; a setting is skipped when a smaller batch or fewer buffer
   steps of the same kind did not fit.

On CUDA the budget keeps the training planner's headroom (`device.headroom_bytes`).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..profiling import device_clock, sliding_window_memory, window_batches, window_positions
from ..profiling.sliding_window import SlidingWindowMemory, autocast_dtype
from .device import budget_bytes, headroom_bytes
from .result import format_size

__all__ = ["NOMINAL_BYTES_PER_S", "SW_BATCH_SIZES", "InferencePlan", "plan_inference"]

SW_BATCH_SIZES = (1, 2, 4, 8, 16, 32)  # the window batches considered
TIME_GAIN = 0.95  # a larger window batch is kept only if its time per window is below this fraction of the last
NOMINAL_BYTES_PER_S = {"cuda": 1.0e12, "link": 1.0e10}  # a GPU's in-place addition and its pageable copy to the
# host, used where the GPU is not here to time (HBM: 1-3 TB/s; PCIe 4 x16 pageable: about 10 GB/s)


@dataclass(frozen=True)
class _Setting:
    sw_batch_size: int
    stitch: str  # "windows": the output on the windows' device; "host": on the host
    buffer_steps: int | None = None
    buffer_dim: int = -1
    amp: bool = False

    def kind(self) -> tuple:
        return (self.stitch, self.buffer_steps is not None, self.buffer_dim, self.amp)

    def text(self, windows: str) -> str:
        where = f"stitched on {windows}" if self.stitch == "windows" else "stitched on the host (cpu)"
        if self.buffer_steps:
            where += f" through buffers of {self.buffer_steps} row(s) along dimension {self.buffer_dim}"
        return f"sw_batch_size={self.sw_batch_size}, {where}" + (", autocast" if self.amp else "")


@dataclass
class InferencePlan:
    """How to run ``sliding_window_inference`` on one image (batch) within a memory budget.

    Attributes:
        sw_batch_size, sw_device, device, buffer_steps, buffer_dim: MONAI's arguments (`sliding_window_kwargs`).
        amp: whether the call runs under ``torch.autocast`` (fp16 on CUDA, bf16 on the CPU): only when allowed.
        peak_bytes: predicted peak live-tensor bytes on ``sw_device`` (exact for MONAI's code and the network's
            forward: MemTracker on fake tensors).
        host_peak_bytes: the same on the host, where the output is stitched with ``device="cpu"`` (None when the
            windows run on the CPU: one device).
        budget_bytes, headroom_bytes: the budget on ``sw_device`` and what of it is kept for what the device adds
            beyond live tensors (CUDA: the training planner's rule); tensors get the difference.
        host_budget_bytes: the host's budget, when one was given.
        default_peak_bytes, default_host_peak_bytes: the peaks with MONAI's defaults (``sw_batch_size=1``,
            everything on ``sw_device``, no buffers).
        image_shape, roi_size, overlap, mode: the call planned.
        windows: windows per image.
        output_bytes: the stitched output and its count map (MONAI keeps both until the end).
        time_ratio: predicted time relative to MONAI's defaults (None where nothing could be timed).
        timed: what the times are based on.
        reason: why this setting: the faster ones that did not fit, with their peaks.
    """

    sw_batch_size: int
    sw_device: str
    device: str
    buffer_steps: int | None
    buffer_dim: int
    amp: bool
    peak_bytes: int
    host_peak_bytes: int | None
    budget_bytes: int
    headroom_bytes: int
    host_budget_bytes: int | None
    default_peak_bytes: int
    default_host_peak_bytes: int | None
    image_shape: tuple[int, ...]
    roi_size: tuple[int, ...]
    overlap: float | tuple[float, ...]
    mode: str
    windows: int
    output_bytes: int
    time_ratio: float | None = None
    timed: str = ""
    reason: str = ""
    considered: list[tuple[str, dict[str, int], bool]] = field(default_factory=list, repr=False)

    def sliding_window_kwargs(self) -> dict:
        """The keyword arguments of ``monai.inferers.sliding_window_inference`` (and ``SlidingWindowInferer``)
        this plan sets; run the call under ``torch.autocast`` when ``amp``."""
        return dict(sw_batch_size=self.sw_batch_size, sw_device=self.sw_device, device=self.device,
                    buffer_steps=self.buffer_steps, buffer_dim=self.buffer_dim)

    def __str__(self) -> str:
        tensors = self.budget_bytes - self.headroom_bytes
        headroom = f", headroom {format_size(self.headroom_bytes)} (tensors get {format_size(tensors)})" \
            if self.headroom_bytes else ""
        host = self.host_peak_bytes is not None
        host_budget = (f"; host budget {format_size(self.host_budget_bytes)}" if self.host_budget_bytes is not None
                       else "; host: no budget" if host else "")

        def peaks(peak: int, host_peak: int | None) -> str:
            text = f"{format_size(peak)} on {self.sw_device}"
            if host_peak is None:
                return text
            return text + (f", {format_size(host_peak)} on the host" if host_peak else ", nothing on the host")

        default_fits = self.default_peak_bytes <= tensors and (
            self.host_budget_bytes is None or (self.default_host_peak_bytes or 0) <= self.host_budget_bytes)
        time_text = (f"time x{self.time_ratio:.2f} of the defaults ({self.timed})" if self.time_ratio is not None
                     else f"time: {self.timed}")
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.sliding_window_kwargs().items())
        return "\n".join([
            f"image {self.image_shape}, roi {self.roi_size}, overlap {self.overlap}, mode {self.mode}: "
            f"{self.windows} windows per image; stitched output and count map {format_size(self.output_bytes)}",
            f"budget {format_size(self.budget_bytes)} on {self.sw_device}{headroom}{host_budget}",
            f"MONAI's defaults (sw_batch_size=1, the output on {self.sw_device}): peak "
            f"{peaks(self.default_peak_bytes, self.default_host_peak_bytes)} "
            f"({'fits' if default_fits else 'does NOT fit'})",
            f"plan: peak {peaks(self.peak_bytes, self.host_peak_bytes)}; {time_text}",
            f"sliding_window_inference({kwargs}){' under torch.autocast' if self.amp else ''}",
            f"why: {self.reason}",
        ])


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}.") from None
    if any(v != w for v, w in zip(out, values)) or any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive integers, got {tuple(values)}.")
    return out


def check_inference_input(network: nn.Module, image_shape: Sequence[int],
                          roi_size: Sequence[int] | int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(image shape, roi) checked: the image is (batch, channels, *spatial) with the network's input channels, and
    the roi (one size per spatial dimension, or one for all; a non-positive size takes the image's, as in MONAI)
    fits inside the image."""
    image = _positive_ints("image_shape", image_shape)
    dims = len(network.size_multiple()) if hasattr(network, "size_multiple") else getattr(network, "spatial_dims",
                                                                                        None)
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi_size = (roi_size,) * (dims or len(image) - 2)
    if not isinstance(roi_size, Sequence) or isinstance(roi_size, str):
        raise ValueError(f"roi_size must be one size per spatial dimension, e.g. (96, 96, 96), got {roi_size!r}.")
    if len(image) != len(roi_size) + 2 or (dims is not None and len(roi_size) != dims):
        spatial = dims or len(roi_size)
        raise ValueError(f"image_shape must be (batch, channels, {', '.join(['size'] * spatial)}) for a "
                         f"{spatial}D network and roi {tuple(roi_size)}, got {tuple(image)}.")
    roi = tuple(int(r) if int(r) > 0 else s for r, s in zip(roi_size, image[2:]))
    larger = [d for d, (r, s) in enumerate(zip(roi, image[2:])) if r > s]
    if larger:
        raise ValueError(
            f"roi_size {roi} is larger than the image {image[2:]} along dimension(s) {larger}: MONAI would pad the "
            f"image to the roi at every call; pad it once instead (monai.transforms.SpatialPad(spatial_size={roi}), "
            f"as the bundles' preprocessing does), or give a roi of at most "
            f"{tuple(min(r, s) for r, s in zip(roi, image[2:]))}.")
    channels = getattr(network, "in_channels", None)
    if isinstance(channels, int) and image[1] != channels:
        raise ValueError(f"the image has {image[1]} channel(s) but the network takes {channels}: image_shape should be "
                         f"({image[0]}, {channels}, {', '.join(map(str, image[2:]))}).")
    return image, roi


class _Timer:
    """Forward times of the real network on the windows' device, and the stitching rates of each device."""

    def __init__(self, network: nn.Module, windows: torch.device) -> None:
        here = next((p.device for p in network.parameters()), torch.device("cpu"))
        self.network_ref, self.windows = weakref.ref(network), windows  # kept timings must not keep a network
        self.available = here.type == windows.type and (windows.index is None or here.index == windows.index)
        self.clock = device_clock(windows) if self.available else time.perf_counter
        self.host_clock = device_clock("cpu") if windows.type == "cpu" else time.perf_counter
        self.forwards: dict[tuple[int, bool], float] = {}
        self.rates: dict[str, float] = {}

    def time_forwards(self, batches: Sequence[tuple[int, bool]], channels: int, roi: tuple[int, ...],
                      rounds: int = 3) -> None:
        """Times a forward of each (window batch, autocast) on real random windows, interleaved in one process
        (every round runs each in turn, the order rotating; one warm-up round), and keeps each one's fastest
        round: other processes on a shared machine only ever add to a time."""
        network = self.network_ref()
        device = next((p.device for p in network.parameters()), self.windows)
        training = network.training
        network.eval()
        times: dict[tuple[int, bool], list[float]] = {key: [] for key in batches}
        try:
            inputs = {b: torch.randn((b, channels, *roi), device=device) for b, _ in batches}
            with torch.no_grad():
                for r in range(rounds + 1):
                    for k in range(len(batches)):
                        b, amp = batches[(r + k) % len(batches)]
                        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
                            t0 = self.clock()
                            network(inputs[b])
                            if r:
                                times[(b, amp)].append(self.clock() - t0)
        finally:
            network.train(training)
        self.forwards.update({key: min(t) for key, t in times.items()})

    def rate(self, where: str) -> float:
        """Bytes per second of an in-place addition on ``where`` ("windows", "host") or of a copy to the host
        ("link")."""
        if where not in self.rates:
            if where != "host" and not self.available:
                self.rates[where] = NOMINAL_BYTES_PER_S["link" if where == "link" else "cuda"]
            else:
                device = torch.device("cpu") if where == "host" else self.windows
                clock = self.host_clock if where == "host" else self.clock
                a, b = torch.ones(2**23, device=device), torch.ones(2**23, device=device)  # 32 MiB each
                times = []
                for i in range(4):
                    t0 = clock()
                    if where == "link":
                        a.to("cpu")
                    else:
                        a.add_(b)
                    if i:
                        times.append(clock() - t0)
                self.rates[where] = a.nbytes / max(statistics.median(times), 1e-9)
        return self.rates[where]


_KEPT: OrderedDict[tuple, tuple[_Timer, dict]] = OrderedDict()  # the last few networks' timings and forward
# profiles: they depend on the window, not on the image, so an inferer's later image shapes reuse them


def _kept(network: nn.Module, windows: torch.device, roi: tuple[int, ...], channels: int,
          dtype: torch.dtype) -> tuple[_Timer, dict]:
    key = (id(network), type(network).__qualname__, tuple((tuple(p.shape), p.dtype, p.device) for p in
                                                          network.parameters()), str(windows), roi, channels, dtype)
    if key not in _KEPT or _KEPT[key][0].network_ref() is not network:
        _KEPT[key] = (_Timer(network, windows), {})
        while len(_KEPT) > 4:
            _KEPT.popitem(last=False)
    _KEPT.move_to_end(key)
    return _KEPT[key]


def _stitch_seconds(s: _Setting, calls: tuple[int, ...], slabs: tuple[tuple[int, ...], ...], windows: int,
                    batch: int, roi_voxels: int, image_voxels: int, classes: int, out_bytes: int, win_bytes: int,
                    timer: _Timer, one_device: bool) -> float:
    """Seconds of MONAI's stitching for a setting: bytes written on each device and copied to the host (the
    operators of `sliding_window_inference`'s loop), at each device's measured rate."""
    n = sum(calls)
    window_out = classes * roi_voxels
    done = {"windows": 0.0, "host": 0.0, "link": 0.0}
    out_side = "windows" if s.stitch == "windows" or one_device else "host"
    done[out_side] += 3 * classes * image_voxels * batch * out_bytes  # zeros, the division, the final copy
    done[out_side] += windows * roi_voxels * out_bytes  # the count map
    if s.buffer_steps:
        done["windows"] += n * window_out * (win_bytes + 2 * out_bytes)  # weighted window, added into the buffer
        slab = sum(classes * math.prod(sh) for sh in slabs) * out_bytes
        done["windows"] += slab  # each buffer's zeros
        done["link"] += slab
        done["host"] += 2 * slab  # the buffer's copy and its addition into the output
    else:
        done["windows"] += n * window_out * win_bytes  # the window's output weighted in place
        done[out_side] += n * window_out * out_bytes  # added into the output
        if out_side == "host":
            done["link"] += n * window_out * win_bytes
            done["host"] += n * window_out * win_bytes  # the copy's allocation
    if one_device:
        return (done["windows"] + done["host"]) / timer.rate("host")
    return sum(v / timer.rate(k) for k, v in done.items() if v)


def plan_inference(
    network: nn.Module,
    image_shape: Sequence[int],
    roi_size: Sequence[int] | int,
    budget_gb: float,
    *,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    amp: bool | str = False,
    device: str | torch.device | None = None,
    image_device: str | torch.device | None = None,
    host_budget_gb: float | None = None,
    headroom_gb: float | None = None,
    sw_batch_sizes: Sequence[int] | None = None,
    image_dtype: torch.dtype = torch.float32,
    progress: bool | Callable[[str], None] = False,
) -> InferencePlan:
    """The settings of ``sliding_window_inference`` with which inference on one image fits ``budget_gb`` fastest.

    Args:
        network: the network the windows run through (any ``nn.Module``; it runs in ``eval()`` under
            ``no_grad``, so a Checkpoint* network runs its parent's plain forward). It is not changed (its
            forward is timed on real random windows where its device is here).
        image_shape: the image as ``sliding_window_inference`` takes it: (batch, channels, *spatial).
        roi_size: the window, one size per spatial dimension (or one size for all).
        budget_gb: memory on the device where the windows run, GiB (2**30 bytes).
        overlap, mode, sigma_scale, padding_mode, cval: MONAI's, kept as given (same windows, same blending).
        amp: False (the default): no autocast. True: the planner may run the call under ``torch.autocast``
            (fp16 on CUDA, bf16 on the CPU) when that is faster or needed to fit; it changes the results slightly
            (docs/guide/inference.md measures how much). ``"always"``: the call runs under autocast anyway (an
            evaluator with ``amp=True``): plan with it.
        device: where the windows run (``sw_device``): default the network's device. ``"cuda"`` for a network
            on the CPU plans for a GPU that is not here (peaks exact; nothing timed, ``sw_batch_size`` 1).
        image_device: where the image is when the call starts: default ``device`` (as an evaluator puts it).
        host_budget_gb: memory on the host (CPU) for the stitched output when the windows run on a GPU; default
            no limit (its peak is reported).
        headroom_gb: what of ``budget_gb`` the device needs beyond live tensors; default as `monai_ckpt.plan`:
            on CUDA 10% of the budget and at least 0.25 GiB, on the CPU none.
        sw_batch_sizes: the window batches considered (default `SW_BATCH_SIZES`: 1, 2, 4, ... 32).
        image_dtype: the image's dtype (MONAI stitches in it).
        progress: report the search on stderr (True) or to a callable.

    Returns:
        an `InferencePlan`: ``plan.sliding_window_kwargs()`` go to ``sliding_window_inference`` (with ``amp``,
        under ``torch.autocast``); ``print(plan)`` says the peaks on each device and why.

    Raises:
        ValueError: when nothing fits (the message gives the smallest peak reachable and its settings); for a
            roi larger than the image, an image whose channels are not the network's, a non-positive budget or
            headroom, or windows the network cannot take.

    Example::

        net = CheckpointUNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).cuda()
        p = plan_inference(net, (1, 1, 512, 512, 400), (96, 96, 96), budget_gb=8)
        print(p)
        out = sliding_window_inference(image, (96, 96, 96), predictor=net, **p.sliding_window_kwargs())
    """
    from .fit import stderr_progress

    report = stderr_progress if progress is True else progress or (lambda message: None)
    image, roi = check_inference_input(network, image_shape, roi_size)
    budget = budget_bytes(budget_gb)
    here = next((p.device for p in network.parameters()), torch.device("cpu"))
    try:
        windows = torch.device(device) if device is not None else here
        image_at = torch.device(image_device) if image_device is not None else windows
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} / image_device {image_device!r}: not a torch device ('cpu', 'cuda', "
                         f"'cuda:0'): {error}") from None
    if windows.type not in ("cpu", "cuda") or image_at.type not in ("cpu", "cuda"):
        raise ValueError(f"the windows run on 'cpu' or 'cuda' and the image is on one of them, got device={device!r}, "
                         f"image_device={image_device!r}.")
    one_device = windows.type == "cpu"
    if one_device and image_at.type != "cpu":
        raise ValueError("the windows run on the CPU but the image is on CUDA: give device='cuda' or move the image.")
    if one_device and host_budget_gb is not None:
        raise ValueError("host_budget_gb is the host's memory for a plan whose windows run on a GPU; on the CPU "
                         "budget_gb is the only budget.")
    host_budget = budget_bytes(host_budget_gb) if host_budget_gb is not None else None
    headroom = headroom_bytes(headroom_gb, budget, windows)
    limit = budget - headroom
    if limit <= 0:
        raise ValueError(f"nothing fits: the budget of {budget_gb} GiB is all headroom on {windows} "
                         f"({format_size(headroom)}: allocator rounding, cuDNN workspaces); give a larger budget, or "
                         "headroom_gb below it.")
    if amp not in (False, True, "always"):
        raise ValueError(f"amp must be False, True (autocast allowed) or 'always', got {amp!r}.")
    amps = (False,) if amp is False else (True,) if amp == "always" else (False, True)
    sizes = sorted({int(b) for b in (SW_BATCH_SIZES if sw_batch_sizes is None else sw_batch_sizes) if int(b) >= 1})
    if not sizes:
        raise ValueError(f"sw_batch_sizes must hold positive integers, got {sw_batch_sizes!r}.")

    w_name, host_name = str(windows), "cpu"
    timer, profiles = _kept(network, windows, roi, image[1], image_dtype)
    measured: dict[_Setting, SlidingWindowMemory] = {}
    common = dict(overlap=overlap, mode=mode, sigma_scale=sigma_scale, padding_mode=padding_mode, cval=cval,
                  image_dtype=image_dtype, profiles=profiles)

    def measure(s: _Setting) -> SlidingWindowMemory:
        if s not in measured:
            report(f"measuring {s.text(w_name)}")
            try:
                measured[s] = sliding_window_memory(
                    network, image, roi, sw_batch_size=s.sw_batch_size, sw_device=windows,
                    device=windows if s.stitch == "windows" else "cpu", image_device=image_at,
                    buffer_steps=s.buffer_steps, buffer_dim=s.buffer_dim, amp=s.amp, **common)
            except RuntimeError as error:
                raise ValueError(f"the network cannot run on windows of {roi} with {image[1]} channel(s) "
                                 f"({type(error).__name__}: {str(error).splitlines()[0]}): give a roi the network "
                                 "takes (e.g. a multiple of its strides' product).") from None
        return measured[s]

    def peaks(s: _Setting) -> tuple[int, int | None]:
        m = measure(s)
        return m.peaks[w_name], None if one_device else m.peaks.get(host_name, 0)

    def fits(s: _Setting) -> bool:
        w, h = peaks(s)
        return w <= limit and (host_budget is None or h is None or h <= host_budget)

    least_stitch = "windows" if one_device else "host"
    least = [_Setting(1, least_stitch, amp=a) for a in amps]
    least_peak = min(least, key=lambda s: peaks(s)[0])
    if peaks(least_peak)[0] > limit:
        w, h = peaks(least_peak)
        raise ValueError(
            f"nothing fits: the least memory on {w_name} is {format_size(w)} ({least_peak.text(w_name)}"
            + (f"; host {format_size(h)}" if h is not None else "") + f"), over the {format_size(limit)} the budget "
            f"of {budget_gb} GiB leaves for tensors" + (f" (headroom {format_size(headroom)})" if headroom else "")
            + ". Give a larger budget, a smaller roi, or (where it is not on already) amp=True.")

    positions = window_positions(image, roi, overlap)
    roi_voxels = math.prod(roi)
    first = measure(least_peak)
    total_windows = first.windows * image[0]
    batch_sizes = [1]
    if timer.available:
        report(f"timing the network's forward on {w_name}")
        if any((1, a) not in timer.forwards for a in amps):
            timer.time_forwards([(1, a) for a in amps], image[1], roi)
    misses = 0
    for b in sorted({min(b, total_windows) for b in sizes}):  # a batch of more windows than there are is all of them
        if b == 1 or not timer.available:
            continue
        if not fits(_Setting(b, least_stitch, amp=least_peak.amp)):
            break
        last = batch_sizes[-1]
        report(f"timing sw_batch_size {b} against {last}")
        pair = [(n, a) for n in (last, b) for a in amps]
        if any(key not in timer.forwards for key in pair):
            timer.time_forwards(pair, image[1], roi)
        per_window = {n: min(timer.forwards[(n, a)] for a in amps) / n for n in (last, b)}
        if per_window[b] < TIME_GAIN * per_window[last]:
            batch_sizes.append(b)
            misses = 0
        else:
            misses += 1
            if misses == 2:  # one miss may be another process's noise; two in a row end the doubling
                break

    classes = first.output_shape[1]
    out_bytes = torch.empty((), dtype=first.output_dtype).element_size()
    image_voxels = math.prod(image[2:])
    output_bytes = (image[0] * classes + 1) * image_voxels * out_bytes

    def forward_seconds(calls: tuple[int, ...], a: bool) -> float:
        if not timer.available:
            return 0.0
        timed = sorted(b for b, x in timer.forwards if x == a)
        total = 0.0
        for c in calls:
            if (c, a) in timer.forwards:
                total += timer.forwards[(c, a)]
                continue
            lo = max((b for b in timed if b < c), default=0)
            hi = min((b for b in timed if b > c), default=None)
            t_lo = timer.forwards[(lo, a)] if lo else 0.0
            if hi is None:
                total += t_lo * c / lo
            else:
                total += t_lo + (timer.forwards[(hi, a)] - t_lo) * (c - lo) / (hi - lo)
        return total

    def seconds(s: _Setting) -> float:
        _, calls, slabs = window_batches(image, roi, overlap, s.sw_batch_size, s.buffer_steps, s.buffer_dim)
        win_bytes = torch.empty((), dtype=autocast_dtype(windows) if s.amp else image_dtype).element_size()
        return forward_seconds(calls, s.amp) + _stitch_seconds(
            s, calls, slabs, first.windows, image[0], roi_voxels, image_voxels, classes, out_bytes, win_bytes,
            timer, one_device)

    candidates = []
    for b in batch_sizes:
        for a in amps:
            candidates.append(_Setting(b, "windows", amp=a))
            if one_device:
                continue
            candidates.append(_Setting(b, "host", amp=a))
            for dim, rows in enumerate(positions):
                steps = 1
                while steps < rows:
                    candidates.append(_Setting(b, "host", steps, dim, a))
                    steps *= 2
    report(f"ordering {len(candidates)} settings by predicted time")
    timed = {s: seconds(s) for s in candidates}
    order = sorted(candidates, key=lambda s: (timed[s], s.sw_batch_size, s.stitch != "windows",
                                              s.buffer_steps is not None, -(s.buffer_steps or 0), s.buffer_dim, s.amp))
    failed: list[_Setting] = []  # a setting with a larger batch or more buffer rows of the same kind needs more

    def dominated(s: _Setting) -> bool:
        return any(f.kind() == s.kind() and f.sw_batch_size <= s.sw_batch_size
                   and (f.buffer_steps or 0) <= (s.buffer_steps or 0) for f in failed)

    considered = []
    chosen = None
    for s in order:
        if dominated(s):
            continue
        ok = fits(s)
        w, h = peaks(s)
        considered.append((s.text(w_name), {w_name: w, **({} if h is None else {"host": h})}, ok))
        if ok:
            chosen = s
            break
        failed.append(s)
    if chosen is None:  # only the host's budget can leave nothing: the least-memory setting fit the device
        w, h = peaks(least_peak)
        host_least = min((s for s in measured), key=lambda s: peaks(s)[1] or 0)
        raise ValueError(
            f"nothing fits both budgets: the least memory on {w_name} ({format_size(w)}) needs {format_size(h)} on "
            f"the host, over its budget of {host_budget_gb} GiB; the least on the host is "
            f"{format_size(peaks(host_least)[1] or 0)} ({host_least.text(w_name)}), "
            f"{format_size(peaks(host_least)[0])} on {w_name}. Give a larger budget on either device.")

    default = _Setting(1, "windows", amp=amps[0] if amp == "always" else False)
    d_w, d_h = peaks(default)
    c_w, c_h = peaks(chosen)
    rejected = [f"{text} ({', '.join(f'{format_size(v)} on {k}' for k, v in p.items() if v)})"
                for text, p, ok in considered if not ok]
    if chosen == default:
        reason = "MONAI's defaults fit and nothing measured is predicted faster"
    elif not rejected:
        reason = "the fastest predicted setting, and it fits"
    else:
        more = f"; and {len(rejected) - 3} more" if len(rejected) > 3 else ""
        reason = "the fastest predicted setting that fits; faster but over budget: " + "; ".join(rejected[:3]) + more
    if timer.available:
        clock = "process CPU time" if windows.type == "cpu" else "CUDA wall time"
        timed_on = f"forwards timed on {w_name} ({clock}), stitching at measured rates"
        ratio = timed[chosen] / seconds(default) if seconds(default) > 0 else None
    else:
        timed_on = (f"not timed: {w_name} is not here, so sw_batch_size stays 1 and stitching is ranked at nominal "
                    "rates")
        ratio = None
    return InferencePlan(
        sw_batch_size=chosen.sw_batch_size, sw_device=w_name, device=w_name if chosen.stitch == "windows" else "cpu",
        buffer_steps=chosen.buffer_steps, buffer_dim=chosen.buffer_dim, amp=chosen.amp, peak_bytes=c_w,
        host_peak_bytes=c_h, budget_bytes=budget, headroom_bytes=headroom, host_budget_bytes=host_budget,
        default_peak_bytes=d_w, default_host_peak_bytes=d_h, image_shape=image, roi_size=roi, overlap=overlap,
        mode=str(mode), windows=first.windows, output_bytes=output_bytes, time_ratio=ratio, timed=timed_on,
        reason=reason, considered=considered)
