"""Nothing a user has is left half-written: the checkpoint saver and the NIfTI writer write to a temporary file and
rename it, so a failure mid-write keeps the previous file and leaves no temporary one."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ckpt.data import AtomicNibabelWriter
from monai_ckpt.handlers import AtomicCheckpointSaver


def test_checkpoint_saver_is_atomic(tmp_path, monkeypatch):
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="m",
                                  key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    scores = iter([0.1, 0.2, 0.3])

    @engine.on(Events.EPOCH_STARTED)
    def _metric(e):
        e.state.metrics["m"] = next(scores)

    engine.run([0], max_epochs=1)
    first = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        net.weight.add_(1.0)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")  # after bytes were written: a non-atomic saver would leave them in model.pt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(kept["weight"], first["weight"])  # the previous best model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_nifti_writer_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"

    def writer() -> AtomicNibabelWriter:
        w = AtomicNibabelWriter(output_dtype=np.uint8)
        w.set_data_array(torch.ones(1, 4, 4, 4), channel_dim=0)
        w.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
        return w

    def failing_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("interrupted")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="interrupted"):
        writer().write(target)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    writer().write(target)
    assert nib.load(target).shape == (4, 4, 4) and list(tmp_path.iterdir()) == [target]
