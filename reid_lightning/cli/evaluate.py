"""Evaluate a checkpoint from a composed Hydra config: the body of ``scripts/eval.py``.

Called as::

    @hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
    def main(cfg):
        return evaluate(cfg)["mAP"]

The model is rebuilt from ``model=...`` on the command line, or from the config saved in the
checkpoint (``reid_config``); the data come from ``data=...``, or from the checkpoint's config.
The evaluation settings are those of the checkpoint's run, so that its test figures come out
again, with any ``evaluation.<key>=...`` given on the command line on top
(:func:`evaluation_settings`). A fast-reid checkpoint (``model_final.pth``) has no saved config:
it needs both ``model=`` and ``data=``, and takes ``conf/evaluation``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from reid_lightning.checkpointing.load import load_model_checkpoint
from reid_lightning.checkpointing.saved_model import rebuild_model
from reid_lightning.cli.train import (
    build_datamodule,
    build_trainer,
    report_test_metrics,
    seed_run,
    write_metrics,
)
from reid_lightning.data.samples import Sample
from reid_lightning.engine.module import ReIDModule
from reid_lightning.evaluation import compute_distance, save_cmc_curve, save_rank_lists
from reid_lightning.evaluation.visualize import RANK_LIST_ORDERS
from reid_lightning.launch.hydra_ddp import hydra_job_ddp

log = logging.getLogger(__name__)


def export_features(outputs: dict[str, Any], paths: list[str], out_path: Path) -> Path:
    """Write query + gallery features, pids, cameras, the query flag and image paths to ``.npz``.

    The features are the model's (those of ``FeatureExtractor(normalize=False)``), also when
    the ranking used query-expanded ones (``evaluation.aqe``)."""
    q_feat, g_feat = outputs.get("q_feat_model", outputs["q_feat"]), outputs.get("g_feat_model", outputs["g_feat"])
    np.savez_compressed(
        out_path,
        features=np.concatenate([q_feat.cpu().numpy(), g_feat.cpu().numpy()]),
        pids=np.concatenate([outputs["q_pids"].cpu().numpy(), outputs["g_pids"].cpu().numpy()]),
        camids=np.concatenate([outputs["q_camids"].cpu().numpy(), outputs["g_camids"].cpu().numpy()]),
        is_query=np.arange(len(paths)) < len(outputs["q_pids"]),
        paths=np.asarray(paths),
    )
    return out_path


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on the test split of each test set; write metrics.json and
    optional extras (with several test sets, into one sub-dir per set).

    Returns:
        The metrics in percent (``Rank-1``, ``Rank-5``, ``Rank-10``, ``mAP``, ``mINP``, and
        ``TPR@FPR=...`` when ``evaluation.tpr_fprs`` is set) of the first test set, plus a
        ``test_sets`` block with each set's when there are several.
    """
    output_dir = Path(cfg.paths.output_dir)
    order = cfg.rank_lists.order
    if isinstance(order, str) and order not in RANK_LIST_ORDERS:  # found before the evaluation, not after it
        raise ValueError(f"rank_lists.order must be {', '.join(RANK_LIST_ORDERS)} or a list of query indices, got {order!r}")
    seed_run(cfg)
    ckpt = load_model_checkpoint(cfg.ckpt_path)
    saved = OmegaConf.create(ckpt["reid_config"] or {})
    missing = [group for group in ("model", "data") if not _whole_group(cfg, group) and saved.get(group) is None]
    if missing:
        raise ValueError(
            f"{cfg.ckpt_path} holds no saved config (a fast-reid checkpoint?): pass "
            + " and ".join(f"{group}=..." for group in missing)
            + " on the command line, e.g. model=bot_r50 data=market1501"
        )
    data_cfg = data_settings(cfg, saved)
    datamodule = build_datamodule(data_cfg, stage="test")

    model_cfg = cfg.model if _whole_group(cfg, "model") else saved.model
    if cfg.get("model") is not None and not _whole_group(cfg, "model"):  # ++model.<key>=... on top of the saved
        model_cfg = OmegaConf.merge(model_cfg, cfg.model)
    model = rebuild_model(ckpt, source=str(cfg.ckpt_path), strict=cfg.get("strict_load", True), model_cfg=model_cfg)
    want_outputs = bool(cfg.export_features or cfg.rank_lists.num_queries or cfg.cmc_curve)
    evaluation = evaluation_settings(cfg, saved)
    module = ReIDModule(model, evaluation=evaluation, keep_eval_outputs=want_outputs, test_sets=datamodule.test_set_names)

    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    with hydra_job_ddp(trainer):  # DDP children of this job only (multirun sweeps)
        trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = report_test_metrics(module)
    if not trainer.is_global_zero:
        return metrics
    write_metrics(metrics, output_dir)
    if want_outputs:
        test_splits = datamodule.test_splits
        for position, (name, split) in enumerate(test_splits.items()):
            out_dir = output_dir if len(test_splits) == 1 else output_dir / name
            out_dir.mkdir(parents=True, exist_ok=True)
            save_extras(cfg, module.eval_outputs(position), [*split.query, *split.gallery], out_dir, datamodule.size,
                        metric=evaluation["metric"])
    return metrics


# evaluation keys that fit the machine, not the protocol (the figures do not depend on them):
# always this run's
MACHINE_EVALUATION_KEYS = frozenset({"max_chunk_mb"})


def _command_line_keys(group: str) -> tuple[bool, set[str]]:
    """Whether ``group`` was chosen as a whole on the command line (``evaluation=default``), and
    the top-level keys of it given there (``evaluation.flip=false`` -> ``flip``); nothing outside
    a Hydra run."""
    if not HydraConfig.initialized():
        return False, set()
    whole, given = False, set()
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        head, _, key = override.key_or_group.partition(".")
        if head == group:
            if key:
                given.add(key.split(".")[0])
            else:
                whole = True
    return whole, given


# data keys that the model was trained for, not the data set's: the checkpoint's run's unless given
MODEL_DATA_KEYS = ("height", "width")


def _whole_group(cfg: DictConfig, group: str) -> bool:
    """Whether ``cfg.<group>`` is a whole config (``data=market1501``: it has a ``_target_``),
    not only keys to put on top of the checkpoint's (``++data.test_batch_size=32``)."""
    return cfg.get(group) is not None and "_target_" in cfg[group]


def data_settings(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """The ``data`` config to evaluate ``cfg.ckpt_path`` on.

    ``data=...`` on the command line: that data set, at the input size of the checkpoint's run
    (``data.height`` / ``data.width`` on the command line override it; a fast-reid checkpoint
    takes ``conf/data``'s). Otherwise the checkpoint's run's data; when ``paths.data_dir`` is
    given on the command line, or the saved data root is gone (a checkpoint trained on another
    machine), its data sets are looked for under this run's ``paths.data_dir`` instead; single
    keys given as ``++data.<key>=...`` go on top."""
    if _whole_group(cfg, "data"):
        data_cfg = cfg.data.copy()
        if saved.get("data") is not None:
            _, given = _command_line_keys("data")
            kept = {key: saved.data[key] for key in MODEL_DATA_KEYS
                    if key not in given and saved.data.get(key) is not None and saved.data[key] != data_cfg.get(key)}
            if kept:
                log.info("input size of the checkpoint's run: %s (data.<key>=... overrides it)",
                         ", ".join(f"data.{key}={value}" for key, value in kept.items()))
                with open_dict(data_cfg):
                    data_cfg.update(kept)
        return data_cfg
    data_cfg = saved.data.copy()
    old_dir = saved.get("paths", {}).get("data_dir")
    new_dir = cfg.paths.data_dir
    data_dir_given = "data_dir" in _command_line_keys("paths")[1]
    moved = old_dir is not None and not Path(str(old_dir)).exists()
    if old_dir is not None and str(old_dir) != str(new_dir) and (data_dir_given or moved):
        log.info("data sets of the checkpoint's run (saved under %s) are read from paths.data_dir=%s", old_dir, new_dir)
        if str(data_cfg.get("root")) == str(old_dir):
            data_cfg.root = new_dir
        for sets in ("train_sets", "test_sets"):
            for entry in data_cfg.get(sets) or []:
                if isinstance(entry, DictConfig) and str(entry.get("root")) == str(old_dir):
                    entry.root = new_dir
    if cfg.get("data") is not None:  # ++data.<key>=... on top of the checkpoint's
        data_cfg = OmegaConf.merge(data_cfg, cfg.data)
    return data_cfg


def evaluation_settings(cfg: DictConfig, saved: DictConfig) -> dict[str, Any]:
    """The evaluation settings for ``cfg.ckpt_path``: the checkpoint's run's (``saved.evaluation``,
    what its test used: flip, re-ranking, metric...), with the keys given on the command line
    (``evaluation.flip=false``; ``evaluation=<option>`` gives them all) taken from
    ``cfg.evaluation``, as are keys the checkpoint's config lacks and the memory bound
    (:data:`MACHINE_EVALUATION_KEYS`). ``cfg.evaluation`` alone for a
    checkpoint without saved settings (fast-reid's) or outside a Hydra run (no command line)."""
    current = OmegaConf.to_container(cfg.evaluation, resolve=True)
    whole, given = _command_line_keys("evaluation")
    if saved.get("evaluation") is None or not HydraConfig.initialized() or whole:
        return current
    kept = {key: value for key, value in OmegaConf.to_container(saved.evaluation, resolve=True).items()
            if key in current and key not in given and key not in MACHINE_EVALUATION_KEYS}
    changed = {key: value for key, value in kept.items() if value != current[key]}
    if changed:
        log.info("evaluation settings of the checkpoint's run: %s (evaluation.<key>=... overrides them)",
                 ", ".join(f"{key}={value}" for key, value in changed.items()))
    return {**current, **kept}


def save_extras(
    cfg: DictConfig, outputs: dict[str, Any], samples: list[Sample], out_dir: Path, size: tuple[int, int],
    metric: str | None = None,
) -> None:
    """Write the extras that ``cfg`` asks for (features.npz, cmc.png, rank_lists/) of one test set.

    Args:
        cfg: the eval config (``export_features``, ``cmc_curve``, ``rank_lists``).
        outputs: the kept outputs of the set's metric (``ReIDModule.eval_outputs``).
        samples: the set's query then gallery samples, in evaluation index order.
        out_dir: where to write.
        size: input (height, width), the tile size of the rank lists.
        metric: the distance the figures were ranked with (``cfg.evaluation.metric`` when None).
    """
    q_paths = [samples[i].path for i in outputs["q_index"].tolist()]
    g_paths = [samples[i].path for i in outputs["g_index"].tolist()]
    if cfg.export_features:
        export_features(outputs, q_paths + g_paths, out_dir / "features.npz")
    if cfg.cmc_curve:
        save_cmc_curve(outputs["cmc"], out_dir / "cmc.png")
    ranks = cfg.rank_lists
    if ranks.num_queries or not isinstance(ranks.order, str):
        order = ranks.order if isinstance(ranks.order, str) else list(ranks.order)
        # the chunked ranking keeps no distance matrix: rank lists compute it here
        distmat = outputs.get("dist")
        if distmat is None:
            distmat = compute_distance(outputs["q_feat"], outputs["g_feat"], metric or cfg.evaluation.metric)
        save_rank_lists(
            distmat, outputs["q_pids"], outputs["g_pids"], outputs["q_camids"], outputs["g_camids"],
            q_paths, g_paths, out_dir / "rank_lists", num_queries=ranks.num_queries, order=order,
            top_k=ranks.top_k, size=tuple(size),
        )
