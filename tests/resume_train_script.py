"""A small MONAI SupervisedTrainer run with ResumableCheckpoint, for the kill -9 test in test_handlers.py.

python tests/resume_train_script.py SAVE_DIR OUT [--pause-after K]   (or ``train(...)`` in-process)

Trains a tiny CheckpointUNet (Adam, StepLR per epoch, accumulation over 2 iterations) on a fixed synthetic
dataset, printing ``RESUMED <iteration>`` and ``ITER <n>`` lines; writes the final weights to OUT. With
``--pause-after K`` it prints ``PAUSED K`` once the checkpoint of iteration K is on disk and then sleeps, for
the test to kill it.
"""

import argparse
import sys
import time

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler

from monai_ckpt import CheckpointUNet
from monai_ckpt.handlers import MemoryEfficientUpdate, ResumableCheckpoint


def train(save_dir: str, out: str, pause_after: int = 0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = CheckpointUNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, checkpoint_policy="all")
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.randn(1, 16, 16, 16, generator=g), "label": torch.rand(2, 16, 16, 16, generator=g)}
            for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    saver = ResumableCheckpoint(save_dir, {"network": net, "optimizer": opt, "lr_scheduler": sched},
                                save_interval=2, n_saved=2)
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=3, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(), decollate=False,
        iteration_update=MemoryEfficientUpdate(accumulation_steps=2),
        train_handlers=[LrScheduleHandler(sched, print_lr=False), saver],
    )

    @trainer.on(Events.STARTED)
    def report_start(engine):  # runs after the saver's STARTED handler has loaded
        print(f"RESUMED {engine.state.iteration}", flush=True)

    @trainer.on(Events.ITERATION_COMPLETED)
    def report(engine):
        print(f"ITER {engine.state.iteration}", flush=True)

    @trainer.on(Events.GET_BATCH_STARTED)
    def pause(engine):  # runs after the saver's GET_BATCH_STARTED handler has written the checkpoint
        if pause_after and engine.state.iteration == pause_after:
            print(f"PAUSED {engine.state.iteration}", flush=True)
            time.sleep(600)

    trainer.run()
    torch.save(net.state_dict(), out)
    print("DONE", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir")
    parser.add_argument("out")
    parser.add_argument("--pause-after", type=int, default=0)
    args = parser.parse_args()
    train(args.save_dir, args.out, args.pause_after)


if __name__ == "__main__":
    sys.exit(main())
