"""`InferencePlan`, what `monai_ckpt.planner.plan_inference` returns, and the settings it considers."""

from __future__ import annotations

from dataclasses import dataclass, field

from .result import format_size

__all__ = ["InferencePlan", "WindowSetting"]


@dataclass(frozen=True)
class WindowSetting:
    """One setting of ``sliding_window_inference`` the planner considers: window batch, where the output is stitched
    (with its buffers) and autocast."""

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
