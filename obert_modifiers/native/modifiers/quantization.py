"""``!OBertQuantizationModifier``: INT8 quantization-aware training."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from obert_modifiers.algorithms import quantization as qat
from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    RecipeRunError,
    StepContext,
)
from obert_modifiers.native.recipe import PlannedModifier

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


def _broadcast_quantizers(model: nn.Module) -> None:
    """Under torch.distributed, rank 0's scales and zero points on every rank once the ranges are
    frozen (each rank's observers saw other batches), so every rank holds the same model."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for fake_quant in qat.fake_quantizers(model):
        for buffer in fake_quant.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


class Quantization(NativeModifier):
    """``!OBertQuantizationModifier``: fake-quantized Linear / Embedding layers (shared parameters), the
    attention matmuls through transformers' attention-function registry (:mod:`.attention`, set by the
    trainer as ``runner.quantize_attention``), observers frozen at ``freeze_observer_epoch``, sparse
    weights kept sparse (masks taken at the first QAT step)."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False
        self.frozen = False
        self.plan: qat.QuantizationPlan | None = None
        self.weights: dict[str, nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] | None = None

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.start_epoch <= 0:
            self.quantize(model, runner)
            self.started = True

    def quantize(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.applied:
            return
        p = self.params
        self.plan = qat.quantize_model(
            model,
            weight_strategy=p.weight_strategy,
            quantize_matmuls=False,
            quantize_embeddings=p.quantize_embeddings,
            exclude=p.exclude,
        )
        if p.quantize_matmuls and runner.quantize_attention is not None:
            self.plan.matmuls += runner.quantize_attention(model, p.exclude)
        if self.plan.num_quantized == 0:
            raise RecipeRunError(
                f"!{self.tag}: nothing to quantize in {type(model).__name__} "
                f"(recipe key 'exclude' = {p.exclude})"
            )
        self.weights = qat.quantized_weights(model)
        self.masks = None
        self.applied = True
        _LOGGER.info(
            "!%s: INT8 fake quantization on %d linear layers, %d attention matmuls, %d embeddings",
            self.tag,
            len(self.plan.linears),
            len(self.plan.matmuls),
            len(self.plan.embeddings),
        )

    def _freeze_pending(self, epoch: float) -> bool:
        freeze = self.params.freeze_observer_epoch
        return self.applied and not self.frozen and freeze is not None and epoch >= freeze

    def update_ready(self, epoch: float) -> bool:
        return super().update_ready(epoch) or self._freeze_pending(epoch)

    def update(self, ctx: StepContext) -> None:
        if not self.applied and (self.start_epoch == -1 or ctx.epoch >= self.start_epoch):
            self.quantize(ctx.model, ctx.runner)
        if self._freeze_pending(ctx.epoch):
            qat.freeze_observers(ctx.model)
            _broadcast_quantizers(ctx.model)
            self.frozen = True
            ctx.runner.metrics["qat_observers_frozen"] = 1.0
            _LOGGER.info("!%s: observers frozen at epoch %.4g", self.tag, ctx.epoch)

    def pre_step(self, ctx: StepContext) -> None:
        if not self.applied:
            return
        if self.masks is None:  # taken at the first QAT step, after a resume loaded the weights
            self.masks = qat.weight_masks(self.weights)
        qat.mask_gradients(self.weights, self.masks)

    def post_step(self, ctx: StepContext) -> None:
        if self.applied and self.masks:
            qat.apply_masks(self.weights, self.masks)

    def state_dict(self) -> dict:
        masks = {n: m.cpu().clone() for n, m in (self.masks or {}).items()}
        return {
            **super().state_dict(),
            "applied": self.applied,
            "frozen": self.frozen,
            "masks": masks if self.masks is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.frozen = bool(state.get("frozen", False))
        masks = state.get("masks")
        if self.applied and masks is not None:
            self.masks = {n: m.to(self.weights[n].device).bool() for n, m in masks.items()}
