"""EventStorage and HistoryBuffer (detectron2/fast-reid semantics)."""
from __future__ import annotations

import pytest
import torch

from reid_lightning.engine.hooks import EventStorage, HistoryBuffer, get_event_storage


def test_history_buffer_statistics() -> None:
    buf = HistoryBuffer()
    for i, value in enumerate([4.0, 1.0, 3.0, 2.0]):
        buf.update(value, iteration=10 + i)
    assert buf.latest() == 2.0
    assert buf.median(3) == 2.0 and buf.median(100) == 2.5
    assert buf.avg(2) == 2.5 and buf.global_avg() == 2.5
    assert buf.values() == [(4.0, 10), (1.0, 11), (3.0, 12), (2.0, 13)]
    with pytest.raises(ValueError, match="window_size"):
        buf.median(0)


def test_history_buffer_is_bounded_but_global_average_is_not() -> None:
    buf = HistoryBuffer(max_length=3)
    for value in range(10):
        buf.update(float(value))
    assert buf.values() == [(7.0, 7), (8.0, 8), (9.0, 9)]
    assert buf.global_avg() == pytest.approx(4.5)


def test_event_storage_records_scalars_at_its_iteration() -> None:
    storage = EventStorage(start_iter=5)
    storage.put_scalar("loss", torch.tensor(2.0))
    storage.put_scalars(lr=0.1, smoothing_hint=False)
    storage.step()
    storage.put_scalar("loss", 4.0)
    assert storage.iter == 6
    assert storage.history("loss").values() == [(2.0, 5), (4.0, 6)]
    assert storage.latest() == {"loss": (4.0, 6), "lr": (0.1, 5)}
    assert storage.latest_with_smoothing_hint(window_size=2) == {"loss": (3.0, 6), "lr": (0.1, 5)}
    assert set(storage.histories()) == {"loss", "lr"}
    storage.iter = 20
    storage.put_scalar("lr", 0.05, smoothing_hint=False)
    assert storage.latest()["lr"] == (0.05, 20)
    with pytest.raises(ValueError, match="smoothing_hint"):
        storage.put_scalar("lr", 0.01)
    with pytest.raises(KeyError, match="acc"):
        storage.history("acc")


def test_name_scope_prefixes_names_and_images() -> None:
    storage = EventStorage()
    with storage.name_scope("val"):
        storage.put_scalar("mAP", 80.0)
        with storage.name_scope("flip/"):
            storage.put_scalar("mAP", 81.0)
        storage.put_image("ranks", torch.zeros(3, 4, 4))
    storage.put_scalar("mAP", 1.0)
    assert set(storage.latest()) == {"val/mAP", "val/flip/mAP", "mAP"}
    assert [(name, itr) for name, _, itr in storage.images] == [("val/ranks", 0)]
    storage.clear_images()
    assert storage.images == []


def test_put_histogram_records_detectron2_histogram_params() -> None:
    storage = EventStorage(start_iter=7)
    assert storage.epoch == 0
    values = torch.tensor([[0.0, 1.0], [1.0, 4.0]])
    with storage.name_scope("weights"):
        storage.put_histogram("conv", values, bins=4)
    (hist,) = storage.histograms
    assert hist == {
        "tag": "weights/conv", "min": 0.0, "max": 4.0, "num": 4, "sum": 6.0, "sum_squares": 18.0,
        "bucket_limits": [1.0, 2.0, 3.0, 4.0], "bucket_counts": [1.0, 2.0, 0.0, 1.0], "global_step": 7,
    }
    storage.clear_histograms()
    assert storage.histograms == []
    with pytest.raises(ValueError, match="put_histogram\\('empty'\\) got an empty tensor"):
        storage.put_histogram("empty", torch.zeros(0))


def test_get_event_storage_returns_the_innermost_active_storage() -> None:
    with pytest.raises(RuntimeError, match="no active EventStorage"):
        get_event_storage()
    with EventStorage() as outer:
        assert get_event_storage() is outer
        with EventStorage(start_iter=3) as inner:
            assert get_event_storage() is inner
        assert get_event_storage() is outer
    with pytest.raises(RuntimeError):
        get_event_storage()


@pytest.mark.parametrize("value", [torch.tensor([0.5, 0.6]), "high", None])
def test_put_scalar_of_a_non_scalar_names_it_and_records_nothing(value) -> None:
    storage = EventStorage()
    with pytest.raises((TypeError, ValueError), match="'acc'"):
        storage.put_scalar("acc", value)
    assert storage.histories() == {} and storage.latest() == {} and storage.smoothing_hints() == {}
    storage.put_scalar("acc", 0.5, smoothing_hint=False)  # the name is still free, with any hint
    assert storage.latest() == {"acc": (0.5, 0)}
