"""Bad input through the entry points: each mistake fails with a message that names it.

Data: missing root or split folder, corrupt image, empty query or gallery, queries without a
match. Config: unknown group option. Checkpoints: another architecture (strict by default,
non-strict on request), pickled code (refused, not run), truncated file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF_DIR, compose_train, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from reid_lightning.checkpointing.load import load_model_weights
from reid_lightning.cli.evaluate import evaluate
from reid_lightning.cli.train import build_trainer, train
from reid_lightning.engine.module import ReIDModule

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
CLASSIFIER = "model.head.classifier.weight"
# ResNet-18 at 64x32, 2 identities x 4 images per batch, one batch per epoch, no progress output
TINY = [
    "experiment=quickstart", "data.height=64", "data.width=32", "data.num_workers=0",
    "data.batch_size=8", "data.num_instances=4", "data.test_batch_size=16", "++data.batches_per_epoch=1",
    "solver.max_epochs=1", "solver.eval_period=1", "solver.warmup_iters=1", "hooks=none", "logger=csv",
    "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
]
WITH_CHECKPOINTS = ["~callbacks.lr_monitor", "~callbacks.progress_bar", "~callbacks.model_summary"]


def write_folder_dataset(root: Path, train_ids: int = 2, query_ids: tuple[int, ...] = (1, 2, 3),
                         gallery_ids: tuple[int, ...] = (1, 2, 3)) -> Path:
    """Write a tiny ``data=folder`` set of 16x32 JPEGs (Market names) under ``root`` and return it.

    ``bounding_box_train`` holds identities ``1..train_ids`` with 4 images over cameras 1-2;
    ``query`` one camera-1 image per entry of ``query_ids``; ``bounding_box_test`` three
    camera-2 images per entry of ``gallery_ids`` (an empty tuple leaves the folder empty).
    """
    rng = np.random.default_rng(0)
    plan = {
        "bounding_box_train": [(pid, 1 + i % 2, i) for pid in range(1, train_ids + 1) for i in range(4)],
        "query": [(pid, 1, 0) for pid in query_ids],
        "bounding_box_test": [(pid, 2, i) for pid in gallery_ids for i in range(3)],
    }
    for split, images in plan.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for pid, cam, i in images:
            pixels = rng.integers(0, 255, (32, 16, 3)) // 2 + 60 * pid % 128
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg")
    return root


def corrupt(path: Path) -> Path:
    """Overwrite an image file with bytes that are no image."""
    path.write_bytes(b"not an image: an interrupted copy")
    return path


def compose_eval(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/eval.yaml as ``scripts/eval.py`` would, writing into ``output_dir`` (created, as Hydra does)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_tiny(data_root: Path, run_dir: Path, extra: list[str] = (), data: str = "folder") -> dict[str, float]:
    """``reid_lightning.cli.train.train`` on the ``data`` set at ``data_root`` with the TINY settings and ``extra`` overrides."""
    return train(compose_train([f"data={data}", *TINY, f"paths.data_dir={data_root}", *extra], output_dir=run_dir))


class SnapshotWeights(pl.Callback):
    """Saves the model's state_dict to ``path`` when training starts (after any ``init_from``);
    listed as ``+callbacks.snapshot._target_=test_bad_input.SnapshotWeights +callbacks.snapshot.path=P``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: ReIDModule) -> None:
        torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.path)


class WritesMarker:
    """Unpickling this object creates the file ``marker`` (code execution at load time)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real ``last.ckpt`` of ``scripts/train.py``: ResNet-18, 2 training identities."""
    base = tmp_path_factory.mktemp("tiny_ckpt")
    run_dir = base / "run"
    train_tiny(write_folder_dataset(base / "data"), run_dir, WITH_CHECKPOINTS + ["run_test=false"])
    return run_dir / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("layout", ["no root", "no data set folder", "no query folder"])
def test_missing_root_or_split_names_the_layout_and_paths_data_dir(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    expected = str(root)
    if layout != "no root":
        root.mkdir()
    if layout == "no query folder":
        for split in ("bounding_box_train", "bounding_box_test"):
            (root / "Market-1501-v15.09.15" / split).mkdir(parents=True)
        expected = str(root / "Market-1501-v15.09.15" / "query")
    with pytest.raises(FileNotFoundError) as info:
        train_tiny(root, tmp_path / "run", data="market1501")
    message = str(info.value)
    assert expected in message and "paths.data_dir" in message and "REID_DATA" in message
    if layout != "no root":
        assert "{bounding_box_train,query,bounding_box_test}" in message


def test_corrupt_image_found_at_setup_with_verify_images(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data")
    bad = corrupt(root / "bounding_box_test" / "0002_c2s1_000001_00.jpg")
    with pytest.raises(RuntimeError, match="1 unreadable image") as info:
        train_tiny(root, tmp_path / "run", ["data.verify_images=true"])
    assert str(bad) in str(info.value)


def test_corrupt_image_fails_the_run_when_loaded(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data")
    # the only batch of the epoch holds all 8 training images
    bad = corrupt(root / "bounding_box_train" / "0001_c2s1_000003_00.jpg")
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        train_tiny(root, tmp_path / "run", ["callbacks=none"])


@pytest.mark.parametrize("split", ["query", "bounding_box_test"])
def test_empty_query_or_gallery(tmp_path: Path, split: str) -> None:
    root = write_folder_dataset(tmp_path / "data")
    for image in (root / split).iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=f"split folder {root / split} holds no images"):
        train_tiny(root, tmp_path / "run")


@pytest.mark.parametrize("problem", ["other identities", "one camera"])
def test_queries_without_gallery_match_fail_at_setup(tmp_path: Path, problem: str) -> None:
    # no query can be scored: found when the test set is read, not at the first validation
    if problem == "other identities":
        root = write_folder_dataset(tmp_path / "data", query_ids=(1, 2), gallery_ids=(3, 4))
    else:
        root = write_folder_dataset(tmp_path / "data")
        for image in (root / "bounding_box_test").iterdir():
            image.rename(image.with_name(image.name.replace("_c2s1_", "_c1s1_")))
    with pytest.raises(ValueError, match="test set folder: no query image has a gallery image of its identity from another camera"):
        train_tiny(root, tmp_path / "run", ["callbacks=none"])


# ---------------------------------------------------------------------------------------- config
@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=market1502"], ["Could not find 'data/market1502'", "market1501"]),
        (["data=market1501", "paths.data_dir=no_such_dir"], ["no_such_dir", "paths.data_dir"]),
    ],
    ids=["unknown group option", "missing data root"],
)
def test_train_script_exits_with_the_problem_named(tmp_path: Path, overrides: list[str], expected: list[str]) -> None:
    # as a user would run it: no HYDRA_FULL_ERROR
    proc = run_script(
        "train.py", [*overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False, full_error=False, timeout=300
    )
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_a_gpu_trainer_without_a_gpu_names_the_cpu_choices(tmp_path: Path, trainer: str) -> None:
    cfg = compose_train([f"trainer={trainer}"], output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="trainer.accelerator=gpu .*no CUDA GPU.*trainer=cpu or trainer=ddp_cpu"):
        build_trainer(cfg, [], loggers=[])


# ---------------------------------------------------------------------------------------- checkpoints
def test_eval_of_another_architecture_fails_unless_loaded_non_strictly(
    tiny_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["reid_config"]["model"]["depth"] = 34  # the weights are a ResNet-18's
    other = tmp_path / "r34.ckpt"
    torch.save(ckpt, other)
    args = [f"ckpt_path={other}", "trainer=cpu", "cmc_curve=false", "++trainer.enable_progress_bar=false"]
    with pytest.raises(RuntimeError, match=rf"{other} does not match the model architecture; missing \(\d+\): "
                                           r"model\.backbone\.layer1\.2\.conv1\.weight"):
        evaluate(compose_eval(args, tmp_path / "strict"))

    with caplog.at_level(logging.WARNING, logger="reid_lightning.checkpointing.load"):
        metrics = evaluate(compose_eval([*args, "strict_load=false"], tmp_path / "loose"))
    assert set(metrics) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    assert f"non-strict loading of {other}" in caplog.text and "layer1.2.conv1.weight" in caplog.text


def test_init_from_another_number_of_identities(tiny_ckpt: Path, tmp_path: Path, caplog) -> None:
    root = write_folder_dataset(tmp_path / "data", train_ids=3)  # the checkpoint saw 2 identities
    with pytest.raises(RuntimeError, match=rf"shape mismatch \(1\): {CLASSIFIER}.*init_strict=false"):
        train_tiny(root, tmp_path / "strict", ["callbacks=none", f"init_from={tiny_ckpt}"])

    snapshot = tmp_path / "start.pt"
    with caplog.at_level(logging.WARNING, logger="reid_lightning.checkpointing.load"):
        metrics = train_tiny(root, tmp_path / "loose", [
            "callbacks=none", f"init_from={tiny_ckpt}", "init_strict=false",
            "+callbacks.snapshot._target_=test_bad_input.SnapshotWeights", f"+callbacks.snapshot.path={snapshot}",
        ])
    assert metrics["mAP"] > 0.0
    assert f"shape mismatch (1): {CLASSIFIER}" in caplog.text
    start = torch.load(snapshot, weights_only=True)
    source = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    assert start[CLASSIFIER].shape[0] == 3 and source[CLASSIFIER].shape[0] == 2
    assert [k for k in source if k != CLASSIFIER and not torch.equal(source[k], start[k])] == []


def test_non_strict_loading_still_needs_one_fitting_weight() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"no weight of checkpoint other\.ckpt fits the model: .*unexpected \(1\): fc"):
        load_model_weights(module, {"fc": torch.zeros(1)}, source="other.ckpt", strict=False)


def test_pickled_code_is_refused_not_run(tiny_ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "reid_config": {}, "payload": WritesMarker(marker)}, evil)
    with pytest.raises(ValueError, match=f"refusing to load {evil}: it holds pickled objects"):
        evaluate(compose_eval([f"ckpt_path={evil}"], tmp_path / "eval"))
    root = write_folder_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=f"refusing to load {evil}"):
        train_tiny(root, tmp_path / "run", ["callbacks=none", f"init_from={evil}"])
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_truncated_checkpoint_is_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_ckpt.read_bytes()[:4096])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {cut}: not a torch checkpoint, or truncated"):
        evaluate(compose_eval([f"ckpt_path={cut}"], tmp_path / "eval"))


def test_eval_with_an_unknown_rank_list_order_fails_before_evaluating(tmp_path: Path) -> None:
    # no checkpoint is read: the setting is refused first
    cfg = compose_eval([f"ckpt_path={tmp_path / 'absent.ckpt'}", "rank_lists.order=random"], tmp_path / "eval")
    with pytest.raises(ValueError, match="rank_lists.order must be worst, best or a list of query indices, got 'random'"):
        evaluate(cfg)


@pytest.mark.parametrize("script", ["train", "eval"])
def test_a_seed_that_is_not_an_integer_is_named(tmp_path: Path, script: str) -> None:
    if script == "train":
        cfg, run = compose_train(["seed=abc", f"paths.data_dir={tmp_path / 'absent'}"], output_dir=tmp_path), train
    else:
        cfg, run = compose_eval([f"ckpt_path={tmp_path / 'absent.ckpt'}", "seed=abc"], tmp_path / "eval"), evaluate
    with pytest.raises(TypeError, match="seed must be an integer, got 'abc'"):
        run(cfg)
