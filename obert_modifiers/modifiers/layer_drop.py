"""``!LayerDropModifier``: physically remove whole encoder layers (SparseML adapter; the math is in
:mod:`obert_modifiers.algorithms.layer_drop`).

Recipe keys::

    - !LayerDropModifier
      layers: [1, 3, 5]        # encoder layer indices to remove, or:
      keep: 3                  # number of layers to keep, chosen by
      strategy: uniform        # uniform (evenly spaced, the oBERT paper's choice) | importance
      importance_batches: 8    # importance: batches of training data used to score the layers
      num_layers: 6            # optional: the layer count the recipe was written for (checked)
      start_epoch: 0.0

Lifecycle. The modifier is structural (``SparsificationTypes.structured``), so SparseML applies it in
``apply_structure`` before training (and again, with ``epoch=inf``, when a saved model is reloaded
or exported). There it receives no data, so ``strategy: importance`` with no recorded choice waits
for ``initialize``, which the trainer calls with its ``grad_sampler`` (train data loader + loss); the
layers are scored there (or at ``start_epoch`` if that is later) and the chosen indices are stored in
the ``layers`` key, so the ``recipe.yaml`` saved with the model re-applies the same drop without data.
After a drop the modifier also records ``num_layers``; the model config records
``obert_layer_map`` and ``obert_layer_drops`` (see the algorithms module), which makes re-applying the
recipe to the saved, already smaller model a no-op.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sparseml.optim import BaseModifier
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledModifier
from sparseml.sparsification import SparsificationTypes
from torch import nn

from obert_modifiers.algorithms import layer_drop as algo
from obert_modifiers.modifiers._base import RecipeParameterError, recipe_properties, store_recipe
from obert_modifiers.params import LayerDropParams, validate_recipe

_LOGGER = logging.getLogger(__name__)
_NAME = "LayerDropModifier"


@PyTorchModifierYAML()
@recipe_properties(
    LayerDropParams, settable=("layers", "keep", "strategy", "importance_batches", "num_layers")
)
class LayerDropModifier(ScheduledModifier):
    """Remove encoder layers for real: smaller module list, config and state dict (recipe keys:
    :class:`~obert_modifiers.params.LayerDropParams`)."""

    def __init__(self, **recipe: Any):
        # Dropped layers are never restored: end_epoch only marks the end of a recipe stage (SparseML's
        # compose_staged writes the stage's last epoch here when a later recipe builds on this model).
        params = validate_recipe(LayerDropParams, recipe)
        super().__init__(start_epoch=params.start_epoch, end_epoch=params.end_epoch, end_comparator=-1)
        store_recipe(self, params)
        self._grad_sampler: dict | None = None
        self._applied = False
        self._optimizer_checked = False

    # ------------------------------------------------------------------ recipe keys
    # (one ModifierProp per key, made by @recipe_properties; `layers` and `num_layers` are recorded
    # after a drop, so the recipe.yaml saved with the model re-applies the same drop without data)
    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list[SparsificationTypes]:
        return [SparsificationTypes.structured]

    # ------------------------------------------------------------------ lifecycle
    def apply_structure(self, module: nn.Module, epoch: float = 0.0, loggers=None, finalize=False, **kwargs):
        """Structure (re)application without data: an importance choice not yet made is deferred to
        ``initialize`` (where the trainer passes its data) unless the model already went through it."""
        if self._layers is None and self._strategy == "importance" and "grad_sampler" not in kwargs:
            if self._match_history(module) is None:
                if math.isinf(epoch):
                    raise RuntimeError(
                        f"!{_NAME}: 'strategy: importance' has no recorded 'layers' and no data to score "
                        "layers with while re-applying the recipe (reload/export); re-apply the recipe "
                        "saved after training (it records 'layers'), or give 'layers' explicitly"
                    )
                return  # not initialized: manager.initialize(..., grad_sampler=...) comes next
        super().apply_structure(module, epoch, loggers, finalize, **kwargs)

    def initialize(self, module: nn.Module, epoch: float = 0, loggers=None, **kwargs: Any) -> None:
        super().initialize(module, epoch, loggers, **kwargs)
        self._grad_sampler = kwargs.get("grad_sampler")
        if self.start_epoch == -1 or epoch >= self.start_epoch:
            self._apply(module)

    def update(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if not self._applied and self.start_pending(epoch, steps_per_epoch):
            self._apply(module)
        self._forget_dropped_parameters(module, optimizer)

    def optimizer_pre_step(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().optimizer_pre_step(module, optimizer, epoch, steps_per_epoch)
        if self._applied and not self._optimizer_checked:
            self._forget_dropped_parameters(module, optimizer)

    def finalize(self, module: nn.Module | None = None, reset_loggers: bool = True, **kwargs: Any) -> None:
        self._grad_sampler = None
        super().finalize(module, reset_loggers, **kwargs)

    # ------------------------------------------------------------------ internals
    def _resolve_num_layers(self, current: int) -> int:
        return self._num_layers if self._num_layers is not None else current

    def _planned_keep(self, num_layers: int) -> list[int] | None:
        if self._layers is not None:
            try:
                kept = algo.keep_from_drop(num_layers, self._layers)
            except algo.LayerDropError as error:
                raise RecipeParameterError(_NAME, "layers", self._layers, str(error)) from None
            if self._keep is not None and len(kept) != self._keep:
                raise RecipeParameterError(
                    _NAME,
                    "keep",
                    self._keep,
                    f"{len(kept)} (= {num_layers} layers - {len(self._layers)} dropped)",
                )
            return kept
        if self._keep > num_layers:
            raise RecipeParameterError(_NAME, "keep", self._keep, f"at most the model's {num_layers} layers")
        if self._strategy == "uniform":
            return algo.uniform_keep(num_layers, self._keep)
        return None  # importance: needs data

    def _match_history(self, module: nn.Module) -> tuple[int, list[int]] | None:
        """``(layers_before, kept)`` of an earlier application of this drop recorded in the config."""
        history = algo.drop_history(module)
        if not history:
            return None
        for before, kept in history:
            if self._num_layers is not None and before != self._num_layers:
                continue
            if self._layers is not None and (
                any(i >= before for i in self._layers) or kept != algo.keep_from_drop(before, self._layers)
            ):
                continue
            if self._keep is not None and len(kept) != self._keep:
                continue
            if (
                self._layers is None
                and self._strategy == "uniform"
                and kept != algo.uniform_keep(before, self._keep)
            ):
                continue
            return before, kept
        return None

    def _apply(self, module: nn.Module) -> None:
        if self._applied:
            return
        name, layer_list = algo.find_encoder_layers(module)
        current = len(layer_list)
        previous = self._match_history(module)
        if previous is not None:
            _LOGGER.info(
                f"!{_NAME}: the model already had this drop applied (kept {previous[1]}); nothing to do"
            )
            self._record(*previous)
            self._applied = True
            return
        num_layers = self._resolve_num_layers(current)
        if current != num_layers:
            raise RuntimeError(
                f"!{_NAME}: the model's '{name}' has {current} layers, but this recipe was written for "
                f"num_layers={num_layers} and the model config records no such drop (obert_layer_drops)"
            )
        kept = self._planned_keep(num_layers)
        if kept is None:
            kept = self._choose_by_importance(module, layer_list)
        dropped = [i for i in range(num_layers) if i not in kept]
        layer_map = algo.drop_layers(module, kept)
        self._record(num_layers, kept)
        self._applied = True
        _LOGGER.info(
            f"!{_NAME}: dropped encoder layers {dropped} of {num_layers} ('{name}'); "
            f"kept layer -> original index: {layer_map}"
        )

    def _record(self, num_layers: int, kept: list[int]) -> None:
        # recorded in the recipe that is saved with the model (ModifierProp setters are locked after
        # initialize, hence the private attributes)
        self._num_layers = num_layers
        self._layers = [i for i in range(num_layers) if i not in kept]

    def _choose_by_importance(self, module: nn.Module, layer_list: nn.ModuleList) -> list[int]:
        sampler = self._grad_sampler
        if not sampler or "data_loader_builder" not in sampler:
            raise RuntimeError(
                f"!{_NAME}: 'strategy: importance' needs training data to score layers, but no grad_sampler "
                "was passed to initialize (SparseML's trainer passes it; in a script pass "
                "grad_sampler={'data_loader_builder': ..., 'loss_function': ...}), or give 'layers'"
            )
        from tqdm.auto import tqdm

        loss_function = sampler.get("loss_function")
        loader = sampler["data_loader_builder"]({})
        batches = [
            (sample, target)
            for _, (_, sample, target) in zip(range(self._importance_batches), loader, strict=False)
        ]

        def loss_fn(outputs, target):
            if loss_function is not None:
                return loss_function(outputs, target)
            return outputs["loss"] if isinstance(outputs, dict) else outputs[0]

        num_drop = len(layer_list) - self._keep
        with tqdm(
            total=num_drop * len(batches), desc="LayerDrop: scoring layer importance", leave=False
        ) as bar:
            order = algo.greedy_drop_order(
                module, batches, loss_fn, num_drop, layer_list, progress=bar.update
            )
        dropped = sorted(index for index, _ in order)
        _LOGGER.info(
            f"!{_NAME}: layers dropped in order (|loss change| with the earlier ones skipped): "
            + ", ".join(f"{index} ({score:.4g})" for index, score in order)
        )
        return [i for i in range(len(layer_list)) if i not in dropped]

    def _forget_dropped_parameters(self, module: nn.Module, optimizer) -> None:
        """Parameters of dropped layers leave the optimizer (it was created before an importance drop)."""
        if not self._applied or optimizer is None or not hasattr(optimizer, "param_groups"):
            return
        self._optimizer_checked = True
        live = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            stale = [p for p in group["params"] if id(p) not in live]
            if stale:
                group["params"] = [p for p in group["params"] if id(p) in live]
                for p in stale:
                    optimizer.state.pop(p, None)
