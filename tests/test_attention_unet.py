"""What only CheckpointAttentionUnet has to show beyond the drop-in contract (test_drop_in_contract.py): groups of its
decoder's blocks, and an attention gate whose backward holds one skip-sized product at a time."""

import torch

from helpers import assert_same_training
from networks_registry import make


def test_training_parity_with_groups_of_decoder_blocks():
    """A decoder's up-convolution, gate, merge convolution and merge norm/activation in groups: bit-identical."""
    policy = [["decoder1.3", "decoder0.0"], {"names": [["decoder0.1", "decoder0.2"]], "mode": "cheap"}, "decoder0.3"]
    parent, child, shape = make("attunet3d", policy)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


class _Gate(torch.nn.Module):
    """An AttentionUnet attention gate on a skip made from the input, run as MONAI's AttentionBlock or as the chain's
    gate step."""

    def __init__(self, chain_step: bool, skip_channels: int = 16):
        from monai.networks.nets.attentionunet import AttentionBlock

        super().__init__()
        self.chain_step = chain_step
        self.skip = torch.nn.Conv3d(1, skip_channels, 1)
        self.block = AttentionBlock(3, f_int=1, f_g=1, f_l=skip_channels)

    def forward(self, inp):
        from monai_ckpt.networks.attentionunet import _attention

        x = self.skip(inp)
        return _attention(self.block, inp, x) if self.chain_step else self.block(inp, x)


def test_the_attention_gates_backward_holds_one_skip_sized_product_at_a_time():
    """The gate's product ``x * psi`` in backward: MONAI's (autograd's MulBackward) makes ``grad * psi`` and then
    ``grad * x`` and sums the latter to psi's one channel with both alive; the chain's gate reduces first. Same
    operators, so bit-identical gradients; at the reduction the live bytes are one skip-sized tensor fewer."""
    from monai_ckpt.profiling.step import steady_state
    from monai_ckpt.profiling.tracker import run_tracked_step

    shape = (2, 1, 16, 16, 16)
    at_reduction = []
    for chain_step in (False, True):
        points = []
        with steady_state(lambda: _Gate(chain_step), shape, False, torch.device("cpu"), "adam", False) as (m, o, x, _):
            run_tracked_step(m, o, x, False, lambda t, func, out: points.append((func, t.live_bytes(), t.phase)))
        at_reduction.append([live for func, live, phase in points
                             if func is torch.ops.aten.sum.dim_IntList and phase == "backward"])
    skip = 2 * 16 * 16**3 * 4
    assert len(at_reduction[0]) == len(at_reduction[1]) == 1
    assert at_reduction[0][0] - at_reduction[1][0] == skip

    torch.manual_seed(0)
    parent, child = _Gate(False), _Gate(True)
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])
