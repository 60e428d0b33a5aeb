"""DistributedDataParallel with 2 CPU processes (gloo): the checkpointed model trains exactly like the plain one."""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, SegResNet, SwinUNETR, UNet, VNet
from torch.nn.parallel import DistributedDataParallel as DDP

from monai_ckpt import (
    CheckpointAttentionUnet, CheckpointBasicUNet, CheckpointDynUNet, CheckpointSegResNet, CheckpointSwinUNETR,
    CheckpointUNet, CheckpointVNet,
)

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2,
           dropout=0.1)
DYN = dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 4, strides=[1, 2, 2, 2],
           upsample_kernel_size=[2] * 3, filters=[4, 8, 16, 32], deep_supervision=True, deep_supr_num=2, dropout=0.1)
SWIN = dict(spatial_dims=2, in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
            window_size=4, drop_rate=0.1, dropout_path_rate=0.1, norm_name="batch")
VOLUME = (2, 1, 16, 16, 16)
# name -> (plain class, checkpointed class, kwargs, policy, input shape)
RUNS = {
    "unet": (UNet, CheckpointUNet, CFG, "all", VOLUME),
    "unet-cheap": (UNet, CheckpointUNet, CFG, {"every": 2, "mode": "cheap"}, VOLUME),
    "vnet": (VNet, CheckpointVNet, dict(spatial_dims=3, in_channels=1, out_channels=2), "sqrt", VOLUME),
    "dynunet-ds": (DynUNet, CheckpointDynUNet, DYN, "all", VOLUME),
    "segresnet": (SegResNet, CheckpointSegResNet, dict(init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1),
                                                        dropout_prob=0.1, norm="batch"), "sqrt", VOLUME),
    "swinunetr": (SwinUNETR, CheckpointSwinUNETR, SWIN, "all", (2, 1, 32, 32)),
    "attentionunet": (AttentionUnet, CheckpointAttentionUnet,
                      dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                           dropout=0.1), "cheap", VOLUME),
    "basicunet": (BasicUNet, CheckpointBasicUNet, dict(features=(4, 4, 8, 8, 16, 4), norm="batch", dropout=0.1),
                  {"every": 2}, VOLUME),
}

# nnU-Net's ResEnc network with its deep-supervision heads, where the optional extra is installed (CI runs the nnunet
# marker in an environment that has it): test_ddp_nnunet_resenc_two_cpu_processes
NNUNET_RUNS = {}
try:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from monai_ckpt.nnunet import CheckpointResidualEncoderUNet

    NNUNET_RUNS["nnunet-resenc-ds"] = (ResidualEncoderUNet, CheckpointResidualEncoderUNet, dict(
        input_channels=1, n_stages=3, features_per_stage=(4, 8, 16), conv_op=torch.nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2), n_blocks_per_stage=(1, 2, 2), num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True), "all", VOLUME)
except ModuleNotFoundError:
    pass

def _release() -> None:
    """End a worker's process group once its DDP modules are gone. A DDP module released after the group was
    destroyed takes the group's last reference, and its destructor joins gloo's threads with the GIL held while one
    of them may still need the GIL to free its last work (seen once: the worker hung for good)."""
    gc.collect()
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_dir: str, nnunet: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for run, (plain_cls, ckpt_cls, cfg, policy, shape) in (NNUNET_RUNS if nnunet else RUNS).items():
            for name, net in _pair(plain_cls, ckpt_cls, cfg, policy):
                net = DDP(net)
                opt = torch.optim.SGD(net.parameters(), lr=0.1)
                for step in range(2):
                    torch.manual_seed(100 * step + rank)
                    x = torch.randn(*shape)
                    out = net(x)
                    sum(o.square().mean() for o in (out if isinstance(out, list) else [out])).backward()
                    opt.step()
                    opt.zero_grad()
                results[(run, name)] = {k: v.clone() for k, v in net.module.state_dict().items()}
                del net, opt  # see _release
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _release()


def _pair(plain_cls, ckpt_cls, cfg, policy):
    for name, make in (("plain", lambda: plain_cls(**cfg)), ("ckpt", lambda: ckpt_cls(**cfg, checkpoint_policy=policy))):
        torch.manual_seed(0)
        yield name, make()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_ddp_trains_as_the_plain_network(runs: dict, nnunet: bool, tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), nnunet), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for run, (plain_cls, _, cfg, _, _) in runs.items():
        plain = r0[(run, "plain")]
        for key, ref in plain.items():
            assert torch.equal(r0[(run, "ckpt")][key], ref), (run, key)
            if "running" not in key and "num_batches" not in key:  # BatchNorm statistics are per rank in DDP
                assert torch.equal(r1[(run, "ckpt")][key], ref), (run, key)  # replicas stay in sync
        # the training did something: weights moved away from the initial ones
        torch.manual_seed(0)
        init = plain_cls(**cfg).state_dict()
        assert any(not torch.equal(init[k], v) for k, v in plain.items()), run


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes(tmp_path):
    _assert_ddp_trains_as_the_plain_network(RUNS, False, tmp_path)


@pytest.mark.nnunet
@pytest.mark.timeout(300)
def test_ddp_nnunet_resenc_two_cpu_processes(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    _assert_ddp_trains_as_the_plain_network(NNUNET_RUNS, True, tmp_path)

UNET4 = dict(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def _budget_worker(rank: int, world: int, port: int, out_dir: str, budget_gb: float) -> None:
    from monai.losses import DiceCELoss

    from monai_ckpt.planner import planning_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = DDP(CheckpointUNet(**UNET4, checkpoint_policy={"budget_gb": budget_gb}))
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        torch.manual_seed(rank)
        x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 4, (2, 1, 16, 16, 16))
        with planning_loss(loss_fn, y):  # what MemoryEfficientUpdate does with the engine's loss and label
            loss_fn(net(x), y).backward()
        p = net.module.checkpoint_plan
        torch.save({"policy": p.policy, "loss": p.loss, "label_shape": p.label_shape, "peak": p.predicted_peak_bytes},
                   os.path.join(out_dir, f"plan{rank}.pt"))
        del net  # see _release
    finally:
        _release()


@pytest.mark.timeout(300)  # a hung worker fails the test instead of stalling the suite
def test_ddp_budget_policy_plans_on_rank0_with_the_engines_loss(tmp_path):
    """Rank 0 plans with the user's DiceCE loss and label batch; every rank runs that plan, and it fits."""
    from monai.losses import DiceCELoss

    from monai_ckpt import plan

    y = torch.zeros(2, 1, 16, 16, 16, dtype=torch.int64)
    plain = plan(CheckpointUNet(**UNET4), (16, 16, 16), 1.0, batch_size=2,
                 loss=DiceCELoss(to_onehot_y=True, softmax=True), label=y).plain_peak_bytes
    budget = 0.9 * plain / 2**30  # below plain: the plan must checkpoint
    mp.spawn(_budget_worker, args=(2, _free_port(), str(tmp_path), budget), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "plan0.pt"), torch.load(tmp_path / "plan1.pt")
    assert p0 == p1
    assert "DiceCELoss" in p0["loss"] and p0["label_shape"] == (2, 1, 16, 16, 16)
    assert p0["policy"] != "none" and p0["peak"] <= budget * 2**30
