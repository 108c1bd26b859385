"""EpochStream: trainer.fit's training loader, one iterator across epochs, the same batches."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_data_module import make_datamodule
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from reid_lightning.data.epoch_stream import EpochStream
from reid_lightning.data.seeded_sampler import SeededSampler


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stream_data")


def _epoch(stream: EpochStream, epoch: int, limit: int | None = None) -> list[dict]:
    stream.sampler.set_epoch(epoch)
    batches = []
    for batch in stream:
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def _assert_same(batches: list[dict], expected: list[dict]) -> None:
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert torch.equal(got["targets"], want["targets"]) and torch.equal(got["images"], want["images"])


def _count_restarts(monkeypatch) -> list[int]:
    restarts: list[int] = []
    real = EpochStream._restart
    monkeypatch.setattr(EpochStream, "_restart", lambda self, epoch: restarts.append(epoch) or real(self, epoch))
    return restarts


def test_the_stream_goes_on_across_epochs_with_each_epochs_batches(data_root: Path, monkeypatch) -> None:
    restarts = _count_restarts(monkeypatch)
    dm = make_datamodule(data_root, num_workers=2, persistent_workers=True)
    dm.setup("fit")
    stream = dm.train_dataloader()
    assert isinstance(stream, EpochStream) and len(stream) == len(dm.build_train_loader(0, 1, epoch=0))
    for epoch in range(3):
        _assert_same(_epoch(stream, epoch), list(dm.build_train_loader(0, 1, epoch=epoch)))
        assert stream.sampler.epoch == epoch
    assert restarts == [0]  # one iterator for the three epochs
    stream.close()


def test_the_stream_starts_again_after_a_cut_epoch_or_another_epoch(data_root: Path, monkeypatch) -> None:
    restarts = _count_restarts(monkeypatch)
    dm = make_datamodule(data_root, num_workers=1, persistent_workers=True)
    dm.setup("fit")
    stream = dm.train_dataloader()
    assert len(_epoch(stream, 0, limit=2)) == 2  # limit_train_batches / max_steps cut the epoch
    _assert_same(_epoch(stream, 1), list(dm.build_train_loader(0, 1, epoch=1)))
    _assert_same(_epoch(stream, 5), list(dm.build_train_loader(0, 1, epoch=5)))  # a resumed run
    _assert_same(_epoch(stream, 6), list(dm.build_train_loader(0, 1, epoch=6)))
    assert restarts == [0, 1, 5]
    stream.close()


def test_stream_epochs_false_gives_the_plain_loader(data_root: Path) -> None:
    dm = make_datamodule(data_root, stream_epochs=False)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), DataLoader)


def test_the_stream_refuses_a_sampler_it_cannot_follow() -> None:
    def make_loader(sampler):
        return DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2, sampler=sampler)

    with pytest.raises(TypeError, match="EpochStream needs a SeededSampler, got SequentialSampler"):
        EpochStream(SequentialSampler(range(8)), make_loader)
    with pytest.raises(ValueError, match="whole batches per epoch: the sampler yields 7 indices for batches of 2"):
        EpochStream(SeededSampler(range(7)), make_loader)


class TargetsProbe(pl.LightningModule):
    """Records (epoch, targets) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch["targets"].tolist()))
        return self.layer(batch["images"].mean(dim=(2, 3))).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_trains_on_each_epochs_batches_and_teardown_closes_the_stream(data_root: Path, monkeypatch) -> None:
    restarts = _count_restarts(monkeypatch)
    dm = make_datamodule(data_root, num_workers=2, persistent_workers=True)
    probe = TargetsProbe()
    trainer = pl.Trainer(
        max_epochs=3, limit_val_batches=0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(probe, datamodule=dm)
    expected = [(epoch, batch["targets"].tolist()) for epoch in range(3) for batch in dm.build_train_loader(0, 1, epoch=epoch)]
    assert probe.seen == expected
    assert restarts == [0] and dm._train_stream is None


@pytest.mark.parametrize("stream_epochs", [True, False])
def test_a_run_resumed_during_an_epoch_trains_on_the_rest_of_it(data_root: Path, tmp_path: Path, stream_epochs: bool) -> None:
    # a checkpoint written after batch 2 of epoch 1 (every_n_train_steps): the resumed run must draw
    # batches 2..7 of epoch 1, not batches 0..5 again (Lightning counts the 2 done ones)
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(callbacks: list, ckpt_path: str | None = None) -> list[tuple[int, list[int]]]:
        probe = TargetsProbe()
        trainer = pl.Trainer(
            max_epochs=2, limit_val_batches=0, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
            enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False,
        )
        trainer.fit(probe, datamodule=make_datamodule(data_root, stream_epochs=stream_epochs), ckpt_path=ckpt_path)
        return probe.seen

    every = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    uninterrupted = fit([every])
    per_epoch = len(uninterrupted) // 2
    assert per_epoch == 8 and (tmp_path / "step=10.ckpt").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit([], ckpt_path=str(tmp_path / "step=10.ckpt"))
    assert resumed == uninterrupted[10:]
    # Lightning's "dataloader is not resumable" warning does not apply: the data module resumed it
    assert not [w for w in caught if "not resumable" in str(w.message)]
