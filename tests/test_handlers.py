"""monai_ckpt.handlers inside MONAI's SupervisedTrainer: accumulation (+AMP) against one big batch, OOM recovery
under a simulated memory limit, kill -9 and resume against an uninterrupted run, memory stats, clear errors."""

import itertools
import os
import resource
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from monai_ckpt import CheckpointUNet
from monai_ckpt.handlers import (
    MemoryEfficientUpdate,
    MemoryStatsHandler,
    ResumableCheckpoint,
    estimate_activation_saving,
)
from monai_ckpt.profiling import measure_step_memory, replica

TESTS = Path(__file__).resolve().parent


def _net(policy="all"):
    torch.manual_seed(0)
    return CheckpointUNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, checkpoint_policy=policy)


def _data(n, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (size, size, size)
    return [{"image": torch.randn(1, *shape, generator=g), "label": torch.rand(2, *shape, generator=g)}
            for _ in range(n)]


def _trainer(net, data, batch, epochs=1, lr=0.1, **kwargs):
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    return SupervisedTrainer(device="cpu", max_epochs=epochs, train_data_loader=loader, network=net,
                             optimizer=torch.optim.SGD(net.parameters(), lr=lr), loss_function=nn.MSELoss(),
                             decollate=False, **kwargs)


def _assert_same_weights(a, b, **tol):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=f"param {name}", **tol)


def _differ(a, b, atol=1e-5):
    return any(not torch.allclose(p, q, atol=atol, rtol=0) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------- accumulation and AMP


def test_accumulation_equals_one_big_batch():
    data = _data(10)  # batches of 2, windows of 2 iterations: 4 + 4 + 2 samples per optimizer step, like batch 4
    big, acc, monai_acc = _net(), _net(), _net()
    _trainer(big, data, batch=4, epochs=2).run()
    trainer = _trainer(acc, data, batch=2, epochs=2, iteration_update=MemoryEfficientUpdate(accumulation_steps=2))
    steps = []
    trainer.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    trainer.run()
    assert trainer.state.iteration == 10 and len(steps) == 6  # 5 batches per epoch, 3 optimizer steps per epoch
    assert _differ(acc, _net())
    _assert_same_weights(acc, big, rtol=1e-5, atol=1e-6)
    # MONAI's own accumulation divides the short last window by 2 instead of 1: not the big batch (the check has power)
    _trainer(monai_acc, data, batch=2, epochs=2, accumulation_steps=2).run()
    assert _differ(monai_acc, big)


def test_accumulation_with_cpu_amp_matches_manual_bf16_loop():
    data = _data(4)
    net, ref, fp32 = _net(), _net(), _net()
    trainer = _trainer(net, data, batch=2, amp=True, iteration_update=MemoryEfficientUpdate(accumulation_steps=2))
    trainer.run()
    # by hand: one window of two micro-batches under bf16 autocast, each loss / 2, one SGD step
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref.train()
    for i in (0, 2):
        batch = {k: torch.stack([d[k] for d in data[i : i + 2]]) for k in ("image", "label")}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.MSELoss()(ref(batch["image"]), batch["label"]).mean()
        (loss / 2).backward()
    opt.step()
    _assert_same_weights(net, ref, rtol=0, atol=0)
    _trainer(fp32, data, batch=2, iteration_update=MemoryEfficientUpdate(accumulation_steps=2)).run()
    assert _differ(net, fp32, atol=1e-6)  # autocast really was on


# ---------------------------------------------------------------- out-of-memory recovery


class SimulatedMemoryLimit(TorchDispatchMode):
    """Counts the bytes of live tensor storages created by operators; raises torch.OutOfMemoryError past ``limit``."""

    def __init__(self, limit=None):
        super().__init__()
        self.limit, self.live, self.peak = limit, WeakIdKeyDictionary(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.live:
                self.live[t.untyped_storage()] = t.untyped_storage().nbytes()
        total = sum(self.live.values())
        self.peak = max(self.peak, total)
        if self.limit is not None and total > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {total} live bytes > limit {self.limit}")
        return out


def _oom_run(policy, data, limit=None, from_iteration=2):
    """4 iterations, windows of 2; the limit applies from ``from_iteration`` (the 2nd step of the 1st window)."""
    net = _net(policy)
    update = MemoryEfficientUpdate(accumulation_steps=2)
    trainer = _trainer(net, data, batch=2, iteration_update=update)
    mode = SimulatedMemoryLimit()
    peaks, completed = {}, []

    @trainer.on(Events.ITERATION_STARTED)
    def start(engine):
        mode.peak = sum(mode.live.values())
        mode.limit = limit if engine.state.iteration >= from_iteration else None

    @trainer.on(Events.ITERATION_COMPLETED)
    def done(engine):
        peaks[engine.state.iteration] = mode.peak
        completed.append(engine.state.iteration)

    with mode:
        trainer.run()
    return net, trainer, peaks, completed


def test_oom_recovery_retries_the_batch_with_more_aggressive_policies():
    data = _data(8, size=32)
    runs = {p: _oom_run(p, data) for p in ("none", "cheap", "all")}
    peak = {p: max(run[2].values()) for p, run in runs.items()}
    assert peak["all"] < peak["cheap"] < peak["none"], peak
    limit = (peak["all"] + peak["cheap"]) // 2  # "none" and "cheap" do not fit, "all" does
    net, trainer, _, completed = _oom_run("none", data, limit=limit)
    events = trainer.state.oom_events
    assert [(e["from"], e["to"]) for e in events] == [("none", "cheap"), ("cheap", "all")]
    assert "backward" in [e["phase"] for e in events]  # gradients were touched: the window had to be replayed
    assert events[0]["iteration"] == 2 and "simulated" in events[0]["error"]
    assert net.checkpoint_policy == "all"
    assert completed == [1, 2, 3, 4] and trainer.state.iteration == len(data) // 2  # no batch skipped
    # the first window's gradient (iteration 1, replayed, + iteration 2) must equal a run that used "all" throughout
    reference = runs["all"][0]
    _assert_same_weights(net, reference, rtol=1e-5, atol=1e-7)
    assert _differ(net, _net())


def test_oom_late_in_backward_clears_partial_gradients_and_replays_the_window():
    data = _data(8)
    net, reference = _net("none"), _net("all")
    update = MemoryEfficientUpdate(accumulation_steps=2, oom_ladder=["none", "all"])
    trainer = _trainer(net, data, batch=2, iteration_update=update)
    params = list(net.parameters())
    first, last = params[0], params[-1]  # the input conv's gradient comes last in backward, the output conv's first
    snapshot, touched = {}, []
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda e: snapshot.update(g=last.grad.clone()))

    def fail_late(grad):  # iteration 2 is the 2nd of its window: iteration 1's gradients are in .grad already
        if net.checkpoint_policy == "none" and trainer.state.iteration == 2:
            touched.append(not torch.equal(last.grad, snapshot["g"]))
            raise torch.OutOfMemoryError("simulated, late in backward")
        return grad

    first.register_hook(fail_late)
    trainer.run()
    assert touched == [True]  # the failed backward had already added to some gradients
    assert [(e["phase"], e["to"]) for e in trainer.state.oom_events] == [("backward", "all")]
    _trainer(reference, data, batch=2, iteration_update=MemoryEfficientUpdate(accumulation_steps=2)).run()
    _assert_same_weights(net, reference, rtol=1e-5, atol=1e-7)


def test_oom_without_a_more_aggressive_policy_raises():
    data = _data(4, size=32)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        _oom_run("all", data, limit=1, from_iteration=1)


# ---------------------------------------------------------------- kill -9 and resume


def _script(save_dir, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(TESTS / "resume_train_script.py"), str(save_dir), str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    from resume_train_script import train

    killed = _script(tmp_path / "ckpt", tmp_path / "unused.pt", "--pause-after", "6")
    threads = torch.get_num_threads()
    try:  # the uninterrupted reference, in this process while the other one starts
        train(str(tmp_path / "ref"), str(tmp_path / "ref.pt"))
    finally:
        torch.set_num_threads(threads)
    assert "ITER 12" in capsys.readouterr().out
    lines = []
    for line in killed.stdout:  # 4 iterations per epoch: iteration 6 is the middle of epoch 2
        lines.append(line.strip())
        if line.startswith("PAUSED"):
            break
    assert lines[-1] == "PAUSED 6", (lines, killed.stderr.read() if killed.poll() is not None else "")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["checkpoint_4.pt", "checkpoint_6.pt"]  # every 2 iterations + epoch end, newest 2 kept
    # what a crash can also leave: a temporary file of a write in progress and a damaged newer checkpoint
    (tmp_path / "ckpt" / ".checkpoint_8.pt.k3j_9x2a.tmp.pt").write_bytes(b"partial")  # atomic_path's name
    (tmp_path / "ckpt" / "checkpoint_7.pt").write_bytes(b"not a checkpoint")

    resumed = _script(tmp_path / "ckpt", tmp_path / "resumed.pt")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    lines = out.split()
    assert "RESUMED 6" in out and "skipping checkpoint" in err and "checkpoint_7.pt" in err
    assert [int(n) for k, n in itertools.pairwise(lines) if k == "ITER"] == list(range(7, 13))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint_10.pt", "checkpoint_12.pt"]
    for name in ("checkpoint_10.pt", "checkpoint_12.pt"):
        ckpt = torch.load(tmp_path / "ckpt" / name, weights_only=True)
        assert set(ckpt) == {"network", "optimizer", "lr_scheduler", "trainer"}
    final, expected = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "ref.pt")
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=0, msg=key)
    assert ckpt["lr_scheduler"]["last_epoch"] == 3 and ckpt["trainer"]["iteration"] == 12


def test_checkpoint_waits_for_the_accumulation_window_and_loads_with_monai(tmp_path):
    from monai.handlers import CheckpointLoader

    data = _data(6)  # 3 iterations per epoch, windows of 2: steps after iterations 2, 3, 5, 6
    net = _net()
    saver = ResumableCheckpoint(tmp_path, {"network": net}, save_interval=1, n_saved=None)
    trainer = _trainer(net, data, batch=2, epochs=2, iteration_update=MemoryEfficientUpdate(accumulation_steps=2),
                       train_handlers=[saver])
    trainer.run()
    assert [it for it, _ in saver.checkpoints()] == [2, 3, 5, 6]
    other = _net("none")
    CheckpointLoader(saver.last_checkpoint, {"network": other})(_trainer(other, data, batch=2))
    _assert_same_weights(other, net, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GradScaler needs CUDA")
def test_grad_scaler_state_is_saved_and_restored_on_cuda(tmp_path):
    data = _data(4)
    net = _net().cuda()
    trainer = SupervisedTrainer(device="cuda", max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, 2),
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                loss_function=nn.MSELoss(), amp=True, decollate=False,
                                iteration_update=MemoryEfficientUpdate(accumulation_steps=2),
                                train_handlers=[ResumableCheckpoint(tmp_path, {"network": net})])
    # a scale a fresh scaler does not have, so that restoring it is visible
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    trainer.add_event_handler(Events.STARTED, lambda e: setattr(e, "scaler", scaler))
    trainer.run()
    saved = torch.load(next(tmp_path.glob("checkpoint_*.pt")), weights_only=True)
    assert saved["grad_scaler"]["scale"] == trainer.scaler.get_scale() <= 1024.0
    net2 = _net().cuda()
    trainer2 = SupervisedTrainer(device="cuda", max_epochs=2, train_data_loader=torch.utils.data.DataLoader(data, 2),
                                 network=net2, optimizer=torch.optim.SGD(net2.parameters(), lr=0.1),
                                 loss_function=nn.MSELoss(), amp=True, decollate=False,
                                 train_handlers=[ResumableCheckpoint(tmp_path, {"network": net2})])
    seen = {}
    trainer2.add_event_handler(Events.ITERATION_STARTED(once=3), lambda e: seen.update(scale=e.scaler.get_scale()))
    trainer2.run()
    assert seen["scale"] == saved["grad_scaler"]["scale"] and trainer2.state.iteration == 4


# ---------------------------------------------------------------- memory stats


class _Writer:
    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_memory_stats_handler_from_a_bundle_config():
    writer = _Writer()
    parser = ConfigParser({
        "handler": {"_target_": "monai_ckpt.handlers.MemoryStatsHandler", "summary_writer": "@writer"},
        "update": {"_target_": "monai_ckpt.handlers.MemoryEfficientUpdate", "accumulation_steps": 2},
    })
    parser["writer"] = writer
    handler, update = parser.get_parsed_content("handler"), parser.get_parsed_content("update")
    assert isinstance(handler, MemoryStatsHandler) and update.accumulation_steps == 2
    net = _net("all")
    trainer = _trainer(net, _data(6), batch=2, iteration_update=update, train_handlers=[handler])
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: setattr(net, "checkpoint_policy", "none"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.run()
    stats = trainer.state.memory_stats
    assert stats["checkpoint_policy"] == "none" and stats["peak_memory_kind"] == "process_peak_rss"
    assert stats["peak_memory_mib"] * 2**20 >= rss_before
    assert stats["voxels_per_s"] * stats["seconds"] == pytest.approx(2 * 16**3)
    # the saving of "all" at iteration 1: same as profiling's estimate of a step (no optimizer) with "none" vs "all"
    first = next(v for t, v, s in writer.scalars if t == "memory/activation_saved_mib" and s == 1)
    none, all_ = (measure_step_memory(lambda p=p: _net(p), (2, 1, 16, 16, 16), estimate=True, optimizer="none").peak
                  for p in ("none", "all"))
    assert first * 2**20 == pytest.approx(none - all_, rel=0.05)
    assert first > 0 and stats["activation_saved_mib"] == 0  # "none" saves nothing
    assert estimate_activation_saving(net, (2, 1, 16, 16, 16), "all")[0] == pytest.approx(none, rel=0.05)
    assert [s for t, v, s in writer.scalars if t == "memory/peak_memory_mib"] == [1, 2, 3]
    assert [(text, s) for _, text, s in writer.texts] == [('"all"', 1), ('"none"', 3)]
    assert set(trainer.state.metrics) >= {"peak_memory_mib", "activation_saved_mib", "voxels_per_s"}
    assert ("memory/epoch_voxels_per_s", trainer.state.metrics["voxels_per_s"], 1) in writer.scalars


def test_activation_saving_of_networks_that_keep_tensors_and_of_vnet():
    """The estimate copies the network: a DynUNet keeps its last deep-supervision outputs (non-leaf tensors) in
    ``heads``, which a plain deepcopy refuses; VNet's transitions once failed to copy under FakeTensorMode."""
    from monai_ckpt import CheckpointDynUNet, CheckpointVNet

    dyn = CheckpointDynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=(4, 8, 16), deep_supervision=True,
                            deep_supr_num=1, checkpoint_policy="all")
    dyn(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    assert dyn.heads[0].grad_fn is not None
    vnet = CheckpointVNet(3, 1, 2, checkpoint_policy="all")
    for net, shape in ((dyn, (1, 1, 16, 16, 16)), (vnet, (1, 1, 32, 32, 32))):
        none, with_all = estimate_activation_saving(net, shape, "all")
        reference = [measure_step_memory(lambda p=p: replica(net, p), shape, estimate=True, optimizer="none").peak
                     for p in ("none", "all")]
        assert (none, with_all) == pytest.approx(reference, rel=0.05) and with_all < none


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "4"])
def test_bad_accumulation_steps(steps):
    with pytest.raises(ValueError, match="accumulation_steps must be a positive integer"):
        MemoryEfficientUpdate(accumulation_steps=steps)


@pytest.mark.parametrize("dtype", ["float32", torch.float32, "float17", torch.int8])
def test_bad_amp_dtype(dtype):
    with pytest.raises(ValueError, match=r"not a mixed-precision dtype.*bfloat16"):
        MemoryEfficientUpdate(amp_dtype=dtype)


def test_amp_dtype_unsupported_on_the_device_or_without_amp():
    update = MemoryEfficientUpdate(amp_dtype="float16")
    engine = types.SimpleNamespace(state=types.SimpleNamespace(device=torch.device("cpu")), amp=False, amp_kwargs={})
    with pytest.raises(ValueError, match="amp=False"):
        update.autocast_dtype(engine)
    engine.amp = True
    assert update.autocast_dtype(engine) == torch.float16  # CPU autocast supports float16 in this torch
    if not torch.cuda.is_available():
        engine.state.device = torch.device("cuda")
        with pytest.raises(ValueError, match="not supported on device type 'cuda'"):
            update.autocast_dtype(engine)
    engine.state.device, engine.amp_kwargs = torch.device("cpu"), {"dtype": "float64"}
    with pytest.raises(ValueError, match="float64"):
        MemoryEfficientUpdate().autocast_dtype(engine)


def test_oom_ladder_with_budget_policies():
    update = MemoryEfficientUpdate(oom_ladder=("none", {"budget_gb": 4}, "all"), budget_factor=0.5)
    assert update._next_policy({"budget_gb": 8, "optimizer": "sgd"}, []) == {"budget_gb": 4, "optimizer": "sgd"}
    assert update._next_policy("none", ["none"]) == {"budget_gb": 4}
    assert update._next_policy("cheap", []) == {"budget_gb": 4}
    with pytest.raises(ValueError, match="budget_gb"):
        MemoryEfficientUpdate(oom_ladder=("none", {"budget_gb": -1}))


@pytest.mark.parametrize("ladder", [["none", "bogus"], ["none", {"every": 0}], [["encoder0", 3]]])
def test_bad_oom_ladder(ladder):
    with pytest.raises(ValueError, match=r"oom_ladder entry .* is not a valid checkpoint policy.*(valid policies|must)"):
        MemoryEfficientUpdate(oom_ladder=ladder)


def test_conflicting_accumulation_with_the_trainer():
    trainer = _trainer(_net(), _data(2), batch=2, accumulation_steps=4,
                       iteration_update=MemoryEfficientUpdate(accumulation_steps=2))
    with pytest.raises(ValueError, match="set it in one place"):
        trainer.run()


def test_resume_with_a_different_save_dict_is_a_clear_error(tmp_path):
    net = _net()
    _trainer(net, _data(2), batch=2, train_handlers=[ResumableCheckpoint(tmp_path, {"network": net})]).run()
    other = _net()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    trainer = _trainer(other, _data(2), batch=2, epochs=2,
                       train_handlers=[ResumableCheckpoint(tmp_path, {"network": other, "optimizer": opt})])
    with pytest.raises(ValueError, match=r"has no \['optimizer'\]"):
        trainer.run()
    with pytest.raises(ValueError, match="save_interval"):
        ResumableCheckpoint(tmp_path, {"network": net}, save_interval=-1)


def test_budget_policy_plans_with_the_engines_loss_and_label_batch():
    """{"budget_gb": X} under MemoryEfficientUpdate plans the trainer's own step: its loss_function on a label batch
    of the loader's shape and dtype (here DiceCE on an integer label map of 6 classes), and that plan fits the budget
    when the step is measured with that loss (real tensors); accumulation and bf16 autocast on top."""
    from monai.losses import DiceCELoss

    from monai_ckpt.profiling import LabelBatch

    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    shape, label = (2, 1, 16, 16, 16), LabelBatch((2, 1, 16, 16, 16), torch.int64)
    net = CheckpointUNet(3, 1, 6, (4, 8, 16), (2, 2), num_res_units=1)
    plain, least = (measure_step_memory(lambda p=p: replica(net, p), shape, optimizer="sgd", amp=True, loss=loss,
                                        label=label).peak for p in ("none", "all"))
    budget = (least + 0.5 * (plain - least)) / 2**30
    net.checkpoint_policy = {"budget_gb": budget, "optimizer": "sgd"}
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 16, 16, 16, generator=g), "label": torch.randint(0, 6, (1, 16, 16, 16), generator=g)}
            for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net, amp=True,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss, decollate=False,
                                iteration_update=MemoryEfficientUpdate(accumulation_steps=2))
    trainer.run()
    p = net.checkpoint_plan
    assert p.loss.startswith("DiceCELoss") and p.label_shape == shape and p.amp and p.policy != "none"
    measured = measure_step_memory(lambda: replica(net, p.policy), shape, optimizer="sgd", amp=True, loss=loss,
                                   label=label).peak
    assert measured <= budget * 2**30 and abs(p.predicted_peak_bytes - measured) <= 0.05 * measured
