"""The LightningDataModule wiring parsers, transforms, the identity sampler and the
evaluation sharding together."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Sampler, Subset

from reid_lightning.data.batch_normalize import BatchNormalizer
from reid_lightning.data.datasets.demo import prepare_demo
from reid_lightning.data.epoch_stream import EpochStream
from reid_lightning.data.image_cache import (
    SharedImageCache,
    cache_bytes,
    memory_limit_bytes,
)
from reid_lightning.data.image_dataset import ImageDataset, verify_images
from reid_lightning.data.multi_dataset import (
    DatasetEntry,
    combine_train_sets,
    load_entry,
    parse_entries,
)
from reid_lightning.data.packed_batch import collate_packed
from reid_lightning.data.samplers import (
    SAMPLERS,
    build_identity_sampler,
    distributed_context,
)
from reid_lightning.data.samples import ReIDSplits, Sample
from reid_lightning.data.seeded_sampler import SeededSampler
from reid_lightning.data.transforms import build_test_transforms, build_train_transforms
from reid_lightning.data.validation_split import hold_out_identities

log = logging.getLogger(__name__)


# Lightning's warning on resuming during an epoch with a loader it cannot resume (this module resumes it)
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``num_samples`` items that a rank evaluates.

    Shares differ in size by at most one, nothing is padded or repeated, and the
    shares of ranks ``0..world_size-1`` cover every item exactly once.

    Args:
        num_samples: number of items.
        rank: the rank.
        world_size: number of ranks.

    Returns:
        The item positions of this rank.
    """
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def check_sizes(**values: Any) -> None:
    """Checks the sizes and probabilities of a :class:`ReIDDataModule` when it is built, so that
    a bad ``data.<key>=...`` override fails at once with its key named, not later in a sampler,
    a transform or the image cache with another name.

    Args:
        **values: ``height``, ``width``, ``batch_size``, ``num_instances``, ``test_batch_size``
            (positive integers), ``batches_per_epoch`` (None or a positive integer),
            ``flip_prob``, ``erasing_prob`` (in [0, 1]) and ``padding`` (>= 0).

    Raises:
        ValueError: naming the first ``data.<key>`` out of range.
    """
    for key in ("height", "width", "batch_size", "num_instances", "test_batch_size", "batches_per_epoch"):
        value = values[key]
        if key == "batches_per_epoch" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            default = " (null: fast-reid's len(train images) // batch_size)" if key == "batches_per_epoch" else ""
            raise ValueError(f"data.{key} must be a positive integer{default}, got {value!r}")
    if values["batch_size"] % values["num_instances"]:
        raise ValueError(
            f"data.batch_size {values['batch_size']} must be a multiple of data.num_instances "
            f"{values['num_instances']} (P identities x K images per batch)"
        )
    for key in ("flip_prob", "erasing_prob"):
        if not 0 <= values[key] <= 1:
            raise ValueError(f"data.{key} must lie in [0, 1], got {values[key]!r}")
    if values["padding"] < 0:
        raise ValueError(f"data.padding must be >= 0, got {values['padding']!r}")


class ReIDDataModule(pl.LightningDataModule):
    """Train and evaluation data of a re-identification data set.

    Training batches are dicts ``{"images": (B, 3, H, W), "targets": (B,), "camids": (B,)}``
    drawn by an identity sampler (``data.sampler``; ``B = batch_size // world_size`` per rank);
    validation and test batches add ``"index"`` (position in query + gallery,
    queries first) and ``"is_query"``, and every rank gets a contiguous share of
    query + gallery without padding. Run the trainer with
    ``use_distributed_sampler=False``.

    With ``normalize_on_device`` the loaders' batches hold uint8 images (and training batches
    the ``"erase_box"`` rectangles, and their integer fields packed in one tensor:
    :mod:`~reid_lightning.data.packed_batch`); :meth:`on_after_batch_transfer`, which Lightning
    calls once a batch is on the model's device, turns them into the batches above.

    One data set (``dataset``) trains and tests by default. ``train_sets`` trains on several
    (identities and cameras kept apart, see :func:`combine_train_sets`), ``test_sets`` tests
    on several: ``test_dataloader`` then returns one loader per set, in list order
    (:attr:`test_set_names`). ``val_identities`` holds training identities out as the
    validation split (:func:`hold_out_identities`); without it validation runs on the test
    sets (fast-reid's behaviour), one loader per set (:attr:`val_set_names`).

    Typical use::

        dm = ReIDDataModule("market1501", root="/data", batch_size=64, num_instances=4)
        dm.prepare_data(); dm.setup("fit")
        model = build_model(num_classes=dm.num_classes)

    Args:
        dataset: registry name of the data set (see :data:`reid_lightning.data.datasets.DATASETS`).
        root: data root (``paths.data_dir``).
        dataset_kwargs: options passed to the parser (e.g. ``{"subset": "labeled"}``, ``{"seed": 0}``).
        height: input height.
        width: input width.
        flip_prob: horizontal flip probability.
        padding: padding before the random crop.
        erasing_prob: random erasing probability.
        batch_size: global training batch, P identities x K instances.
        num_instances: K.
        test_batch_size: evaluation batch per rank.
        num_workers: loader worker processes.
        pin_memory: pin host memory (only when CUDA is available).
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        verify_images: check every image file with PIL at set-up; fail listing the bad ones.
        cache_images: keep each decoded, resized training image in memory (uint8) once it has been
            read, one copy that all loader workers share and fill (and ``PreciseBN``'s loader
            too): ``3 x height x width`` bytes per training image at most
            (:class:`~reid_lightning.data.image_cache.SharedImageCache`); later epochs skip the
            decode and the resize, and the batches are the same. ``"auto"``: on when the caches
            of all training processes on this machine (the trainer's devices) fill at most a
            quarter of its memory (:func:`~reid_lightning.data.image_cache.memory_limit_bytes`).
        stream_epochs: ``train_dataloader`` (what ``trainer.fit`` iterates) goes from one epoch
            to the next without emptying the loader, so the first batches of an epoch are ready
            when it starts (:class:`~reid_lightning.data.epoch_stream.EpochStream`); the batches
            are the same either way.
        normalize_on_device: loader workers stop at uint8 images; the float conversion,
            normalisation and random erasing run on each batch on the model's device
            (:class:`~reid_lightning.data.batch_normalize.BatchNormalizer`). The images are the
            same either way. ``"auto"``: on when the model trains on a GPU (the attached
            trainer's device is CUDA; without a trainer, when CUDA is available).
        seed: seed of the identity sampler.
        batches_per_epoch: global training batches per epoch; default fast-reid's
            epoch, ``len(train images) // batch_size`` (at least 1).
        train_sets: training data sets, replacing ``dataset`` for training: names or mappings
            ``{name, root?, label?, <parser options>}`` (see :func:`parse_entries`; an entry given
            by name alone that equals ``dataset`` takes ``dataset_kwargs``).
        test_sets: test data sets, same form; default ``train_sets`` when given, else ``dataset``.
        val_identities: training identities held out for validation: an integer, or a fraction
            in ``(0, 1)``; 0 validates on the test sets.
        sampler: ``"naive"``: fast-reid's NaiveIdentitySampler (identities drawn in
            proportion to their image count, :class:`~reid_lightning.data.samplers.NaiveIdentitySampler`);
            ``"balanced"``: fast-reid's, every identity once per pass, its images from different
            cameras (:class:`~reid_lightning.data.samplers.BalancedIdentitySampler`).

    Raises:
        ValueError: for an unknown ``sampler``, a ``normalize_on_device`` or ``cache_images``
            other than true, false or auto, or a size or probability out of range
            (:func:`check_sizes`).
    """

    def __init__(
        self,
        dataset: str = "demo",
        root: str = "datasets",
        dataset_kwargs: dict[str, Any] | None = None,
        height: int = 256,
        width: int = 128,
        flip_prob: float = 0.5,
        padding: int = 10,
        erasing_prob: float = 0.5,
        batch_size: int = 64,
        num_instances: int = 4,
        test_batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        verify_images: bool = False,
        cache_images: bool | str = "auto",
        stream_epochs: bool = True,
        normalize_on_device: bool | str = "auto",
        seed: int = 0,
        batches_per_epoch: int | None = None,
        sampler: str = "naive",
        train_sets: list[str | dict[str, Any]] | None = None,
        test_sets: list[str | dict[str, Any]] | None = None,
        val_identities: float = 0,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown data.sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        for name, value in (("normalize_on_device", normalize_on_device), ("cache_images", cache_images)):
            if not isinstance(value, bool) and value != "auto":
                raise ValueError(f"data.{name} must be true, false or auto, got {value!r}")
        check_sizes(
            height=height, width=width, batch_size=batch_size, num_instances=num_instances,
            test_batch_size=test_batch_size, batches_per_epoch=batches_per_epoch,
            flip_prob=flip_prob, erasing_prob=erasing_prob, padding=padding,
        )
        self.save_hyperparameters(logger=False)  # saved in checkpoints; scripts/train.py logs the whole config
        self.dataset = dataset
        self.root = str(root)
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.size = (height, width)
        self.flip_prob = flip_prob
        self.padding = padding
        self.erasing_prob = erasing_prob
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.verify_images = verify_images
        self.cache_images = cache_images
        self._image_cache: SharedImageCache | None = None
        self.stream_epochs = stream_epochs
        self._train_stream: EpochStream | None = None
        self.normalize_on_device = normalize_on_device
        self._normalize = BatchNormalizer()
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.sampler = sampler
        defaults = {dataset: self.dataset_kwargs}
        single = [{"name": dataset, **self.dataset_kwargs}]
        self.train_entries = parse_entries(train_sets or single, "data.train_sets" if train_sets else "", self.root, defaults)
        test_where = "data.test_sets" if test_sets else "data.train_sets" if train_sets else ""
        self.test_entries = parse_entries(test_sets or train_sets or single, test_where, self.root, defaults)
        self.val_identities = val_identities
        self._splits: ReIDSplits | None = None
        self._val: ReIDSplits | None = None
        self._test_splits: dict[str, ReIDSplits] | None = None
        self._parsed: dict[tuple, ReIDSplits] = {}
        self._resume_epoch: tuple[int, int] | None = None

    def prepare_data(self) -> None:
        """Generates the demo sets (Lightning runs this on one process per node before ``setup``)."""
        for entry in [*self.train_entries, *self.test_entries]:
            if entry.name == "demo":
                prepare_demo(entry.root, **entry.kwargs)

    def _load(self, entry: DatasetEntry) -> ReIDSplits:
        """Parses an entry's data set once per run (a set in both lists is read once) and logs its summary."""
        if entry.key() not in self._parsed:
            self._parsed[entry.key()] = load_entry(entry)
            self._log_summary(self._parsed[entry.key()])
        return replace(self._parsed[entry.key()], name=entry.label)

    def setup(self, stage: str | None = None) -> None:
        """Parses the data sets, logs their summary tables and optionally verifies the image
        files. Later calls parse only what earlier ones did not.

        Args:
            stage: Lightning's stage name: ``"test"`` and ``"predict"`` read the test sets
                only; other stages (and None) also read the training sets and build the
                validation split.
        """
        if self._test_splits is None:
            self._test_splits = {entry.label: self._load(entry) for entry in self.test_entries}
            for label, splits in self._test_splits.items():
                if splits.query and not splits.num_matchable_queries():
                    raise ValueError(
                        f"test set {label}: no query image has a gallery image of its identity from another "
                        "camera, and the Market protocol drops same-camera matches, so no query can be "
                        "scored; check the camera ids the parser reads from the file names"
                    )
            if self.verify_images:
                verify_images([s for splits in self._test_splits.values() for s in [*splits.query, *splits.gallery]])
        if self._splits is not None or stage in ("test", "predict"):
            return
        parsed = [self._load(entry) for entry in self.train_entries]
        train = parsed[0].train if len(parsed) == 1 else combine_train_sets(parsed)
        train, val = hold_out_identities(train, self.val_identities, self.seed)
        first = next(iter(self._test_splits.values()))
        self._splits = ReIDSplits("+".join(splits.name for splits in parsed), train, first.query, first.gallery)
        if val.query:
            self._val = val
        if len(parsed) > 1 or val.query:
            self._log_summary(ReIDSplits(f"{self._splits.name} (training)", train, val.query, val.gallery))
        if self.verify_images:
            verify_images([*train, *val.query, *val.gallery])

    @rank_zero_only
    def _log_summary(self, splits: ReIDSplits) -> None:
        log.info("%s", splits.summary_table())

    @property
    def splits(self) -> ReIDSplits:
        """The training samples (all training sets, held-out identities removed) with the
        query and gallery of the first test set (after :meth:`setup` of a training stage)."""
        if self._splits is None:
            raise RuntimeError("ReIDDataModule.setup() has not run yet; call it before reading the splits")
        return self._splits

    @property
    def test_splits(self) -> dict[str, ReIDSplits]:
        """Each test set's splits by label, in ``test_sets`` order (after :meth:`setup`)."""
        if self._test_splits is None:
            raise RuntimeError("ReIDDataModule.setup() has not run yet; call it before reading the splits")
        return self._test_splits

    @property
    def val_split(self) -> ReIDSplits | None:
        """The held-out validation query/gallery (None when ``val_identities`` is 0); after :meth:`setup`."""
        return self._val

    @property
    def test_set_names(self) -> list[str]:
        """Labels of the test sets, in the order of :meth:`test_dataloader`'s loaders."""
        return [entry.label for entry in self.test_entries]

    @property
    def val_set_names(self) -> list[str]:
        """Labels of the validation loaders: ``["validation"]`` with held-out identities, else the test sets'."""
        return ["validation"] if self._val is not None else self.test_set_names

    @property
    def num_classes(self) -> int:
        """Number of training identities."""
        return self.splits.num_train_pids

    @property
    def num_query(self) -> int:
        """Number of query images; they come first in the evaluation set."""
        return len(self.splits.query)

    @property
    def num_cameras(self) -> int:
        """Number of camera ids over all splits (largest camid + 1)."""
        return 1 + max(s.camid for s in [*self.splits.train, *self.splits.query, *self.splits.gallery])

    @property
    def test_samples(self) -> list[Sample]:
        """Query then gallery samples of the first test set, in evaluation index order."""
        first = next(iter(self.test_splits.values()))
        return [*first.query, *first.gallery]

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: ``{"next_epoch": e, "next_batch": b}``, the epoch whose batches
        training draws next and how many of its global batches were already trained on (0 unless
        the checkpoint was written during the epoch, e.g. by ``every_n_train_steps``).

        Lightning builds the training loader and makes its iterator (loader workers then fetch
        their first batches) before it restores the loops and calls ``set_epoch``; a restored run
        starts its loader at ``next_epoch``, batch ``next_batch``, so that those batches come from
        the right epoch and a run resumed during an epoch trains on the rest of it (Lightning
        counts the batches done, but would draw them from the start of the epoch again).
        """
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop.epoch_loop
        done = loop.done
        return {
            "next_epoch": self.trainer.current_epoch + int(done),
            "next_batch": 0 if done else loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next training loader starts at its ``next_epoch``, batch
        ``next_batch``. Lightning's warning that a checkpoint written during an epoch meets a loader
        that is "not resumable" is silenced: this module restores the loader's position itself."""
        if "next_epoch" in state_dict:
            self._resume_epoch = (state_dict["next_epoch"], state_dict.get("next_batch", 0))
        if state_dict.get("next_batch", 0) > 0:
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING, category=PossibleUserWarning)

    def _first_train_epoch(self) -> tuple[int, int]:
        """Epoch and first global batch of a new training loader: the restored ``next_epoch`` and
        ``next_batch`` once, else the trainer's epoch from its start."""
        if self._resume_epoch is not None:
            resume, self._resume_epoch = self._resume_epoch, None
            return resume
        return (self.trainer.current_epoch if self.trainer is not None else 0), 0

    def distributed_context(self) -> tuple[int, int]:
        """``(rank, world_size)`` from the attached trainer, else from ``torch.distributed``, else ``(0, 1)``."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return distributed_context()

    def normalizes_on_device(self) -> bool:
        """Whether the loaders built now hand over uint8 images (``normalize_on_device`` resolved)."""
        if self.normalize_on_device != "auto":
            return bool(self.normalize_on_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def build_train_loader(self, rank: int, world_size: int, epoch: int | None = None, stream: int = 0) -> DataLoader:
        """Builds the training loader of one rank.

        Args:
            rank: the rank.
            world_size: number of ranks; ``batch_size`` must divide into
                ``world_size * num_instances``.
            epoch: the sampler's first epoch; default the trainer's current epoch (after
                a restore: the checkpoint's ``next_epoch``, see :meth:`state_dict`).
            stream: 0 for the training batches; another number gives a loader over the
                same data with its own batches and augmentation seeds (``PreciseBN`` uses 1).

        Returns:
            A loader of ``batch_size // world_size`` images per batch. Each image's
            augmentation has its own seed (:class:`SeededSampler`), so it does not depend
            on the loader workers and a resumed epoch repeats the uninterrupted one.
        """
        return self._train_loader(self._train_sampler(rank, world_size, epoch, stream), world_size)

    def _train_sampler(self, rank: int, world_size: int, epoch: int | None, stream: int) -> SeededSampler:
        """The seeded identity sampler of :meth:`build_train_loader`, set to its first epoch."""
        train = self.splits.train
        num_batches = self.batches_per_epoch if self.batches_per_epoch is not None else max(1, len(train) // self.batch_size)
        seed = self.seed if stream == 0 else int(np.random.SeedSequence([self.seed, stream]).generate_state(1)[0])
        identities = build_identity_sampler(
            self.sampler, [s.pid for s in train], self.batch_size, self.num_instances,
            camids=[s.camid for s in train], seed=seed, rank=rank, world_size=world_size, num_batches=num_batches,
        )
        sampler = SeededSampler(identities, seed, rank)
        first, done = self._first_train_epoch() if epoch is None else (epoch, 0)
        sampler.set_epoch(first)
        sampler.resume_at(first, done * (self.batch_size // world_size))
        return sampler

    def _train_loader(self, sampler: Sampler, world_size: int) -> DataLoader:
        """The training loader over ``sampler``'s ``(index, seed)`` keys: one rank's batches of
        ``batch_size // world_size`` augmented images."""
        on_device = self.normalizes_on_device()
        transform = build_train_transforms(self.size, self.flip_prob, self.padding, self.erasing_prob, normalize=not on_device)
        return DataLoader(
            ImageDataset(self.splits.train, transform, cache=self._train_image_cache()),
            batch_size=self.batch_size // world_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate_packed if on_device else None,
            **self._loader_options(),
        )

    def caches_images(self) -> bool:
        """Whether the training loaders keep the decoded images (``cache_images`` resolved)."""
        if self.cache_images != "auto":
            return bool(self.cache_images)
        processes = self.trainer.num_devices if self.trainer is not None else 1
        return processes * cache_bytes(len(self.splits.train), (3, *self.size)) <= memory_limit_bytes() // 4

    def _train_image_cache(self) -> SharedImageCache | None:
        """The training images' shared cache (``cache_images``), made before the first training
        loader's workers start and kept for every later one; under ``auto``, none where the
        system refuses the memory."""
        if self._image_cache is None and self.caches_images():
            try:
                self._image_cache = SharedImageCache(len(self.splits.train), (3, *self.size))
            except MemoryError as error:
                if self.cache_images is True:
                    raise MemoryError(f"{error}; set data.cache_images=false to train without it") from error
                log.warning("data.cache_images=auto: %s; training without the cache", error)
                self.cache_images = False
                return None
            gigabytes = self._image_cache.nbytes / 2**30
            rank_zero_only(log.info)(
                "data.cache_images: keeping the %d decoded training images, %.2f GB at most",
                self._image_cache.count, gigabytes,
            )
        return self._image_cache

    def build_test_loader(self, rank: int, world_size: int, split: ReIDSplits | None = None) -> DataLoader:
        """Builds the evaluation loader of one rank: its contiguous share (see
        :func:`shard_range`) of query + gallery, in order, items carrying their global
        ``"index"`` and ``"is_query"``.

        Args:
            rank: the rank.
            world_size: number of ranks.
            split: the query/gallery to load; default the first test set.

        Returns:
            A sequential loader of ``test_batch_size`` images per batch.
        """
        split = split or next(iter(self.test_splits.values()))
        transform = build_test_transforms(self.size, normalize=not self.normalizes_on_device())
        full = ImageDataset.for_test(split.query, split.gallery, transform)
        share = Subset(full, list(shard_range(len(full), rank, world_size)))
        return DataLoader(
            share, batch_size=self.test_batch_size, shuffle=False, drop_last=False, **self._loader_options()
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook on every batch once it is on the model's device: uint8 images
        (``normalize_on_device``) become normalised, erased float32 images; other batches pass.

        Lightning casts a batch to the precision plugin's input type (``bf16-true``,
        ``16-true``, ``64-true``: the model's own dtype) before the transfer, when the images
        are still uint8; the images made here get that cast now."""
        normalized = self._normalize(batch)
        if normalized is batch or self.trainer is None:
            return normalized
        return self.trainer.precision_plugin.convert_input(normalized)

    def train_dataloader(self) -> DataLoader | EpochStream:
        rank, world_size = self.distributed_context()
        if not self.stream_epochs:
            return self.build_train_loader(rank, world_size)
        self._close_train_stream()
        sampler = self._train_sampler(rank, world_size, None, stream=0)
        self._train_stream = EpochStream(sampler, partial(self._train_loader, world_size=world_size))
        return self._train_stream

    def _close_train_stream(self) -> None:
        if self._train_stream is not None:
            self._train_stream.close()
            self._train_stream = None

    def teardown(self, stage: str) -> None:
        """After ``fit``: the training stream's workers exit."""
        if stage == "fit":
            self._close_train_stream()

    def _eval_loaders(self, splits: list[ReIDSplits]) -> DataLoader | list[DataLoader]:
        loaders = [self.build_test_loader(*self.distributed_context(), split) for split in splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out validation split, else one loader per test set (see :attr:`val_set_names`)."""
        return self._eval_loaders([self.val_split] if self.val_split else list(self.test_splits.values()))

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per test set (see :attr:`test_set_names`)."""
        return self._eval_loaders(list(self.test_splits.values()))
