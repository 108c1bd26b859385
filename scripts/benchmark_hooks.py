"""Per-step cost of the hook API: ten no-op HookBase hooks vs none.

Two references separate the costs: ten plain Lightning Callbacks (what Lightning's dispatch to
any callback costs) and one HookBase (the adapter's fixed per-step work: storage, loss values).

    python scripts/benchmark_hooks.py                       # small MLP, 400 steps, CPU
    python scripts/benchmark_hooks.py --model resnet18 --steps 60
    python scripts/benchmark_hooks.py --accelerator gpu --model resnet50 --batch-size 64 --precision bf16-mixed

Each configuration trains the same model on random batches already on the device for
``--warmup`` + ``--steps`` optimizer steps; the timed window is the last ``--steps`` steps (from a
batch start to a batch end, read by a plain Callback present in every run). Configurations run in
a rotating order for ``--repeats`` rounds and the fastest round of each is reported, with the
overhead over "none" in microseconds per step and in percent of the step. End-to-end differences
of a few tens of microseconds drown in run-to-run noise, so a last column gives the time spent
inside the added callbacks' methods per step, read from an extra run under Lightning's
SimpleProfiler. It leaves out Lightning's own loop over the callbacks and includes the profiler's
bookkeeping, which is what the plain Callbacks row (empty methods) shows.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.profilers import SimpleProfiler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reid_lightning.engine.hooks import HookBase


class NoOpHook(HookBase):
    """A hook that keeps HookBase's six no-op methods."""


class NoOpCallback(Callback):
    """A plain Lightning callback (reference: what any callback costs)."""


class StepClock(Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


class RandomBatches(Dataset):
    """``batches`` ready-made random batches on ``device`` (no collation, no host-to-device copy:
    the timing measures the training step and the callbacks, not the input pipeline)."""

    def __init__(self, batches: int, batch_size: int, shape: tuple[int, ...], classes: int, device: str) -> None:
        self.images = torch.randn(batches, batch_size, *shape, device=device)
        self.targets = torch.randint(0, classes, (batches, batch_size), device=device)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "targets": self.targets[i]}


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)), (256,)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 128, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 256, 128)),
}


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``model`` with the ReIDModule output contract."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], batch_size: int, data_device: str) -> None:
        super().__init__()
        self.model = model
        self.shape, self.batch_size, self.data_device = shape, batch_size, data_device

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        loss = nn.functional.cross_entropy(self.model(batch["images"]), batch["targets"])
        return {"loss": loss, "loss_dict": {"loss_cls": loss.detach()}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomBatches(10, self.batch_size, self.shape, 10, self.data_device), batch_size=None)


def time_run(args: argparse.Namespace, extra: list[Callback], profiled: bool = False) -> float:
    """Seconds per step for one configuration over the timed window: wall time, or, when
    ``profiled``, the time spent inside the ``extra`` callbacks' methods (SimpleProfiler)."""
    build, shape = MODELS[args.model]
    torch.manual_seed(0)
    total = args.warmup + args.steps
    module = Classifier(build(), shape, args.batch_size, "cpu" if args.accelerator == "cpu" else "cuda")
    clock = StepClock(args.warmup)
    profiler = SimpleProfiler() if profiled else None
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=total, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock, *extra], profiler=profiler,
    )
    trainer.fit(module)
    if profiler is None:
        return (clock.end - clock.start) / args.steps
    # callbacks of one state_key (plain Callbacks: the class name) share a profiler action, whose
    # list then holds one entry per callback per call
    sharing = Counter(f"[Callback]{cb.state_key}." for cb in extra)
    inside = 0.0
    for action, durations in profiler.recorded_durations.items():
        key = next((key for key in sharing if action.startswith(key)), None)
        if key is not None:
            # per-batch actions: the timed window only (first calls load kernels, fill caches)
            window = args.steps * sharing[key]
            inside += sum(durations[-window:] if len(durations) >= total * sharing[key] else durations)
    return inside / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hooks", type=int, default=10, help="number of no-op hooks / callbacks")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="pl.Trainer precision, e.g. bf16-mixed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs: dict[str, Callable[[], list[Callback]]] = {
        "none": lambda: [],
        f"{args.hooks} plain Callbacks": lambda: [NoOpCallback() for _ in range(args.hooks)],
        "1 no-op HookBase": lambda: [NoOpHook()],
        f"{args.hooks} no-op HookBase": lambda: [NoOpHook() for _ in range(args.hooks)],
    }
    best = {name: float("inf") for name in configs}
    names = list(configs)
    for round_index in range(args.repeats):
        # rotate the order each round so that drifts (clocks, caches) do not favour one configuration
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            best[name] = min(best[name], time_run(args, configs[name]()))

    inside = {name: time_run(args, configs[name](), profiled=True) for name in names[1:]}
    inside["none"] = 0.0

    base = best["none"]
    print(f"\nmodel={args.model} batch={args.batch_size} steps={args.steps} accelerator={args.accelerator} "
          f"precision={args.precision} (fastest of {args.repeats} rounds)")
    print(f"{'configuration':<24}{'ms/step':>10}{'overhead us/step':>18}{'overhead %':>12}{'in callbacks us/step':>22}")
    for name, seconds in best.items():
        print(
            f"{name:<24}{seconds * 1e3:>10.3f}{(seconds - base) * 1e6:>18.1f}"
            f"{(seconds - base) / base * 100:>11.2f}%{inside[name] * 1e6:>22.1f}"
        )


if __name__ == "__main__":
    main()
