"""DistributedDataParallel with 2 CPU processes (gloo): the checkpointed model trains exactly like the plain one."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import UNet
from torch.nn.parallel import DistributedDataParallel as DDP

from monai_ckpt import CheckpointUNet

CFG = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2,
           dropout=0.1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, cls, kw in [("plain", UNet, {}), ("ckpt", CheckpointUNet, {"checkpoint_policy": "all"}),
                              ("cheap", CheckpointUNet, {"checkpoint_policy": {"every": 2, "mode": "cheap"}})]:
            torch.manual_seed(0)
            net = DDP(cls(**CFG, **kw))
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for step in range(2):
                torch.manual_seed(100 * step + rank)
                x = torch.randn(2, 1, 16, 16, 16)
                net(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            results[name] = {k: v.clone() for k, v in net.module.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for key, ref in r0["plain"].items():
        assert torch.equal(r0["ckpt"][key], ref), key
        assert torch.equal(r0["cheap"][key], ref), key
        assert torch.equal(r1["ckpt"][key], ref), key  # replicas stay in sync
    # the training did something: weights moved away from the initial ones
    torch.manual_seed(0)
    init = UNet(**CFG).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in r0["plain"].items())
