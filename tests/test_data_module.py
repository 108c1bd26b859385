"""ReIDDataModule end to end on a tiny demo set, evaluation sharding, corrupt images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train
from hydra.utils import instantiate
from PIL import Image
from pytorch_lightning.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
)

from reid_lightning.data import (
    BalancedIdentitySampler,
    ImageDataset,
    NaiveIdentitySampler,
    ReIDDataModule,
    Sample,
    build_test_transforms,
    verify_images,
)
from reid_lightning.data.datamodule import shard_range
from reid_lightning.data.packed_batch import PACKED, unpack_integer_fields

DEMO = {
    "seed": 0,
    "num_ids": 24,
    "images_per_id": 6,
    "num_cams": 3,
    "size": (32, 16),
    "num_distractors": 4,
    "num_junk": 2,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def make_datamodule(root: Path, **overrides: object) -> ReIDDataModule:
    options = dict(
        dataset="demo",
        root=str(root),
        dataset_kwargs=DEMO,
        height=32,
        width=16,
        batch_size=8,
        num_instances=2,
        test_batch_size=16,
        num_workers=0,
        pin_memory=False,
    )
    options.update(overrides)
    dm = ReIDDataModule(**options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_properties_need_setup(data_root: Path) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        ReIDDataModule(root=str(data_root)).num_classes


def test_setup_is_idempotent_and_exposes_sizes(data_root: Path) -> None:
    dm = make_datamodule(data_root)
    splits = dm.splits
    dm.setup("test")
    assert dm.splits is splits
    assert dm.num_classes == 12 == splits.num_train_pids
    assert dm.num_query == len(splits.query)
    assert dm.num_cameras == 3
    assert dm.test_samples == [*splits.query, *splits.gallery]


def test_train_batches(data_root: Path) -> None:
    dm = make_datamodule(data_root)
    loader = dm.train_dataloader()
    assert len(loader) == len(dm.splits.train) // 8
    batch = next(iter(loader))  # normalize_on_device "auto" without CUDA: normalised in the workers
    assert set(batch) == {"images", "targets", "camids"}
    assert batch["images"].shape == (8, 3, 32, 16) and batch["images"].dtype == torch.float32
    assert batch["targets"].dtype == torch.int64 and batch["camids"].dtype == torch.int64
    targets = batch["targets"].tolist()
    assert len(set(targets)) == 4 and all(targets[i] == targets[i + 1] for i in range(0, 8, 2))
    assert all(0 <= t < dm.num_classes for t in targets)
    assert ReIDDataModule(batches_per_epoch=5, root=str(data_root)).batches_per_epoch == 5


def test_cache_images_gives_the_same_batches_and_fills_the_cache(data_root: Path) -> None:
    plain, cached = make_datamodule(data_root, cache_images=False), make_datamodule(data_root, cache_images=True)
    loaders = [plain.build_train_loader(0, 1, epoch=0), cached.build_train_loader(0, 1, epoch=0)]
    for a, b in zip(*loaders):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert loaders[0].dataset.cache is None and len(loaders[1].dataset.cache) > 0


def test_the_image_cache_is_one_for_all_workers_and_training_loaders(data_root: Path) -> None:
    dm = make_datamodule(data_root, cache_images=True, num_workers=2, persistent_workers=False)
    first = dm.build_train_loader(0, 1, epoch=0)
    cache = first.dataset.cache
    assert cache.count == len(dm.splits.train) and cache.shape == (3, 32, 16)
    assert len(cache) == 0
    for _ in first:
        pass
    # the two forked workers stored their images in the one mapping this process reads
    assert len(cache) == len({index for index, _ in first.sampler}) > 0
    for other in (dm.build_train_loader(0, 1, epoch=1), dm.build_train_loader(0, 1, epoch=0, stream=1)):
        assert other.dataset.cache is cache


def test_test_loader_covers_query_and_gallery_once(data_root: Path) -> None:
    dm = make_datamodule(data_root)
    batches = list(dm.test_dataloader())
    assert set(batches[0]) == {"images", "targets", "camids", "index", "is_query"}
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(len(dm.test_samples)))
    assert torch.cat([b["is_query"] for b in batches]).tolist() == [i < dm.num_query for i in index.tolist()]
    assert torch.cat([b["targets"] for b in batches]).tolist() == [s.pid for s in dm.test_samples]
    assert torch.cat([b["camids"] for b in batches]).tolist() == [s.camid for s in dm.test_samples]
    assert len(list(dm.val_dataloader())) == len(batches)


def test_two_rank_sharding(data_root: Path) -> None:
    dm = make_datamodule(data_root)
    shares = [torch.cat([b["index"] for b in dm.build_test_loader(rank, 2)]).tolist() for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(len(dm.test_samples)))
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    single = [b["targets"].tolist() for b in dm.build_train_loader(0, 1)]
    per_rank = [[b["targets"].tolist() for b in dm.build_train_loader(rank, 2)] for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    assert all(len(batch) == 4 for batch in per_rank[0])
    assert [a + b for a, b in zip(*per_rank)] == single


def test_sampler_key_picks_the_identity_sampler(data_root: Path, tmp_path: Path) -> None:
    cfg = compose_train([], output_dir=tmp_path)
    assert cfg.data.sampler == "naive"  # fast-reid's, the BoT default
    for name, kind in (("naive", NaiveIdentitySampler), ("balanced", BalancedIdentitySampler)):
        dm = make_datamodule(data_root, sampler=name)
        loader = dm.build_train_loader(0, 1)
        assert type(loader.sampler.sampler) is kind
    # the balanced sampler spreads an identity's images over its cameras: it has them
    cameras = [c.tolist() for c in loader.sampler.sampler.cameras]
    train = dm.splits.train
    assert cameras == [[train[i].camid for i in ids] for ids in loader.sampler.sampler.identities]
    assert any(len(set(c)) > 1 for c in cameras)
    with pytest.raises(Exception, match="unknown data.sampler 'pk': choose one of naive, balanced"):
        instantiate(compose_train(["data.sampler=pk"], output_dir=tmp_path).data)


def test_a_second_stream_gives_other_batches_of_the_same_data(data_root: Path) -> None:
    dm = make_datamodule(data_root)

    def targets(**kwargs: int) -> list[list[int]]:
        return [b["targets"].tolist() for b in dm.build_train_loader(0, 1, **kwargs)]

    assert targets(epoch=2) == targets(epoch=2) != targets(epoch=3)
    assert targets(epoch=2, stream=1) == targets(epoch=2, stream=1) != targets(epoch=2)


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 3), (2, 4), (7, 1)])
def test_shard_range_partitions(num_samples: int, world_size: int) -> None:
    shares = [list(shard_range(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sum(shares, []) == list(range(num_samples))


def test_trainer_advances_the_sampler_epoch(data_root: Path) -> None:
    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.seen: list[tuple[int, int, list[int]]] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            sampler = self.trainer.train_dataloader.sampler
            self.seen.append((self.current_epoch, sampler.epoch, batch["targets"].tolist()))
            return self.layer(batch["images"].mean(dim=(2, 3))).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(probe, datamodule=make_datamodule(data_root))
    assert [(epoch, sampler_epoch) for epoch, sampler_epoch, _ in probe.seen] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert probe.seen[0][2] != probe.seen[2][2]


def corrupt_tree(root: Path) -> Path:
    """A folder data set whose gallery holds one file that is not an image."""
    for split, names in {
        "bounding_box_train": ["0001_c1s1_000001_00.jpg", "0002_c2s1_000002_00.jpg"],
        "query": ["0003_c1s1_000003_00.jpg"],
        "bounding_box_test": ["0003_c2s1_000004_00.jpg"],
    }.items():
        (root / split).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (4, 8)).save(root / split / name)
    (root / "bounding_box_test" / "0003_c3s1_000005_00.jpg").write_bytes(b"\xff\xd8 truncated")
    return root / "bounding_box_test" / "0003_c3s1_000005_00.jpg"


def test_corrupt_image_fails_when_read(tmp_path: Path) -> None:
    bad = corrupt_tree(tmp_path)
    dataset = ImageDataset([Sample(str(bad), 3, 2)], build_test_transforms((32, 16)))
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        dataset[0]


def test_verify_images_lists_every_bad_file(tmp_path: Path) -> None:
    bad = corrupt_tree(tmp_path)
    missing = tmp_path / "gone.jpg"
    good = Sample(str(tmp_path / "query" / "0003_c1s1_000003_00.jpg"), 3, 0)
    verify_images([good])
    with pytest.raises(RuntimeError, match="2 unreadable image") as info:
        verify_images([good, Sample(str(bad), 3, 2), Sample(str(missing), 1, 0)])
    assert str(bad) in str(info.value) and str(missing) in str(info.value)


def test_verify_images_finds_a_truncated_jpeg(tmp_path: Path) -> None:
    # a copy cut short keeps a valid JPEG header: Image.verify passes it, the loader's decode fails
    whole, cut = tmp_path / "whole.jpg", tmp_path / "0001_c1s1_000001_00.jpg"
    Image.effect_noise((64, 128), 64).convert("RGB").save(whole, quality=95)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="cannot read image"):
        ImageDataset([Sample(str(cut), 1, 0)], build_test_transforms((32, 16)))[0]
    verify_images([Sample(str(whole), 1, 0)])
    with pytest.raises(RuntimeError, match="1 unreadable image") as info:
        verify_images([Sample(str(whole), 1, 0), Sample(str(cut), 1, 0)])
    assert str(cut) in str(info.value)


def test_datamodule_verify_images_at_setup(tmp_path: Path) -> None:
    bad = corrupt_tree(tmp_path)
    options = dict(dataset="folder", root=str(tmp_path), batch_size=2, num_instances=1, num_workers=0)
    ReIDDataModule(**options).setup("fit")  # the scan is opt-in
    with pytest.raises(RuntimeError, match=str(bad)):
        ReIDDataModule(**options, verify_images=True).setup("fit")


def test_image_dataset_items() -> None:
    samples = [Sample("a.jpg", 1, 0), Sample("b.jpg", 2, 1), Sample("c.jpg", 2, 0)]
    dataset = ImageDataset.for_test(samples[:1], samples[1:], build_test_transforms((32, 16)))
    assert dataset.samples == samples and dataset.query_count == 1 and dataset.with_index
    with pytest.raises(ValueError, match="query_count 4"):
        ImageDataset(samples, build_test_transforms((32, 16)), query_count=4)


def test_datamodule_batches_are_the_same_either_way(data_root) -> None:
    on, off = (make_datamodule(data_root, normalize_on_device=flag) for flag in (True, False))
    raw = next(iter(on.build_train_loader(0, 1, epoch=1)))
    assert raw["images"].dtype == torch.uint8
    # the integer fields cross from the workers in one tensor: (4 box rows + targets + camids, B)
    assert [key for key, value in raw.items() if torch.is_tensor(value)] == ["images", PACKED]
    assert raw[PACKED].shape == (6, len(raw["images"]))
    assert unpack_integer_fields(raw)["erase_box"].shape == (len(raw["images"]), 4)
    pairs = [(on.build_train_loader(0, 1, epoch=1), off.build_train_loader(0, 1, epoch=1)),
             (on.build_test_loader(0, 1), off.build_test_loader(0, 1))]
    for loader_on, loader_off in pairs:
        for batch_on, batch_off in zip(loader_on, loader_off, strict=True):
            batch_on = on.on_after_batch_transfer(batch_on, 0)
            assert batch_on.keys() == batch_off.keys()
            for key in batch_off:
                assert torch.equal(batch_on[key], batch_off[key]), key


def test_normalize_on_device_auto_follows_the_trainers_device(data_root: Path) -> None:
    dm = make_datamodule(data_root)
    assert dm.normalize_on_device == "auto" and dm.normalizes_on_device() == torch.cuda.is_available()
    for device, expected in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.normalizes_on_device() is expected
    dm.trainer = None
    assert make_datamodule(data_root, normalize_on_device=True).normalizes_on_device() is True
    with pytest.raises(ValueError, match="data.normalize_on_device must be true, false or auto, got 'yes'"):
        make_datamodule(data_root, normalize_on_device="yes")


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64), ("bf16-mixed", torch.float32)])
def test_images_normalised_on_device_get_the_precision_plugins_input_type(data_root: Path, precision, dtype) -> None:
    # Lightning casts a batch to a "-true" precision's dtype before the transfer, while the images
    # are still uint8: without the cast after normalising, a bf16 model got float32 images and failed
    plugin = {"bf16-true": lambda: HalfPrecision("bf16-true"), "64-true": DoublePrecision,
              "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu")}[precision]()
    dm = make_datamodule(data_root, normalize_on_device=True)
    raw = next(iter(dm.build_train_loader(0, 1, epoch=1)))
    expected = dm.on_after_batch_transfer(dict(raw), 0)["images"]  # no trainer: float32
    assert expected.dtype == torch.float32
    dm.trainer = SimpleNamespace(precision_plugin=plugin)
    batch = dm.on_after_batch_transfer(plugin.convert_input(dict(raw)), 0)  # Lightning's order
    assert batch["images"].dtype == dtype and torch.equal(batch["images"], expected.to(dtype))
    assert batch["targets"].dtype == torch.int64
    dm.trainer = None


def test_cache_images_auto_fits_the_caches_of_all_processes_in_a_quarter_of_memory(data_root, monkeypatch) -> None:
    from reid_lightning.data import datamodule

    dm = make_datamodule(data_root)
    assert dm.cache_images == "auto"
    one_process = len(dm.splits.train) * 3 * 32 * 16
    monkeypatch.setattr(datamodule, "memory_limit_bytes", lambda: 8 * one_process)
    assert dm.caches_images() is True
    dm.trainer = SimpleNamespace(num_devices=2)
    assert dm.caches_images() is True
    dm.trainer = SimpleNamespace(num_devices=3)
    assert dm.caches_images() is False
    dm.trainer = None
    assert make_datamodule(data_root, cache_images=False).build_train_loader(0, 1, epoch=0).dataset.cache is None
    monkeypatch.setattr(datamodule, "memory_limit_bytes", lambda: 4 * one_process - 1)
    assert dm.caches_images() is False and dm.build_train_loader(0, 1, epoch=0).dataset.cache is None
    with pytest.raises(ValueError, match="data.cache_images must be true, false or auto, got 'on'"):
        make_datamodule(data_root, cache_images="on")


def test_an_image_cache_the_system_refuses_stops_only_a_forced_cache(data_root, monkeypatch) -> None:
    from reid_lightning.data import datamodule

    def refuse(count, shape):
        raise MemoryError("cannot map 9.00 GB for the image cache: [Errno 12] Cannot allocate memory")

    monkeypatch.setattr(datamodule, "SharedImageCache", refuse)
    with pytest.raises(MemoryError, match="Cannot allocate memory; set data.cache_images=false"):
        make_datamodule(data_root, cache_images=True).build_train_loader(0, 1, epoch=0)
    dm = make_datamodule(data_root)
    assert dm.build_train_loader(0, 1, epoch=0).dataset.cache is None and dm.cache_images is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"batches_per_epoch": 0}, r"data.batches_per_epoch must be a positive integer \(null: "),
        ({"batches_per_epoch": -1}, "data.batches_per_epoch must be a positive integer"),
        ({"height": 0}, "data.height must be a positive integer, got 0"),
        ({"batch_size": 30, "num_instances": 4}, "data.batch_size 30 must be a multiple of data.num_instances 4"),
        ({"num_instances": 0}, "data.num_instances must be a positive integer, got 0"),
        ({"test_batch_size": 0}, "data.test_batch_size must be a positive integer, got 0"),
        ({"erasing_prob": 1.5}, r"data.erasing_prob must lie in \[0, 1\], got 1.5"),
        ({"padding": -2}, "data.padding must be >= 0, got -2"),
    ],
)
def test_bad_sizes_fail_at_construction_naming_the_key(data_root: Path, override: dict, message: str) -> None:
    # they failed only when the training loader was built (after set-up and the model), named by
    # the sampler or the image cache (height 0: "SharedImageCache needs a positive count and
    # shape"), or not at all: batches_per_epoch=0 silently meant the default epoch
    with pytest.raises(ValueError, match=message):
        ReIDDataModule(dataset="demo", root=str(data_root), **override)
