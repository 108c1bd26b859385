"""DDP correctness on CPU: ``scripts/train.py trainer=ddp_cpu`` (2 gloo processes) keeps the ranks
in step and evaluates exactly like one process; SyncBatchNorm keeps the BNNeck bias frozen."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train, run_script
from pytorch_lightning.plugins import TorchSyncBatchNorm
from torch import nn

from reid_lightning.cli.train import build_datamodule, build_model
from reid_lightning.data.datasets.demo import prepare_demo
from reid_lightning.engine.module import ReIDModule

TESTS_DIR = Path(__file__).resolve().parent
BNNECK_BIAS = "head.bnneck.bias"


class DumpModelState(pl.Callback):
    """Saves each rank's model state to ``out_dir/<moment>_rank<r>.pt`` at the end of training
    and at the start of testing; listed in a run's config as
    ``+callbacks.dump_state._target_=test_ddp.DumpModelState +callbacks.dump_state.out_dir=DIR``.

    A file holds ``{"state": model.state_dict(), "frozen": names of parameters without grad}``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _dump(self, moment: str, trainer: pl.Trainer, pl_module: ReIDModule) -> None:
        model = pl_module.model
        record = {
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "frozen": [name for name, p in model.named_parameters() if not p.requires_grad],
        }
        torch.save(record, self.out_dir / f"{moment}_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: ReIDModule) -> None:
        self._dump("train_end", trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: ReIDModule) -> None:
        self._dump("test_start", trainer, pl_module)


# a demo set of 40 identities (20 for training, about 250 test images) keeps every pass short
SMALL_DEMO = {"seed": 0, "num_ids": 40, "images_per_id": 12, "num_distractors": 20, "num_junk": 4, "size": [64, 32]}
TINY = [
    "experiment=quickstart", "data.height=64", "data.width=32", "data.num_workers=0",
    *(f"++data.dataset_kwargs.{key}={value}" for key, value in SMALL_DEMO.items()),
    "solver.warmup_iters=2", "hooks=none", "logger=csv",
]


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory) -> Path:
    """A data root holding the SMALL_DEMO set, generated before any rank starts."""
    root = tmp_path_factory.mktemp("small_demo")
    prepare_demo(root, **SMALL_DEMO)
    return root


@pytest.mark.slow
def test_ddp_ranks_stay_in_step_and_evaluate_like_one_process(small_demo_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    # 2 epochs of 3 global batches of 32 (16 per rank); validation after epoch 2 writes last.ckpt
    run_script("train.py", [
        *TINY, "trainer=ddp_cpu", "++data.batches_per_epoch=3", "solver.max_epochs=2", "solver.eval_period=2",
        "~callbacks.lr_monitor", "~callbacks.progress_bar", "~callbacks.model_summary",
        "+callbacks.dump_state._target_=test_ddp.DumpModelState", f"+callbacks.dump_state.out_dir={run_dir}",
        f"paths.data_dir={small_demo_root}", f"hydra.run.dir={run_dir}",
    ], cwd=tmp_path)

    ends = [torch.load(run_dir / f"train_end_rank{rank}.pt") for rank in (0, 1)]
    starts = [torch.load(run_dir / f"test_start_rank{rank}.pt") for rank in (0, 1)]
    # gradients are averaged over the ranks: every parameter is bit-identical at the end of training
    # (BN running statistics are not compared here: DDP copies rank 0's at each forward, so after the
    # last training step each rank holds its own update until the next forward or the test's sync)
    params = [k for k in ends[0]["state"] if "running_" not in k and "num_batches_tracked" not in k]
    assert len(params) > 60
    assert [k for k in params if not torch.equal(ends[0]["state"][k], ends[1]["state"][k])] == []
    # the test runs on rank 0's full state (BN statistics included) on every rank
    assert [k for k in starts[0]["state"] if not torch.equal(starts[0]["state"][k], starts[1]["state"][k])] == []
    # rank 0 alone writes: one CSV log, one best checkpoint + last.ckpt
    assert len(list(run_dir.glob("csv/version_*"))) == 1
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert [k for k in saved if not torch.equal(saved[k], starts[0]["state"][k])] == []
    for record in (*ends, *starts):
        assert BNNECK_BIAS in record["frozen"] and not record["state"][BNNECK_BIAS].any()

    # the DDP test (each rank ranks its shard, then gather + de-duplication) equals one process
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_dir = tmp_path / "eval"
    run_script("eval.py", [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", "cmc_curve=false",
        f"hydra.run.dir={eval_dir}",
    ], cwd=tmp_path)
    single_metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(ddp_metrics) == set(single_metrics) == {"Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"}
    for name, value in single_metrics.items():  # both rounded to 4 decimals
        assert ddp_metrics[name] == pytest.approx(value, abs=1.5e-4), name
    (metrics_csv,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as handle:
        val_maps = [float(row["val/mAP"]) for row in csv.DictReader(handle) if row.get("val/mAP")]
    assert val_maps == [pytest.approx(ddp_metrics["mAP"], abs=1e-3)]  # same weights, same DDP evaluation


def test_sync_batchnorm_keeps_the_bnneck_bias_frozen(small_demo_root: Path, tmp_path: Path) -> None:
    cfg = compose_train(
        [*TINY, "trainer=cpu", "callbacks=none", "data.batch_size=16", "++data.batches_per_epoch=2", "solver.max_epochs=1",
         f"paths.data_dir={small_demo_root}"],
        output_dir=tmp_path,
    )
    datamodule = build_datamodule(cfg.data)
    module = ReIDModule(build_model(cfg, datamodule.num_classes), solver=cfg.solver)
    # what Trainer(sync_batchnorm=True) applies to the module under DDP before building the optimizer
    module = TorchSyncBatchNorm().apply(module)
    bnneck = module.model.head.bnneck
    assert isinstance(bnneck, nn.SyncBatchNorm) and not bnneck.bias.requires_grad
    assert isinstance(module.model.backbone.bn1, nn.SyncBatchNorm)

    # one process: SyncBatchNorm normalises like BatchNorm, the optimizer and the losses are the real ones
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert not bnneck.bias.requires_grad and torch.equal(bnneck.bias, torch.zeros_like(bnneck.bias))
    assert not torch.equal(bnneck.weight, torch.ones_like(bnneck.weight))  # the BNNeck weight did train
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(bnneck.bias) not in optimized and id(bnneck.weight) in optimized
