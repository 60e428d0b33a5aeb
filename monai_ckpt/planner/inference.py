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
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..profiling import sliding_window_memory, window_batches, window_positions
from ..profiling.sliding_window import SlidingWindowMemory
from ..profiling.step import autocast_dtype, parameter_device
from .device import budget_bytes, headroom_bytes
from .inference_plan import InferencePlan, WindowSetting
from .result import format_size
from .window_timing import NOMINAL_BYTES_PER_S, kept_timer, stitch_seconds

__all__ = ["NOMINAL_BYTES_PER_S", "SW_BATCH_SIZES", "InferencePlan", "plan_inference"]

SW_BATCH_SIZES = (1, 2, 4, 8, 16, 32)  # the window batches considered
TIME_GAIN = 0.95  # a larger window batch is kept only if its time per window is below this fraction of the last


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
    here = parameter_device(network)
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
    timer, profiles = kept_timer(network, windows, roi, image[1], image_dtype)
    measured: dict[WindowSetting, SlidingWindowMemory] = {}
    common = dict(overlap=overlap, mode=mode, sigma_scale=sigma_scale, padding_mode=padding_mode, cval=cval,
                  image_dtype=image_dtype, profiles=profiles)

    def measure(s: WindowSetting) -> SlidingWindowMemory:
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

    def peaks(s: WindowSetting) -> tuple[int, int | None]:
        m = measure(s)
        return m.peaks[w_name], None if one_device else m.peaks.get(host_name, 0)

    def fits(s: WindowSetting) -> bool:
        w, h = peaks(s)
        return w <= limit and (host_budget is None or h is None or h <= host_budget)

    least_stitch = "windows" if one_device else "host"
    least = [WindowSetting(1, least_stitch, amp=a) for a in amps]
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
        if not fits(WindowSetting(b, least_stitch, amp=least_peak.amp)):
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

    def seconds(s: WindowSetting) -> float:
        _, calls, slabs = window_batches(image, roi, overlap, s.sw_batch_size, s.buffer_steps, s.buffer_dim)
        win_bytes = torch.empty((), dtype=autocast_dtype(windows) if s.amp else image_dtype).element_size()
        return forward_seconds(calls, s.amp) + stitch_seconds(
            s, calls, slabs, first.windows, image[0], roi_voxels, image_voxels, classes, out_bytes, win_bytes,
            timer, one_device)

    candidates = []
    for b in batch_sizes:
        for a in amps:
            candidates.append(WindowSetting(b, "windows", amp=a))
            if one_device:
                continue
            candidates.append(WindowSetting(b, "host", amp=a))
            for dim, rows in enumerate(positions):
                steps = 1
                while steps < rows:
                    candidates.append(WindowSetting(b, "host", steps, dim, a))
                    steps *= 2
    report(f"ordering {len(candidates)} settings by predicted time")
    timed = {s: seconds(s) for s in candidates}
    order = sorted(candidates, key=lambda s: (timed[s], s.sw_batch_size, s.stitch != "windows",
                                              s.buffer_steps is not None, -(s.buffer_steps or 0), s.buffer_dim, s.amp))
    failed: list[WindowSetting] = []  # a setting with a larger batch or more buffer rows of the same kind needs more

    def dominated(s: WindowSetting) -> bool:
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

    default = WindowSetting(1, "windows", amp=amps[0] if amp == "always" else False)
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
        base = timed[default] if default in timed else seconds(default)
        ratio = timed[chosen] / base if base > 0 else None
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
