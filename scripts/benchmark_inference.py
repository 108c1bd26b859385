"""Images/s of a BoT model in PyTorch eager fp32, TorchScript and onnxruntime (CPU provider).

    python scripts/benchmark_inference.py                                  # R50 256x128 and R18 96x48, batch 1 and 64
    python scripts/benchmark_inference.py --models r18:96x48 --repeat 5

Each model is randomly initialised (speed does not depend on the weights), exported with
:func:`reid_lightning.inference.export_model` exactly as ``scripts/export.py`` does, and fed
the same random batch in each runtime: ``--warmup`` untimed runs, then ``--repeat`` timed
ones. The ratios compare runtimes measured in the same process, one after another.
"""
from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reid_lightning.inference import FeatureExtractor, export_model
from reid_lightning.inference.export import load_runtime
from reid_lightning.modeling import build_bot

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def images_per_second(run: Callable[[], object], batch: int, warmup: int, repeat: int) -> float:
    """``batch * repeat`` divided by the wall time of ``repeat`` calls of ``run`` after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return batch * repeat / (time.perf_counter() - start)


def benchmark_model(
    depth: int, size: tuple[int, int], batches: list[int], warmup: int, repeat: int, workdir: Path, threads: int | None
) -> list[dict]:
    """Images/s of each runtime for each batch size, for one BoT of ``depth`` at ``size``."""
    torch.manual_seed(0)
    extractor = FeatureExtractor(build_bot(num_classes=751, depth=depth).eval(), size, device="cpu")
    module = extractor.model
    runners = {
        "torchscript": load_runtime(export_model(extractor, workdir / f"r{depth}.pt", "torchscript"), "torchscript"),
        "onnxruntime": load_runtime(export_model(extractor, workdir / f"r{depth}.onnx", "onnx"), "onnx", threads),
    }
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, *size)
        array = np.ascontiguousarray(images.numpy())

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return module(images)

        speed = {"eager": images_per_second(eager, batch, warmup, repeat)}
        for name, run in runners.items():
            speed[name] = images_per_second(lambda run=run: run(array), batch, warmup, repeat)
        rows.append({"model": f"R{depth}", "input": f"{size[0]}x{size[1]}", "batch": batch, **speed})
    return rows


def parse_model(text: str) -> tuple[int, tuple[int, int]]:
    """``"r50:256x128"`` -> ``(50, (256, 128))``."""
    match = re.fullmatch(r"r?(\d+):(\d+)x(\d+)", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected depth:HxW, e.g. r18:96x48, got {text!r}")
    depth, height, width = (int(group) for group in match.groups())
    return depth, (height, width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=parse_model, default=["r50:256x128", "r18:96x48"],
                        help="depth:HxW, e.g. r18:96x48")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of torch and onnxruntime (default: each library's own choice)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, onnxruntime threads: "
          f"{args.threads or 'default'}; warmup {args.warmup}, repeat {args.repeat}")
    print("| model | input | batch | eager fp32 img/s | TorchScript img/s (x eager) | onnxruntime img/s (x eager) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for depth, size in args.models:
            for row in benchmark_model(depth, size, args.batches, args.warmup, args.repeat, Path(workdir), args.threads):
                eager = row["eager"]
                print(f"| {row['model']} | {row['input']} | {row['batch']} | {eager:.1f} | "
                      f"{row['torchscript']:.1f} ({row['torchscript'] / eager:.2f}x) | "
                      f"{row['onnxruntime']:.1f} ({row['onnxruntime'] / eager:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
