"""What the inference planner times: forwards of window batches of the real network on the windows' device, and
the stitching of ``sliding_window_inference`` as bytes written on each device and copied between them, at rates
measured here (`NOMINAL_BYTES_PER_S` for a device that is not here)."""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..profiling import device_clock
from ..profiling.step import autocast_dtype, parameter_device
from .inference_plan import WindowSetting

__all__ = ["NOMINAL_BYTES_PER_S", "WindowTimer", "kept_timer", "stitch_seconds"]

NOMINAL_BYTES_PER_S = {"cuda": 1.0e12, "link": 1.0e10}  # a GPU's in-place addition and its pageable copy to the
# host, used where the GPU is not here to time (HBM: 1-3 TB/s; PCIe 4 x16 pageable: about 10 GB/s)


class WindowTimer:
    """Forward times of the real network on the windows' device, and the stitching rates of each device."""

    def __init__(self, network: nn.Module, windows: torch.device) -> None:
        here = parameter_device(network)
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
        device = parameter_device(network, self.windows)
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


_TIMERS: OrderedDict[tuple, tuple[WindowTimer, dict]] = OrderedDict()  # the last few networks' timings and forward
# profiles: they depend on the window, not on the image, so an inferer's later image shapes reuse them


def kept_timer(network: nn.Module, windows: torch.device, roi: tuple[int, ...], channels: int,
               dtype: torch.dtype) -> tuple[WindowTimer, dict]:
    """The timer (and a dict for forward profiles) of this network, window and input: one of the last four kept,
    or a new one."""
    key = (id(network), type(network).__qualname__, tuple((tuple(p.shape), p.dtype, p.device) for p in
                                                          network.parameters()), str(windows), roi, channels, dtype)
    if key not in _TIMERS or _TIMERS[key][0].network_ref() is not network:
        _TIMERS[key] = (WindowTimer(network, windows), {})
        while len(_TIMERS) > 4:
            _TIMERS.popitem(last=False)
    _TIMERS.move_to_end(key)
    return _TIMERS[key]


def stitch_seconds(s: WindowSetting, calls: tuple[int, ...], slabs: tuple[tuple[int, ...], ...], windows: int,
                    batch: int, roi_voxels: int, image_voxels: int, classes: int, out_bytes: int, win_bytes: int,
                    timer: WindowTimer, one_device: bool) -> float:
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
