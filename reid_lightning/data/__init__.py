"""Data layer: data set parsers, transforms, the identity sampler, the synthetic demo
set and the LightningDataModule that ties them together."""

from reid_lightning.data.datamodule import ReIDDataModule
from reid_lightning.data.datasets import DATASETS, build_dataset
from reid_lightning.data.demo_generator import generate_demo_dataset
from reid_lightning.data.image_dataset import ImageDataset, verify_images
from reid_lightning.data.samplers import (
    SAMPLERS,
    BalancedIdentitySampler,
    IdentitySampler,
    NaiveIdentitySampler,
    build_identity_sampler,
)
from reid_lightning.data.samples import ReIDSplits, Sample
from reid_lightning.data.seeded_sampler import SeededSampler
from reid_lightning.data.transforms import build_test_transforms, build_train_transforms

__all__ = [
    "DATASETS",
    "SAMPLERS",
    "BalancedIdentitySampler",
    "IdentitySampler",
    "ImageDataset",
    "NaiveIdentitySampler",
    "ReIDDataModule",
    "ReIDSplits",
    "Sample",
    "SeededSampler",
    "build_dataset",
    "build_identity_sampler",
    "build_test_transforms",
    "build_train_transforms",
    "generate_demo_dataset",
    "verify_images",
]
