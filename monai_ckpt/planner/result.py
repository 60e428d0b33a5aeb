"""What the planner answers: a `Plan`, printable, with sizes in GiB (2**30 bytes), as GPU memory is counted."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policies import PolicySpec

__all__ = ["GiB", "Plan", "format_size"]

GiB = 2**30


@dataclass
class Plan:
    """How to run one training step of a network within a memory budget.

    Attributes:
        policy: the checkpoint policy spec (give it to ``network.checkpoint_policy``).
        checkpointed: segment and block names it checkpoints, in execution order.
        predicted_peak_bytes: peak live-tensor bytes of a whole training step (forward, backward, optimizer)
            with this policy, measured on fake tensors with MemTracker.
        predicted_time_ratio: step time relative to no checkpointing, from measured block times.
        fits: whether the predicted peak is within the budget.
        budget_bytes: the budget.
        plain_peak_bytes: the peak without checkpointing.
        input_shape: (batch, channels, *spatial).
        amp: autocast (bf16 on CPU, fp16 on CUDA) in the forward.
        optimizer: optimizer whose state counts towards the peak.
        loss: the loss of the planned step (``"mean(out**2)"`` when none was given) and how its memory was
            measured.
        label_shape: the label batch the loss took (None for the default loss).
        device: where the network trains (times were measured there).
        headroom_bytes: what the budget keeps back for what the device adds beyond live tensors (CUDA: the
            caching allocator's rounding and fragmentation, cuDNN workspaces); tensors are planned into
            ``budget_bytes - headroom_bytes``.
        expected_allocated_bytes: what ``torch.cuda.max_memory_allocated`` should report for the step (the
            live-tensor peak).
        expected_reserved_bytes: what ``torch.cuda.max_memory_reserved`` should stay under (peak + headroom).
        compiled: planned for the step ``torch.compile(network)`` runs (`plan` with ``compiled=True``): the peak
            is that step's, and ``predicted_time_ratio`` is relative to the compiled step without checkpointing.
        compile_memory_budget: with ``compiled``, compile's ``activation_memory_budget`` for the network's graph
            (1.0: compile's default), which a ``{"budget_gb": X}`` network sets itself under ``torch.compile``.
        saved_bytes: with ``compiled``, what the compiled step keeps for backward (activations, the batch included).
    """

    policy: PolicySpec
    checkpointed: list[str]
    predicted_peak_bytes: int
    predicted_time_ratio: float
    fits: bool
    budget_bytes: int
    plain_peak_bytes: int
    input_shape: tuple[int, ...]
    amp: bool = False
    optimizer: str = "adam"
    loss: str = "mean(out**2)"
    label_shape: tuple[int, ...] | None = None
    device: str = "cpu"
    headroom_bytes: int = 0
    expected_allocated_bytes: int = field(default=0)
    expected_reserved_bytes: int = field(default=0)
    compiled: bool = False
    compile_memory_budget: float | None = None
    saved_bytes: int | None = None

    def __post_init__(self) -> None:
        self.expected_allocated_bytes = self.expected_allocated_bytes or self.predicted_peak_bytes
        self.expected_reserved_bytes = self.expected_reserved_bytes or self.predicted_peak_bytes + self.headroom_bytes

    def __str__(self) -> str:
        tensors = format_size(self.budget_bytes - self.headroom_bytes)
        headroom = (f", headroom {format_size(self.headroom_bytes)} (tensors get {tensors})" if self.headroom_bytes
                    else "")
        return "\n".join([
            f"input {self.input_shape}, budget {format_size(self.budget_bytes)}{headroom}, amp={self.amp}, "
            f"optimizer={self.optimizer}, device={self.device}",
            f"loss: {self.loss}" + (f", label batch {self.label_shape}" if self.label_shape else ""),
            f"without checkpointing: peak {format_size(self.plain_peak_bytes)}",
            f"plan: peak {format_size(self.predicted_peak_bytes)} ({'fits' if self.fits else 'does NOT fit'}), "
            f"step time x{self.predicted_time_ratio:.2f}",
            f"expected: allocated {format_size(self.expected_allocated_bytes)}, reserved <= "
            f"{format_size(self.expected_reserved_bytes)}",
            f"checkpointed: {', '.join(self.checkpointed) or 'nothing'}",
            f"checkpoint_policy = {self.policy!r}",
        ] + ([f"compiled step (torch.compile): activation_memory_budget = {self.compile_memory_budget:g}, keeps "
              f"{format_size(self.saved_bytes or 0)} for backward; time relative to the compiled plain step"]
             if self.compiled else []))


def format_size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"
