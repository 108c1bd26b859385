"""Summary of a Hydra multirun: one row per job, its overrides -> Rank-1 / mAP / mINP (and the
mAP of each further test set and of the validation split, when the jobs report them).

Registered as a Hydra callback in ``conf/hydra/default.yaml``::

    callbacks:
      sweep_summary:
        _target_: reid_lightning.launch.sweep_summary.SweepSummary

Hydra calls it after every multirun job (so a sweep that stops at a failed job still
leaves the summary so far) and at the end of the sweep, where the summary is also
printed. It reads each job's ``.hydra/overrides.yaml`` and ``metrics.json`` under the
sweep dir and writes ``summary.md`` (markdown table) and ``summary.csv`` there; a job
without ``metrics.json`` is listed as failed. By hand: ``write_summary(Path(sweep_dir))``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reid_lightning.utils.files import write_atomically

# metrics.json keys shown in summary.md (summary.csv holds every key found), followed by the
# "<test set>/mAP" of each test set and "val/mAP" when jobs report them
TABLE_METRICS = ("Rank-1", "mAP", "mINP")


@dataclass
class JobResult:
    """One job of a sweep: its dir relative to the sweep dir, task overrides and metrics (None: failed)."""

    job: str
    overrides: list[str]
    metrics: dict[str, Any] | None


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """metrics.json as one level: nested blocks become ``block/key`` (``val/mAP``, ``best/epoch``), and
    each block of ``test_sets`` is named by its set alone (``dukemtmc/mAP``, ``best/dukemtmc/mAP``)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix if key == "test_sets" else f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def collect_jobs(sweep_dir: Path) -> list[JobResult]:
    """Every job dir under ``sweep_dir`` (a dir holding ``.hydra/overrides.yaml``), in job order."""
    jobs = []
    for overrides_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        metrics_file = job_dir / "metrics.json"
        metrics = flatten(json.loads(metrics_file.read_text())) if metrics_file.is_file() else None
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        jobs.append(JobResult(job_dir.relative_to(sweep_dir).as_posix(), overrides, metrics))
    return sorted(jobs, key=lambda j: natural_key(j.job))


def split_override(override: str) -> tuple[str, str]:
    """``"solver.base_lr=1e-4"`` -> ``("solver.base_lr", "1e-4")``; ``"~key"`` -> ``("~key", "")``."""
    key, _, value = override.partition("=")
    return key, value


def short_value(value: str) -> str:
    """A sampled float such as ``0.00010134344267417033`` as ``0.0001013`` (others unchanged)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and not value.isdigit() else value


def varying_keys(jobs: list[JobResult]) -> tuple[list[str], list[str]]:
    """Override keys whose value differs between jobs (in first-seen order), and the overrides all jobs share."""
    values: dict[str, set[str | None]] = {}
    for job in jobs:
        for key, _ in map(split_override, job.overrides):
            values.setdefault(key, set())
    for job in jobs:
        given = dict(map(split_override, job.overrides))
        for key in values:
            values[key].add(given.get(key))
    varying = [key for key, seen in values.items() if len(seen) > 1]
    common = [o for o in (jobs[0].overrides if jobs else []) if split_override(o)[0] not in varying]
    return varying, common


def metric_names(jobs: list[JobResult]) -> list[str]:
    """Every metrics.json key of the sweep, in first-seen order."""
    names: dict[str, None] = {}
    for job in jobs:
        names.update(dict.fromkeys(job.metrics or {}))
    return list(names)


def table_metrics(jobs: list[JobResult]) -> list[str]:
    """The columns of summary.md: :data:`TABLE_METRICS`, then each test set's and the validation mAP found."""
    extra = [name for name in metric_names(jobs) if name.endswith("/mAP") and not name.startswith("best/")]
    return [*TABLE_METRICS, *[name for name in extra if name != "val/mAP"], *[name for name in extra if name == "val/mAP"]]


def selection_score(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """What a sweeper optimised (see ``runner.objective``), from flattened metrics: ``(label, value)``."""
    for key, label in (("best/val_mAP", "val mAP (best checkpoint)"), ("val/mAP", "val mAP"), ("mAP", "mAP")):
        if key in metrics:
            return label, metrics[key]
    return None


def format_markdown(sweep_dir: Path, jobs: list[JobResult]) -> str:
    """The summary as markdown: a heading, the shared overrides, the best job by its objective
    (validation mAP when the jobs hold identities out, else test mAP) and the table."""
    varying, common = varying_keys(jobs)
    columns = table_metrics(jobs)
    header = ["job", *varying, *columns, "status"]
    lines = [f"# Sweep summary: {sweep_dir}", ""]
    if common:
        lines += ["Overrides shared by all jobs: " + " ".join(f"`{o}`" for o in common), ""]
    scored = [(selection_score(job.metrics), job) for job in jobs if job.metrics and selection_score(job.metrics)]
    if scored:
        (label, value), best = max(scored, key=lambda pair: pair[0][1])
        lines += [f"Best {label}: {value:.2f} (job {best.job})", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for job in jobs:
        given = dict(map(split_override, job.overrides))
        cells = [job.job, *(short_value(given.get(key, "")) for key in varying)]
        metrics = job.metrics or {}
        cells += [f"{metrics[name]:.2f}" if name in metrics else "-" for name in columns]
        cells.append("ok" if job.metrics is not None else "failed")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(jobs: list[JobResult]) -> str:
    """The summary as CSV: job, all overrides, one column per varying key, every metric, status."""
    varying, _ = varying_keys(jobs)
    names = metric_names(jobs)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", "overrides", *varying, *names, "status"])
    for job in jobs:
        given = dict(map(split_override, job.overrides))
        metrics = job.metrics or {}
        writer.writerow([
            job.job, " ".join(job.overrides), *(given.get(key, "") for key in varying),
            *(metrics.get(name, "") for name in names), "ok" if job.metrics is not None else "failed",
        ])
    return out.getvalue()


def write_summary(sweep_dir: Path) -> str:
    """Write ``summary.md`` and ``summary.csv`` into ``sweep_dir``; returns the markdown."""
    jobs = collect_jobs(sweep_dir)
    markdown = format_markdown(sweep_dir, jobs)
    write_atomically(sweep_dir / "summary.md", markdown)
    write_atomically(sweep_dir / "summary.csv", format_csv(jobs))
    return markdown


class SweepSummary(Callback):
    """Hydra callback writing the sweep summary after each multirun job and printing it at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(write_summary(sweep_dir), flush=True)
