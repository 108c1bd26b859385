"""Train a ReID model: ``python scripts/train.py [group=option ...] [key=value ...]``.

Examples::

    python scripts/train.py experiment=quickstart          # CPU-sized run on the demo data
    python scripts/train.py model=bot_r50 data=market1501  # BoT on Market-1501 under $REID_DATA
    python scripts/train.py -m solver.base_lr=1e-4,3.5e-4 seed=1,2

Returns the objective to Hydra sweepers (percent): the validation mAP of the best checkpoint
(or of the final model) when ``data.val_identities`` holds identities out, else the test mAP.
"""
import hydra
from omegaconf import DictConfig

from reid_lightning.engine.runner import objective, train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return objective(train(cfg))


if __name__ == "__main__":
    main()
