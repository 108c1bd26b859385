"""Search a gallery for query images: ``python scripts/search.py index=features.npz query=IMAGE_OR_FOLDER top_k=10``.

Writes results.json and one rank-list PNG per query into the run's output dir (see conf/search.yaml).
"""
import hydra
from omegaconf import DictConfig

from reid_lightning.cli.inference import run_search


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> None:
    run_search(cfg)


if __name__ == "__main__":
    main()
