"""DistributedDataParallel with 2 CPU processes (gloo): the checkpointed model trains exactly like the plain one."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import DynUNet, UNet, VNet
from torch.nn.parallel import DistributedDataParallel as DDP

from monai_ckpt import CheckpointDynUNet, CheckpointUNet, CheckpointVNet

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2,
           dropout=0.1)
DYN = dict(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 4, strides=[1, 2, 2, 2],
           upsample_kernel_size=[2] * 3, filters=[4, 8, 16, 32], deep_supervision=True, deep_supr_num=2, dropout=0.1)
# name -> (plain class, checkpointed class, kwargs, policy)
RUNS = {
    "unet": (UNet, CheckpointUNet, CFG, "all"),
    "unet-cheap": (UNet, CheckpointUNet, CFG, {"every": 2, "mode": "cheap"}),
    "vnet": (VNet, CheckpointVNet, dict(spatial_dims=3, in_channels=1, out_channels=2), "sqrt"),
    "dynunet-ds": (DynUNet, CheckpointDynUNet, DYN, "all"),
}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for run, (plain_cls, ckpt_cls, cfg, policy) in RUNS.items():
            for name, net in _pair(plain_cls, ckpt_cls, cfg, policy):
                net = DDP(net)
                opt = torch.optim.SGD(net.parameters(), lr=0.1)
                for step in range(2):
                    torch.manual_seed(100 * step + rank)
                    x = torch.randn(2, 1, 16, 16, 16)
                    net(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
                results[(run, name)] = {k: v.clone() for k, v in net.module.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _pair(plain_cls, ckpt_cls, cfg, policy):
    for name, make in (("plain", lambda: plain_cls(**cfg)), ("ckpt", lambda: ckpt_cls(**cfg, checkpoint_policy=policy))):
        torch.manual_seed(0)
        yield name, make()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for run, (plain_cls, _, cfg, _) in RUNS.items():
        plain = r0[(run, "plain")]
        for key, ref in plain.items():
            assert torch.equal(r0[(run, "ckpt")][key], ref), (run, key)
            if "running" not in key and "num_batches" not in key:  # BatchNorm statistics are per rank in DDP
                assert torch.equal(r1[(run, "ckpt")][key], ref), (run, key)  # replicas stay in sync
        # the training did something: weights moved away from the initial ones
        torch.manual_seed(0)
        init = plain_cls(**cfg).state_dict()
        assert any(not torch.equal(init[k], v) for k, v in plain.items()), run
