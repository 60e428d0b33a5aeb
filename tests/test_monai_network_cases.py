"""MONAI's own network tests as the reference for "drop-in".

The constructor cases of MONAI's tests/networks/nets/ test_segresnet.py, test_segresnet_ds.py, test_attentionunet.py,
test_swin_unetr.py, test_basic_unet.py and test_basic_unetplusplus.py (their parameter grids, rebuilt here), each
against the MONAI parent: the same state_dict keys, and in training (checkpointing on, policy "all") the same
output, of the shape MONAI's test expects. Spatial sizes are shrunk where MONAI's are large (Swin 3D, Attention
U-Net 3D), keeping what the case is about (unequal or odd edges). Exact training parity (2 steps, every gradient and
buffer) runs on a subset; MONAI's ill-argument cases raise the parent's error.
"""

import itertools

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus, SegResNet, SegResNetDS, SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2
from monai.utils import UpsampleMode

from monai_ckpt import (
    CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointBasicUNetPlusPlus, CheckpointSegResNet,
    CheckpointSegResNetDS, CheckpointSwinUNETR,
)
from helpers import assert_same_training, make_pair

CHILD = {SegResNet: CheckpointSegResNet, SegResNetDS: CheckpointSegResNetDS, AttentionUnet: CheckpointAttentionUnet,
         SwinUNETR: CheckpointSwinUNETR, BasicUNet: CheckpointBasicUNet, BasicUNetPlusPlus: CheckpointBasicUNetPlusPlus}


def _segresnet() -> list:
    """test_segresnet.py: TEST_CASE_SEGRESNET (no final conv: init_filters channels out) and TEST_CASE_SEGRESNET_2."""
    cases = []
    for dims, filters, dropout, norm, mode in itertools.product(
            (2, 3), (8, 16), (None, 0.2), (("GROUP", {"num_groups": 8}), ("batch", {"track_running_stats": False}),
                                           "instance"), list(UpsampleMode)):
        kw = dict(spatial_dims=dims, init_filters=filters, dropout_prob=dropout, norm=norm, upsample_mode=mode,
                  use_conv_final=False)
        cases.append((SegResNet, kw, (2, 1, *[16] * dims), [(2, filters, *[16] * dims)]))
    for dims, filters, out, mode in itertools.product((2, 3), (8, 16), (1, 2), list(UpsampleMode)):
        kw = dict(spatial_dims=dims, init_filters=filters, out_channels=out, upsample_mode=mode)
        cases.append((SegResNet, kw, (2, 1, *[16] * dims), [(2, out, *[16] * dims)]))
    return cases


def _segresnet_ds() -> list:
    """test_segresnet_ds.py: TEST_CASE_SEGRESNET_DS, _DS2 (deep supervision: one output per level in training)
    and _DS3 (anisotropic resolution)."""
    cases = []
    for dims, filters, act, norm, mode in itertools.product(
            (2, 3), (8, 16), ("relu", "leakyrelu"), ("BATCH", ("instance", {"affine": True})), ("deconv", "nontrainable")):
        kw = dict(spatial_dims=dims, init_filters=filters, act=act, norm=norm, upsample_mode=mode)
        cases.append((SegResNetDS, kw, (2, 1, *[16] * dims), [(2, 2, *[16] * dims)]))
    for dims, out, depth in itertools.product((2, 3), (1, 2), (1, 2, 3)):
        kw = dict(spatial_dims=dims, init_filters=8, out_channels=out, dsdepth=depth)
        cases.append((SegResNetDS, kw, (2, 1, *[16] * dims), [(2, out, *[16 // 2**i] * dims) for i in range(depth)]))
    for depth, resolution, shapes in (
            (2, None, [(16, 16, 16), (8, 8, 8)]),
            (3, None, [(16, 16, 16), (8, 8, 8), (4, 4, 4)]),
            (3, [1, 1, 5], [(16, 16, 16), (8, 8, 16), (4, 4, 16)]),
            (3, [1, 2, 5], [(16, 16, 16), (8, 8, 16), (4, 8, 16)])):
        kw = dict(init_filters=8, dsdepth=depth, resolution=resolution)
        cases.append((SegResNetDS, kw, (2, 1, 16, 16, 16), [(2, 2, *s) for s in shapes]))
    return cases


def _attention_unet() -> list:
    """test_attentionunet.py: 2D/3D, channels (3, 4, 5), strides (1, 2) with up_kernel_size 5, and strides (2, 2)
    (MONAI: 92 per side; 3D here 20)."""
    cases = []
    for dims, extra in itertools.product((2, 3), (dict(up_kernel_size=5, strides=(1, 2)), dict(strides=(2, 2)))):
        size = 92 if dims == 2 else 20
        kw = dict(spatial_dims=dims, in_channels=1, out_channels=2, channels=(3, 4, 5), **extra)
        cases.append((AttentionUnet, kw, (3, 1, *[size] * dims), [(3, 2, *[size] * dims)]))
    return cases


def _swin_unetr() -> list:
    """test_swin_unetr.py: depths x image sizes x use_checkpoint, the merging mode cycling through the four kinds
    (MONAI: (64, 32, 192) and (96, 32); here (32, 32, 64) and (64, 32), unequal edges kept)."""
    cases = []
    merging = ["mergingv2", "merging", PatchMerging, PatchMergingV2]
    grid = itertools.product(([2, 1, 1, 1], [1, 2, 1, 1]), ((32, 32, 64), (64, 32)), (True, False))
    for i, (depths, img, own_checkpoint) in enumerate(grid):
        kw = dict(spatial_dims=len(img), in_channels=1, out_channels=2, feature_size=12, depths=depths,
                  norm_name="instance", attn_drop_rate=0.4, downsample=merging[i % 4], use_checkpoint=own_checkpoint)
        cases.append((SwinUNETR, kw, (2, 1, *img), [(2, 2, *img)]))
    return cases


def _basic_unets(parent: type) -> list:
    """test_basic_unet.py / test_basic_unetplusplus.py: 1D (every upsample mode and the default), 2D (odd and even
    edges, three modes), three 3D cases (one odd edge at least each), and UNet++'s deep-supervision case."""
    cases = []
    for mode in ("pixelshuffle", "nontrainable", "deconv", None):
        kw = dict(spatial_dims=1, in_channels=5, out_channels=8, **({} if mode is None else dict(upsample=mode)))
        cases.append((parent, kw, (10, 5, 33), [(10, 8, 33)]))
    for mode, d1, d2 in itertools.product(("pixelshuffle", "nontrainable", "deconv"), range(33, 64, 14),
                                          range(63, 33, -21)):
        kw = dict(spatial_dims=2, in_channels=2, out_channels=3, features=(12, 12, 13, 14, 15, 16), upsample=mode)
        cases.append((parent, kw, (2, 2, d1, d2), [(2, 3, d1, d2)]))
    for in_channels, out, features, mode, shape in (
            (1, 2, (16, 20, 21, 22, 23, 11), "pixelshuffle", (2, 33, 34, 35)),
            (2, 7, (14, 15, 16, 17, 18, 11), "deconv", (2, 33, 37, 34)),  # MONAI: batch 3
            (4, 2, (14, 15, 16, 17, 18, 10), "nontrainable", (2, 34, 35, 37))):  # MONAI: batch 5
        kw = dict(spatial_dims=3, in_channels=in_channels, out_channels=out, features=features, upsample=mode)
        cases.append((parent, kw, (shape[0], in_channels, *shape[1:]), [(shape[0], out, *shape[1:])]))
    if parent is BasicUNetPlusPlus:  # test_deep_supervision_shape (MONAI: batch 16)
        kw = dict(spatial_dims=2, deep_supervision=True, in_channels=3, out_channels=3)
        cases.append((parent, kw, (2, 3, 32, 32), [(2, 3, 32, 32)] * 4))
    return cases


def _case_id(case) -> str:  # noqa: ANN001
    parent, kw, shape, _ = case
    args = "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items())
    return f"{parent.__name__}-{args}-{shape}"


CASES = (_segresnet() + _segresnet_ds() + _attention_unet() + _swin_unetr() + _basic_unets(BasicUNet)
         + _basic_unets(BasicUNetPlusPlus))
IDS = [_case_id(c) for c in CASES]


def _shapes(out) -> list[tuple[int, ...]]:  # noqa: ANN001
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]


def _costly(case) -> bool:  # noqa: ANN001
    """The 3D cases that cost most per forward: checked for keys only, but for one of each kind."""
    parent, kw, _, _ = case
    if parent is SwinUNETR and kw["spatial_dims"] == 3:
        return (kw["depths"] == [2, 1, 1, 1]) != kw["use_checkpoint"]  # two of the eight run
    return parent is SegResNet and kw["spatial_dims"] == 3 and kw["init_filters"] == 16


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_monai_case_same_keys_and_training_output(case):
    """Built from MONAI's arguments, the child has the parent's state_dict keys, and its checkpointed training
    forward gives the parent's output (same weights, same seed), of the shape MONAI's test expects (the costliest
    3D cases: keys only, see `_costly`)."""
    parent_cls, kw, shape, expected = case
    parent, child = make_pair(parent_cls, CHILD[parent_cls], kw, "all")
    assert list(child.state_dict()) == list(parent.state_dict())
    assert child.checkpoint_groups()
    if _costly(case):
        return
    x = torch.randn(*shape)
    outs = []
    for net in (parent.train(), child.train()):
        torch.manual_seed(0)
        outs.append(net(x))
    assert _shapes(outs[1]) == _shapes(outs[0]) == expected
    assert all(o.requires_grad for o in (outs[1] if isinstance(outs[1], list) else [outs[1]]))
    for a, b in zip(outs[0] if isinstance(outs[0], list) else [outs[0]],
                    outs[1] if isinstance(outs[1], list) else [outs[1]]):
        assert torch.equal(a, b)


# exact training parity on a subset: one case of each network and kind of case (deep supervision, anisotropy,
# MONAI's own checkpointing, odd edges, 1D)
PARITY = [i for i, c in enumerate(CASES) if (c[0] is SegResNet and c[1]["spatial_dims"] == 2 and c[1]["init_filters"] == 8
                                             and c[1].get("dropout_prob") == 0.2 and c[1]["norm"] == "instance"
                                             and c[1]["upsample_mode"] == UpsampleMode.DECONV)
          or (c[0] is SegResNet and c[1]["spatial_dims"] == 3 and c[1].get("out_channels") == 2
              and c[1]["init_filters"] == 8 and c[1]["upsample_mode"] == UpsampleMode.NONTRAINABLE)
          or (c[0] is SegResNetDS and c[1].get("resolution") == [1, 2, 5])
          or (c[0] is SegResNetDS and c[1].get("dsdepth") == 3 and c[1].get("spatial_dims") == 2)
          or (c[0] is AttentionUnet and c[1]["spatial_dims"] == 2 and c[1]["strides"] == (1, 2))
          or (c[0] is SwinUNETR and c[1]["spatial_dims"] == 2 and c[1]["depths"] == [2, 1, 1, 1])
          or (c[0] in (BasicUNet, BasicUNetPlusPlus) and c[1]["spatial_dims"] == 1 and c[1].get("upsample") is None)
          or (c[0] in (BasicUNet, BasicUNetPlusPlus) and c[2] == (2, 2, 47, 42)
              and c[1]["upsample"] == "pixelshuffle")
          or (c[0] is BasicUNetPlusPlus and c[1].get("deep_supervision"))]


@pytest.mark.parametrize("index", PARITY, ids=[IDS[i] for i in PARITY])
def test_monai_case_training_parity(index):
    """Policy "all" ("cheap" on the deep-supervision cases; every policy runs in test_drop_in_contract.py)."""
    parent_cls, kw, shape, _ = CASES[index]
    deep = kw.get("deep_supervision") or kw.get("dsdepth", 1) > 1
    parent, child = make_pair(parent_cls, CHILD[parent_cls], kw, "cheap" if deep else "all")
    assert_same_training(parent, child, [torch.randn(*shape) for _ in range(2)])


def test_parity_subset_covers_each_network():
    assert {CASES[i][0] for i in PARITY} == set(CHILD)


@pytest.mark.parametrize("kernel_size, params", [(5, 3534), (7, 5574)])
def test_attention_unet_kernel_size_case(kernel_size, params):
    """test_attentionunet_kernel_size: the parameter counts MONAI checks, and the parent's parameter names."""
    kw = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(3, 4, 5), up_kernel_size=5, strides=(1, 2),
              kernel_size=kernel_size)
    parent, child = AttentionUnet(**kw), CheckpointAttentionUnet(**kw)
    assert sum(p.numel() for p in child.parameters()) == sum(p.numel() for p in parent.parameters()) == params


@pytest.mark.parametrize("parent_cls, kw", [
    (SegResNet, dict(spatial_dims=4)),
    (SegResNetDS, dict(spatial_dims=4)),
    (SwinUNETR, dict(spatial_dims=1, in_channels=1, out_channels=2, feature_size=48, norm_name="instance")),
    (SwinUNETR, dict(in_channels=1, out_channels=4, feature_size=50, norm_name="instance")),
    (SwinUNETR, dict(in_channels=1, out_channels=3, feature_size=24, norm_name="instance", drop_rate=-1)),
], ids=str)
def test_monai_ill_arguments_raise_the_parents_error(parent_cls, kw):
    with pytest.raises(ValueError) as expected:
        parent_cls(**kw)
    with pytest.raises(ValueError) as got:
        CHILD[parent_cls](**kw)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("parent_cls, kw, shape", [
    (SegResNet, CASES[0][1], (2, 1, 16, 16)),
    (SegResNetDS, _segresnet_ds()[0][1], (2, 1, 16, 16)),
    (BasicUNet, dict(spatial_dims=2, in_channels=1, out_channels=3), (2, 1, 32, 32)),
    (BasicUNetPlusPlus, dict(spatial_dims=2, deep_supervision=True, in_channels=1, out_channels=3), (2, 1, 32, 32)),
], ids=lambda v: getattr(v, "__name__", None))
def test_monai_script_cases(parent_cls, kw, shape):
    """MONAI's test_script cases: the child scripts, and the scripted child equals the parent in eval."""
    import io

    parent, child = make_pair(parent_cls, CHILD[parent_cls], kw, "all")
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(child), buf)
    buf.seek(0)
    x = torch.randn(*shape)
    got, expected = torch.jit.load(buf).eval()(x), parent.eval()(x)
    for a, b in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got],
                    strict=True):
        assert torch.equal(a, b)
