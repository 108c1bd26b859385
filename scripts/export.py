"""Export a checkpoint's model: ``python scripts/export.py ckpt_path=PATH format=onnx|torchscript output=model.onnx``.

Dynamic batch axis, fixed height x width; writes model.json beside the model and checks the
exported file against PyTorch (see conf/export.yaml).
"""
import hydra
from omegaconf import DictConfig

from reid_lightning.cli.inference import run_export


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_export(cfg)


if __name__ == "__main__":
    main()
