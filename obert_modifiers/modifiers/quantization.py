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

from sparseml.optim import BaseModifier
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledModifier
from sparseml.sparsification import SparsificationTypes
from torch.nn import Module
from torch.optim.optimizer import Optimizer

from obert_modifiers.algorithms import quantization as qat
from obert_modifiers.modifiers._base import recipe_properties, store_recipe
from obert_modifiers.params import OBertQuantizationParams, validate_recipe

__all__ = ["OBertQuantizationModifier"]

_LOGGER = logging.getLogger(__name__)
_NAME = "OBertQuantizationModifier"


@PyTorchModifierYAML()
@recipe_properties(OBertQuantizationParams, settable=("freeze_observer_epoch",))
class OBertQuantizationModifier(ScheduledModifier):
    """Quantization-aware training to INT8 for BERT, keeping pruned weights at exactly zero.

    Recipe keys (:class:`~obert_modifiers.params.OBertQuantizationParams`):

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

    def __init__(self, **recipe: Any):
        params = validate_recipe(OBertQuantizationParams, recipe)
        store_recipe(self, params)
        super().__init__(start_epoch=params.start_epoch, end_epoch=params.end_epoch, end_comparator=-1)
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
