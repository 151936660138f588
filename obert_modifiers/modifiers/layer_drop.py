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

from sparseml.optim import BaseModifier, ModifierProp
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledModifier
from sparseml.sparsification import SparsificationTypes
from torch import nn

from obert_modifiers.algorithms import layer_drop as algo
from obert_modifiers.modifiers._base import (
    RecipeParameterError,
    check_epochs,
    coerce_choice,
    coerce_int,
)

_LOGGER = logging.getLogger(__name__)
_NAME = "LayerDropModifier"
STRATEGIES = ("uniform", "importance")


@PyTorchModifierYAML()
class LayerDropModifier(ScheduledModifier):
    """Remove encoder layers for real: smaller module list, config and state dict."""

    def __init__(
        self,
        layers: list[int] | None = None,
        keep: int | None = None,
        strategy: str = "uniform",
        importance_batches: int = 8,
        num_layers: int | None = None,
        start_epoch: float = -1.0,
        end_epoch: float = -1.0,
    ):
        # Dropped layers are never restored: end_epoch only marks the end of a recipe stage (SparseML's
        # compose_staged writes the stage's last epoch here when a later recipe builds on this model).
        start, end = check_epochs(_NAME, start_epoch, end_epoch, end_required=False)
        if layers is not None:
            if isinstance(layers, int) or not isinstance(layers, (list, tuple)) or not layers:
                raise RecipeParameterError(
                    _NAME, "layers", layers, "a non-empty list of layer indices to drop"
                )
            layers = sorted({coerce_int(_NAME, "layers", i, minimum=0) for i in layers})
        if keep is not None:
            keep = coerce_int(_NAME, "keep", keep, minimum=1)
        if layers is None and keep is None:
            raise RecipeParameterError(_NAME, "layers", None, "either 'layers' (indices to drop) or 'keep'")
        strategy = coerce_choice(_NAME, "strategy", strategy, STRATEGIES)
        importance_batches = coerce_int(_NAME, "importance_batches", importance_batches, minimum=1)
        if num_layers is not None:
            num_layers = coerce_int(_NAME, "num_layers", num_layers, minimum=1)
            if keep is not None and keep > num_layers:
                raise RecipeParameterError(_NAME, "keep", keep, f"at most num_layers ({num_layers})")
            if layers is not None:
                algo.keep_from_drop(num_layers, layers)  # raises for out-of-range indices
                if keep is not None and num_layers - len(layers) != keep:
                    raise RecipeParameterError(
                        _NAME, "keep", keep, f"num_layers - len(layers) = {num_layers - len(layers)}"
                    )
        super().__init__(start_epoch=start, end_epoch=end, end_comparator=-1)
        self._layers = layers
        self._keep = keep
        self._strategy = strategy
        self._importance_batches = importance_batches
        self._num_layers = num_layers
        self._grad_sampler: dict | None = None
        self._applied = False
        self._optimizer_checked = False

    # ------------------------------------------------------------------ recipe keys
    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list[SparsificationTypes]:
        return [SparsificationTypes.structured]

    @ModifierProp()
    def layers(self) -> list[int] | None:
        """Encoder layer indices (in the model the recipe was written for) that are removed."""
        return self._layers

    @layers.setter
    def layers(self, value: list[int] | None) -> None:
        self._layers = value

    @ModifierProp()
    def keep(self) -> int | None:
        return self._keep

    @keep.setter
    def keep(self, value: int | None) -> None:
        self._keep = value

    @ModifierProp()
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = value

    @ModifierProp()
    def importance_batches(self) -> int:
        return self._importance_batches

    @importance_batches.setter
    def importance_batches(self, value: int) -> None:
        self._importance_batches = value

    @ModifierProp()
    def num_layers(self) -> int | None:
        return self._num_layers

    @num_layers.setter
    def num_layers(self, value: int | None) -> None:
        self._num_layers = value

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
