"""Peak memory and step time of one training step, measured the same way everywhere.

- ``measure_step_memory(factory, shape)`` (`tracker`): exact live-tensor peak of a training step (forward, loss,
  backward, optimizer step) with torch's ``MemTracker``, by category. With ``estimate=True`` the network and
  batch are fake tensors (``FakeTensorMode``): clinical sizes cost seconds and no memory. On a CUDA device
  it also reports ``torch.cuda.max_memory_allocated``.
- ``step_time_ratios(factories, shape)`` (`timing`): step time of several networks relative to the first,
  measured interleaved in one process (A B A B ...), median after warm-up.
- ``block_costs(factory, shape)`` (`blocks`): per block of a checkpoint-aware network, the activation bytes its
  forward keeps for backward when it is not checkpointed, the bytes of its output, and its forward time.
- ``memory_timeline(factory, shape)`` (`peaks`): live bytes after every operator of one training step, with phase.
- ``peak_tensors(factory, shape)`` (`peaks`): the tensors alive at the peak, each with the operator and module that
  made it: where a policy's peak comes from, and what no policy can remove.
- ``loss_memory`` and ``LossStandIn`` (`loss`): what a loss adds to a step, replayable on fake tensors.
- ``sliding_window_memory(network, image_shape, roi_size, ...)`` (`sliding_window`): the peak on each device of
  MONAI's ``sliding_window_inference`` (inference, not a training step), exact on fake tensors at clinical sizes.

A training step here (`step`) is ``loss = mean(out**2)`` (or the user's ``loss(out, label)`` on a label batch of
the shape and dtype given, see `LabelBatch`), ``loss.backward()``, ``Adam.step()``, ``zero_grad()``, measured on
the second step so that optimizer state exists, as in steady-state training. A loss that reads data (MONAI's
``.tolist()`` of reduction axes, one-hot checks) cannot run on fake tensors; `loss_memory` then measures it for
real at small output sizes and scales its output-sized terms exactly (`LossStandIn` replays that profile in a
fake step).
"""

from .blocks import BlockCost, block_costs, saved_for_backward
from .loss import LossMemory, LossStandIn, loss_memory
from .peaks import LiveTensor, PeakTensors, memory_timeline, peak_tensors
from .sliding_window import SlidingWindowMemory, sliding_window_memory, window_batches, window_positions
from .step import MiB, LabelBatch, make_optimizer, mean_square, replica, training_step
from .timing import device_clock, step_time_ratios
from .tracker import CATEGORIES, StepMemory, measure_step_memory

__all__ = [
    "CATEGORIES",
    "BlockCost",
    "LabelBatch",
    "LiveTensor",
    "LossMemory",
    "LossStandIn",
    "MiB",
    "PeakTensors",
    "SlidingWindowMemory",
    "StepMemory",
    "block_costs",
    "device_clock",
    "loss_memory",
    "make_optimizer",
    "mean_square",
    "measure_step_memory",
    "memory_timeline",
    "peak_tensors",
    "replica",
    "saved_for_backward",
    "sliding_window_memory",
    "step_time_ratios",
    "training_step",
    "window_batches",
    "window_positions",
]
