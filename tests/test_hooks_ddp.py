"""Hooks under DDP: two CPU processes (ddp_spawn), results collected through files per rank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hooks_support import Recorder, TinyModule, make_trainer

from reid_lightning.engine.hooks import PeriodicWriter
from reid_lightning.utils import comm

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_every_rank_runs_every_hook_and_only_rank0_writes(tmp_path: Path) -> None:
    json_file = tmp_path / "metrics.jsonl"
    hooks = [Recorder("rec", out_dir=str(tmp_path)), PeriodicWriter(period=2, json_file=json_file)]
    trainer = make_trainer(tmp_path, hooks, strategy="ddp_spawn", accelerator="cpu", devices=2)
    # 12 items, batch 4, split over 2 ranks by Lightning's DistributedSampler: 2 steps per epoch
    trainer.fit(TinyModule(batches=3))

    results = [json.loads((tmp_path / f"rec_rank{rank}.json").read_text()) for rank in (0, 1)]
    sequences = [[tuple(e[1:4]) for e in r["events"]] for r in results]
    assert sequences[0] == sequences[1]
    assert [e[1] for e in sequences[0] if e[0] == "after_step"] == [0, 1, 2, 3]
    assert [e[0] for e in sequences[0]].count("after_train") == 1
    for rank, result in enumerate(results):
        assert result["gathered"] == [0, 1] and result["world_size"] == 2 and result["rank"] == rank
        assert (result["start_iter"], result["max_iter"]) == (0, 4)
    lines = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 3]  # rank 0 alone wrote


def test_comm_in_a_single_process() -> None:
    assert (comm.get_rank(), comm.get_world_size()) == (0, 1) and comm.is_main_process()
    tensor = torch.tensor([1.0, 3.0])
    comm.all_reduce_mean_([tensor])
    assert tensor.tolist() == [1.0, 3.0]
