"""The lifecycle of a recipe plan on a training loop, without SparseML (pure torch, no transformers).

:class:`RecipeRunner` drives the modifiers of a :class:`~obert_modifiers.native.recipe.RecipePlan`
with the calls and epochs of SparseML's ``ScheduledOptimizer`` step wrapper, so a recipe does the
same thing at the same optimizer step on both stacks:

- ``steps_per_epoch`` is SparseML's: ``ceil(len(train_dataset) / (per_device_batch * world *
  gradient_accumulation))`` (:func:`sparseml_steps_per_epoch`); the epoch at optimizer step ``n``
  (counted from 0) is ``n // steps_per_epoch + (n % steps_per_epoch) / steps_per_epoch``.
- :meth:`RecipeRunner.apply_structure` runs before the optimizer exists (SparseML's
  ``apply_structure``): layer drop and QAT that start at epoch 0 (or -1).
- before every optimizer step (after the step's backward and gradient clipping):
  :meth:`~RecipeRunner.before_optimizer_step` runs each modifier's scheduled update (a pruning step,
  the recipe's learning rate, QAT start, observer freeze, a later layer drop) when SparseML's
  ``update_ready`` rule says so, then their ``optimizer_pre_step`` (gradients of pruned weights
  zeroed); after it, :meth:`~RecipeRunner.after_optimizer_step` re-applies the masks and counts the
  step.
- the distillation loss (:meth:`RecipeRunner.distillation_loss`) at the trainer's epoch, as
  SparseML's trainer passes ``state.epoch`` to ``loss_update``.

Each recipe tag has one small class in :mod:`obert_modifiers.native.modifiers` (lifecycle only,
one file per tag); the math is in :mod:`obert_modifiers.algorithms`. Their state (masks, pruning
steps done, flags) is :meth:`RecipeRunner.state_dict`, saved with every checkpoint so that a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from obert_modifiers.algorithms.sparsity import epoch_from_steps
from obert_modifiers.native.modifiers import (
    MODIFIERS,
    Distillation,
    GradientSource,
    LayerDrop,
    LearningRateFunction,
    Masked,
    NativeModifier,
    OBertPruning,
    Quantization,
    RecipeRunError,
    SetLearningRate,
    StepContext,
    ZipLMPruning,
    find_params,
)
from obert_modifiers.native.recipe import RecipePlan

__all__ = [
    "GradientSource",
    "NativeModifier",
    "OBertPruning",
    "RecipeRunner",
    "RecipeRunError",
    "find_params",
    "sparseml_steps_per_epoch",
]

_LOGGER = logging.getLogger(__name__)


def sparseml_steps_per_epoch(
    num_samples: int, per_device_batch_size: int, world_size: int, accumulation: int
) -> int:
    """Optimizer steps per epoch as SparseML's trainer computes them (``create_optimizer``)."""
    total = per_device_batch_size * max(world_size, 1) * accumulation
    return max(math.ceil(num_samples / total), 1)


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeRunner:
    """Runs ``plan`` on ``model``: call :meth:`apply_structure` before the optimizer exists,
    :meth:`before_optimizer_step` / :meth:`after_optimizer_step` around every optimizer step, and
    :meth:`distillation_loss` in the loss. ``gradients`` feeds the modifiers that need data;
    ``quantize_attention(model, exclude) -> [names]`` quantizes the attention matmuls (set by the
    transformers adapter)."""

    plan: RecipePlan
    model: nn.Module
    steps_per_epoch: int = 1
    gradients: GradientSource | None = None
    quantize_attention: Callable[[nn.Module, Sequence[str]], list[str]] | None = None
    output_dir: str | None = None  # where ZipLM family members go
    tokenizer: Any = None  # saved with them
    record_attention: Callable[[nn.Module], None] | None = None
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the latest of each, for the trainer's log
    lr_trace: list[tuple[int, float, float]] = field(default_factory=list)  # (step, epoch, lr of group 0)
    modifiers: list[NativeModifier] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [m.tag for m in self.plan.modifiers if m.tag not in MODIFIERS]
        if unknown:
            raise RecipeRunError(
                f"{self.plan.source}: '!{unknown[0]}' does not run on the native adapter yet (it runs "
                f"{', '.join('!' + t for t in MODIFIERS)}); train this recipe on the SparseML stack"
            )
        self.modifiers = [MODIFIERS[m.tag](m) for m in self.plan.modifiers]
        self.structured = False

    # queries ------------------------------------------------------------------------------
    @property
    def epoch(self) -> float:
        return epoch_from_steps(self.step, self.steps_per_epoch)

    def of_type(self, kind: type) -> list:
        return [m for m in self.modifiers if isinstance(m, kind)]

    @property
    def has_lr_modifiers(self) -> bool:
        return bool(self.of_type(LearningRateFunction) or self.of_type(SetLearningRate))

    @property
    def has_distillation(self) -> bool:
        return bool(self.of_type(Distillation))

    def prepare_distillation(self, teacher: nn.Module) -> None:
        """Pair layers and attach the hidden-state hooks before training, so the first step's
        forward pass is already recorded."""
        for modifier in self.of_type(Distillation):
            modifier.hook(self.model, teacher)

    def wants_attentions(self, epoch: float | None) -> bool:
        """Whether the student must return its attention maps at ``epoch``."""
        return any(d.wants_attentions and d.active(epoch) for d in self.of_type(Distillation))

    # lifecycle ----------------------------------------------------------------------------
    def apply_structure(self) -> None:
        """Structure that exists from the start (layer drop, QAT at epoch 0), then the parameters
        each modifier works on. Call before the optimizer is created."""
        if self.structured:
            return
        for modifier in self.modifiers:
            modifier.apply_structure(self.model, self)
        self.bind()
        self.structured = True

    def bind(self) -> None:
        for modifier in self.modifiers:
            modifier.bind(self)

    def _context(self, optimizer) -> StepContext:
        return StepContext(self.model, optimizer, self.epoch, self.step, self.steps_per_epoch, self)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        ctx = self._context(optimizer)
        for modifier in self.modifiers:
            if modifier.update_ready(ctx.epoch):
                modifier.scheduled_update(ctx)
                if isinstance(modifier, LayerDrop | Quantization | ZipLMPruning):
                    self.bind()
        for modifier in self.modifiers:
            modifier.pre_step(ctx)
        if optimizer is not None:
            self.lr_trace.append((self.step, ctx.epoch, float(optimizer.param_groups[0]["lr"])))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        ctx = self._context(optimizer)
        for modifier in self.modifiers:
            modifier.post_step(ctx)
        self.step += 1

    def distillation_loss(
        self,
        task_loss: torch.Tensor,
        student_outputs: Any,
        teacher: nn.Module,
        teacher_inputs: Mapping,
        epoch: float | None,
    ) -> torch.Tensor:
        """The loss with every active distillation modifier applied in turn (SparseML's
        ``loss_update`` chain); ``task_loss`` unchanged when none is active."""
        loss = task_loss
        for modifier in self.of_type(Distillation):
            if not modifier.active(epoch):
                continue
            modifier.hook(self.model, teacher)
            extra = {}
            if modifier.wants_attentions:
                if self.record_attention is not None:
                    self.record_attention(teacher)
                extra["output_attentions"] = True
            with torch.no_grad():
                teacher_outputs = teacher(**teacher_inputs, **extra)
            loss = modifier.loss(
                self, loss, student_outputs, teacher_outputs, teacher_inputs.get("attention_mask")
            )
        return loss

    def finalize(self) -> None:
        for modifier in self.of_type(Masked):
            if modifier.masks_active:
                modifier.apply_masks()
        for modifier in self.of_type(ZipLMPruning):
            if len(modifier.params.speedup_targets) > 1 and modifier.steps_done == len(modifier.targets):
                modifier.save_member(self.model, self)

    # state (checkpoints) ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "modifiers": [{"tag": m.tag, **m.state_dict()} for m in self.modifiers],
            "lr_trace": list(self.lr_trace),
        }

    def structure_state(self, state: Mapping) -> None:
        """Re-create what a checkpoint's state has built (QAT modules, a later layer drop) before
        its weights load."""
        for modifier, saved in zip(self.modifiers, state.get("modifiers", []), strict=False):
            if isinstance(modifier, Quantization) and saved.get("applied"):
                modifier.quantize(self.model, self)
            if isinstance(modifier, ZipLMPruning) and saved.get("structure"):
                from obert_modifiers.algorithms import shrink

                shrink.apply_structure(self.model, saved["structure"])
                modifier.steps_done = int(saved.get("steps_done", 0))
            if isinstance(modifier, LayerDrop) and saved.get("applied") and not modifier.applied:
                modifier.planned.params = modifier.params.model_copy(
                    update={"layers": saved["layers"], "num_layers": saved["num_layers"]}
                )
                modifier.params = modifier.planned.params
                modifier._apply(self.model, self)
        self.bind()

    def load_state_dict(self, state: Mapping) -> None:
        saved = state.get("modifiers", [])
        tags = [s.get("tag") for s in saved]
        if tags != [m.tag for m in self.modifiers]:
            raise RecipeRunError(
                f"{self.plan.source}: the checkpoint was trained with other modifiers ({tags}); "
                "resume with its recipe"
            )
        for modifier, entry in zip(self.modifiers, saved, strict=True):
            modifier.load_state_dict(entry)
        self.step = int(state.get("step", 0))
        self.lr_trace = [tuple(x) for x in state.get("lr_trace", [])]


def deep_copy_model(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
