"""Where the fit loses time against the bare step: the fit timed with one thing changed at a time,
in one process, and optionally a py-spy sample of its main thread
(:mod:`reid_lightning.cli.fit_variants`).

    python scripts/benchmark_fit_variants.py --data /data/cuhk03-np/detected --device cuda \
        --precision bf16-mixed --workers 14 [--py-spy out/spy.txt] [--variants default,from_memory]
    python scripts/benchmark_fit_variants.py --model bot_r18 --height 64 --width 32 --iters 20 --warmup 5

Prints one JSON line for the bare step (timed first), one per variant (``fit_over_step`` against
that step) and one for the step again at the end. Variants:

* ``default``: the fit as ``scripts/benchmark_train.py --mode fit`` runs it;
* ``no_train_log``: ``ReIDModule.log`` does nothing (what logging the training losses costs);
* ``loss_on_lightnings_bar``: the training loss logged with ``prog_bar=True``, as before
  2026-12-01: Lightning then reads it to the host after every batch (a GPU wait per step);
* ``from_memory``: 8 real training batches (pinned on a GPU machine) replayed instead of the
  loader: no workers, no decode, no waiting for a batch;
* ``from_memory_no_hooks_no_log``: that, without the hooks and without ``self.log``;
* ``half_workers``: half the loader workers;
* ``no_pin_memory``: ``data.pin_memory=false``;
* ``file_system_sharing``: workers hand tensors over by file name instead of file descriptor;
* ``float_batches``: ``data.normalize_on_device=false``, the workers normalise and erase and the
  batches travel as float32;
* ``no_image_cache``: ``data.cache_images=false``, every image decoded and resized at each use;
* ``last_checkpoint`` / ``last_checkpoint_sync``: ``last.ckpt`` written at every epoch's end as
  ``train.py`` writes it, in the background (``async_checkpoints``, the default) / synchronously.

``--sync-debug`` (CUDA) counts torch's synchronising calls per step of each variant's timed steps
(``syncs_per_step``, ``sync_sites``; it slows them). ``--py-spy FILE`` (py-spy on the PATH) samples every thread of the ``default`` variant, run a second
time, into FILE (raw stacks) and prints the main thread's time per part of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess

from reid_lightning.cli import train_benchmark as bench
from reid_lightning.cli.fit_variants import main_thread_parts, time_variant, variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="demo", help="demo, or a folder in Market-1501 layout")
    parser.add_argument("--data-dir", default=os.environ.get("REID_DATA", "datasets"), help="root of the demo set")
    parser.add_argument("--model", default="bot_r50")
    parser.add_argument("--height", type=bench.at_least(1), default=256)
    parser.add_argument("--width", type=bench.at_least(1), default=128)
    parser.add_argument("--batch", type=bench.at_least(1), default=64)
    parser.add_argument("--iters", type=bench.at_least(1), default=150)
    parser.add_argument("--warmup", type=bench.at_least(0), default=30)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed", "bf16-true", "16-true"], default="32")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--workers", type=bench.at_least(0), default=2)
    parser.add_argument("--variants", default=None, help="comma-separated names; default all")
    parser.add_argument("--sync-debug", action="store_true", help="count torch's synchronising CUDA calls per step")
    parser.add_argument("--py-spy", default=None, metavar="FILE", help="sample the default variant into FILE")
    parser.add_argument("--output-dir", default="outputs/benchmark_fit_variants")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml for every variant")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    table = variants(args.workers)
    names = args.variants.split(",") if args.variants else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(table)}")
    spy = shutil.which("py-spy")
    if args.py_spy and spy is None:
        raise SystemExit("--py-spy needs py-spy on the PATH (pip install py-spy)")

    def config(overrides: list[str]):
        return bench.benchmark_config(
            model=args.model, height=args.height, width=args.width, batch=args.batch, device=args.device,
            precision=args.precision, channels_last=not args.no_channels_last, workers=args.workers,
            data=args.data, data_dir=args.data_dir, output_dir=args.output_dir, overrides=[*args.overrides, *overrides])

    bench.seed(0)
    step = bench.time_step(config([]), args.iters, args.warmup)
    print(json.dumps({"variant": "step", **step}), flush=True)
    for name in names:
        overrides, patches = table[name]
        fit = time_variant(config(overrides), args.iters, args.warmup, patches, sync_debug=args.sync_debug)
        print(json.dumps({"variant": name, **bench.fit_over_step(fit, step)}), flush=True)
    if args.py_spy:  # until the fit ends: py-spy writes its samples when interrupted
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(os.getpid()), "-r", "400", "--threads", "--idle", "--nonblocking",
             "-f", "raw", "-o", args.py_spy],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time_variant(config([]), args.iters, args.warmup, {})
        sampler.send_signal(signal.SIGINT)
        sampler.wait(timeout=120)
        with open(args.py_spy) as stacks:
            print(json.dumps({"variant": "default", "main_thread_parts": main_thread_parts(stacks.read())}), flush=True)
    bench.seed(0)
    print(json.dumps({"variant": "step_after", **bench.time_step(config([]), args.iters, args.warmup)}), flush=True)


if __name__ == "__main__":
    main()
