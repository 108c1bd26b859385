"""``AtomicCheckpointIO``: a save that dies midway, or a process killed while saving, leaves the
previous checkpoint whole and loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, compose_train

from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO
from reid_lightning.cli.train import build_trainer


def checkpoint(value: float) -> dict:
    """A checkpoint-shaped dict of about 4 MB whose tensors all hold ``value``."""
    weights = {f"layer{i}.weight": torch.full((256, 1024), value) for i in range(4)}
    return {"state_dict": weights, "global_step": int(value)}


def assert_holds(path: Path, value: float) -> None:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["global_step"] == int(value)
    assert all(torch.equal(t, torch.full((256, 1024), value)) for t in loaded["state_dict"].values())


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1.0), path)
    assert_holds(path, 1.0)

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()  # half of the new checkpoint is on disk ...
        raise OSError("No space left on device")  # ... when the write fails

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(checkpoint(2.0), path)
    monkeypatch.undo()

    assert_holds(path, 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the partial temp file is gone
    plain = path.parent / "plain"
    plain.touch()
    assert path.stat().st_mode == plain.stat().st_mode  # the usual permissions (umask), not a temp file's 0600
    plain.unlink()
    io.save_checkpoint(checkpoint(3.0), path)
    assert_holds(path, 3.0)


SAVE_FOREVER = """
import sys, torch
from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
big = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MB: most of the time goes to writing
while True:
    step += 1
    io.save_checkpoint({"state_dict": big, "global_step": step}, sys.argv[1])
    print(step, flush=True)
"""


def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "1"  # the first checkpoint is complete
        time.sleep(0.3)  # now inside a later save, most likely
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["global_step"] >= 1 and set(loaded["state_dict"]) == {f"w{i}" for i in range(8)}
    # at most the temp file of the interrupted save is left beside it
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in leftovers), leftovers


def test_the_trainer_of_the_runner_saves_atomically(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=quickstart", "callbacks=none", "logger=csv"], output_dir=tmp_path)
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_checkpoint_directory_is_named_with_the_files_in_it(tmp_path):
    from reid_lightning.checkpointing.load import load_checkpoint, load_model_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    for load in (load_checkpoint, load_model_checkpoint):
        with pytest.raises(IsADirectoryError, match=r"checkpoints is a directory: pass a checkpoint file in it \(last\.ckpt\)"):
            load(tmp_path / "checkpoints")
