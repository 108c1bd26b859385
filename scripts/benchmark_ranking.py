"""Time the distance matrix and evaluate_rank at Market-1501 scale on synthetic features.

    python scripts/benchmark_ranking.py                      # 3,368 x 15,913, 2048-d, CPU
    python scripts/benchmark_ranking.py --device cuda --repeat 5

Features have identity structure: 1,501 identity centres plus Gaussian noise (the
default noise gives a BoT-like Rank-1 ~99% / mAP ~87% / mINP ~47%), cameras drawn
uniformly from 6. Prints the best and mean wall time of each phase over ``--repeat``
runs after one warm-up run, and each phase's peak memory above what was allocated
before it (CPU: resident set high-water mark; CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reid_lightning.evaluation import compute_distance, evaluate_rank

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synthetic_split(
    num_query: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, noise: float, seed: int
) -> tuple[torch.Tensor, ...]:
    """Query/gallery features (centre of the pid + noise), pids and cameras, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen)
    q_pids = torch.randint(0, num_ids, (num_query,), generator=gen)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    q_cams = torch.randint(0, num_cams, (num_query,), generator=gen)
    g_cams = torch.randint(0, num_cams, (num_gallery,), generator=gen)
    q_feat = centres[q_pids] + noise * torch.randn(num_query, dim, generator=gen)
    g_feat = centres[g_pids] + noise * torch.randn(num_gallery, dim, generator=gen)
    return q_feat, g_feat, q_pids, g_pids, q_cams, g_cams


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


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of ``fn()`` with the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--num-ids", type=int, default=1501)
    parser.add_argument("--num-cams", type=int, default=6)
    parser.add_argument("--noise", type=float, default=3.0, help="per-dimension noise std (centres have std 1)")
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="evaluate_rank chunk (default: per device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")

    split = synthetic_split(args.num_query, args.num_gallery, args.dim, args.num_ids, args.num_cams,
                            args.noise, args.seed)
    q_feat, g_feat, *ids = (t.to(device) for t in split)

    def distance() -> torch.Tensor:
        return compute_distance(q_feat, g_feat, args.metric)

    with PeakMemory(device) as dist_mem:
        distmat = distance()  # warm-up, memory measured here

    def ranking() -> dict:
        return evaluate_rank(distmat, *ids, chunk_size=args.chunk_size)

    with PeakMemory(device) as rank_mem:
        result = ranking()
    times = {"distance": [], "ranking": []}
    for _ in range(args.repeat):
        seconds, distmat = timed(distance, device)
        times["distance"].append(seconds)
        seconds, result = timed(ranking, device)
        times["ranking"].append(seconds)
    times["total"] = [a + b for a, b in zip(times["distance"], times["ranking"])]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.num_query} x {args.num_gallery}, {args.dim}-d, {args.num_ids} ids, {args.metric}; device: {name}")
    print(f"Rank-1 {100 * result['cmc'][0]:.1f}  mAP {100 * result['mAP']:.1f}  mINP {100 * result['mINP']:.1f}  "
          f"valid queries {result['num_valid_queries']}")
    print(f"{'phase':<10}{'best s':>10}{'mean s':>10}{'peak MiB':>10}")
    for phase, memory in (("distance", dist_mem.mib), ("ranking", rank_mem.mib), ("total", None)):
        peak = "" if memory is None else f"{memory:.0f}"
        print(f"{phase:<10}{min(times[phase]):>10.4f}{statistics.mean(times[phase]):>10.4f}{peak:>10}")


if __name__ == "__main__":
    main()
