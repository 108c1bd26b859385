"""Time evaluation ranking on synthetic features: dense matrix or bounded-memory chunks.

    python scripts/benchmark_ranking.py                          # Market-1501 size, dense + chunked
    python scripts/benchmark_ranking.py --case msmt17 --mode chunked --check-dense
    python scripts/benchmark_ranking.py --case gallery1m --mode chunked
    python scripts/benchmark_ranking.py --device cuda --repeat 5

Cases: ``market1501`` 3,368 x 15,913, 2048-d, 1,501 ids, 6 cameras; ``msmt17``
11,659 x 82,161, 2048-d, 3,060 ids, 15 cameras; ``gallery1m`` 1,000 x 1,000,000, 256-d,
1,000 ids with 20 gallery images each and 980,000 distractors (pid 0). Features have
identity structure: identity centres plus Gaussian noise (the default noise gives a
BoT-like Rank-1 ~99% / mAP ~87% / mINP ~47% at Market size; ``gallery1m`` uses 1.5);
distractors are noise of the same scale; cameras are uniform. ``--num-query``,
``--noise`` etc. override a case.

Modes: ``dense`` times ``compute_distance`` (the whole matrix) and ``evaluate_rank``;
``chunked`` times ``rank_queries`` (what ReIDMetric runs: distances and ranking per
query chunk within ``--max-chunk-mb``). Each phase runs ``--repeat`` times; the first
run also measures its peak memory above what was allocated before it (CPU: resident set
high-water mark; CUDA: ``torch.cuda.max_memory_allocated``), i.e. beyond the features.
``--check-dense`` also runs the dense path and asserts equal CMC / mAP / mINP. ``cpu s``
is the process CPU time of the best run (all threads): on a machine shared with other
work, ``cpu s / threads`` approximates the wall time the phase would take alone.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reid_lightning.evaluation import compute_distance, evaluate_rank, rank_queries
from reid_lightning.evaluation.ranking import metrics_from_sums, rank_sums

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synthetic_split(
    num_query: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, noise: float, seed: int,
    num_distractors: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Query/gallery features (centre of the pid + noise), pids (1..num_ids; distractors 0)
    and cameras, on the CPU; the last ``num_distractors`` gallery items are noise of the same scale."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen)
    num_real = num_gallery - num_distractors
    q_pids = torch.randint(0, num_ids, (num_query,), generator=gen)
    g_pids = torch.cat([torch.randint(0, num_ids, (num_real,), generator=gen), torch.full((num_distractors,), -1)])
    q_cams = torch.randint(0, num_cams, (num_query,), generator=gen)
    g_cams = torch.randint(0, num_cams, (num_gallery,), generator=gen)
    q_feat = centres[q_pids] + noise * torch.randn(num_query, dim, generator=gen)
    g_feat = torch.randn(num_gallery, dim, generator=gen).mul_(noise)
    g_feat[:num_real] += centres[g_pids[:num_real]]
    g_feat[num_real:] *= (1 + noise**2) ** 0.5 / noise
    return q_feat, g_feat, q_pids + 1, g_pids + 1, q_cams, g_cams


def _status_kib(field: str) -> int | None:
    if not _STATUS.exists():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif _CLEAR_REFS.exists() and _status_kib("VmRSS:") is not None:
            _CLEAR_REFS.write_text("5")  # resets the resident set high-water mark (Linux)
            self.start = _status_kib("VmRSS:") * 1024
        else:  # lifetime maximum: only growth beyond earlier peaks shows
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif _CLEAR_REFS.exists() and _status_kib("VmHWM:") is not None:
            peak = _status_kib("VmHWM:") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = max(0, peak - self.start) / 2**20


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """Wall time and process CPU time (all threads) of ``fn()``, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, result


CASES = {
    "market1501": dict(num_query=3368, num_gallery=15913, dim=2048, num_ids=1501, num_cams=6, num_distractors=0,
                       noise=3.0),
    "msmt17": dict(num_query=11659, num_gallery=82161, dim=2048, num_ids=3060, num_cams=15, num_distractors=0,
                   noise=3.0),
    "gallery1m": dict(num_query=1000, num_gallery=1000000, dim=256, num_ids=1000, num_cams=6, num_distractors=980000,
                      noise=1.5),
}


def summary(result: dict) -> str:
    return (f"Rank-1 {100 * result['cmc'][0]:.2f}  mAP {100 * result['mAP']:.2f}  mINP {100 * result['mINP']:.2f}  "
            f"valid queries {result['num_valid_queries']}")


def run_phase(name: str, fn: Callable[[], object], device: torch.device, repeat: int, rows: list) -> object:
    """Run ``fn`` ``repeat`` times; ``rows`` gets the fastest run's wall and CPU time, the mean wall
    time and the first run's peak memory."""
    times, cpu_times = [], []
    with PeakMemory(device) as mem:
        seconds, cpu_seconds, result = timed(fn, device)
    times.append(seconds)
    cpu_times.append(cpu_seconds)
    for _ in range(repeat - 1):
        seconds, cpu_seconds, result = timed(fn, device)
        times.append(seconds)
        cpu_times.append(cpu_seconds)
    best = min(range(len(times)), key=times.__getitem__)
    rows.append((name, times[best], statistics.mean(times), cpu_times[best], mem.mib))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="market1501")
    for key in CASES["market1501"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=float if key == "noise" else int, default=None,
                            help="per-dimension noise std (centres have std 1)" if key == "noise" else "")
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--mode", choices=("dense", "chunked", "both"), default="both")
    parser.add_argument("--max-chunk-mb", type=float, default=256, help="chunked mode: evaluation.max_chunk_mb")
    parser.add_argument("--check-dense", action="store_true", help="chunked mode: compare with the dense path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="dense evaluate_rank chunk (default: per device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    case = {key: getattr(args, key) if getattr(args, key) is not None else value
            for key, value in CASES[args.case].items()}
    if case["num_distractors"] > case["num_gallery"]:
        parser.error(f"--num-distractors ({case['num_distractors']}) must be at most --num-gallery ({case['num_gallery']})"
                     f" (case {args.case})")

    start = time.perf_counter()
    split = synthetic_split(**case, seed=args.seed)
    q_feat, g_feat, *ids = (t.to(device) for t in split)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.case}: {case['num_query']:,} x {case['num_gallery']:,}, {case['dim']}-d, {case['num_ids']:,} ids, "
          f"{case['num_distractors']:,} distractors, noise {case['noise']}, {args.metric}; device: {name}; "
          f"features {(q_feat.numel() + g_feat.numel()) * 4 / 2**20:,.0f} MiB (made in {time.perf_counter() - start:.1f} s)")

    rows: list = []
    results = {}
    if args.mode in ("chunked", "both"):
        def chunked() -> dict:
            per_query = rank_queries(q_feat, g_feat, *ids, metric=args.metric, max_chunk_mb=args.max_chunk_mb)
            max_rank = min(50, case["num_gallery"])
            return metrics_from_sums(rank_sums(per_query, max_rank), max_rank)

        results["chunked"] = run_phase(f"chunked ({args.max_chunk_mb:g} MiB)", chunked, device, args.repeat, rows)
    if args.mode in ("dense", "both") or args.check_dense:
        distmat = run_phase("distance", lambda: compute_distance(q_feat, g_feat, args.metric), device, args.repeat, rows)
        results["dense"] = run_phase(
            "ranking", lambda: evaluate_rank(distmat, *ids, chunk_size=args.chunk_size), device, args.repeat, rows
        )
        del distmat
        rows.append(("dense total", *(a + b for a, b in zip(rows[-2][1:4], rows[-1][1:4])), None))
    for mode, result in results.items():
        print(f"{mode:<8} {summary(result)}")
    if args.check_dense and "chunked" in results:
        dense, chunk = results["dense"], results["chunked"]
        assert dense["num_valid_queries"] == chunk["num_valid_queries"]
        assert abs(dense["mAP"] - chunk["mAP"]) < 1e-12 and abs(dense["mINP"] - chunk["mINP"]) < 1e-12
        assert (dense["cmc"] == chunk["cmc"]).all()
        print("chunked == dense: same valid queries and CMC, mAP/mINP within 1e-12")
    print(f"{'phase':<22}{'best s':>10}{'mean s':>10}{'cpu s':>10}{'peak MiB':>10}")
    for phase, best, mean, cpu, memory in rows:
        peak = "" if memory is None else f"{memory:,.0f}"
        print(f"{phase:<22}{best:>10.3f}{mean:>10.3f}{cpu:>10.1f}{peak:>10}")


if __name__ == "__main__":
    main()
