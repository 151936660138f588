"""``!LayerDropModifier``: encoder layers removed for real."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from obert_modifiers.algorithms import layer_drop as drop
from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    RecipeRunError,
    StepContext,
)
from obert_modifiers.native.recipe import PlannedModifier

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


class LayerDrop(NativeModifier):
    """``!LayerDropModifier``: encoder layers removed for real, before the optimizer exists when the
    drop starts at epoch 0 (or -1); a later drop also takes the dropped layers' parameters out of the
    optimizer. The chosen layers are recorded in the plan (``layers``, ``num_layers``), so the
    ``recipe.yaml`` saved with the model re-applies the same drop."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.start_epoch <= 0:
            self._apply(model, runner)
            self.started = True

    def update(self, ctx: StepContext) -> None:
        if not self.applied:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise RecipeRunError(
                    f"!{self.tag}: recipe key 'start_epoch' = {self.start_epoch}: under torch.distributed "
                    "layers can only be dropped before training (start_epoch 0 or -1; DDP holds them)"
                )
            self._apply(ctx.model, ctx.runner)
            _forget_dropped_parameters(ctx.model, ctx.optimizer)

    def _apply(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.applied:
            return
        p = self.params
        name, layers = drop.find_encoder_layers(model)
        current = len(layers)
        history = drop.drop_history(model)
        if (
            history
            and p.num_layers is not None
            and history[-1][0] == p.num_layers
            and current != p.num_layers
        ):
            self.applied = True  # this drop was already applied to the saved model (recorded in its config)
            return
        num_layers = p.num_layers if p.num_layers is not None else current
        if current != num_layers:
            raise RecipeRunError(
                f"!{self.tag}: recipe key 'num_layers' = {num_layers}, but the model's '{name}' "
                f"has {current} layers"
            )
        try:
            if p.layers is not None:
                kept = drop.keep_from_drop(num_layers, p.layers)
            elif p.strategy == "uniform":
                kept = drop.uniform_keep(num_layers, p.keep)
            else:
                kept = self._by_importance(model, runner, layers)
        except drop.LayerDropError as error:
            raise RecipeRunError(f"!{self.tag}: {error}") from None
        if p.keep is not None and len(kept) != p.keep:
            raise RecipeRunError(
                f"!{self.tag}: recipe key 'keep' = {p.keep}, but 'layers' leaves {len(kept)}"
            )
        layer_map = drop.drop_layers(model, kept)
        _trim_layer_types(model, kept)
        dropped = [i for i in range(num_layers) if i not in kept]
        self.planned.params = self.params = p.model_copy(update={"layers": dropped, "num_layers": num_layers})
        self.applied = True
        _LOGGER.info(
            "!%s: dropped layers %s of %d; kept -> original: %s", self.tag, dropped, num_layers, layer_map
        )

    def _by_importance(self, model: nn.Module, runner: RecipeRunner, layers: nn.ModuleList) -> list[int]:
        source = runner.gradients
        if source is None:
            raise RecipeRunError(f"!{self.tag}: 'strategy: importance' needs training data (a train_dataset)")
        stream = source.batches(None, torch.Generator().manual_seed(source.seed))
        batches = [(next(stream), None) for _ in range(self.params.importance_batches)]
        order = drop.greedy_drop_order(
            model,
            batches,
            lambda outputs, _target: source.loss(outputs),
            len(layers) - self.params.keep,
            layers,
        )
        dropped = {index for index, _ in order}
        return [i for i in range(len(layers)) if i not in dropped]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "applied": self.applied,
            "layers": self.planned.params.layers,
            "num_layers": self.planned.params.num_layers,
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)


def _trim_layer_types(model: nn.Module, kept: Sequence[int]) -> None:
    """transformers 5 configs that list a type per layer (ModernBERT's ``layer_types``) must keep
    one entry per remaining layer, or ``save_pretrained`` refuses the config."""
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list | tuple) and len(types) > len(kept):
        config.layer_types = [types[i] for i in kept]


def _forget_dropped_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        return
    live = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        stale = [p for p in group["params"] if id(p) not in live]
        if stale:
            group["params"] = [p for p in group["params"] if id(p) in live]
            for p in stale:
                optimizer.state.pop(p, None)
