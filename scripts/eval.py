"""Evaluate a checkpoint: ``python scripts/eval.py ckpt_path=PATH [data=...] [evaluation.rerank=true]``;
a fast-reid checkpoint: ``python scripts/eval.py ckpt_path=model_final.pth model=bot_r50 data=market1501``.

Writes metrics.json (and, when asked, features.npz, cmc.png, rank_lists/*.png) into the
run's output dir and returns the mAP (percent).
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from reid_lightning.cli.evaluate import evaluate
from reid_lightning.launch.hydra_ddp import external_rank_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("mAP")


if __name__ == "__main__":
    sys.argv += external_rank_overrides(sys.argv[1:], os.environ)  # torchrun/srun: rank > 0 writes nothing
    main()
