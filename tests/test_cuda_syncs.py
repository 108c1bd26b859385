"""CudaSyncRecorder: torch's sync warnings counted by call site, other warnings shown as before,
nothing recorded off CUDA. torch's own sync warning needs a GPU; here it is raised as torch
raises it (a UserWarning in the calling thread) with the debug mode switch recorded."""
from __future__ import annotations

import warnings

import pytest
import torch

from reid_lightning.utils.cuda_syncs import SYNC_WARNING, CudaSyncRecorder


@pytest.fixture()
def debug_modes(monkeypatch) -> list:
    modes: list = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def _reads_the_loss() -> None:
    warnings.warn(SYNC_WARNING)  # what torch raises for loss.item() under set_sync_debug_mode("warn")


def _copies_to_the_host() -> None:
    warnings.warn(SYNC_WARNING)


def test_each_sync_is_counted_at_its_caller(debug_modes) -> None:
    syncs = CudaSyncRecorder("cuda")
    syncs.start()
    for _ in range(3):
        _reads_the_loss()  # the same place three times: each counts
    _copies_to_the_host()
    syncs.stop()
    assert debug_modes == ["warn", "default"]
    assert syncs.count == 4
    (top, top_count), (other, other_count) = syncs.sites()
    assert top_count == 3 and top.startswith("test_cuda_syncs.py:") and "_reads_the_loss" in top
    assert "test_each_sync_is_counted_at_its_caller" in top  # the calling frames follow, innermost first
    assert other_count == 1 and "_copies_to_the_host" in other
    with pytest.warns(UserWarning, match=SYNC_WARNING):
        _reads_the_loss()  # after stop: shown as any warning, not counted
    assert syncs.count == 4


def test_other_warnings_still_show_and_the_filters_come_back(debug_modes) -> None:
    filters = list(warnings.filters)
    syncs = CudaSyncRecorder(torch.device("cuda"))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        syncs.start()
        warnings.warn("the learning rate is high")
        _reads_the_loss()
        syncs.stop()
    assert [str(w.message) for w in shown] == ["the learning rate is high"]
    assert syncs.count == 1
    assert warnings.filters == filters


def test_off_cuda_it_records_nothing(debug_modes) -> None:
    syncs = CudaSyncRecorder("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        syncs.start()
        _reads_the_loss()
        syncs.stop()
    assert debug_modes == [] and syncs.count is None and syncs.sites() == []
