"""Training throughput in three modes, the body of ``scripts/benchmark_train.py``.

* ``loader``: the training loader alone (decode + BoT transforms + collate), images/s for each
  worker count;
* ``epochs``: the training loader alone over whole epochs from cold workers (the image cache's
  effect): seconds per epoch and the memory of the main process and its workers after each;
* ``step``: forward + losses + backward + optimizer step on one batch already on the device (the
  bare limit of the model);
* ``optimizer``: ``optimizer.step`` alone on the model's parameters, torch's fused kernel and the
  per-tensor loop alternating in rounds (``solver.fused``);
* ``checkpoint``: the training thread's time per checkpoint (model and optimizer state), written
  synchronously and with ``async_checkpoints``;
* ``fit``: ``ReIDModule`` under our ``pl.Trainer`` with the configured hooks and progress bar, on
  the same data, timed as fast-reid's IterationTimer does: from the end of the last warm-up step
  to the end of the last step, after every hook (``after_step``), with ``torch.cuda.synchronize``
  at both ends; validation and checkpoints are left out.

Called as::

    cfg = benchmark_config(model="bot_r18", height=96, width=48, batch=32, device="cpu", ...)
    print(json.dumps(time_step(cfg, iters=50, warmup=10)))
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning_fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, open_dict

from reid_lightning.checkpointing.async_io import AsyncAtomicCheckpointIO
from reid_lightning.checkpointing.atomic_io import AtomicCheckpointIO
from reid_lightning.cli.train import (
    build_datamodule,
    build_model,
    build_trainer,
    resolve_precision,
)
from reid_lightning.engine.hooks import HookBase, build_hooks
from reid_lightning.engine.module import ReIDModule
from reid_lightning.engine.optim import build_optimizer
from reid_lightning.engine.progress import IntervalRichProgressBar
from reid_lightning.engine.settings import SolverSettings
from reid_lightning.utils.cuda_syncs import CudaSyncRecorder

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else a usage error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def worker_counts(text: str) -> list[int]:
    """An argparse ``type``: ``"0,2,4"`` -> ``[0, 2, 4]``."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = [-1]
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected worker counts >= 0 separated by commas, got {text!r}")
    return counts


def benchmark_config(
    model: str = "bot_r50",
    height: int = 256,
    width: int = 128,
    batch: int = 64,
    device: str = "cpu",
    precision: str = "32",
    channels_last: bool = False,
    compile: bool = False,
    workers: int = 2,
    data: str = "demo",
    data_dir: str = "datasets",
    output_dir: str = "outputs/benchmark_train",
    overrides: list[str] | None = None,
) -> DictConfig:
    """Compose ``conf/train.yaml`` for a benchmark run.

    Args:
        model: a ``conf/model`` option (``bot_r18``, ``bot_r50``...); initialised randomly.
        height: input height.
        width: input width.
        batch: global batch (16 or more identities x 4 images in the BoT recipe).
        device: ``cpu`` or ``cuda``.
        precision: Lightning precision (``32``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``...); the bare
            step applies it as Lightning does (autocast, or weights and inputs cast for ``*-true``).
        channels_last: backbone in channels-last memory format.
        compile: ``torch.compile`` the backbone (with its eager fallback).
        workers: loader worker processes.
        data: ``demo`` (the embedded demo set under ``data_dir``) or a folder in Market-1501 layout.
        data_dir: data root of the demo set.
        output_dir: where the trainer may write.
        overrides: further Hydra overrides, e.g. ``["data.persistent_workers=false"]``.
    """
    is_demo = data == "demo"
    args = [
        f"model={model}", "model.pretrained=none", "data=demo" if is_demo else "data=folder",
        f"paths.data_dir={data_dir if is_demo else data}", f"data.height={height}", f"data.width={width}",
        f"data.batch_size={batch}", f"data.num_workers={workers}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", f"trainer.precision={precision}",
        f"channels_last={str(channels_last).lower()}", f"compile={str(compile).lower()}",
        *(overrides or []),
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(mode: str, cfg: DictConfig, images: int, seconds: float, iters: int, **extra: Any) -> dict[str, Any]:
    return {
        "mode": mode, "images_per_s": round(images / seconds, 2), "s_per_iter": round(seconds / max(1, iters), 5),
        "iters": iters, "device": "cuda" if cfg.trainer.accelerator == "gpu" else "cpu",
        "precision": _precision(cfg), "model": cfg.model.get("depth"), "batch": cfg.data.batch_size,
        "size": [cfg.data.height, cfg.data.width], "channels_last": bool(cfg.channels_last),
        "compile": bool(cfg.compile), "threads": torch.get_num_threads(), **extra,
    }


def batches_forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(cfg: DictConfig, iters: int, warmup: int, worker_counts: list[int]) -> dict[str, Any]:
    """Images/s of the training loader for each worker count (after ``warmup`` batches); with
    ``data.normalize_on_device`` (auto: on a GPU) its batches hold uint8 images, normalised later on the device.

    Returns:
        the summary of the fastest count, with ``by_workers`` (``{count: images/s}``) and
        ``main_cpu_ms_by_workers``: the main thread's CPU milliseconds per batch (receiving it
        from the workers, or making it with 0 workers; ``time.thread_time``).
    """
    by_workers: dict[int, float] = {}
    main_cpu_ms: dict[int, float] = {}
    for workers in worker_counts:
        with open_dict(cfg):
            cfg.data.num_workers = workers
        loader = build_datamodule(cfg.data).build_train_loader(0, 1)
        batches = batches_forever(loader)
        for _ in range(warmup):
            next(batches)
        start, cpu_start, images = time.perf_counter(), time.thread_time(), 0
        for _ in range(iters):
            images += len(next(batches)["images"])
        by_workers[workers] = images / (time.perf_counter() - start)
        main_cpu_ms[workers] = (time.thread_time() - cpu_start) / iters * 1e3
        del batches, loader
    best = max(by_workers, key=by_workers.get)
    seconds = cfg.data.batch_size * iters / by_workers[best]
    return _summary("loader", cfg, cfg.data.batch_size * iters, seconds, iters, workers=best,
                    by_workers={str(k): round(v, 2) for k, v in by_workers.items()},
                    main_cpu_ms_by_workers={str(k): round(v, 3) for k, v in main_cpu_ms.items()})


def process_tree_pss_bytes() -> int | None:
    """Proportional set size of this process and its children (shared pages split between the
    processes that map them, so a shared cache counts once), from ``/proc``; None elsewhere."""
    me = os.getpid()
    total = 0
    try:
        pids = [me] + [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == me]
        for pid in pids:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    except OSError:
        return None
    return total


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):  # the process ended meanwhile
        return None


def time_loader_epochs(cfg: DictConfig, epochs: int) -> dict[str, Any]:
    """The training loader over ``epochs`` whole epochs from a cold start (``data.num_workers``).

    Returns:
        the summary of the epochs after the first (images/s), with ``s_per_epoch`` (each epoch's
        seconds) and ``pss_gb`` (:func:`process_tree_pss_bytes` after each epoch, in GiB).
    """
    if epochs < 2:
        raise ValueError(f"--mode epochs times the epochs after the first: give --epochs 2 or more, got {epochs}")
    loader = build_datamodule(cfg.data).build_train_loader(0, 1)
    batches = batches_forever(loader)
    seconds, pss = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(len(loader)):
            next(batches)
        seconds.append(round(time.perf_counter() - start, 3))
        size = process_tree_pss_bytes()
        pss.append(None if size is None else round(size / 2**30, 3))
    iters = len(loader) * (epochs - 1)
    del batches, loader
    return _summary("epochs", cfg, cfg.data.batch_size * iters, sum(seconds[1:]), iters, s_per_epoch=seconds, pss_gb=pss)


# Lightning's precision names -> (autocast dtype, dtype of the weights and inputs); the aliases
# Lightning accepts ("16", "bf16", "32", "64") as Lightning maps them
_PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
    "32-true": (None, torch.float32), "64-true": (None, torch.float64),
    "16-mixed": (torch.float16, torch.float32), "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-true": (None, torch.float16), "bf16-true": (None, torch.bfloat16),
}
_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _precision(cfg: DictConfig) -> str:
    """``trainer.precision`` as the fit's trainer gets it (``auto`` resolved), as a string."""
    return str(resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator))


def _step_dtypes(precision: str) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, weight and input dtype) of a Lightning precision, for the bare step."""
    name = _ALIASES.get(precision, precision)
    if name not in _PRECISIONS:
        raise ValueError(f"the benchmark step cannot time precision {precision!r}: use one of "
                         f"{sorted([*_PRECISIONS, *_ALIASES])}")
    return _PRECISIONS[name]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _device(cfg: DictConfig) -> torch.device:
    return torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")


def _time_calls(call: Callable[[], Any], times: int, device: torch.device) -> float:
    """Seconds taken by ``times`` calls of ``call``, with the device synchronised at both ends."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(times):
        call()
    _synchronize(device)
    return time.perf_counter() - start


def time_step(cfg: DictConfig, iters: int, warmup: int) -> dict[str, Any]:
    """Images/s of the bare training step on one batch of the training loader, already on the device
    and normalised there, with cuDNN's algorithm search (``torch.backends.cudnn.benchmark``) set
    as ``trainer.benchmark`` sets it for the fit; ``host_cpu_s_per_iter`` is the main thread's CPU time per step
    (``time.thread_time``) and ``host_busy`` its share of the wall time: near 1, launching the
    step's work keeps the host as busy as the device (or a synchronisation spins)."""
    device = _device(cfg)
    # the precision as Lightning applies it: autocast (*-mixed), or weights and inputs cast (*-true)
    autocast_dtype, dtype = _step_dtypes(_precision(cfg))
    if cfg.trainer.get("benchmark") is not None:  # cuDNN's algorithm search, as the fit's Trainer sets it
        torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    datamodule = build_datamodule(cfg.data)
    batch = next(iter(datamodule.build_train_loader(0, 1)))
    batch = datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)
    images, targets = batch["images"].to(dtype), batch["targets"]
    model = build_model(cfg, datamodule.num_classes).to(device=device, dtype=dtype).train()
    optimizer = build_optimizer(model, **SolverSettings.from_mapping(cfg.solver).optimizer_kwargs())
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def step() -> None:
        with _autocast(device, autocast_dtype):
            outputs = model(images)
        loss = sum(model.losses(outputs, targets).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    cpu_start = time.thread_time()
    seconds = _time_calls(step, iters, device)
    cpu = time.thread_time() - cpu_start
    return _summary("step", cfg, len(targets) * iters, seconds, iters, host_cpu_s_per_iter=round(cpu / iters, 5),
                    host_busy=round(cpu / seconds, 3), cudnn_benchmark=torch.backends.cudnn.benchmark)


def _model_with_gradients(cfg: DictConfig, device: torch.device, num_classes: int) -> torch.nn.Module:
    """The config's model on ``device`` in training mode, each trainable parameter's gradient set
    to 1e-3 (what an optimizer step needs, without a forward pass)."""
    model = build_model(cfg, num_classes=num_classes).to(device).train()
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3) if param.requires_grad else None
    return model


def time_optimizer(cfg: DictConfig, iters: int, warmup: int, rounds: int = 6) -> dict[str, Any]:
    """Milliseconds per ``optimizer.step`` over the model's parameters (gradients set once),
    fused and per-tensor, alternating ``rounds`` times ``iters`` steps; medians of the rounds."""
    device = _device(cfg)
    model = _model_with_gradients(cfg, device, num_classes=100)
    kwargs = SolverSettings.from_mapping(cfg.solver).optimizer_kwargs()
    optimizers = {fused: build_optimizer(model, **{**kwargs, "fused": fused}) for fused in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    for _ in range(rounds):
        for fused, optimizer in optimizers.items():
            times[fused].append(_time_calls(optimizer.step, iters, device) / iters * 1e3)
    median = {fused: statistics.median(values) for fused, values in times.items()}
    return {
        "mode": "optimizer", "optimizer": kwargs["name"], "ms_per_step_loop": round(median[False], 3),
        "ms_per_step_fused": round(median[True], 3), "fused_speedup": round(median[False] / median[True], 2),
        "fused": bool(optimizers[True].defaults["fused"]), "iters": iters, "rounds": rounds, "device": device.type,
        "model": cfg.model.get("depth"),
    }


def time_checkpoint(cfg: DictConfig, iters: int, output_dir: str | Path) -> dict[str, Any]:
    """Seconds the training thread spends per checkpoint of the model with its optimizer state
    (one optimizer step taken): the synchronous atomic write (``async_checkpoints=false``) against
    the snapshot and hand-over of :class:`AsyncAtomicCheckpointIO`, alternating ``iters`` times;
    medians. The background writes are waited for outside the timing, and the files deleted."""
    device = _device(cfg)
    model = _model_with_gradients(cfg, device, num_classes=751)
    optimizer = build_optimizer(model, **SolverSettings.from_mapping(cfg.solver).optimizer_kwargs())
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}
    path = Path(output_dir) / "checkpoint_benchmark.ckpt"
    sync_io, async_io = AtomicCheckpointIO(), AsyncAtomicCheckpointIO()
    times: dict[str, list[float]] = {"sync": [], "async": []}
    try:
        for _ in range(iters):
            for name, io in (("sync", sync_io), ("async", async_io)):
                times[name].append(_time_calls(lambda io=io: io.save_checkpoint(checkpoint, path), 1, device))
                async_io.wait()
    finally:
        async_io.teardown()
        path.unlink(missing_ok=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "mode": "checkpoint", "mb": round(_tensor_megabytes(checkpoint), 1), "s_sync": round(median["sync"], 4),
        "s_async": round(median["async"], 4), "speedup": round(median["sync"] / median["async"], 1), "iters": iters,
        "device": device.type, "model": cfg.model.get("depth"),
    }


def _tensor_megabytes(checkpoint: dict[str, Any]) -> float:
    """The tensors' bytes in ``checkpoint``, in MiB."""
    sizes: list[int] = []
    apply_to_collection(checkpoint, torch.Tensor, lambda tensor: sizes.append(tensor.numel() * tensor.element_size()))
    return sum(sizes) / 2**20


class _FitClock(HookBase):
    """Wall time from the ``after_step`` of iteration ``start`` to that of iteration ``end``
    (synchronising CUDA at both); registered after every other hook. ``gaps`` holds the host's
    time between consecutive ``after_step`` calls in that window, unsynchronised: in a steady
    state they follow the device, and a stall (an epoch start, a slow batch) shows as a long one.
    ``cpu_gaps`` holds the main thread's CPU time over the same intervals (``time.thread_time``):
    close to the gaps, the host is busy the whole step (a CUDA synchronisation that spins counts
    as busy); well below them, it waits (for a batch, for the GIL). ``syncs`` records torch's
    synchronising CUDA calls over the window."""

    def __init__(self, start: int, end: int, syncs: CudaSyncRecorder | None = None) -> None:
        self.start, self.end = start, end
        self.t0 = self.t1 = math.nan
        self.gaps: list[float] = []
        self.cpu_gaps: list[float] = []
        self.syncs = syncs
        self._last = self._last_cpu = math.nan

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if not self.start <= iteration <= self.end:
            return
        if iteration in (self.start, self.end):
            if iteration == self.end and self.syncs is not None:
                self.syncs.stop()
            _synchronize(self.trainer.pl_module.device)
        now, now_cpu = time.perf_counter(), time.thread_time()
        if iteration == self.start:
            self.t0 = now
            if self.syncs is not None:
                self.syncs.start()
        else:
            self.gaps.append(now - self._last)
            self.cpu_gaps.append(now_cpu - self._last_cpu)
        if iteration == self.end:
            self.t1 = now
        self._last, self._last_cpu = now, now_cpu

    def after_train(self) -> None:
        if self.syncs is not None:  # a fit that ended before the window did
            self.syncs.stop()

    def gap_summary(self) -> dict[str, Any]:
        """Median and largest gap, the time spent beyond twice the median in the gaps longer than
        that, the main thread's median CPU time per step and its share of the median gap
        (``host_busy``), and with a sync recorder the synchronising calls per step and their sites."""
        if not self.gaps:
            return {}
        median, cpu_median = statistics.median(self.gaps), statistics.median(self.cpu_gaps)
        summary: dict[str, Any] = {
            "gap_median_s": round(median, 5), "gap_max_s": round(max(self.gaps), 5),
            "stall_s": round(sum(gap - 2 * median for gap in self.gaps if gap > 2 * median), 4),
            "host_cpu_median_s": round(cpu_median, 5), "host_busy": round(cpu_median / median, 3) if median > 0 else None,
        }
        if self.syncs is not None:
            count = self.syncs.count
            summary["syncs_per_step"] = None if count is None else round(count / len(self.gaps), 3)
            summary["sync_sites"] = self.syncs.sites()
        return summary


def time_fit(cfg: DictConfig, iters: int, warmup: int, last_checkpoint: bool = False, sync_debug: bool = False) -> dict[str, Any]:
    """Images/s of ``trainer.fit`` for ``warmup + iters`` steps, the last ``iters`` timed.

    The trainer is built as ``scripts/train.py`` builds it, with the config's hooks and progress
    bar and without validation, checkpoints or loggers; with ``last_checkpoint``, it writes
    ``last.ckpt`` under ``cfg.paths.output_dir`` at the end of every epoch, as ``train.py`` does
    (``async_checkpoints`` chooses the writer). Epoch boundaries fall inside the timed window when
    an epoch is shorter than it (the demo set: 1,180 images). With ``sync_debug``, torch's
    synchronising CUDA calls in the timed window are counted by site (:class:`CudaSyncRecorder`;
    ``syncs_per_step`` is None off CUDA); their warnings slow the steps they flag.
    """
    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    module = ReIDModule(model, solver=cfg.solver, cfg=None)
    syncs = CudaSyncRecorder(_device(cfg)) if sync_debug else None
    clock = _FitClock(start=max(0, warmup - 1), end=max(0, warmup - 1) + iters, syncs=syncs)
    # the bar draws on stderr: stdout holds only the script's JSON lines (`| jq`, `> results.jsonl`)
    callbacks = [IntervalRichProgressBar(console_kwargs={"stderr": True}), *build_hooks(cfg.get("hooks")), clock]
    if last_checkpoint:  # the config's own last.ckpt callback, under cfg.paths.output_dir
        callbacks.append(instantiate(cfg.callbacks.last_checkpoint))
    with open_dict(cfg):
        cfg.trainer.max_steps = clock.end + 1
        cfg.trainer.max_epochs = 1_000_000
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_checkpointing = last_checkpoint
        cfg.trainer.enable_model_summary = False
    trainer = build_trainer(cfg, callbacks, loggers=[])
    trainer.fit(module, datamodule=datamodule)
    seconds = clock.t1 - clock.t0
    return _summary("fit", cfg, cfg.data.batch_size * iters, seconds, iters, workers=cfg.data.num_workers,
                    epochs=trainer.current_epoch, **clock.gap_summary())


def fit_over_step(fit: dict[str, Any], *steps: dict[str, Any]) -> dict[str, Any]:
    """``fit`` with ``fit_over_step``: its images/s over the bare step's (the mean of ``steps``,
    e.g. timed before and after the fit), and ``step_images_per_s`` (each of ``steps``)."""
    step_rates = [step["images_per_s"] for step in steps]
    mean = sum(step_rates) / len(step_rates)
    return {**fit, "fit_over_step": round(fit["images_per_s"] / mean, 4), "step_images_per_s": step_rates}


def seed(value: int = 0) -> None:
    """Seed every generator (the identity sampler draws from the config's own seed)."""
    pl.seed_everything(value, workers=True, verbose=False)

