"""``!OBertQuantizationModifier``: quantization-aware training to INT8, sparsity masks kept.

Lifecycle only; the fake-quantized modules and mask helpers live in
:mod:`obert_modifiers.algorithms.quantization`. Recipe example::

    - !OBertQuantizationModifier
        start_epoch: 2.0
        freeze_observer_epoch: 3.0
        weight_strategy: tensor        # or channel
        quantize_matmuls: true         # the two attention matmuls
        quantize_embeddings: true
        exclude: [classifier]          # module names, class names or 're:' patterns

The modifier is *structured*: SparseML re-applies it (``epoch=inf``) when a saved model is
reloaded for evaluation or export, so the fake-quant modules exist before the checkpoint's
scales and zero points are loaded, and ``sparseml.transformers.export_onnx`` converts it to the
INT8 ``MatMulInteger`` graph.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sparseml.optim import BaseModifier, ModifierProp
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledModifier
from sparseml.sparsification import SparsificationTypes
from torch.nn import Module
from torch.optim.optimizer import Optimizer

from obert_modifiers.algorithms import quantization as qat
from obert_modifiers.modifiers._base import (
    RecipeParameterError,
    coerce_bool,
    coerce_choice,
    coerce_float,
    coerce_str_list,
    unknown_key_message,
)

__all__ = ["OBertQuantizationModifier"]

_LOGGER = logging.getLogger(__name__)
_NAME = "OBertQuantizationModifier"


@PyTorchModifierYAML()
class OBertQuantizationModifier(ScheduledModifier):
    """Quantization-aware training to INT8 for BERT, keeping pruned weights at exactly zero.

    :param start_epoch: epoch at which fake quantization starts (-1: from the beginning)
    :param end_epoch: -1; QAT stays on to the end (the export converts it). A number >= start_epoch
        is accepted and only marks the end of the recipe stage (SparseML's ``compose_staged``
        writes one when a later recipe builds on this model); it does not switch QAT off
    :param freeze_observer_epoch: epoch after which quantization ranges stop updating
        (None: never before export; export always freezes them)
    :param weight_strategy: ``tensor`` (one scale per weight) or ``channel`` (per output row)
    :param quantize_matmuls: also quantize the attention matmuls ``Q @ K^T`` and ``probs @ V``
    :param quantize_embeddings: also fake-quantize the embedding tables (UINT8)
    :param exclude: module names (with their subtree), module class names or ``re:`` patterns
        left in float; the classifier head by default
    """

    def __init__(
        self,
        start_epoch: float = -1.0,
        end_epoch: float = -1.0,
        freeze_observer_epoch: float | None = None,
        weight_strategy: str = "tensor",
        quantize_matmuls: bool = True,
        quantize_embeddings: bool = True,
        exclude: list[str] | None = None,
        **unknown: Any,
    ):
        if unknown:
            raise ValueError(unknown_key_message(type(self), next(iter(unknown))))
        start = coerce_float(_NAME, "start_epoch", start_epoch)
        if start < 0 and start != -1:
            raise RecipeParameterError(_NAME, "start_epoch", start_epoch, "a number >= 0, or -1")
        end = coerce_float(_NAME, "end_epoch", end_epoch)
        # QAT cannot be switched off once started: the end only marks the stage end. SparseML's
        # compose_staged writes the stage's last epoch here when a later recipe builds on this one.
        if end != -1 and end < max(start, 0.0):
            raise RecipeParameterError(
                _NAME, "end_epoch", end_epoch, f"-1 (QAT stays on), or a number >= start_epoch ({start})"
            )
        freeze = coerce_float(_NAME, "freeze_observer_epoch", freeze_observer_epoch, allow_none=True)
        if freeze is not None and freeze < max(start, 0.0):
            raise RecipeParameterError(
                _NAME,
                "freeze_observer_epoch",
                freeze_observer_epoch,
                f"null or a number >= start_epoch ({start})",
            )
        self._freeze_observer_epoch = freeze
        self._weight_strategy = coerce_choice(
            _NAME, "weight_strategy", weight_strategy, qat.WEIGHT_STRATEGIES
        )
        self._quantize_matmuls = coerce_bool(_NAME, "quantize_matmuls", quantize_matmuls)
        self._quantize_embeddings = coerce_bool(_NAME, "quantize_embeddings", quantize_embeddings)
        self._exclude = (
            ["classifier"]
            if exclude is None
            else coerce_str_list(_NAME, "exclude", exclude, allow_empty=True)
        )
        super().__init__(start_epoch=start, end_epoch=end, end_comparator=-1)
        self._reset_state()

    def _reset_state(self) -> None:
        self._applied = False
        self._frozen = False
        self._plan: qat.QuantizationPlan | None = None
        self._weights = {}
        self._masks = None

    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list[SparsificationTypes]:
        return [SparsificationTypes.quantization, SparsificationTypes.structured]

    @ModifierProp()
    def freeze_observer_epoch(self) -> float | None:
        return self._freeze_observer_epoch

    @freeze_observer_epoch.setter
    def freeze_observer_epoch(self, value: float | None) -> None:
        self._freeze_observer_epoch = coerce_float(_NAME, "freeze_observer_epoch", value, allow_none=True)

    @ModifierProp()
    def weight_strategy(self) -> str:
        return self._weight_strategy

    @ModifierProp()
    def quantize_matmuls(self) -> bool:
        return self._quantize_matmuls

    @ModifierProp()
    def quantize_embeddings(self) -> bool:
        return self._quantize_embeddings

    @ModifierProp()
    def exclude(self) -> list[str]:
        return self._exclude

    @property
    def plan(self) -> qat.QuantizationPlan | None:
        """What was quantized (None before QAT starts)."""
        return self._plan

    def advance_epochs(self, ref_start_epoch: float | None = None) -> None:
        if ref_start_epoch is None:
            return
        super().advance_epochs(ref_start_epoch=ref_start_epoch)
        if self._freeze_observer_epoch is not None:
            self._freeze_observer_epoch = max(0.0, self._freeze_observer_epoch) + ref_start_epoch

    # lifecycle ------------------------------------------------------------------------------
    def initialize(self, module: Module, epoch: float = 0, loggers: Any = None, **kwargs: Any) -> None:
        # Called with no kwargs by SparseML's apply_structure (structure reload uses epoch=inf).
        super().initialize(module, epoch, loggers, **kwargs)
        self._reset_state()
        self._check_quantization(module, epoch)

    def update_ready(self, epoch: float, steps_per_epoch: int) -> bool:
        return super().update_ready(epoch, steps_per_epoch) or (self.enabled and self._freeze_pending(epoch))

    def update(self, module: Module, optimizer: Optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        self._check_quantization(module, epoch)

    def optimizer_pre_step(self, module: Module, optimizer: Optimizer, epoch: float, steps_per_epoch: int):
        super().optimizer_pre_step(module, optimizer, epoch, steps_per_epoch)
        if not self._applied:
            return
        if self._masks is None:
            # captured at the first step of QAT, after any structure reload loaded the weights
            self._masks = qat.weight_masks(self._weights)
            if self._masks:
                _LOGGER.info("!%s keeps %d sparse weight tensors masked during QAT", _NAME, len(self._masks))
        qat.mask_gradients(self._weights, self._masks)

    def optimizer_post_step(self, module: Module, optimizer: Optimizer, epoch: float, steps_per_epoch: int):
        super().optimizer_post_step(module, optimizer, epoch, steps_per_epoch)
        if self._applied and self._masks:
            qat.apply_masks(self._weights, self._masks)

    def finalize(self, module: Module | None = None, reset_loggers: bool = True, **kwargs: Any) -> None:
        super().finalize(module, reset_loggers, **kwargs)
        self._weights, self._masks = {}, None

    # helpers --------------------------------------------------------------------------------
    def _freeze_pending(self, epoch: float) -> bool:
        return (
            self._applied
            and not self._frozen
            and self._freeze_observer_epoch is not None
            and epoch >= self._freeze_observer_epoch
        )

    def _check_quantization(self, module: Module, epoch: float) -> None:
        if not self._applied and (self.start_epoch == -1 or epoch >= self.start_epoch):
            self._plan = qat.quantize_model(
                module,
                weight_strategy=self._weight_strategy,
                quantize_matmuls=self._quantize_matmuls,
                quantize_embeddings=self._quantize_embeddings,
                exclude=self._exclude,
            )
            if self._plan.num_quantized == 0:
                raise RuntimeError(
                    f"!{_NAME}: nothing to quantize in {type(module).__name__} "
                    f"(exclude={self._exclude}); check the recipe key 'exclude'"
                )
            self._weights = qat.quantized_weights(module)
            self._masks = None
            self._applied = True
            _LOGGER.info(
                "!%s: INT8 fake quantization on %d linear layers, %d attention matmuls, %d embeddings "
                "(epoch %s)",
                _NAME,
                len(self._plan.linears),
                len(self._plan.matmuls),
                len(self._plan.embeddings),
                epoch,
            )
        if self._freeze_pending(epoch) or (self._applied and math.isinf(epoch) and not self._frozen):
            qat.freeze_observers(module)
            self._frozen = True
