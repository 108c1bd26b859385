"""Train a ReID model: ``python scripts/train.py [group=option ...] [key=value ...]``.

Examples::

    python scripts/train.py experiment=quickstart          # CPU-sized run on the demo data
    python scripts/train.py model=bot_r50 data=market1501  # BoT on Market-1501 under $REID_DATA
    python scripts/train.py -m solver.base_lr=1e-4,3.5e-4 seed=1,2
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --master_addr HOST --master_port 29500 \
        scripts/train.py trainer=ddp trainer.devices=4 trainer.num_nodes=2   # and node_rank 1 on HOST 2

Returns the objective to Hydra sweepers (percent): the validation mAP of the best checkpoint
(or of the final model) when ``data.val_identities`` holds identities out, else the test mAP.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from reid_lightning.cli.train import objective, train
from reid_lightning.launch.hydra_ddp import external_rank_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return objective(train(cfg))


if __name__ == "__main__":
    sys.argv += external_rank_overrides(sys.argv[1:], os.environ)  # torchrun/srun: rank > 0 writes nothing
    main()
