"""What every native modifier shares: SparseML's schedule (``start_pending``, ``end_pending``,
``update_ready``), the step context, the data source, parameter lookup and the error type."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obert_modifiers.errors import ObertError
from obert_modifiers.native.recipe import PlannedModifier

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


ALL_PRUNABLE = ("__ALL__", "__ALL_PRUNABLE__")


class RecipeRunError(ObertError, RuntimeError):
    """A recipe cannot run on this model or trainer; the message names the recipe key and why."""


def find_params(
    model: nn.Module, patterns: Sequence[str], tag: str, key: str = "params"
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for the recipe's names or ``re:`` patterns, in module order, as SparseML's
    ``get_named_layers_and_params_by_regex`` finds them (``re.match`` on ``layer.param``; each
    layer's own parameters). ``__ALL_PRUNABLE__``: every Linear / Embedding / ConvNd weight. A name
    or pattern that matches no parameter is an error naming it (SparseML silently skips it)."""
    if any(p in ALL_PRUNABLE for p in patterns):
        kinds = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
        return [(f"{name}.weight", m.weight) for name, m in model.named_modules() if isinstance(m, kinds)]
    found: list[tuple[str, nn.Parameter]] = []
    hits = dict.fromkeys(patterns, 0)
    for layer_name, layer in model.named_modules():
        for param_name, param in layer.named_parameters(recurse=False):
            full = f"{layer_name}.{param_name}" if layer_name else param_name
            matched = [p for p in patterns if (re.match(p[3:], full) if p.startswith("re:") else full == p)]
            for p in matched:
                hits[p] += 1
            if matched:
                found.append((full, param))
    missing = [p for p, count in hits.items() if count == 0]
    if missing:
        example = next(iter(n for n, _ in model.named_parameters() if n.endswith(".weight")), "?")
        raise RecipeRunError(
            f"!{tag}: recipe key '{key}': {missing[0]!r} matches no parameter of {type(model).__name__} "
            f"(names look like {example!r}; docs/native.md lists each family's patterns)"
        )
    return found


# --------------------------------------------------------------------------------------------
# what the modifiers get from the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class GradientSource:
    """Training batches for the modifiers that need data (oBERT's gradients, importance layer drop):
    ``batches(batch_size, generator)`` yields model inputs (with labels) forever, shuffled with
    ``generator``; ``loss(outputs)`` is the training loss of one batch."""

    batches: Callable[[int | None, torch.Generator | None], Iterator[dict]]
    loss: Callable[[Any], torch.Tensor] = lambda outputs: (
        outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
    )
    seed: int = 0


@dataclass
class StepContext:
    """What a modifier gets at an optimizer step (SparseML's ``update(module, optimizer, epoch,
    steps_per_epoch)``), plus the runner for the data and the transformers hooks it holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    epoch: float
    step: int
    steps_per_epoch: int
    runner: RecipeRunner


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# --------------------------------------------------------------------------------------------
# one class per recipe tag
# --------------------------------------------------------------------------------------------


class NativeModifier:
    """SparseML's ``ScheduledModifier`` schedule (``start_pending``/``end_pending``/``update_ready``)
    and lifecycle hooks; a subclass overrides what its tag does."""

    update_frequency: float | None = None  # ScheduledUpdateModifier: -1 every step, > 0 every N epochs

    def __init__(self, planned: PlannedModifier):
        self.planned = planned
        self.params = planned.params
        self.tag = planned.tag
        self.start_epoch = planned.start_epoch
        self.end_epoch = planned.end_epoch
        self.started = False
        self.ended = False
        self.last_update_epoch = -1.0

    # SparseML's schedule ------------------------------------------------------------------
    def start_pending(self, epoch: float) -> bool:
        return (
            not self.started
            and not self.ended
            and (epoch >= self.start_epoch >= 0.0 or self.start_epoch == -1.0)
        )

    def end_pending(self, epoch: float) -> bool:
        return not self.ended and self.started and epoch >= self.end_epoch >= 0.0

    def update_ready(self, epoch: float) -> bool:
        ready = self.start_pending(epoch) or self.end_pending(epoch)
        if self.update_frequency is not None:
            ready = ready or (
                self.started
                and epoch > self.start_epoch
                and not self.ended
                and (
                    self.update_frequency == -1.0
                    or (
                        self.last_update_epoch >= 0.0
                        and epoch >= self.last_update_epoch + self.update_frequency
                    )
                )
            )
        return ready

    def scheduled_update(self, ctx: StepContext) -> None:
        self.update(ctx)
        self.last_update_epoch = ctx.epoch
        if self.start_pending(ctx.epoch):
            self.started = True
        if self.end_pending(ctx.epoch):
            self.ended = True

    # hooks ---------------------------------------------------------------------------------
    def bind(self, runner: RecipeRunner) -> None:
        """The model is final for this modifier's purposes (after structure): find parameters."""

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        """Before the optimizer exists (SparseML's ``apply_structure``)."""

    def update(self, ctx: StepContext) -> None:
        pass

    def pre_step(self, ctx: StepContext) -> None:
        pass

    def post_step(self, ctx: StepContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {"started": self.started, "ended": self.ended, "last_update_epoch": self.last_update_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.started = bool(state.get("started", False))
        self.ended = bool(state.get("ended", False))
        self.last_update_epoch = float(state.get("last_update_epoch", -1.0))
