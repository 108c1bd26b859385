"""Resuming a run, and the run state that Lightning's checkpoint leaves out.

Called by :func:`reid_lightning.cli.train.train`::

    plan = ResumePlan.from_config(cfg)        # which checkpoint, and whether the run goes on in place
    callbacks = [..., RNGStates()]
    loggers = instantiate_group(plan.logger_config(cfg.get("logger")))
    plan.keep_logged_history(loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=plan.ckpt_path)

``resume=true hydra.run.dir=<run dir>`` continues that run in place from its
``checkpoints/last.ckpt``, written at the end of every training epoch by the ``last_checkpoint``
callback of ``conf/callbacks/default.yaml``; ``ckpt_path=<file>`` starts a new run dir from any
checkpoint (with ``resume=true`` too: that file instead of ``last.ckpt``, in place). A run killed
in the middle of an epoch replays that epoch from its start.

Lightning restores from the checkpoint: weights, optimizer, LR scheduler (the step count of the
per-step warmup + multistep ``LambdaLR``), precision plugin (the fp16 grad scaler), loops (epoch
and global step; the identity sampler gets the epoch through ``set_epoch``) and every callback's
``state_dict`` (ModelCheckpoint's best and last paths, the fast-reid hooks). This module adds:

* :class:`RNGStates`: the Python, NumPy and torch (CPU and current CUDA device) generators, which
  the training augmentation and the loaders' worker seeds draw from;
* for a run resumed in place, loggers that continue: CSVLogger and TensorBoardLogger write into
  their latest ``version_N`` dir instead of a new one; CSV rows logged before the checkpoint's
  step are kept, later ones (the replayed part of an epoch) dropped; TensorBoard purges its events
  from that step on (``purge_step``); MLFlowLogger with a local store (``sqlite:``/``file:``)
  goes on in the store's latest run of its experiment (the replayed steps are logged again);
  WandbLogger keeps the run id of its latest run under ``save_dir/wandb`` (``resume="allow"``);
* a warning listing the ``model``/``data``/``solver``/``seed`` settings that differ from the
  checkpoint's run, and a second one naming those among them that the restored optimizer and LR
  scheduler state overrides (optimizer, learning rate, weight decay, momentum: the checkpoint's stay).
"""
from __future__ import annotations

import csv
import logging
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import (
    CSVLogger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from pytorch_lightning.utilities import rank_zero_only

from reid_lightning.checkpointing.load import load_checkpoint
from reid_lightning.engine.hparams import flatten_config

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
# config groups whose change between the checkpoint's run and the resumed run is worth a warning
_COMPARED_KEYS = ("model", "data", "solver", "seed")
# settings the checkpoint's optimizer state (its kind; param groups: lr, weight decay, momentum) and
# LR scheduler state (base_lrs) hold: a resumed run keeps the checkpoint's values of these (another
# optimizer class would take the saved groups' settings of the first: SGD from an Adam state fails
# at its first step with KeyError: 'momentum')
_HELD_BY_OPTIMIZER_STATE = (
    "solver.optimizer", "solver.base_lr", "solver.bias_lr_factor", "solver.weight_decay", "solver.weight_decay_norm",
    "solver.weight_decay_bias", "solver.momentum", "solver.nesterov",
)
# a W&B run dir: (offline-)run-<date>_<time>-<run id>
_WANDB_RUN_DIR = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")


@dataclass(frozen=True)
class ResumePlan:
    """Where ``trainer.fit`` starts from.

    Attributes:
        ckpt_path: checkpoint to restore, None to start from scratch.
        resume_step: the checkpoint's global step when the run continues in place (its loggers
            go on), else None.
        held_settings: the checkpoint's values of the settings its optimizer and LR-scheduler
            state hold (optimizer, learning rate, weight decay, momentum) where the config differs: the
            restored run trains with these (:meth:`keep_held_settings` puts them in the config).
    """

    ckpt_path: str | None = None
    resume_step: int | None = None
    held_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ResumePlan:
        """The plan for ``cfg.resume`` / ``cfg.ckpt_path``; warns about settings changed since the checkpoint.

        ``resume=true`` without ``ckpt_path`` takes ``last.ckpt`` from the ``dirpath`` of the
        ModelCheckpoint in ``cfg.callbacks`` that writes it (:func:`last_checkpoint_path`).

        Raises:
            FileNotFoundError: the checkpoint to resume from does not exist (the message names it).
            ValueError: ``resume=true`` without ``ckpt_path`` and no ModelCheckpoint writing
                ``last.ckpt``; or the checkpoint is unreadable or not from ``scripts/train.py``
                (see :func:`~reid_lightning.checkpointing.load.load_checkpoint`).
        """
        ckpt_path = cfg.get("ckpt_path")
        in_place = bool(cfg.get("resume", False))
        if ckpt_path is None and not in_place:
            return cls()
        if ckpt_path is None:
            path = last_checkpoint_path(cfg)
            if not path.is_file():
                raise FileNotFoundError(
                    f"resume=true found no checkpoint at {path}: pass the output dir of the run to resume "
                    "(hydra.run.dir=<run dir>; without it every start makes a new dir), or ckpt_path=<file>"
                )
        else:
            path = Path(ckpt_path)
            if not path.is_file():
                raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        checkpoint = load_checkpoint(path)  # a truncated, foreign or pickled file fails here, named
        held = _warn_changed_settings(checkpoint["reid_config"], cfg, path)
        return cls(str(path), int(checkpoint["global_step"]) if in_place else None, held)

    def keep_held_settings(self, cfg: DictConfig) -> None:
        """Set ``cfg``'s optimizer, learning rate, weight decay and momentum settings back to the
        checkpoint's values where they differ (:attr:`held_settings`): the restored optimizer and
        LR scheduler state trains with those, so the module, the logged hyper-parameters and the
        next checkpoint's config say what the run does."""
        for key, value in self.held_settings.items():
            OmegaConf.update(cfg, key, value, merge=False)

    def logger_config(self, logger_cfg: DictConfig | None) -> DictConfig | None:
        """``logger_cfg`` with each logger pinned to the run it wrote before, when in place.

        CSV/TensorBoard: the latest ``version_N`` dir (TensorBoard also gets ``purge_step``: events
        from the resumed step on are dropped). MLflow: ``run_id`` of the latest run of the
        experiment in a local store. W&B: ``id`` of the latest run under ``save_dir/wandb``. A
        logger whose version/run is set, or that has written nothing yet, is left alone.
        """
        if self.resume_step is None or not logger_cfg:
            return logger_cfg
        plain = OmegaConf.to_container(logger_cfg, resolve=True)
        for node in plain.values():
            if not isinstance(node, dict) or "_target_" not in node:
                continue
            target = get_class(node["_target_"])
            if issubclass(target, MLFlowLogger) and node.get("run_id") is None:
                node["run_id"] = latest_mlflow_run(node["tracking_uri"], node.get("experiment_name", "lightning_logs"))
                continue
            if issubclass(target, WandbLogger) and node.get("id") is None:
                run_id = latest_wandb_run(node.get("save_dir") or ".")
                if run_id is not None:
                    node.update(id=run_id, resume="allow")
                continue
            if not issubclass(target, (CSVLogger, TensorBoardLogger)) or node.get("version") is not None:
                continue
            version = latest_version(node["save_dir"], node.get("name", "lightning_logs"))
            if version is None:
                continue
            node["version"] = version
            if issubclass(target, TensorBoardLogger):
                node["purge_step"] = self.resume_step
        return OmegaConf.create(plain)

    def keep_logged_history(self, loggers: list[Any]) -> None:
        """When in place, rewrite each CSVLogger's ``metrics.csv`` keeping the rows before the resumed step.

        Call it right after building the loggers: Lightning's CSV writer deletes an existing
        ``metrics.csv`` when it starts; this keeps its earlier rows in the new file.
        """
        if self.resume_step is None:
            return
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                _continue_csv(logger, self.resume_step)


def last_checkpoint_path(cfg: DictConfig) -> Path:
    """``<dirpath>/last.ckpt`` of the first ModelCheckpoint in ``cfg.callbacks`` that writes it
    (``filename: last``, or ``save_last``).

    Raises:
        ValueError: no such callback (``callbacks=none``): nothing writes ``last.ckpt``.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    for node in (cfg.get("callbacks") or {}).values():
        if node is None or "_target_" not in node or not issubclass(get_class(node._target_), ModelCheckpoint):
            continue
        if node.get("dirpath") and (node.get("filename") == "last" or node.get("save_last")):
            return Path(node.dirpath) / LAST_CHECKPOINT
    raise ValueError(
        "resume=true needs a ModelCheckpoint writing last.ckpt into a dirpath in callbacks (callbacks=default "
        "has last_checkpoint); otherwise pass ckpt_path=<file>"
    )


def latest_version(save_dir: str | Path, name: str | None) -> int | None:
    """Largest N of the ``version_N`` dirs under ``save_dir/name``, None when there is none."""
    root = Path(save_dir) / name if name else Path(save_dir)
    versions = [
        int(child.name[len("version_"):])
        for child in root.glob("version_*")
        if child.is_dir() and child.name[len("version_"):].isdigit()
    ]
    return max(versions, default=None)


def latest_mlflow_run(tracking_uri: str, experiment_name: str) -> str | None:
    """Id of the most recently started run of ``experiment_name`` in a local MLflow store.

    None for a store that does not exist yet, an experiment without runs, or a remote
    ``tracking_uri`` (other users' runs may be the latest there).
    """
    for scheme in ("sqlite:///", "file:"):
        if tracking_uri.startswith(scheme):
            store = Path(tracking_uri[len(scheme):])
            break
    else:
        return None
    if not store.exists():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def latest_wandb_run(save_dir: str | Path) -> str | None:
    """Run id of the newest ``[offline-]run-<date>_<time>-<id>`` dir under ``save_dir/wandb``, None when none."""
    names = (child.name for child in (Path(save_dir) / "wandb").glob("*run-*") if child.is_dir())
    runs = [match.groups() for match in map(_WANDB_RUN_DIR.fullmatch, names) if match]
    return max(runs)[1] if runs else None


@rank_zero_only
def _continue_csv(logger: CSVLogger, resume_step: int) -> None:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) < resume_step]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # deletes the old metrics.csv
    for row in rows:
        # the values stay the strings read, so that the kept rows are written back unchanged
        writer.log_metrics({k: v for k, v in row.items() if k != "step" and v not in ("", None)}, step=int(row["step"]))
    logger.save()


def _warn_changed_settings(saved: Mapping[str, Any], cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Warn about the settings of ``cfg`` that differ from the checkpoint's run; return the
    checkpoint's values of those its optimizer and LR-scheduler state hold."""
    current = OmegaConf.to_container(cfg, resolve=True)
    before = flatten_config({k: saved.get(k) for k in _COMPARED_KEYS})
    now = flatten_config({k: current.get(k) for k in _COMPARED_KEYS})
    changes = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if changes:
        log.warning("resuming from %s with settings that differ from its run: %s", path, "; ".join(changes))
    held = {key: before[key] for key in _HELD_BY_OPTIMIZER_STATE if key in before and key in now and before[key] != now[key]}
    if held:
        log.warning(
            "%s: not applied when resuming; the run goes on with the checkpoint's values, which its optimizer "
            "and LR-schedule state hold. To train with the new ones, start a new run from its weights: init_from=%s",
            ", ".join(held), path,
        )
    return held


# ---------------------------------------------------------------------- random generators
def collect_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators, as plain types and tensors
    (loadable with ``torch.load(weights_only=True)``). CUDA: the current device, once initialised."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Put back the generator states of :func:`collect_rng_states`."""
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = states["numpy"]
    np.random.set_state(
        ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
         numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    torch.set_rng_state(states["torch"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])


class RNGStates(pl.Callback):
    """Saves the global generator states in every checkpoint; loading the checkpoint puts them back.

    The states are those at the moment of saving (``last.ckpt``: the end of an epoch). Lightning
    loads callback states after the model is built and before the training loader's first
    iterator is made, so the resumed epochs draw the same augmentations and worker seeds as the
    uninterrupted run (exactly so with ``data.num_workers=0`` or non-persistent workers: a
    persistent worker's generators live in its process and are not saved). Under DDP every rank
    takes rank 0's states, which equal its own in an uninterrupted run (same seed, same draws).
    """

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict)
