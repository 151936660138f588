"""``!EpochRangeModifier``, ``!LearningRateFunctionModifier``, ``!SetLearningRateModifier``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    StepContext,
)
from obert_modifiers.native.recipe import PlannedModifier, lr_at

if TYPE_CHECKING:
    pass

_LOGGER = logging.getLogger(__name__)


class EpochRange(NativeModifier):
    """``!EpochRangeModifier``: only sets the epochs trained (the plan's ``max_epochs``)."""


class LearningRateFunction(NativeModifier):
    """``!LearningRateFunctionModifier``: the rate :func:`~obert_modifiers.native.recipe.lr_at`
    gives, set at every optimizer step within ``[start_epoch, end_epoch]``."""

    update_frequency = -1.0

    def update(self, ctx: StepContext) -> None:
        rate = lr_at(self.params, ctx.epoch, ctx.steps_per_epoch)
        _set_lr(ctx.optimizer, rate, self.params.param_groups)


class SetLearningRate(NativeModifier):
    """``!SetLearningRateModifier``: one rate from ``start_epoch`` on (set once)."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False

    def update_ready(self, epoch: float) -> bool:
        return not self.applied and (
            self.start_epoch < 0 or (self.start_epoch - epoch) < 2.220446049250313e-16
        )

    def update(self, ctx: StepContext) -> None:
        if self.params.learning_rate is not None:
            _set_lr(ctx.optimizer, self.params.learning_rate, self.params.param_groups)
        self.applied = True

    def state_dict(self) -> dict:
        return {**super().state_dict(), "applied": self.applied}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.applied = bool(state.get("applied", False))


def _set_lr(optimizer: torch.optim.Optimizer | None, rate: float, groups: Sequence[int] | None) -> None:
    if optimizer is None:
        return
    for index, group in enumerate(optimizer.param_groups):
        if not groups or index in groups:
            group["lr"] = rate
