"""reid_lightning: fast-reid's BoT person re-identification on PyTorch Lightning and Hydra.

``from reid_lightning import HookBase, EventStorage, get_event_storage`` gives fast-reid's
hook API, ``from reid_lightning import FeatureExtractor`` runs a trained checkpoint on any
images; data, models and evaluation live in the sub-packages of the same names. These names
are imported on first use so that ``import reid_lightning.modeling`` stays free of Lightning.
"""
__version__ = "0.1.0"
__all__ = ["EventStorage", "FeatureExtractor", "HookBase", "get_event_storage", "__version__"]

_HOOK_API = ("EventStorage", "HookBase", "get_event_storage")


def __getattr__(name: str):
    if name in _HOOK_API:
        from reid_lightning.engine import hooks

        return getattr(hooks, name)
    if name == "FeatureExtractor":
        from reid_lightning.inference import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'reid_lightning' has no attribute {name!r}")
