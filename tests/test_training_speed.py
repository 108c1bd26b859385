"""The training-speed switches: unread losses in the hook storage, the on-device finite check, the
progress bar's metric interval, channels-last and compile with its fallback."""
from __future__ import annotations

import json
import logging
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train, run_script
from hooks_support import TinyModule, make_trainer
from omegaconf import open_dict
from pytorch_lightning.callbacks import RichProgressBar

from reid_lightning.cli import fit_variants
from reid_lightning.cli import train_benchmark as bench
from reid_lightning.cli.fit_variants import main_thread_parts
from reid_lightning.cli.train import (
    build_datamodule,
    build_model,
    build_trainer,
    instantiate_group,
    resolve_precision,
)
from reid_lightning.engine.finite_check import NonFiniteLossWatch
from reid_lightning.engine.hooks import HookBase, PeriodicWriter, build_hooks
from reid_lightning.engine.hooks.events import EventStorage
from reid_lightning.engine.model_speed import (
    compile_with_fallback,
    resolve_channels_last,
    resolve_compile,
)
from reid_lightning.engine.module import ReIDModule
from reid_lightning.engine.progress import IntervalRichProgressBar


def test_storage_keeps_tensors_unread_until_a_reader_asks(monkeypatch) -> None:
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a put tensor was read with .item()"))
    with EventStorage() as storage:
        for i in range(5):
            storage.iter = i
            storage.put_scalars(loss=torch.tensor(float(i)), acc=torch.tensor([0.5 * i]))
            storage.put_scalar("lr", 0.1)
        assert reads == []
        pending = storage._history["loss"].pending()
        assert [itr for _, itr in pending] == [0, 1, 2, 3, 4] and all(torch.is_tensor(t) for t, _ in pending)
        assert storage.latest_iterations() == {"loss": 4, "acc": 4, "lr": 4}
        assert len(storage._history["loss"]) == 5
        # the first read converts every pending value of the storage with one copy
        assert storage.history("loss").values() == [(float(i), i) for i in range(5)]
        assert reads == [(10,)]
        assert storage.history("acc").latest() == 2.0 and storage.history("acc").global_avg() == 1.0
        assert storage.latest() == {"loss": (4.0, 4), "acc": (2.0, 4), "lr": (0.1, 4)}
        assert storage.latest_with_smoothing_hint(3)["loss"] == (3.0, 4)
        with pytest.raises(ValueError, match=r"one-element tensors, got shape \(2,\)"):
            storage.history("loss").update(torch.zeros(2))


class PendingLosses(HookBase):
    """Records how many ``total_loss`` values the storage holds unread at each ``after_step``."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def after_step(self) -> None:
        self.pending.append(len(self.trainer.storage._history["total_loss"].pending()))


def test_the_hooks_leave_step_losses_on_the_device_until_the_writer_reads_them(tmp_path: Path) -> None:
    probe = PendingLosses()
    writer = PeriodicWriter(period=4)
    module = TinyModule(batches=6)
    make_trainer(tmp_path, [writer, probe], max_epochs=1).fit(module)
    # the writer reads at iterations 3 (period) and 5 (last), once every hook is done with the step
    # (after the probe's after_step); the losses between stay tensors
    assert probe.pending == [1, 2, 3, 4, 1, 2]
    assert writer.trainer.storage._history["total_loss"].pending() == []
    values = [value for value, _ in writer.trainer.storage.history("total_loss").values()]
    assert values == pytest.approx(module.batch_losses)


def test_the_finite_watch_names_the_first_non_finite_iteration_when_read() -> None:
    watch = NonFiniteLossWatch()
    finite = {"loss_cls": torch.tensor(1.0), "loss_triplet": torch.tensor(0.5)}
    watch.update(0, 0, torch.tensor(1.5), finite)
    watch.check()
    nan = {"loss_cls": torch.tensor(float("nan")), "loss_triplet": torch.tensor(0.25)}
    watch.update(7, 1, torch.tensor(float("nan")), nan)
    watch.update(8, 1, torch.tensor(float("inf")), {"loss_cls": torch.tensor(float("inf")), "loss_triplet": torch.tensor(0.0)})
    with pytest.raises(FloatingPointError, match=r"at iteration 7 \(epoch 1\): loss_cls=nan, loss_triplet=0.25$"):
        watch.check()
    with pytest.raises(FloatingPointError, match=r"at iteration 7 "):  # and at every later check
        watch.check()


def test_the_finite_watch_launches_nothing_per_step_and_reads_when_too_many_steps_wait(monkeypatch) -> None:
    monkeypatch.setattr("reid_lightning.engine.finite_check.MAX_PENDING", 3)
    watch = NonFiniteLossWatch()
    two, nan = torch.tensor(2.0), torch.tensor(float("nan"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        watch.update(0, 0, two, {"loss_cls": two})
        watch.update(1, 0, nan, {"loss_cls": nan})
    assert {event.name for event in prof.events()} <= {"aten::detach", "detach"}
    watch.update(2, 0, torch.tensor(1.0), {"loss_cls": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match=r"at iteration 1 \(epoch 0\): loss_cls=nan$"):
        watch.update(3, 0, torch.tensor(1.0), {"loss_cls": torch.tensor(1.0)})


def test_the_progress_bar_reads_metrics_every_n_steps(tmp_path: Path, monkeypatch) -> None:
    reads = []
    real = RichProgressBar._update_metrics
    monkeypatch.setattr(RichProgressBar, "_update_metrics", lambda self, t, m: reads.append(t.global_step) or real(self, t, m))
    bar = IntervalRichProgressBar(metrics_every_n_steps=3)
    make_trainer(tmp_path, [bar], max_epochs=1, enable_progress_bar=True).fit(TinyModule(batches=7))
    train_reads = [step for step in reads if step in (3, 6)]
    assert train_reads == [3, 6]
    assert not any(step in (1, 2, 4, 5, 7) for step in reads[:-1])
    with pytest.raises(ValueError, match="metrics_every_n_steps must be >= 1"):
        IntervalRichProgressBar(metrics_every_n_steps=0)


def test_the_progress_bar_reads_on_the_global_steps_the_module_logs(tmp_path: Path, monkeypatch) -> None:
    """Epochs of 5 batches, every 3rd step: global steps 3, 6, 9, as Lightning writes the logs
    (and ``ReIDModule`` calls ``self.log``), not the 3rd batch of each epoch."""
    reads = []
    real = RichProgressBar._update_metrics
    monkeypatch.setattr(RichProgressBar, "_update_metrics", lambda self, t, m: reads.append(t.global_step) or real(self, t, m))
    bar = IntervalRichProgressBar(metrics_every_n_steps=3)
    make_trainer(tmp_path, [bar], max_epochs=2, enable_progress_bar=True).fit(TinyModule(batches=5))
    assert [step for step in reads if step not in (5, 10)] == [3, 6, 9]


class _LoggingTiny(TinyModule):
    """TinyModule logging its total loss as ReIDModule does: without ``prog_bar``."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        out = super().training_step(batch, batch_idx)
        self.log("train/total_loss", out["loss"], batch_size=self.batch_size)
        return out


def test_the_progress_bar_shows_the_loss_logged_without_prog_bar(tmp_path: Path) -> None:
    bar = IntervalRichProgressBar(metrics_every_n_steps=2, show=["train/total_loss", "train/never_logged"])
    module = _LoggingTiny(batches=4)
    trainer = make_trainer(tmp_path, [bar], max_epochs=1, enable_progress_bar=True)
    trainer.fit(module)
    assert trainer.progress_bar_metrics == {}  # nothing for Lightning to read after each batch
    shown = bar.get_metrics(trainer, module)
    assert shown["train/total_loss"] == pytest.approx(module.batch_losses[-1]) and "train/never_logged" not in shown


TINY_MODEL = ["model=bot_r18", "model.pretrained=none"]


def _train_once(model: torch.nn.Module) -> torch.Tensor:
    model.train()
    images = torch.randn(4, 3, 32, 16)
    loss = sum(model.losses(model(images), torch.tensor([0, 0, 1, 1])).values())
    loss.backward()
    model.eval()
    with torch.no_grad():
        return model(images)


def test_channels_last_and_compile_switches_compose_and_run(tmp_path: Path) -> None:
    eager_backend = ["~compile_kwargs.mode", "+compile_kwargs.backend=eager"]
    cfg = compose_train([*TINY_MODEL, "channels_last=true", "compile=true", *eager_backend], tmp_path)
    model = build_model(cfg, num_classes=2)
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.backbone._compiled_call_impl is not None
    assert torch.isfinite(_train_once(model)).all()
    assert set(model.state_dict()) == set(build_model(compose_train(TINY_MODEL, tmp_path), 2).state_dict())
    # auto: on only when a GPU trains
    assert resolve_channels_last("auto", "cpu") is False
    assert resolve_channels_last("auto", "gpu") is torch.cuda.is_available()
    with pytest.raises(ValueError, match="channels_last must be true, false or auto, got 'yes'"):
        resolve_channels_last("yes", "cpu")


@pytest.mark.parametrize("kwargs", [[], ["~compile_kwargs.mode"]], ids=["config_default", "empty"])
def test_compile_with_the_default_or_empty_kwargs_builds(tmp_path: Path, kwargs: list[str]) -> None:
    """``compile=true`` with conf/train.yaml's ``compile_kwargs`` (mode reduce-overhead), and with
    none (an empty mapping: torch.compile's defaults)."""
    cfg = compose_train([*TINY_MODEL, "compile=true", *kwargs], tmp_path)
    assert dict(cfg.compile_kwargs) == ({} if kwargs else {"mode": "reduce-overhead"})
    model = build_model(cfg, num_classes=2)
    assert model.backbone._compiled_call_impl is not None


def test_compile_auto_is_off_on_the_cpu(tmp_path: Path) -> None:
    """conf/train.yaml's ``compile: auto`` leaves a CPU run's backbone eager."""
    cfg = compose_train([*TINY_MODEL, "trainer=cpu"], tmp_path)
    assert cfg.compile == "auto"
    assert build_model(cfg, num_classes=2).backbone._compiled_call_impl is None


@pytest.mark.parametrize(
    ("trainer", "gpus", "expected"),
    [
        ({"accelerator": "gpu", "devices": 1}, 4, True),
        ({"accelerator": "auto", "devices": "auto"}, 1, True),
        ({"accelerator": "cuda", "devices": [2]}, 4, True),
        ({"accelerator": "gpu", "devices": "0,"}, 4, True),
        ({"accelerator": "gpu", "devices": "1"}, 4, True),
        ({"accelerator": "gpu", "devices": 2}, 4, False),
        ({"accelerator": "gpu", "devices": -1}, 4, False),
        ({"accelerator": "auto", "devices": "auto"}, 2, False),
        ({"accelerator": "gpu", "devices": "0,1"}, 4, False),
        ({"accelerator": "gpu", "devices": 1, "num_nodes": 2}, 4, False),
        ({"accelerator": "cpu", "devices": 1}, 4, False),
        ({"accelerator": "gpu", "devices": 1}, 0, False),
    ],
)
def test_compile_auto_means_one_cuda_gpu_in_one_process(monkeypatch, trainer, gpus, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_compile("auto", trainer) is expected
    assert resolve_compile(True, trainer) is True and resolve_compile(False, trainer) is False


@pytest.mark.parametrize(("major", "expected"), [(7, "16-mixed"), (8, "bf16-mixed"), (9, "bf16-mixed")])
def test_precision_auto_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, major, expected) -> None:
    # a V100 (7.0) or T4 (7.5) runs bfloat16 only emulated, which torch.cuda.is_bf16_supported()
    # counts by default: precision auto chose bf16-mixed there, far slower than 16-mixed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulated
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", "gpu") == expected
    assert resolve_precision("auto", "cpu") == 32 and resolve_precision("16-mixed", "gpu") == "16-mixed"


def test_compile_refuses_another_value() -> None:
    with pytest.raises(ValueError, match="compile must be true, false or auto, got 'yes'"):
        resolve_compile("yes", {"accelerator": "gpu"})


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("no compiler here")


def _seeded_output(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return _train_once(model)


def test_compile_falls_back_to_eager_with_a_message(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    eager = _seeded_output(build_model(compose_train(TINY_MODEL, tmp_path), num_classes=2))

    no_backend = ["~compile_kwargs.mode", "+compile_kwargs.backend=no_such_backend"]
    cfg = compose_train([*TINY_MODEL, "compile=true", *no_backend], tmp_path)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="reid_lightning.engine.model_speed"):
        model = build_model(cfg, num_classes=2)
    assert "torch.compile of the backbone failed, so it runs without compile" in caplog.text
    assert "no_such_backend" in caplog.text and model.backbone._compiled_call_impl is None
    assert torch.equal(_seeded_output(model), eager)

    # the compiler fails at the first call: that call and the later ones run eagerly
    caplog.clear()
    torch.manual_seed(0)
    model = build_model(compose_train(TINY_MODEL, tmp_path), num_classes=2)
    assert compile_with_fallback(model.backbone, "backbone", backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="reid_lightning.engine.model_speed"):
        fallen_back = _seeded_output(model)
    assert "torch.compile of the backbone failed" in caplog.text and "no compiler here" in caplog.text
    assert model.backbone._compiled_call_impl is None
    assert torch.equal(fallen_back, eager)


# a demo set of 8 identities x 4 images for the benchmark scripts
SMALL_DEMO = [f"++data.dataset_kwargs.{key}={value}"
              for key, value in {"num_ids": 8, "images_per_id": 4, "num_distractors": 0, "num_junk": 2}.items()]


def _json_lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_benchmark_train_prints_one_json_line_per_mode(tmp_path: Path) -> None:
    proc = run_script(
        "benchmark_train.py",
        ["--mode", "all", "--model", "bot_r18", "--height", "32", "--width", "16", "--batch", "8", "--iters", "3",
         "--warmup", "1", "--workers", "0,1", "--data-dir", str(tmp_path / "data"),
         "--output-dir", str(tmp_path / "out"), "--channels-last", *SMALL_DEMO],
        cwd=tmp_path,
    )
    lines = _json_lines(proc)
    assert [line["mode"] for line in lines] == ["loader", "step", "fit"]
    for line in lines:
        assert {"images_per_s", "iters", "device", "precision"} <= set(line) and line["images_per_s"] > 0
        assert (line["iters"], line["device"], line["precision"], line["channels_last"]) == (3, "cpu", "32", True)
    assert set(lines[0]["by_workers"]) == {"0", "1"} == set(lines[0]["main_cpu_ms_by_workers"])
    assert all(ms > 0 for ms in lines[0]["main_cpu_ms_by_workers"].values())
    fit = lines[2]
    step_rates = fit["step_images_per_s"]
    assert len(step_rates) == 2 and step_rates[0] == lines[1]["images_per_s"]
    assert fit["fit_over_step"] == pytest.approx(2 * fit["images_per_s"] / sum(step_rates), rel=1e-3)
    # 2 batches of 8 per epoch (16 training images): the timed steps cross epoch boundaries
    assert fit["epochs"] >= 1
    # 3 gaps between the 4 after_step calls of the window; their sum is the timed window
    assert 0 < fit["gap_median_s"] <= fit["gap_max_s"] <= 3 * fit["s_per_iter"] + 1e-4
    assert 0 <= fit["stall_s"] < 3 * fit["s_per_iter"]
    # on the CPU the main thread computes the steps itself: busy most of each step
    for line in (lines[1], fit):
        assert 0.3 < line["host_busy"] <= 1.2
    assert 0 < lines[1]["host_cpu_s_per_iter"] and 0 < fit["host_cpu_median_s"]
    assert "syncs_per_step" not in fit  # only with --sync-debug
    assert lines[1]["cudnn_benchmark"] is True  # trainer=default sets benchmark: true, for the fit and the step


@pytest.mark.slow
def test_benchmark_train_optimizer_mode_times_fused_and_loop(tmp_path: Path) -> None:
    proc = run_script(
        "benchmark_train.py",
        ["--mode", "optimizer", "--model", "bot_r18", "--iters", "2", "--warmup", "1", "--data-dir", str(tmp_path / "data"),
         "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
    )
    (line,) = _json_lines(proc)
    assert line["mode"] == "optimizer" and line["fused"] is True and line["optimizer"] == "Adam"
    assert line["ms_per_step_loop"] > 0 and line["ms_per_step_fused"] > 0
    assert line["fused_speedup"] == pytest.approx(line["ms_per_step_loop"] / line["ms_per_step_fused"], rel=0.02)


@pytest.mark.slow
def test_benchmark_train_checkpoint_mode_times_both_writers_and_leaves_no_file(tmp_path: Path) -> None:
    proc = run_script(
        "benchmark_train.py",
        ["--mode", "checkpoint", "--model", "bot_r18", "--iters", "2", "--data-dir", str(tmp_path / "data"),
         "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
    )
    (line,) = _json_lines(proc)
    assert line["mode"] == "checkpoint" and line["iters"] == 2 and line["s_sync"] > 0 and line["s_async"] > 0
    # ResNet-18 BoT with 751 classes, weights plus Adam's two moments: about 3 x 45 MB
    assert 100 < line["mb"] < 200
    assert line["speedup"] == pytest.approx(line["s_sync"] / line["s_async"], rel=0.1)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_benchmark_train_epochs_mode_times_each_epoch_and_the_memory(tmp_path: Path) -> None:
    proc = run_script(
        "benchmark_train.py",
        ["--mode", "epochs", "--epochs", "3", "--model", "bot_r18", "--height", "32", "--width", "16", "--batch", "8",
         "--workers", "2", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), *SMALL_DEMO,
         "data.cache_images=true"],
        cwd=tmp_path,
    )
    (line,) = _json_lines(proc)
    assert line["mode"] == "epochs" and len(line["s_per_epoch"]) == len(line["pss_gb"]) == 3
    # 2 batches of 8 per epoch: the two epochs after the first
    assert line["iters"] == 4 and line["images_per_s"] == pytest.approx(32 / sum(line["s_per_epoch"][1:]), rel=0.01)
    assert all(0 < size < 64 for size in line["pss_gb"])
    bad = run_script("benchmark_train.py", ["--mode", "epochs", "--epochs", "1"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "give --epochs 2 or more, got 1" in bad.stderr


def test_process_tree_pss_counts_a_shared_mapping_once() -> None:
    import multiprocessing

    from reid_lightning.cli.train_benchmark import process_tree_pss_bytes
    from reid_lightning.data.image_cache import SharedImageCache

    cache = SharedImageCache(512, (3, 256, 128))  # 48 MiB
    for index in range(512):
        cache.put(index, torch.full((3, 256, 128), index % 256, dtype=torch.uint8))
    before = process_tree_pss_bytes()
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    child = context.Process(target=_read_all_and_wait, args=(cache, ready, done))
    child.start()
    try:
        assert ready.wait(30)
        during = process_tree_pss_bytes()
    finally:
        done.set()
        child.join(30)
        child.kill()
    # the child reads all 48 MiB too: what it adds is its own few pages, not a second copy
    assert before > 48 * 2**20 and during - before < 24 * 2**20


def _read_all_and_wait(cache, ready, done) -> None:
    torch.set_num_threads(1)  # as a loader worker: a forked child must not enter the parent's OpenMP pool
    total = sum(int(cache.get(index).sum(dtype=torch.int64)) for index in range(cache.count))
    assert total == 3 * 256 * 128 * sum(index % 256 for index in range(cache.count))
    ready.set()
    done.wait(30)


def _fit_variant_lines(tmp_path: Path, variants: str, iters: int, workers: int) -> list[dict]:
    """The JSON lines of ``benchmark_fit_variants.py`` for ``variants`` on a tiny BoT R18 and the small demo set."""
    proc = run_script(
        "benchmark_fit_variants.py",
        ["--model", "bot_r18", "--height", "32", "--width", "16", "--batch", "8", "--iters", str(iters), "--warmup",
         "1", "--workers", str(workers), "--variants", variants, "--data-dir", str(tmp_path / "data"),
         "--output-dir", str(tmp_path / "out"), *SMALL_DEMO],
        cwd=tmp_path,
    )
    return _json_lines(proc)


@pytest.mark.slow
def test_fit_variants_print_one_line_per_variant(tmp_path: Path) -> None:
    lines = _fit_variant_lines(tmp_path, "default,from_memory_no_hooks_no_log", iters=2, workers=1)
    assert [line["variant"] for line in lines] == ["step", "default", "from_memory_no_hooks_no_log", "step_after"]
    for fit in lines[1:3]:
        assert fit["mode"] == "fit" and fit["images_per_s"] > 0
        assert fit["fit_over_step"] == pytest.approx(fit["images_per_s"] / lines[0]["images_per_s"], rel=1e-3)
    bad = run_script("benchmark_fit_variants.py", ["--variants", "default,no_such"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "unknown variants ['no_such']" in bad.stderr


@pytest.mark.slow
def test_fit_variants_with_a_last_checkpoint_write_it_each_way(tmp_path: Path) -> None:
    lines = _fit_variant_lines(tmp_path, "last_checkpoint_sync,last_checkpoint", iters=3, workers=0)
    assert [line["variant"] for line in lines] == ["step", "last_checkpoint_sync", "last_checkpoint", "step_after"]
    # 2 batches per epoch: the 4 steps end epoch 1, whose last.ckpt the async writer finished at teardown
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_main_thread_parts_attribute_each_sample_to_its_first_matching_part() -> None:
    loop = "thread (1): MainThread;fit (trainer.py:1);_TrainingEpochLoop.advance (training_epoch_loop.py:2)"
    raw = "\n".join([
        f"{loop};step (torch/optim/adam.py:3);training_step (module.py:4);forward (resnet.py:5) 6",
        f"{loop};step (torch/optim/adam.py:3);backward (torch/_tensor.py:6) 3",
        f"{loop};__next__ (pytorch_lightning/loops/fetchers.py:7) 1",
        "thread (2): Thread-1 (_pin_memory_loop);pin_memory (pin_memory.py:8) 50",
        "thread (1): MainThread;setup (trainer.py:9) 40",
    ])
    assert main_thread_parts(raw) == {"forward": 0.6, "backward": 0.3, "waiting for the next batch": 0.1}


# tensor methods that copy a value to the host: on a GPU each one waits for the device
_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class _ReadProbe(HookBase):
    """Counts the main thread's host reads of tensors per training step, with the calling code: a
    read from one ``before_step`` to the next counts for the step it began (Lightning writes a
    logged step's metrics after the callbacks' ``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.step = 0
        self.reads: dict[int, list[str]] = {}

    def before_step(self) -> None:
        self.step = self.trainer.iter

    def record(self, name: str) -> None:
        if threading.current_thread() is threading.main_thread():
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-7:-2]]
            self.reads.setdefault(self.step, []).append(f"{name} <- " + " <- ".join(reversed(frames)))


def test_the_training_steps_read_nothing_to_the_host_between_logged_steps(demo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """train.py's callbacks, hooks and loggers, uint8 batches normalised by the datamodule, one
    loader worker: only the logged steps (every 10, and the last) may copy a tensor to the host."""
    torch.set_num_threads(1)
    cfg = bench.benchmark_config(
        model="bot_r18", height=32, width=16, batch=8, workers=1, data_dir=str(demo_root), output_dir=str(tmp_path),
        overrides=["data.normalize_on_device=true", "trainer.log_every_n_steps=10", "hooks.periodic_writer.period=10"],
    )
    with open_dict(cfg):
        cfg.trainer.update(max_steps=25, limit_val_batches=0, enable_model_summary=False)
    datamodule = build_datamodule(cfg.data)
    module = ReIDModule(build_model(cfg, datamodule.num_classes), solver=cfg.solver, cfg=cfg)
    probe = _ReadProbe()
    callbacks = [*instantiate_group(cfg.callbacks), *build_hooks(cfg.hooks), probe]
    trainer = build_trainer(cfg, callbacks, instantiate_group(cfg.logger))
    assert datamodule.normalizes_on_device() and trainer.num_training_batches != 25  # no epoch end in the 25 steps
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def read(tensor, *args, _real=real, _name=name, **kwargs):
            probe.record(_name)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    trainer.fit(module, datamodule=datamodule)
    monkeypatch.undo()
    assert trainer.global_step == 25
    # step 0 starts the fit (the loader is built); 9 and 19 are logged; 24 ends the fit
    unexpected = {step: sites for step, sites in probe.reads.items() if step not in (0, 9, 19, 24)}
    assert not unexpected, "\n".join(f"step {step}: {site}" for step, sites in unexpected.items() for site in sorted(set(sites)))
    assert probe.reads.get(9) and probe.reads.get(19)  # the probe sees the logged steps' reads


def test_the_old_prog_bar_variant_puts_only_the_training_loss_on_lightnings_bar(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(fit_variants, "ORIGINAL_LOG", lambda self, name, value, *args, **kwargs: calls.append((name, kwargs)))
    patched = fit_variants.variants(workers=2)["loss_on_lightnings_bar"][1]["log"]
    patched(None, "train/total_loss", 1.0, batch_size=8)
    patched(None, "train/loss_cls", 1.0, batch_size=8)
    assert calls == [("train/total_loss", {"batch_size": 8, "prog_bar": True}), ("train/loss_cls", {"batch_size": 8})]


@pytest.mark.slow
def test_benchmark_train_stdout_holds_only_its_json_lines(tmp_path: Path) -> None:
    # `benchmark_train.py ... | jq` or `> results.jsonl`: the fit's progress bar goes to stderr
    proc = run_script(
        "benchmark_train.py",
        ["--mode", "fit", "--model", "bot_r18", "--height", "32", "--width", "16", "--batch", "8", "--iters", "2",
         "--warmup", "1", "--workers", "0", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
         *SMALL_DEMO],
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert [json.loads(line)["mode"] for line in lines] == ["step", "fit"], proc.stdout


def _record_forward_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """(input dtype, weight dtype, autocast on) of every forward of the models ``bench`` builds."""
    seen: list = []
    real = bench.build_model

    def build(cfg, num_classes):
        model = real(cfg, num_classes)
        model.register_forward_pre_hook(lambda module, args: seen.append(
            (args[0].dtype, next(module.parameters()).dtype, torch.is_autocast_enabled("cpu"))))
        return model

    monkeypatch.setattr(bench, "build_model", build)
    return seen


@pytest.mark.parametrize(
    ("precision", "label", "expected"),
    [
        ("bf16-true", "bf16-true", (torch.bfloat16, torch.bfloat16, False)),
        ("bf16", "bf16", (torch.float32, torch.float32, True)),  # Lightning's alias of bf16-mixed
        ("bf16-mixed", "bf16-mixed", (torch.float32, torch.float32, True)),
        ("32-true", "32-true", (torch.float32, torch.float32, False)),
        ("auto", "32", (torch.float32, torch.float32, False)),  # resolve_precision on the CPU
    ],
)
def test_the_benchmark_step_runs_the_precision_it_reports(tmp_path: Path, monkeypatch, precision, label, expected) -> None:
    """``trainer.precision=bf16-true`` (an override) ran the step in float32, labelled bf16-true."""
    seen = _record_forward_dtypes(monkeypatch)
    cfg = bench.benchmark_config(model="bot_r18", height=32, width=16, batch=8, workers=0, data_dir=str(tmp_path / "data"),
                                 output_dir=str(tmp_path / "out"), overrides=[*SMALL_DEMO, f"trainer.precision={precision}"])
    line = bench.time_step(cfg, iters=1, warmup=0)
    assert line["precision"] == label and seen and set(seen) == {expected}


def test_the_benchmark_step_refuses_a_precision_it_cannot_apply(tmp_path: Path) -> None:
    cfg = bench.benchmark_config(model="bot_r18", height=32, width=16, batch=8, workers=0, data_dir=str(tmp_path / "data"),
                                 output_dir=str(tmp_path / "out"), overrides=[*SMALL_DEMO, "trainer.precision=transformer-engine"])
    with pytest.raises(ValueError, match="cannot time precision 'transformer-engine'"):
        bench.time_step(cfg, iters=1, warmup=0)



def _load_script(name: str):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location(f"_{name}", Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["benchmark_train", "benchmark_fit_variants"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iters", "0"], "argument --iters: expected an integer >= 1, got '0'"),
        (["--batch", "-4"], "argument --batch: expected an integer >= 1, got '-4'"),
        (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
        (["--workers", "x"], "argument --workers: expected"),
    ],
)
def test_the_training_benchmarks_name_a_bad_count(script: str, argv: list[str], message: str, capsys) -> None:
    """``--iters 0`` ended in a ZeroDivisionError once the model had run, ``--workers 0,x`` in
    int()'s ValueError."""
    with pytest.raises(SystemExit):
        _load_script(script).parse_args(argv)
    assert message in capsys.readouterr().err


def test_benchmark_train_parses_its_worker_counts(capsys) -> None:
    parse_args = _load_script("benchmark_train").parse_args
    assert parse_args(["--workers", "0,2"]).workers == [0, 2] and parse_args([]).workers == [2]
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0,-1"])
    assert "argument --workers: expected worker counts >= 0 separated by commas, got '0,-1'" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["benchmark_train", "benchmark_fit_variants"])
def test_the_training_benchmarks_find_the_demo_set_under_reid_data(script: str, monkeypatch, tmp_path: Path) -> None:
    """Like paths.data_dir (``${oc.env:REID_DATA,datasets}``); benchmark_fit_variants passed
    ``datasets`` whatever REID_DATA said, and made a second demo set there."""
    monkeypatch.setenv("REID_DATA", str(tmp_path))
    assert _load_script(script).parse_args([]).data_dir == str(tmp_path)
