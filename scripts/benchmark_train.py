"""Training throughput: the loader, the bare training step and our trainer end to end.

    python scripts/benchmark_train.py --mode all --model bot_r18 --height 96 --width 48 --batch 32
    python scripts/benchmark_train.py --mode fit --model bot_r50 --device cuda --precision bf16-mixed \
        --channels-last --workers 8 --data /data/market1501
    python scripts/benchmark_train.py --mode optimizer --model bot_r18 --iters 5
    python scripts/benchmark_train.py --mode checkpoint --model bot_r50 --iters 3
    python scripts/benchmark_train.py --mode epochs --epochs 4 --workers 8 --data /data/cuhk03-np/detected

Each mode prints one JSON line: ``mode``, ``images_per_s``, ``s_per_iter``, ``iters``, ``device``,
``precision`` and the settings; ``loader`` adds ``by_workers`` (images/s for each count of
``--workers 0,2,4``), ``epochs`` adds ``s_per_epoch`` and ``pss_gb`` (each epoch's seconds from
cold workers, and the memory of the process and its workers after it; ``images_per_s`` is that
of the epochs after the first), ``fit`` adds ``fit_over_step`` (its images/s over the bare step's, the step
timed in the same process before and after the fit, averaged), ``host_busy`` (the main
thread's CPU time per step over the wall time per step, median: near 1 the host is the limit;
``step`` reports it too) and, with ``--sync-debug`` on CUDA, ``syncs_per_step`` and ``sync_sites``
(torch's synchronising calls in the timed steps and where they come from). ``--mode fit`` prints the step's
line first. ``optimizer`` (not part of ``all``) prints the optimizer step's milliseconds with
torch's fused kernel and with the per-tensor loop; ``checkpoint`` (not part of ``all`` either) the
seconds the training thread spends per checkpoint written synchronously (``s_sync``) and in the
background (``s_async``). See :mod:`reid_lightning.cli.train_benchmark` for what each mode times.
"""
from __future__ import annotations

import argparse
import json
import os

from reid_lightning.cli import train_benchmark as bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["loader", "epochs", "step", "fit", "all", "optimizer", "checkpoint"], default="all")
    parser.add_argument("--model", default="bot_r50", help="a conf/model option (random init)")
    parser.add_argument("--height", type=bench.at_least(1), default=256)
    parser.add_argument("--width", type=bench.at_least(1), default=128)
    parser.add_argument("--batch", type=bench.at_least(1), default=64, help="global batch (identities x 4)")
    parser.add_argument("--iters", type=bench.at_least(1), default=50, help="timed iterations")
    parser.add_argument("--warmup", type=bench.at_least(0), default=10, help="untimed iterations before them")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of --mode epochs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed", "bf16-true", "16-true"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--sync-debug", action="store_true",
                        help="fit: count torch's synchronising CUDA calls in the timed steps, by site (slows them)")
    parser.add_argument("--workers", type=bench.worker_counts, default="2", help="loader workers; a list (0,2,4) for --mode loader")
    parser.add_argument("--data", default="demo", help="demo, or a folder in Market-1501 layout")
    parser.add_argument("--data-dir", default=os.environ.get("REID_DATA", "datasets"), help="root of the demo set")
    parser.add_argument("--output-dir", default="outputs/benchmark_train")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides of conf/train.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worker_counts = args.workers
    cfg = bench.benchmark_config(
        model=args.model, height=args.height, width=args.width, batch=args.batch, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        workers=worker_counts[-1], data=args.data, data_dir=args.data_dir, output_dir=args.output_dir,
        overrides=args.overrides,
    )
    if args.mode == "optimizer":
        print(json.dumps(bench.time_optimizer(cfg, args.iters, args.warmup)), flush=True)
        return
    if args.mode == "checkpoint":
        print(json.dumps(bench.time_checkpoint(cfg, args.iters, args.output_dir)), flush=True)
        return
    if args.mode == "epochs":
        print(json.dumps(bench.time_loader_epochs(cfg, args.epochs)), flush=True)
        return
    modes = ["loader", "step", "fit"] if args.mode == "all" else [args.mode]
    step = None
    for mode in modes:
        bench.seed(0)
        if mode == "loader":
            print(json.dumps(bench.time_loader(cfg.copy(), args.iters, args.warmup, worker_counts)), flush=True)
            continue
        if step is None:
            step = bench.time_step(cfg, args.iters, args.warmup)
            print(json.dumps(step), flush=True)
        if mode == "fit":
            fit = bench.time_fit(cfg, args.iters, args.warmup, sync_debug=args.sync_debug)
            bench.seed(0)
            # the step again after the fit: on a shared machine the load drifts between the two
            step_after = bench.time_step(cfg, args.iters, args.warmup)
            print(json.dumps(bench.fit_over_step(fit, step, step_after)), flush=True)

if __name__ == "__main__":
    main()
