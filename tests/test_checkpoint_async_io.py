"""``AsyncAtomicCheckpointIO``: checkpoints snapshot on the training thread, written in order by one
background thread, errors raised at the next call."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from reid_lightning.checkpointing import atomic_io
from reid_lightning.checkpointing.async_io import AsyncAtomicCheckpointIO
from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO
from reid_lightning.cli.train import build_trainer


def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "optimizer_states": [{"state": {0: {"step": torch.tensor(value)}}}],
            "global_step": int(value)}


def held(path: Path) -> float:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), float(loaded["global_step"])))
    return loaded["global_step"]


@pytest.fixture
def gated_writes(monkeypatch):
    """Writes block until the returned event is set (the training thread goes on meanwhile)."""
    gate, original = threading.Event(), atomic_io.atomic_torch_save

    def gated(obj, path):
        assert gate.wait(30)
        original(obj, path)

    monkeypatch.setattr(atomic_io, "atomic_torch_save", gated)
    return gate


def test_a_save_returns_before_the_write_and_writes_the_values_of_the_call(tmp_path, gated_writes) -> None:
    io, state = AsyncAtomicCheckpointIO(), checkpoint(3.0)
    io.save_checkpoint(state, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    state["state_dict"]["w"].add_(1.0)  # training goes on in place
    state["optimizer_states"][0]["state"][0]["step"].add_(1.0)
    gated_writes.set()
    io.teardown()
    assert held(tmp_path / "last.ckpt") == 3
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert loaded["optimizer_states"][0]["state"][0]["step"] == 3.0


def test_removals_wait_for_the_saves_asked_for_before_them(tmp_path, gated_writes) -> None:
    io = AsyncAtomicCheckpointIO()
    old, new = tmp_path / "epoch1.ckpt", tmp_path / "epoch2.ckpt"
    gated_writes.set()
    io.save_checkpoint(checkpoint(1.0), old)
    io.wait()
    gated_writes.clear()
    io.save_checkpoint(checkpoint(2.0), new)
    io.remove_checkpoint(old)  # ModelCheckpoint replacing its best file
    assert old.exists() and not new.exists()
    gated_writes.set()
    io.wait()
    assert not old.exists() and held(new) == 2
    io.teardown()


def test_a_load_waits_for_the_write_in_flight(tmp_path, gated_writes) -> None:
    io = AsyncAtomicCheckpointIO()
    io.save_checkpoint(checkpoint(5.0), tmp_path / "last.ckpt")
    threading.Timer(0.2, gated_writes.set).start()
    assert io.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5
    io.teardown()


def test_a_failed_write_is_raised_by_the_next_call_and_stops_later_writes(tmp_path, monkeypatch) -> None:
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    io = AsyncAtomicCheckpointIO()
    monkeypatch.setattr(atomic_io, "atomic_torch_save", full_disk)
    io.save_checkpoint(checkpoint(1.0), tmp_path / "last.ckpt")
    io._last.result()
    with pytest.raises(OSError, match="No space left on device") as raised:
        io.save_checkpoint(checkpoint(2.0), tmp_path / "last.ckpt")
    # raised by the next save: the error names the write that failed
    if sys.version_info >= (3, 11):  # exception notes
        assert f"writing checkpoint {tmp_path / 'last.ckpt'}" in "".join(raised.value.__notes__)
    io.save_checkpoint(checkpoint(3.0), tmp_path / "last.ckpt")  # raised once; the run decides
    with pytest.raises(OSError, match="No space left on device"):
        io.teardown()
    assert io._executor is None


def test_the_runner_writes_asynchronously_unless_asked_not_to(tmp_path: Path) -> None:
    overrides = ["experiment=quickstart", "callbacks=none", "logger=csv"]
    trainer = build_trainer(compose_train(overrides, output_dir=tmp_path), callbacks=[], loggers=[])
    assert isinstance(trainer.strategy.checkpoint_io, AsyncAtomicCheckpointIO)
    trainer = build_trainer(compose_train([*overrides, "async_checkpoints=false"], output_dir=tmp_path), [], [])
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
