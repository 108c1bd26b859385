"""Extract features of your own images: ``python scripts/extract.py ckpt_path=PATH input=FOLDER output=features.npz``.

See conf/extract.yaml for the options (dtype, skip_bad, flip, device, ...).
"""
import hydra
from omegaconf import DictConfig

from reid_lightning.cli.inference import run_extract


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    run_extract(cfg)


if __name__ == "__main__":
    main()
