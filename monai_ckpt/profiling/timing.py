"""Step time, always as a ratio: `step_time_ratios` runs several networks interleaved in one process (A B A B ...,
median after warm-up), and `device_clock` is the clock every timing uses (CPU: this process's CPU time; CUDA:
synchronised wall time)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .step import make_optimizer, training_step

__all__ = ["device_clock", "interleaved_step_times", "step_time_ratios"]


def interleaved_step_times(
    factories: Sequence[Callable[[], nn.Module]],
    input_shape: Sequence[int],
    *,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    optimizer: str = "adam",
    clock: str = "process",
) -> tuple[list[list[float]], list[list[float]]]:
    """Step times of each network, round by round, interleaved in one process.

    All networks get the same weights-independent input; each round runs one step of every network in
    turn (A B C, B C A, C A B ...: the order rotates so that no network always runs first), so load on a
    shared machine affects them alike. On the CPU the ratios' clock is this process's CPU time (all its
    threads), which other processes on a shared machine do not inflate; on CUDA it is wall time after
    synchronising.

    Args:
        clock: on the CPU, ``"process"`` (user and kernel time) or ``"user"`` (user time only, without the
            kernel's page faults): see `device_clock`.

    Returns:
        (per network, its ratio-clock seconds of each round after the warm-up; per network, its wall-clock seconds
        of each round), so that a time can be divided by another network's in the same round.
    """
    cpu_clock = device_clock("cpu", clock)
    device = torch.device(device)
    models = [f().to(device).train() for f in factories]
    opts = [make_optimizer(m, optimizer) for m in models]
    x = torch.randn(*input_shape, device=device)
    cuda = device.type == "cuda"
    wall: list[list[float]] = [[] for _ in models]
    ratio_clock: list[list[float]] = [[] for _ in models]
    n = len(models)
    for round_ in range(warmup + steps):
        for i in [(round_ + k) % n for k in range(n)]:  # rotate the order: no network always runs first
            m, o = models[i], opts[i]
            if cuda:
                torch.cuda.synchronize(device)
            w0, c0 = time.perf_counter(), cpu_clock()
            training_step(m, x, o, amp)
            if cuda:
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                wall[i].append(time.perf_counter() - w0)
                ratio_clock[i].append(wall[i][-1] if cuda else cpu_clock() - c0)
    return ratio_clock, wall


def step_time_ratios(
    factories: Sequence[Callable[[], nn.Module]],
    input_shape: Sequence[int],
    *,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    optimizer: str = "adam",
    clock: str = "process",
) -> tuple[list[float], list[float]]:
    """Median step time of each network, and its ratio to the first, interleaved in one process
    (`interleaved_step_times`, whose arguments these are).

    Returns:
        (median wall-clock seconds per network, ratio of each network's median to the first network's).
    """
    ratio_clock, wall = interleaved_step_times(factories, input_shape, steps=steps, warmup=warmup, device=device,
                                               amp=amp, optimizer=optimizer, clock=clock)
    base = statistics.median(ratio_clock[0])
    return [statistics.median(t) for t in wall], [statistics.median(t) / base for t in ratio_clock]


def device_clock(device: str | torch.device, cpu: str = "process") -> Callable[[], float]:
    """The clock a profile times operators with: on the CPU this process's CPU time (which other processes on a
    shared machine do not inflate); on CUDA wall time after ``torch.cuda.synchronize`` (an operator's time is
    then its kernels' time).

    ``cpu``: ``"process"`` (user and kernel time) or ``"user"`` (user time only). The kernel's share is mostly page
    faults on fresh memory: glibc hands each freed large tensor back to the system, so a step pays for every large
    tensor it allocates, and a network that allocates less pays less. A GPU's caching allocator has no such cost;
    ``"user"`` leaves it out, to compare computation alone."""
    if cpu not in ("process", "user"):
        raise ValueError(f"clock must be 'process' or 'user', got {cpu!r}.")
    device = torch.device(device)
    if device.type == "cuda":
        def cuda_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return cuda_clock
    if device.type != "cpu":
        raise ValueError(f"times can be measured on 'cpu' or 'cuda' devices, got {str(device)!r}.")
    if cpu == "process":
        return time.process_time
    import resource  # POSIX only, as the distinction is; imported here, once, not at every reading of the clock

    def user_seconds() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_utime

    return user_seconds
