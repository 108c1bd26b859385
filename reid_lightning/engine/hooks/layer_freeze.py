"""``LayerFreeze``: keep named submodules frozen for the first steps (fast-reid's ``FreezeLayer``)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from reid_lightning.engine.hooks.base import HookBase

logger = logging.getLogger(__name__)


class LayerFreeze(HookBase):
    """Freeze ``freeze_layers`` of ``trainer.model`` while ``trainer.iter < open_layer_iter``.

    A frozen submodule is in eval mode (its BatchNorm statistics stay put) and its parameters have
    ``requires_grad=False`` (no gradient, so the optimizer leaves them unchanged). Eval mode is
    applied again before every frozen step because Lightning calls ``model.train()`` each epoch
    and after validation. At ``open_layer_iter`` the submodules go back to train mode and their
    parameters that required grad before get it back. On resume past ``open_layer_iter`` nothing
    is frozen.

    Under DDP, parameters without gradients need ``strategy="ddp_find_unused_parameters_true"``.

    Args:
        open_layer_iter: first step at which the layers train.
        freeze_layers: submodule names relative to ``trainer.model``, e.g. ``["backbone"]``
            (dotted paths such as ``"backbone.layer1"`` work too).
    """

    def __init__(self, open_layer_iter: int, freeze_layers: Sequence[str]) -> None:
        if isinstance(freeze_layers, str):
            freeze_layers = [freeze_layers]
        if open_layer_iter < 0:
            raise ValueError(f"LayerFreeze open_layer_iter must be >= 0, got {open_layer_iter}")
        self.open_layer_iter = open_layer_iter
        self.freeze_layers = tuple(freeze_layers)
        self.is_frozen = False
        self._frozen_params: list[nn.Parameter] = []

    def _layers(self) -> list[nn.Module]:
        model = self.trainer.model
        layers = []
        for name in self.freeze_layers:
            try:
                layers.append(model.get_submodule(name))
            except AttributeError as err:
                children = [child for child, _ in model.named_children()]
                raise ValueError(
                    f"LayerFreeze: {type(model).__name__} has no submodule {name!r}; its children are {children}"
                ) from err
        return layers

    def before_train(self) -> None:
        self._layers()  # fail early on a wrong name

    def before_step(self) -> None:
        frozen_now = self.trainer.iter < self.open_layer_iter
        if frozen_now:
            self._freeze()
        elif self.is_frozen:
            self._open()

    def after_train(self) -> None:
        if self.is_frozen:
            self._open()

    def _freeze(self) -> None:
        layers = self._layers()
        for layer in layers:
            layer.eval()
        if self.is_frozen:
            return
        self._frozen_params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        for param in self._frozen_params:
            param.requires_grad_(False)
        self.is_frozen = True
        logger.info("Freeze layers %s for %d iterations", ", ".join(self.freeze_layers), self.open_layer_iter)

    def _open(self) -> None:
        for layer in self._layers():
            layer.train()
        for param in self._frozen_params:
            param.requires_grad_(True)
        self._frozen_params = []
        self.is_frozen = False
        logger.info("Open layers %s at iteration %d", ", ".join(self.freeze_layers), self.trainer.iter)
