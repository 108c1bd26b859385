"""The benchmark scripts outside reid_lightning.cli (``scripts/benchmark_hooks.py``,
``scripts/benchmark_ranking.py``, ``scripts/benchmark_inference.py``), imported in-process."""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
from pytorch_lightning.callbacks import Callback

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _SleepyCallback(Callback):
    """A plain callback that spends 2 ms in every ``on_train_batch_end``; its instances share
    Lightning's ``state_key`` (the class name), as benchmark_hooks' plain callbacks do."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.002)


def test_benchmark_hooks_counts_the_time_inside_every_callback_of_a_shared_key() -> None:
    """Ten plain callbacks share one profiler action: its per-batch list holds ten entries per
    step, and keeping only the last ``--steps`` entries counted one callback in ten."""
    hooks = _script("benchmark_hooks")
    args = argparse.Namespace(model="mlp", steps=6, warmup=2, batch_size=4, accelerator="cpu", precision="32-true")
    inside = hooks.time_run(args, [_SleepyCallback() for _ in range(3)], profiled=True)
    assert 3 * 0.002 <= inside < 3 * 0.002 * 3


def test_benchmark_ranking_reports_the_cpu_time_of_the_best_run(monkeypatch) -> None:
    """``cpu s`` is documented as the process CPU time of the best (fastest) run; it was the
    smallest CPU time of any run."""
    ranking = _script("benchmark_ranking")
    runs = iter([(3.0, 1.0, "a"), (1.0, 5.0, "b"), (2.0, 2.0, "c")])  # (wall s, cpu s, result)
    monkeypatch.setattr(ranking, "timed", lambda fn, device: next(runs))
    rows: list = []
    ranking.run_phase("phase", lambda: None, ranking.torch.device("cpu"), 3, rows)
    (name, best, mean, cpu, _peak), = rows
    assert (name, best, mean, cpu) == ("phase", 1.0, 2.0, 5.0)


@pytest.mark.slow
def test_gpu_bundle_runs_in_a_git_worktree(tmp_path: Path) -> None:
    """In a worktree ``.git`` is a file, not a folder: the script appended to ``.git/info/exclude``
    and, under ``set -e``, stopped there. The exclude file is the one git reads
    (``git rev-parse --git-path info/exclude``, the main repository's)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    main = tmp_path / "main"
    (main / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "gpu_bundle.sh", main / "scripts")
    subprocess.run([*git, "init", "-q", str(main)], check=True)
    subprocess.run([*git, "-C", str(main), "add", "."], check=True)
    subprocess.run([*git, "-C", str(main), "commit", "-qm", "x"], check=True)
    subprocess.run([*git, "-C", str(main), "worktree", "add", "-q", str(tmp_path / "wt")], check=True)
    shared = tmp_path / "shared"
    (shared / "data/cuhk03-np/detected").mkdir(parents=True)
    (shared / "device").mkdir()
    (shared / "device/wheels.sh").write_text('mkdir -p "$1"\n')  # no download here
    proc = subprocess.run(["bash", "scripts/gpu_bundle.sh", str(shared)], cwd=tmp_path / "wt", capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "wt/.dev/cuhk03-np/detected").is_dir()
    excluded = (main / ".git/info/exclude").read_text().splitlines()
    assert "/.whl/" in excluded and "/.dev/" in excluded
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path / "wt", capture_output=True, text=True,
                            check=True)
    assert status.stdout == ""  # .whl and .dev ignored


@pytest.mark.parametrize("text", ["r18", "r18:96", "resnet18:96x48", "r18:96x"])
def test_benchmark_inference_names_a_malformed_model(text: str, capsys) -> None:
    """``--models r18`` failed with "invalid literal for int() with base 10: ''"."""
    inference = _script("benchmark_inference")
    with pytest.raises(SystemExit):
        inference.build_parser().parse_args(["--models", text])
    assert f"expected depth:HxW, e.g. r18:96x48, got {text!r}" in capsys.readouterr().err
    assert inference.build_parser().parse_args(["--models", "R50:256X128"]).models == [(50, (256, 128))]


def test_benchmark_ranking_refuses_more_distractors_than_gallery_items(capsys) -> None:
    """``--case gallery1m --num-gallery 5000`` (980,000 distractors) failed in torch with
    "Trying to create tensor with negative dimension -975000"."""
    with pytest.raises(SystemExit):
        _script("benchmark_ranking").main(["--case", "gallery1m", "--num-gallery", "5000"])
    assert "--num-distractors (980000) must be at most --num-gallery (5000)" in capsys.readouterr().err
